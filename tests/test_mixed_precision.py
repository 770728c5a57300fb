"""Our loss scaler against torch's GradScaler and DeepSpeed's rule worked by hand; the two stability fixes and the
max-score diagnostic against fp64 math."""
import json
import math
from dataclasses import replace

import pytest
import torch

import checkpoint
from conftest import tiny_run
from configs import LossScaleConfig
from model import GPT, CausalSelfAttention, GPTConfig, naive_attention
from train import DynamicLossScaler, train

# a scripted sequence of overflow (True) / clean (False) steps with long clean runs, bursts and lone overflows
SCRIPT = [False] * 7 + [True] + [False] * 3 + [True, True, True] + [False] * 9 + [True, False, True] + [False] * 12


def torch_gradscaler_trajectory(script, init, growth_interval):
    """Drive torch.amp.GradScaler through the script by planting inf gradients; record scale and skips."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=growth_interval)
    trajectory = []
    for overflow in script:
        before = param.detach().clone()
        scaler.scale(param.sum()).backward()
        if overflow:
            param.grad[1] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        trajectory.append((scaler.get_scale(), torch.equal(before, param.detach())))
    return trajectory


def our_trajectory(script, **cfg):
    """Our scaler through the script: (scale after the step, step skipped) per step."""
    scaler = DynamicLossScaler(LossScaleConfig(**cfg), enabled=True)
    trajectory = []
    for overflow in script:
        skipped = scaler.update(overflow)
        trajectory.append((scaler.scale, skipped))
    return trajectory


def test_hysteresis_1_matches_torch_gradscaler():
    ours = our_trajectory(SCRIPT, init_scale=1024.0, growth_interval=4, hysteresis=1)
    assert ours == torch_gradscaler_trajectory(SCRIPT, 1024.0, 4)


# SCRIPT through DeepSpeed's rule (runtime/fp16/loss_scaler.py, consecutive_hysteresis=False), worked out by hand:
# init 1024, window 4, hysteresis 2. Every overflow is skipped; the first overflow after a growth only spends
# hysteresis (2 → 1), later ones halve the scale; only a growth refills hysteresis to 2.
#   steps 0-6   clean ×7      grow after 4 clean (step 3): 1024 → 2048
#   step  7     overflow      hysteresis 2 → 1, scale stays 2048              (skipped)
#   steps 8-10  clean ×3      3 < 4: no growth
#   steps 11-13 overflow ×3   hysteresis is 1: 2048 → 1024 → 512 → 256     (skipped)
#   steps 14-22 clean ×9      grow at the 4th and 8th: 256 → 512 (step 17) → 1024 (step 21); hysteresis back to 2
#   step  23    overflow      hysteresis 2 → 1, scale stays 1024              (skipped)
#   step  24    clean
#   step  25    overflow      hysteresis 1: 1024 → 512                        (skipped)
#   steps 26-37 clean ×12     grow at steps 29, 33, 37: 1024, 2048, 4096
DEEPSPEED_SCALES = ([1024.0] * 3 + [2048.0] * 4 + [2048.0] + [2048.0] * 3 + [1024.0, 512.0, 256.0] + [256.0] * 3
                    + [512.0] * 4 + [1024.0] * 2 + [1024.0] + [1024.0] + [512.0] + [512.0] * 3 + [1024.0] * 4
                    + [2048.0] * 4 + [4096.0])
DEEPSPEED_SKIPPED_STEPS = [7, 11, 12, 13, 23, 25]


def test_hysteresis_2_matches_deepspeed_worked_by_hand():
    ours = our_trajectory(SCRIPT, init_scale=1024.0, growth_interval=4, hysteresis=2)
    assert [scale for scale, _ in ours] == DEEPSPEED_SCALES
    assert [step for step, (_, skipped) in enumerate(ours) if skipped] == DEEPSPEED_SKIPPED_STEPS


def test_bf16_and_fp32_bypass_the_scaler():
    scaler = DynamicLossScaler(LossScaleConfig(), enabled=False)
    assert scaler.scale == 1.0 and scaler.update(True) is False and scaler.scale == 1.0


def test_overflow_at_min_scale_aborts_clearly():
    scaler = DynamicLossScaler(LossScaleConfig(init_scale=2.0, min_scale=1.0, hysteresis=1), enabled=True)
    scaler.update(True)  # 2 → 1
    with pytest.raises(FloatingPointError, match="overflow at the minimum loss scale 1"):
        scaler.update(True)


def test_too_many_skips_in_a_row_abort_clearly():
    scaler = DynamicLossScaler(LossScaleConfig(max_consecutive_skips=3, hysteresis=1), enabled=True)
    scaler.update(True), scaler.update(True)
    with pytest.raises(FloatingPointError, match="3 overflowing steps in a row"):
        scaler.update(True)


def test_a_skipped_step_leaves_weights_and_adamw_untouched(tiny_data, tmp_path):
    """Step 1 of a real fp16 run with an absurd initial scale overflows; the state equals step 0's bitwise."""
    cfg = tiny_run(tiny_data, tmp_path / "run", precision="fp16", max_steps=1, eval_interval=1,
                   loss_scale=LossScaleConfig(init_scale=2.0**40, hysteresis=1),
                   checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, schedule="mistral"))
    train(cfg)
    before = checkpoint.load(checkpoint.step_dir(tmp_path / "run", 0))
    after = checkpoint.load(checkpoint.step_dir(tmp_path / "run", 1))
    assert after["scaler"]["skipped_steps"] == 1 and after["scaler"]["scale"] == 2.0**39 and after["opt_step"] == 0
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name
    assert after["optimizer"]["state"] == {} == before["optimizer"]["state"]  # AdamW never saw the batch
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_steps"] == 1 and row["loss_scale"] == 2.0**39
    assert not math.isfinite(row["grad_norm"]) and not math.isfinite(row["grad_norm_clipped"])


def test_an_overflowed_norm_is_logged_as_it_is_not_as_the_clip(tiny_data, tmp_path):
    # a skipped step's norm is nothing clipping tamed: min(inf, clip) would log the clip value, 1.0
    from types import SimpleNamespace

    from model import GPT
    from train import train_row

    cfg = tiny_run(tiny_data, tmp_path)
    out = SimpleNamespace(grad_norm=torch.tensor(float("inf")), loss=1.0, times=(0.0, 0.0, 0.0), stats=None)
    row = train_row(1, out, 0, cfg, SimpleNamespace(scale=1.0, skipped_steps=1), 1.0, 1.0, 0.0, 0.1, GPT(cfg.model),
                    SimpleNamespace(device=torch.device("cpu"), world_size=1))
    assert math.isinf(row["grad_norm_clipped"])  # (a nan norm needs no care: min(nan, clip) is nan)


# ----------------------------------------------------------------------------- the stability fixes

def overflowing_qkv(seed=0):
    """q, k whose raw dot products reach ~1e5 (> fp16's 65504), v ordinary. (B, nh, T, hs) = (2, 2, 16, 64)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 16, 64, generator=gen) for _ in range(3))
    direction = torch.randn(64, generator=gen)
    q, k = q + 45 * direction, k + 45 * direction  # a shared direction: large, aligned scores
    assert (q.double() @ k.double().transpose(-2, -1)).abs().max() > 65504
    return q, k, v


def fp64_attention(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_naive_without_upcast_overflows_in_fp16_and_upcast_fixes_it():
    q, k, v = overflowing_qkv()
    q16, k16, v16 = q.half(), k.half(), v.half()
    with torch.autocast("cpu", dtype=torch.float16):
        broken = naive_attention(q16, k16, v16, 0.125, upcast=False)
        fixed = naive_attention(q16, k16, v16, 0.125, upcast=True)
    assert not torch.isfinite(broken).all()
    assert torch.isfinite(fixed).all()
    assert rel_err(fixed, fp64_attention(q16, k16, v16, 0.125)) < 2e-3


@pytest.mark.parametrize("upcast", [True, False])
def test_sdpa_path_stays_finite_and_matches_fp64(upcast):
    """torch's SDPA accumulates QKᵀ in fp32 inside its kernels, so this path cannot show the overflow
    even with upcast off; with either setting it must match fp64."""
    q, k, v = overflowing_qkv(1)
    cfg = GPTConfig(n_embd=128, n_head=2, block_size=16, attn_impl="sdpa", upcast_attn=upcast,
                    scale_attn_by_layer_idx=False)
    attn = CausalSelfAttention(cfg, layer_idx=0)
    q16, k16, v16 = q.half(), k.half(), v.half()
    with torch.autocast("cpu", dtype=torch.float16):
        out, _ = attn._attend(q16, k16, v16, diagnose=False)
    assert torch.isfinite(out).all()
    assert rel_err(out, fp64_attention(q16, k16, v16, attn.scale)) < 2e-3


def fp64_max_scores(model: GPT, idx: torch.Tensor, by_layer: bool) -> list[float]:
    """max |q·k| / √head_size (/ layer number, 1-based, when by_layer) over the causal entries of every layer, in
    float64 from each attention's input (captured by a hook) and its c_attn weights."""
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda _, args: inputs.append(args[0].double()))
             for block in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    C, nh = model.config.n_embd, model.config.n_head
    maxima = []
    for i, (x, block) in enumerate(zip(inputs, model.transformer.h)):
        q, k, _ = (x @ block.attn.c_attn.weight.double().T + block.attn.c_attn.bias.double()).split(C, dim=-1)
        q, k = (t.unflatten(-1, (nh, C // nh)).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // nh) / (i + 1 if by_layer else 1)  # (B, nh, T, T)
        maxima.append(scores.tril().abs().max().item())  # tril: the causal entries (the rest set to 0)
    return maxima


@pytest.mark.parametrize("by_layer", [True, False])
@pytest.mark.parametrize("attn_impl", ["naive", "sdpa"])
def test_max_score_diagnostic_matches_fp64_scores(attn_impl, by_layer):
    """The per-layer max |attention score| the trainer logs, with and without layer scaling, against fp64."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=4, n_head=4, n_embd=64, attn_impl=attn_impl,
                          scale_attn_by_layer_idx=by_layer)).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # scores well away from 0, so a wrong divisor shows
            block.attn.c_attn.weight.normal_(0.0, 0.3)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, _, stats = model(idx, diagnose=True)
    logged = [float(score) for score in stats["attn_max_score"]]
    assert logged == pytest.approx(fp64_max_scores(model, idx, by_layer), rel=1e-5)
    assert logged != pytest.approx(fp64_max_scores(model, idx, not by_layer), rel=1e-2)  # the check can tell
