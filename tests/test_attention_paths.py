"""Which attention path runs, and what it computes: the sdpa upcast path on a GPU keeps 16-bit inputs on fused
kernels only (forced on this CPU), "auto" follows configs' measured table, and attn_max_score means max |score|
(after scaling, before softmax) on every path — each against fp64 math written out here."""
import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import attention_cuda
import model
from conftest import ROOT
from model import FUSED_SDPA_BACKENDS, CausalSelfAttention, GPTConfig, pick_attn_impl, sdpa_attention


def overflowing_qkv(seed=0):
    """fp16 q, k whose raw dot products pass fp16's 65504, v ordinary. (B, nh, T, hs) = (2, 2, 16, 64)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 16, 64, generator=gen) for _ in range(3))
    direction = torch.randn(64, generator=gen)
    q, k = q + 45 * direction, k + 45 * direction
    assert (q.double() @ k.double().transpose(-2, -1)).abs().max() > 65504
    return q.half(), k.half(), v.half()


def fp64_attention(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


class SdpaSpy:
    """Records the backends each sdpa_kernel context allowed and the dtypes sdpa was called with."""

    def __init__(self, monkeypatch):
        self.backends, self.dtypes, real_kernel, real_sdpa = [], [], model.sdpa_kernel, F.scaled_dot_product_attention

        @contextmanager
        def kernel(backends, *args, **kwargs):
            self.backends.append(list(backends))
            with real_kernel(backends, *args, **kwargs):
                yield

        def sdpa(q, k, v, **kwargs):
            self.dtypes.append((q.dtype, k.dtype, v.dtype))
            return real_sdpa(q, k, v, **kwargs)

        monkeypatch.setattr(model, "sdpa_kernel", kernel)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


def test_upcast_on_the_gpu_path_keeps_16_bit_inputs_on_fused_kernels_only(monkeypatch):
    """The GPU branch, forced on this CPU: its flash kernel also accumulates fp16 inputs in fp32."""
    spy = SdpaSpy(monkeypatch)
    monkeypatch.setattr(model, "fused_sdpa_can_run", lambda q: True)  # what a CUDA device with fp16 q reports
    q, k, v = overflowing_qkv()
    with torch.autocast("cpu", dtype=torch.float16):
        y = sdpa_attention(q, k, v, 0.125, upcast=True)
    assert spy.dtypes == [(torch.float16,) * 3]  # no fp32 copies of q, k, v
    assert spy.backends == [FUSED_SDPA_BACKENDS] and torch.nn.attention.SDPBackend.MATH not in spy.backends[0]
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    expected = fp64_attention(q, k, v, 0.125)
    assert ((y.double() - expected).norm() / expected.norm()).item() < 2e-3


def test_upcast_where_no_fused_kernel_runs_casts_to_fp32(monkeypatch):
    spy = SdpaSpy(monkeypatch)
    q, k, v = overflowing_qkv(1)
    assert not model.fused_sdpa_can_run(q)  # a CPU tensor
    with torch.autocast("cpu", dtype=torch.float16):
        y = sdpa_attention(q, k, v, 0.125, upcast=True)
    assert spy.dtypes == [(torch.float32,) * 3] and spy.backends == []
    expected = fp64_attention(q, k, v, 0.125)
    assert y.dtype == torch.float16 and ((y.double() - expected).norm() / expected.norm()).item() < 2e-3


def test_auto_follows_the_measured_table(monkeypatch):
    assert pick_attn_impl("auto", torch.device("cpu"), 0.0, True) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(attention_cuda, "available", lambda: True)  # as if the kernel built
    cuda = torch.device("cuda")
    assert pick_attn_impl("auto", cuda, 0.0, True) == "sdpa"  # measured: the kernel is slower there
    monkeypatch.setitem(model.KERNEL_AT_LEAST_AS_FAST_AS_SDPA, "H200", True)
    assert pick_attn_impl("auto", cuda, 0.0, True) == "cuda"
    assert pick_attn_impl("auto", cuda, 0.1, True) == "sdpa"  # the kernel has no attention dropout
    assert pick_attn_impl("auto", cuda, 0.0, False) == "sdpa"


def test_a_cuda_request_that_cannot_work_is_a_user_error(monkeypatch):
    from errors import UserError
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        pick_attn_impl("cuda", torch.device("cpu"), 0.0, True)
    monkeypatch.setattr(attention_cuda, "available", lambda: True)  # as if the kernel built
    with pytest.raises(UserError, match="--model.dropout is 0.1"):
        pick_attn_impl("cuda", torch.device("cuda"), 0.1, True)
    with pytest.raises(UserError, match="--model.no-upcast-attn"):
        pick_attn_impl("cuda", torch.device("cuda"), 0.0, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel path is allowed")
def test_train_with_the_cuda_kernel_on_a_cpu_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "shakespeare-quick", "--model.attn-impl", "cuda",
                           "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--model.attn-impl sdpa" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the table picks by device: this is the CPU's row")
@pytest.mark.parametrize("asked,taken", [("auto", "sdpa"), ("naive", "naive")])
def test_each_checkpoint_names_the_attention_path_taken(tiny_data, tmp_path, asked, taken):
    """config.json keeps what was asked ("auto" re-decides on another device); the checkpoint records what ran."""
    from dataclasses import replace

    import checkpoint
    from configs import CheckpointConfig
    from conftest import tiny_run
    from train import train

    cfg = tiny_run(tiny_data, tmp_path / "run", max_steps=2, eval_interval=2,
                   checkpoint=CheckpointConfig(schedule="every", every=2, keep_last=0))
    train(replace(cfg, model=replace(cfg.model, attn_impl=asked)))
    state = checkpoint.load(checkpoint.latest_complete(tmp_path / "run"))
    assert state["provenance"]["attn_impl"] == taken
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["attn_impl"] == asked


def test_train_help_shows_auto_as_the_attention_default():
    out = subprocess.run([sys.executable, "train.py", "gpt2-small", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""}).stdout
    line = next(i for i, text in enumerate(out.splitlines()) if "--model.attn-impl" in text)
    assert "(default: auto)" in " ".join(out.splitlines()[line:line + 6])


def attention_with_negative_extreme(impl: str):
    """A layer whose largest score in magnitude is negative (so max and max |·| differ), its input, and the
    fp64 max |scale·q·k| over the causal entries computed here from its own c_attn weights."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=32, n_head=2, block_size=8, attn_impl=impl), layer_idx=1).eval()
    direction = torch.randn(16)
    with torch.no_grad():  # q and k biased along opposite directions in every head: strongly negative q·k
        attn.c_attn.bias[:32] = 2 * direction.repeat(2)
        attn.c_attn.bias[32:64] = -2 * direction.repeat(2)
    x = torch.randn(2, 8, 32)
    q, k, _ = (x.double() @ attn.c_attn.weight.double().t() + attn.c_attn.bias.double()).split(32, dim=2)
    q, k = (t.view(2, 8, 2, 16).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert -scores[..., causal].min() > scores[..., causal].max()  # the extreme one is negative
    return attn, x, scores[..., causal].abs().max().item()


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
def test_max_score_is_max_abs_score_on_every_path(impl):
    attn, x, expected = attention_with_negative_extreme(impl)
    with torch.no_grad():
        _, max_score = attn(x, diagnose=True)
        assert attn(x)[1] is None  # nothing recorded, nothing returned, when not asked
    assert max_score.dtype == torch.float32 and max_score.item() == pytest.approx(expected, rel=1e-5)


def test_max_score_is_max_abs_score_on_the_cuda_path_through_its_cpu_twin():
    """model.py's cuda branch on CPU tensors runs attention_cuda's reference twin (the emulator is too slow here)."""
    attn, x, expected = attention_with_negative_extreme("naive")
    attn.attn_impl = "cuda"  # past pick_attn_impl, which refuses cuda on a CPU
    with torch.no_grad():
        _, max_score = attn(x, diagnose=True)
    assert max_score.item() == pytest.approx(expected, rel=1e-5)
