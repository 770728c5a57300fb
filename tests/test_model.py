"""model.py against independent references: Hugging Face's GPT-2, fp64 attention math, known parameter counts."""
import math

import pytest
import torch

from model import GPT, GPTConfig, naive_attention

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides):
    base = dict(block_size=32, vocab_size=101, n_layer=3, n_head=4, n_embd=32, dropout=0.0)
    base.update(overrides)
    return GPTConfig(**base)


def hf_twin(cfg: GPTConfig, both_fixes: bool):
    """A randomly initialised HF GPT2LMHeadModel with the same shape and the matching flags."""
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        reorder_and_upcast_attn=both_fixes, scale_attn_by_inverse_layer_idx=both_fixes)
    hf_cfg._attn_implementation = "eager"  # the path that honours reorder_and_upcast_attn
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def copy_hf_into_gust(hf, model):
    """HF's Conv1D stores (in, out); our nn.Linear stores (out, in): transpose those four."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = model.state_dict()
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            if name not in ours:
                continue  # HF's non-parameter buffers (masks), if any
            source = tensor.t() if name.endswith(conv1d) else tensor
            ours[name][:source.size(0)].copy_(source)  # wte: gust's padding rows past HF's vocab_size stay 0


@pytest.mark.parametrize("both_fixes", [False, True])
@pytest.mark.parametrize("attn_impl", ["naive", "sdpa"])
def test_logits_match_huggingface(both_fixes, attn_impl):
    cfg = tiny_config(attn_impl=attn_impl, upcast_attn=both_fixes, scale_attn_by_layer_idx=both_fixes)
    hf, model = hf_twin(cfg, both_fixes), GPT(cfg).eval()
    copy_hf_into_gust(hf, model)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_naive_and_sdpa_agree():
    torch.manual_seed(0)
    naive, sdpa = GPT(tiny_config(attn_impl="naive")).eval(), GPT(tiny_config(attn_impl="sdpa")).eval()
    sdpa.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        assert (naive(idx)[0] - sdpa(idx)[0]).abs().max().item() < 1e-5


def test_naive_attention_matches_fp64_math():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    scale = 0.3
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores + torch.full((9, 9), float("-inf"), dtype=torch.float64).triu(1)
    expected = torch.softmax(scores, -1) @ v
    got = naive_attention(q.float(), k.float(), v.float(), scale, upcast=True)
    assert (got.double() - expected).abs().max().item() < 1e-5


def test_layer_scaling_divides_layer_i_scores_by_i():
    with_fix, without = GPT(tiny_config(n_layer=4)), GPT(tiny_config(n_layer=4, scale_attn_by_layer_idx=False))
    for i in range(4):
        ratio = with_fix.transformer.h[i].attn.scale / without.transformer.h[i].attn.scale
        assert ratio == pytest.approx(1.0 / (i + 1), rel=1e-12)
        assert without.transformer.h[i].attn.scale == pytest.approx(1 / math.sqrt(8), rel=1e-12)


@pytest.mark.parametrize("n_layer,n_head,n_embd,expected", [(12, 12, 768, 124_439_808), (24, 16, 1024, 354_823_168)])
def test_gpt2_parameter_counts_on_meta_device(n_layer, n_head, n_embd, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    assert abs(model.num_params() - expected) / expected < 0.01


def test_bad_head_count_names_the_flags():
    with pytest.raises(ValueError, match="--model.n-embd 30 is not divisible by --model.n-head 4"):
        GPTConfig(n_embd=30, n_head=4)


def test_generate_is_deterministic_for_a_seed():
    model = GPT(tiny_config()).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    outs = [model.generate(idx, 10, top_k=5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 11)
