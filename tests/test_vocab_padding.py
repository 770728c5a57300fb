"""The vocabulary padded to a multiple of 64 changes nothing a user sees: loss, logits and samples equal the
unpadded model's with the same weights; Hugging Face and --init-from see exactly vocab_size rows."""
import types
from dataclasses import replace

import pytest
import torch

import checkpoint
from configs import PRESETS, TrainConfig, to_json
from model import GPT, GPTConfig

SHAPE = dict(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def padded_and_unpadded():
    """The same weights in a model of 100 rows and one of 128, whose 28 extra rows hold large values:
    if any padding logit took probability mass, the two would disagree."""
    torch.manual_seed(0)
    unpadded = GPT(GPTConfig(**SHAPE, vocab_multiple=1)).eval()
    padded = GPT(GPTConfig(**SHAPE)).eval()
    state = unpadded.state_dict()
    with torch.no_grad():
        for name, tensor in padded.state_dict().items():
            tensor[:state[name].size(0)].copy_(state[name])
        padded.transformer.wte.weight[100:] = 5.0  # padding rows that would win every softmax if counted
    return unpadded, padded


def test_padded_sizes():
    assert GPTConfig().padded_vocab_size == 50304 and GPTConfig(vocab_size=4096).padded_vocab_size == 4096
    assert GPTConfig(vocab_multiple=1).padded_vocab_size == 50257
    assert GPT(GPTConfig(**SHAPE)).transformer.wte.weight.shape == (128, 32)
    with torch.device("meta"):  # GPT-2 Small's published count: padding rows are not parameters of the model
        assert GPT(GPTConfig()).num_params() == 124_439_808
    assert PRESETS["gpt2-small"][1].model.vocab_size == 50257  # the config keeps the tokenizer's size


def test_loss_logits_and_samples_equal_the_unpadded_models():
    unpadded, padded = padded_and_unpadded()
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert padded(idx)[0].shape == (2, 16, 100)
        assert torch.allclose(padded(idx)[0], unpadded(idx)[0], rtol=0, atol=1e-6)
        assert abs(padded(idx, targets)[1].item() - unpadded(idx, targets)[1].item()) < 1e-6
    prompt = torch.zeros(2, 1, dtype=torch.long)
    for top_k in (None, 5):
        samples = [m.generate(prompt, 20, temperature=1.5, top_k=top_k, generator=torch.Generator().manual_seed(3))
                   for m in (unpadded, padded)]
        assert torch.equal(samples[0], samples[1]) and samples[1].max() < 100


def test_hugging_face_export_and_import_hold_exactly_vocab_size_rows(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from hf_bridge import export_hf, import_hf

    _, padded = padded_and_unpadded()
    export_hf(padded, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.transformer.wte.weight.shape == (100, 32) and hf.config.vocab_size == 100
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, padded(idx)[0], rtol=0, atol=1e-5)
    imported = import_hf(tmp_path / "hf")
    assert imported.transformer.wte.weight.shape == (128, 32)
    assert (imported.transformer.wte.weight[100:] == 0).all()
    with torch.no_grad():
        assert torch.allclose(imported(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def save_weights(model: GPT, run_dir):
    state = {"model": model.state_dict(), "config": to_json(TrainConfig(model=model.config)), "step": 0}
    return checkpoint.save(run_dir, 0, state, keep=True, keep_last=0)


def test_init_from_fits_the_rows_and_resume_names_the_flag(tmp_path):
    from resume import check_model_shape, init_weights

    unpadded, padded = padded_and_unpadded()
    ckpt = save_weights(unpadded, tmp_path / "old")  # as a checkpoint from before the padding: 100 rows
    fresh = GPT(GPTConfig(**SHAPE)).eval()
    cfg = TrainConfig(model=fresh.config)
    init_weights(ckpt, cfg, fresh, types.SimpleNamespace(is_main=False))
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(fresh(idx)[0], unpadded(idx)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="holds 100 vocabulary rows.*resume with --model.vocab-multiple 1"):
        check_model_shape(checkpoint.load(ckpt), cfg, ckpt, same_padding=True)  # AdamW's moments hold 100 rows
    check_model_shape(checkpoint.load(ckpt), replace(cfg, model=unpadded.config), ckpt, same_padding=True)
