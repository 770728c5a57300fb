"""Our loss scaler against torch's GradScaler and DeepSpeed's rule; the two stability fixes against fp64 math."""
import json
from dataclasses import replace

import pytest
import torch

import checkpoint
from conftest import tiny_run
from configs import LossScaleConfig
from model import CausalSelfAttention, GPTConfig, naive_attention
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


class DeepSpeedRule:
    """DeepSpeed's DynamicLossScaler.update_scale (runtime/fp16/loss_scaler.py, consecutive_hysteresis=False),
    transcribed: the documented behaviour our hysteresis follows."""

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = init_scale, 0, -1
        self.scale_window, self.min_scale = scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            self.cur_hysteresis = self.delayed_shift
            self.cur_scale *= 2.0
        self.cur_iter += 1


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


def test_hysteresis_2_matches_deepspeed():
    reference = DeepSpeedRule(init_scale=1024.0, scale_window=4, min_scale=1.0, delayed_shift=2)
    expected = []
    for overflow in SCRIPT:
        reference.update_scale(overflow)
        expected.append((reference.cur_scale, overflow))  # DeepSpeed skips every overflowing step
    assert our_trajectory(SCRIPT, init_scale=1024.0, growth_interval=4, hysteresis=2) == expected


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


@pytest.mark.parametrize("layer_idx", [0, 1, 4, 11])
def test_layer_scaling_divides_the_scores_by_the_layer_number(layer_idx):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    scores = {}
    for flag in (True, False):
        cfg = GPTConfig(n_embd=64, n_head=4, block_size=16, attn_impl="naive", scale_attn_by_layer_idx=flag)
        torch.manual_seed(1)
        attn = CausalSelfAttention(cfg, layer_idx)
        _, max_score = attn(x, diagnose=True)
        scores[flag] = max_score.item()
    assert scores[True] / scores[False] == pytest.approx(1.0 / (layer_idx + 1), rel=1e-6)
