"""model.py against independent references: Hugging Face's GPT-2, fp64 attention math, the parameter-count formula,
and sampling against probabilities computed in the test."""
import math

import pytest
import torch

from model import GPT, GPTConfig, naive_attention


def tiny_config(**overrides):
    base = dict(block_size=32, vocab_size=101, n_layer=3, n_head=4, n_embd=32, dropout=0.0)
    base.update(overrides)
    return GPTConfig(**base)


def hf_twin(cfg: GPTConfig, both_fixes: bool):
    """A randomly initialised HF GPT2LMHeadModel with the same shape and the matching flags."""
    transformers = pytest.importorskip("transformers")
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


def fp64_attention_layer(attn, x, layer_number: int, by_layer: bool):
    """One attention sublayer written out in float64 from the module's weights: GPT-2's 1/√head_size, and with
    HF's scale_attn_by_inverse_layer_idx also 1/layer_number (1-based). x (B, T, C) → (B, T, C)."""
    B, T, C = x.shape
    nh = attn.n_head
    w_qkv, b_qkv = attn.c_attn.weight.double(), attn.c_attn.bias.double()  # (3C, C), (3C,)
    q, k, v = (x.double() @ w_qkv.T + b_qkv).split(C, dim=-1)
    q, k, v = (t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // nh) / (layer_number if by_layer else 1)
    future = torch.arange(T)[None, :] > torch.arange(T)[:, None]  # (T, T), True above the diagonal
    y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v  # (B, nh, T, hs)
    y = y.permute(0, 2, 1, 3).reshape(B, T, C)
    return y @ attn.c_proj.weight.double().T + attn.c_proj.bias.double()


@pytest.mark.parametrize("by_layer", [True, False])
@pytest.mark.parametrize("attn_impl", ["naive", "sdpa"])
def test_attention_layers_match_fp64_with_and_without_layer_scaling(attn_impl, by_layer):
    """Every layer of a 12-layer model against fp64 math: layer i (1-based) divides its scores by i only when asked."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=12, n_embd=64, attn_impl=attn_impl, scale_attn_by_layer_idx=by_layer)).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # GPT-2's init gives near-zero scores, where any scale looks alike
            block.attn.c_attn.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 16, 64)
    for i, block in enumerate(model.transformer.h):
        with torch.no_grad():
            got = block.attn(x)[0].double()  # (y, max_score): no diagnostics asked
        expected = fp64_attention_layer(block.attn, x, i + 1, by_layer)
        assert (got - expected).abs().max().item() < 1e-5, i
        if i > 0:  # the check can tell: the other scaling rule gives a clearly different output
            other = fp64_attention_layer(block.attn, x, i + 1, not by_layer)
            assert (other - expected).abs().max().item() > 1e-2, i


def gpt2_parameter_count(n_layer: int, n_embd: int, vocab_size: int = 50257, block_size: int = 1024) -> int:
    """GPT-2's parameters counted from the architecture: token and position embeddings (the output head is
    tied to the token embedding), per block two LayerNorms (gain + bias), qkv (C → 3C) and projection (C → C)
    with biases, the MLP (C → 4C → C) with biases; and the final LayerNorm."""
    C = n_embd
    per_block = 2 * (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return vocab_size * C + block_size * C + n_layer * per_block + 2 * C


@pytest.mark.parametrize("n_layer,n_head,n_embd,expected", [(12, 12, 768, 124_439_808), (24, 16, 1024, 354_823_168)])
def test_gpt2_parameter_counts_on_meta_device(n_layer, n_head, n_embd, expected):
    assert gpt2_parameter_count(n_layer, n_embd) == expected  # the published sizes: "124M" and "355M"
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    assert model.num_params() == expected


@pytest.mark.parametrize("n_layer,n_head,n_embd,expected", [(12, 12, 768, 124_439_808), (24, 16, 1024, 354_823_168)])
def test_gpt2_parameter_counts_match_huggingface(n_layer, n_head, n_embd, expected):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    assert hf.num_parameters() == expected  # HF counts the tied head once, as we do


def test_bad_head_count_names_the_flags():
    with pytest.raises(ValueError, match="--model.n-embd 30 is not divisible by --model.n-head 4"):
        GPTConfig(n_embd=30, n_head=4)


# ----------------------------------------------------------------------------- generate

def sampling_model() -> GPT:
    """A tiny model whose next-token distribution is far from uniform (GPT-2's init gives near-equal logits)."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(8.0)  # logits × 8: a spread of a few nats
    return model


def test_generate_is_deterministic_for_a_seed():
    model = sampling_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    outs = [model.generate(idx, 10, top_k=5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 11)


def test_generate_with_top_k_1_is_greedy_decoding_past_the_block_size():
    """top_k=1 leaves one token: generate must equal argmax decoding done here, one full forward per token,
    with the context cropped to the last block_size tokens (the prompt of 28 + 12 new runs past 32)."""
    model = sampling_model()
    prompt = torch.randint(0, 101, (2, 28), generator=torch.Generator().manual_seed(3))
    expected = prompt
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(expected[:, -32:])  # (B, T, vocab)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = model.generate(prompt, 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """softmax(logits / T) over the k largest logits, zero elsewhere, in float64. logits (vocab,)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_k is not None:
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[logits.argsort(descending=True)[:top_k]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def z_scores(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(count - N p) / √(N p (1 - p)) per token; tokens of probability 0 must have count 0 (z = inf otherwise)."""
    n = counts.sum().double()
    sd = (n * probs * (1 - probs)).sqrt()
    z = (counts.double() - n * probs).abs() / sd
    return torch.where(probs > 0, z, torch.where(counts > 0, math.inf, 0.0))


@pytest.mark.parametrize("temperature,top_k", [(0.8, 6), (1.6, None), (1.0, 3)])
def test_generate_samples_softmax_of_logits_over_temperature_within_top_k(temperature, top_k):
    """20,000 first tokens drawn at once (a batch of identical prompts) against the distribution computed here."""
    model = sampling_model()
    prompt = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        logits = model(prompt)[0][0, -1]  # (vocab,)
    n = 20_000
    drawn = model.generate(prompt.expand(n, -1), 1, temperature=temperature, top_k=top_k,
                           generator=torch.Generator().manual_seed(11))[:, -1]
    counts = torch.bincount(drawn, minlength=101)
    expected = reference_probs(logits, temperature, top_k)
    assert z_scores(counts, expected).max() < 5  # 5 σ: a sound sampler passes for almost every seed
    # and the check can tell: the distribution without temperature, or with one more token, is rejected
    assert z_scores(counts, reference_probs(logits, 1.0 if temperature != 1.0 else 2.0, top_k)).max() > 10
    wider = None if top_k is None else top_k + 1
    if wider is not None:
        assert z_scores(counts, reference_probs(logits, temperature, wider)).max() > 10
