"""Tests for attention_cuda on a CPU-only machine: the twin against fp64 math, the CUDA kernel's
own code run under CPU emulation against both, the op's autograd plumbing, and an nvcc
compile-only check. The GPU run itself lives in attention_cuda/gpu_check.py."""

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_cuda
from attention_cuda import launch, reference

REPO = Path(__file__).resolve().parents[1]


def naive_attention_fp64(q, k, v, scale):
    """Causal attention by the textbook formula, in fp64 on upcast inputs: the independent oracle."""
    T = q.shape[-2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, -math.inf)
    return torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


def naive_grads_fp64(q, k, v, do, scale):
    """(dq, dk, dv) of naive_attention_fp64 by torch.autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y, _ = naive_attention_fp64(*leaves, scale)
    y.backward(do.double())
    return [t.grad for t in leaves]


def max_abs_score_fp64(q, k, scale):
    """(B, H, T): each row's max |scale q_i·k_j| over j <= i, in fp64 (the diagnostic's definition)."""
    T = q.shape[-2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale  # (B, H, T, T)
    return scores.abs().masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0).amax(dim=-1)


def negative_score_inputs(shape, dtype, seed=0):
    """q and k share a component of opposite sign (11 and -11): every q·k is about -121 ± a few,
    so the score of largest magnitude is negative and the signed row max is a different number."""
    q, k, v, do = random_inputs(*shape, torch.float64, seed=seed)
    q[..., 0], k[..., 0] = 11.0, -11.0
    return [t.to(dtype) for t in (q, k, v, do)]


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref||; the absolute error where ref is exactly 0 (dq, dk at T = 1)."""
    ref_norm = ref.double().norm().item()
    return (out.double() - ref.double()).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def random_inputs(B, H, T, D, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4)]


SHAPES = [(1, 1, 1, 8), (2, 3, 5, 16), (1, 2, 37, 32), (1, 1, 70, 16)]  # T=1, tails past 16 and 32
BLOCKS = [(16, 16), (32, 16), (16, 32)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layer_idx", [1, 7])  # GPT-2's 1/layer_idx score scaling on top of 1/sqrt(D)
def test_reference_matches_fp64_math(dtype, tolerance, shape, layer_idx):
    q, k, v, do = random_inputs(*shape, dtype)
    scale = 1 / math.sqrt(shape[-1]) / layer_idx
    y_ref, lse_ref = naive_attention_fp64(q, k, v, scale)
    grads_ref = naive_grads_fp64(q, k, v, do, scale)
    for block_q, block_k in BLOCKS:
        y, lse = reference.flash_forward(q, k, v, scale, block_q=block_q, block_k=block_k)
        assert relative_error(y, y_ref) < tolerance
        assert relative_error(lse, lse_ref) < tolerance
        grads = reference.flash_backward(q, k, v, y, lse, do, scale, block_q=block_q, block_k=block_k)
        for name, grad, grad_ref in zip("qkv", grads, grads_ref):
            assert relative_error(grad, grad_ref) < tolerance, f"d{name} with blocks {block_q}/{block_k}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_reference_16bit_upcast_is_close_to_fp64(dtype, tolerance):
    """16-bit in, fp32 softmax: within the GPU check's tolerances of exact math on the same inputs."""
    q, k, v, do = random_inputs(2, 2, 70, 64, dtype)
    scale = 1 / 8 / 3
    y, lse = reference.flash_forward(q, k, v, scale)
    y_ref, lse_ref = naive_attention_fp64(q, k, v, scale)
    assert relative_error(y, y_ref) < tolerance and relative_error(lse, lse_ref) < 1e-5
    for grad, grad_ref in zip(reference.flash_backward(q, k, v, y, lse, do, scale), naive_grads_fp64(q, k, v, do, scale)):
        assert relative_error(grad, grad_ref) < tolerance


def overflow_inputs(dtype, shape=(1, 2, 70, 64)):
    """A component of 260 shared by every q and k: q·k ~ 67,600 > 65,504 overflows fp16, while
    the rest of each score varies as usual (deep GPT-2 layers' failure)."""
    q, k, v, do = random_inputs(*shape, torch.float64)
    q[..., 0], k[..., 0] = 260.0, 260.0
    return [t.to(dtype) for t in (q, k, v, do)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 3e-3), (torch.bfloat16, 1e-2)])
def test_reference_survives_scores_past_fp16_range(dtype, tolerance):
    q, k, v, do = overflow_inputs(dtype)
    assert torch.isinf(q[0, 0].half() @ k[0, 0].half().T).any()  # the failure the kernel exists to avoid
    y, lse = reference.flash_forward(q, k, v, 1 / 8)
    y_ref, _ = naive_attention_fp64(q, k, v, 1 / 8)
    assert torch.isfinite(y).all() and relative_error(y, y_ref) < tolerance
    # dQ relies on centering the keys (reference.flash_backward): without it bf16 dq is ~10% off
    grads = reference.flash_backward(q, k, v, y, lse, do, 1 / 8)
    for name, grad, grad_ref in zip("qkv", grads, naive_grads_fp64(q, k, v, do, 1 / 8)):
        assert relative_error(grad, grad_ref) < tolerance, f"d{name}"


# ---- the CUDA kernel's code under CPU emulation (cuda_on_cpu.h) ----

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH: cannot build the CPU emulation")
NAN_GUARD = 64 * 128  # NaN elements around every buffer, a whole tile: a write past the end lands here


def guarded(shape, dtype, fill=math.nan):
    """A tensor living inside a NaN-filled buffer, and the buffer (to check the guards afterwards)."""
    numel = math.prod(shape)
    buffer = torch.full((numel + 2 * NAN_GUARD,), math.nan, dtype=dtype)
    tensor = buffer[NAN_GUARD:NAN_GUARD + numel].view(shape)
    tensor.fill_(fill)
    return tensor, buffer


def guard_intact(buffer) -> bool:
    return bool(buffer[:NAN_GUARD].isnan().all() and buffer[-NAN_GUARD:].isnan().all())


def run_emulated(q, k, v, do, scale):
    """Forward and backward of the emulated kernel; outputs start as NaN so unwritten ones show."""
    lib = pytest.importorskip("attention_cuda.emulate").library()
    B, H, T, D = q.shape
    inputs = []
    for tensor in (q, k, v, do):  # NaN around inputs: reading past the last row poisons results
        copy, _ = guarded(tensor.shape, tensor.dtype)
        inputs.append(copy.copy_(tensor))
    q, k, v, do = inputs
    (o, o_buf), (lse, lse_buf), (row_max, max_buf) = guarded(q.shape, q.dtype), guarded((B, H, T), torch.float32), \
        guarded((B, H, T), torch.float32)
    launch.forward_into(lib, q, k, v, scale, o, lse, row_max)
    grads = [guarded(q.shape, q.dtype) for _ in range(3)]
    delta, _ = guarded((B, H, T), torch.float32)
    k_mean, _ = guarded((B, H, D), torch.float32)  # (B, H, D): the dQ kernel's centering, written by the kernels
    launch.backward_into(lib, q, k, v, o, lse, do, k_mean, scale, *(g for g, _ in grads), delta)
    assert all(guard_intact(b) for b in (o_buf, lse_buf, max_buf, *(b for _, b in grads))), "write out of bounds"
    return o, lse, row_max, [g for g, _ in grads]


@needs_gxx
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 3, 70, 64), (2, 1, 130, 128)])
def test_emulated_kernel_matches_twin_and_fp64(dtype, tolerance, shape):
    q, k, v, do = random_inputs(*shape, dtype, seed=1)
    scale = 1 / math.sqrt(shape[-1]) / 3
    o, lse, row_max, grads = run_emulated(q, k, v, do, scale)
    for name, out in zip(["o", "lse", "row_max", "dq", "dk", "dv"], [o, lse, row_max, *grads]):
        assert torch.isfinite(out).all(), f"{name} has NaN/inf: unwritten or poisoned"
    o_twin, lse_twin = reference.flash_forward(q, k, v, scale)
    assert relative_error(o, o_twin) < 1e-3 and relative_error(lse, lse_twin) < 1e-6  # same algorithm
    y_ref, lse_ref = naive_attention_fp64(q, k, v, scale)
    assert relative_error(o, y_ref) < tolerance and relative_error(lse, lse_ref) < 1e-5
    T = shape[2]
    assert torch.allclose(row_max.double(), max_abs_score_fp64(q, k, scale), rtol=1e-5, atol=1e-5)
    grads_twin = reference.flash_backward(q, k, v, o_twin, lse_twin, do, scale)
    for name, grad, twin, exact in zip("qkv", grads, grads_twin, naive_grads_fp64(q, k, v, do, scale)):
        if T == 1 and name != "v":  # exactly 0 in exact math; the kernel leaves fp32 rounding noise
            assert grad.abs().max() < 1e-5, f"d{name} should be ~0 at T=1"
            continue
        assert relative_error(grad, twin) < 1e-3, f"d{name} vs twin"
        assert relative_error(grad, exact) < tolerance, f"d{name} vs fp64"


ROW_PAD = 8  # NaN elements after each (B, T) row of the strided buffers: a read poisons, a write shows


def padded_rows(B, T, width, dtype):
    """A (B, T, width) view whose rows are ROW_PAD elements longer in memory, all NaN, inside a guard."""
    storage, buffer = guarded((B, T, width + ROW_PAD), dtype)
    return storage[..., :width], storage, buffer


def heads_of(x, H):
    """(B, T, H * D) -> (B, H, T, D) view, written out here rather than taken from attention_cuda."""
    B, T, width = x.shape
    return x.unflatten(-1, (H, width // H)).transpose(1, 2)


@needs_gxx
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B, H, T, D", [(2, 2, 37, 64), (1, 2, 70, 128)])
def test_emulated_kernel_reads_qkv_and_writes_y_in_place(dtype, tolerance, B, H, T, D):
    """q, k, v read straight out of a (B, T, 3C) buffer, y written into a (B, T, C) one, dq, dk,
    dv into a (B, T, 3C) one, all with padded rows: fp64-correct, bitwise equal to the contiguous
    launch, and nothing outside the views is read or written."""
    lib = pytest.importorskip("attention_cuda.emulate").library()
    C, scale = H * D, 1 / math.sqrt(D) / 2
    generator = torch.Generator().manual_seed(3)
    qkv, qkv_storage, qkv_buffer = padded_rows(B, T, 3 * C, dtype)
    qkv.copy_(torch.randn(B, T, 3 * C, generator=generator))
    dy, _, _ = padded_rows(B, T, C, dtype)
    dy.copy_(torch.randn(B, T, C, generator=generator))
    y, y_storage, y_buffer = padded_rows(B, T, C, dtype)
    dqkv, dqkv_storage, dqkv_buffer = padded_rows(B, T, 3 * C, dtype)
    q, k, v = (heads_of(qkv[..., i * C:(i + 1) * C], H) for i in range(3))
    grads = [heads_of(dqkv[..., i * C:(i + 1) * C], H) for i in range(3)]
    lse, row_abs_max = torch.empty(B, H, T), torch.empty(B, H, T)
    launch.forward_into(lib, q, k, v, scale, heads_of(y, H), lse, row_abs_max)
    launch.backward_into(lib, q, k, v, heads_of(y, H), lse, heads_of(dy, H), torch.empty(B, H, D), scale, *grads,
                         torch.empty(B, H, T))
    for name, storage, buffer in [("y", y_storage, y_buffer), ("dqkv", dqkv_storage, dqkv_buffer),
                                  ("qkv", qkv_storage, qkv_buffer)]:
        assert guard_intact(buffer) and storage[..., -ROW_PAD:].isnan().all(), f"{name}: write outside the view"
    assert torch.isfinite(y).all() and torch.isfinite(dqkv).all(), "unwritten or poisoned output"
    y_ref, _ = naive_attention_fp64(q, k, v, scale)  # (B, H, T, D)
    assert relative_error(heads_of(y, H), y_ref) < tolerance
    for name, grad, grad_ref in zip("qkv", grads, naive_grads_fp64(q, k, v, heads_of(dy, H), scale)):
        assert relative_error(grad, grad_ref) < tolerance, f"d{name} vs fp64"
    o, lse_c, row_abs_max_c, grads_c = run_emulated(*(t.contiguous() for t in (q, k, v, heads_of(dy, H))), scale)
    assert torch.equal(heads_of(y, H), o) and torch.equal(lse, lse_c) and torch.equal(row_abs_max, row_abs_max_c)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_c)), "strided and contiguous launches differ"


@needs_gxx
@pytest.mark.parametrize("kind", ["split", "fused"])
@pytest.mark.parametrize("B, H, T, D", [(2, 3, 37, 64), (1, 2, 70, 128)])
def test_emulated_backward_prologue_gives_delta_and_key_mean(kind, B, H, T, D):
    """The backward's first kernel writes delta = rowsum(dO * O) and each head's mean key (the dQ
    centering) into NaN-filled scratch, reading o, dO and k as strided views with padded rows; both
    within fp32 rounding of fp64 sums of the same 16-bit numbers. T = 37 and 70 leave the last
    block of rows part-empty."""
    lib = pytest.importorskip("attention_cuda.emulate").library()
    C, scale, dtype = H * D, 1 / math.sqrt(D), torch.bfloat16
    generator = torch.Generator().manual_seed(5)
    qkv, _, _ = padded_rows(B, T, 3 * C, dtype)
    qkv.copy_(torch.randn(B, T, 3 * C, generator=generator) + 3.0)  # a nonzero mean key
    y, _, _ = padded_rows(B, T, C, dtype)
    dy, _, _ = padded_rows(B, T, C, dtype)
    dy.copy_(torch.randn(B, T, C, generator=generator))
    q, k, v = (heads_of(qkv[..., i * C:(i + 1) * C], H) for i in range(3))
    o, do = heads_of(y, H), heads_of(dy, H)
    lse = torch.empty(B, H, T)
    launch.forward_into(lib, q, k, v, scale, o, lse)
    (delta, delta_buffer), (k_mean, mean_buffer) = guarded((B, H, T), torch.float32), guarded((B, H, D), torch.float32)
    grads = [torch.empty(B, H, T, D, dtype=dtype) for _ in range(3)]
    if kind == "split":
        launch.backward_into(lib, q, k, v, o, lse, do, k_mean, scale, *grads, delta)
    else:
        dq_acc, dq_turn = torch.empty(B, H, T, D), torch.full((B * H * -(-T // 64),), 7, dtype=torch.int32)
        launch.backward_fused_into(lib, q, k, v, o, lse, do, k_mean, scale, *grads, delta, dq_acc, dq_turn)
    assert guard_intact(delta_buffer) and guard_intact(mean_buffer), "write outside delta or k_mean"
    delta_ref = (do.double() * o.double()).sum(dim=-1)  # (B, H, T)
    mean_ref = k.double().mean(dim=2)  # (B, H, D)
    assert torch.allclose(delta.double(), delta_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(k_mean.double(), mean_ref, rtol=1e-6, atol=1e-6)


@needs_gxx
def test_emulated_kernel_survives_scores_past_fp16_range():
    """Both backwards keep dQ within 1% of fp64 on scores near 67,600: they center the keys (dQ =
    scale dS (K - k_mean)); without that, bf16 dq is ~10% off here (measured in the emulation, NOTES.md)."""
    q, k, v, do = overflow_inputs(torch.bfloat16, shape=(1, 1, 70, 64))
    o, lse, _, grads = run_emulated(q, k, v, do, 1 / 8)
    y_ref, _ = naive_attention_fp64(q, k, v, 1 / 8)
    assert relative_error(o, y_ref) < 1e-2
    fused = run_fused_backward(q, k, v, o, lse, do, 1 / 8)
    for name, grad, fused_grad, grad_ref in zip("qkv", grads, fused, naive_grads_fp64(q, k, v, do, 1 / 8)):
        assert relative_error(grad, grad_ref) < 1e-2, f"d{name}"
        assert relative_error(fused_grad, grad_ref) < 1e-2, f"d{name}, fused backward"


# ---- the fused backward (dK, dV, dQ in one kernel; dQ added in a fixed order of K tiles) ----

def run_emulated_backward(kind, q, k, v, o, lse, do, scale, grads=None, acc_fill=math.nan, turn_fill=-1):
    """The emulated "split" or "fused" backward into NaN-filled, guarded dq, dk, dv (or into `grads`,
    views given by the caller). The fused one's scratch starts as garbage: dq_acc filled with
    acc_fill inside a NaN guard, the turn counters with turn_fill; it must neither read what it has
    not written nor count on zeros."""
    lib = pytest.importorskip("attention_cuda.emulate").library()
    B, H, T, D = q.shape
    buffers = []
    if grads is None:
        guarded_grads = [guarded(q.shape, q.dtype) for _ in range(3)]
        grads, buffers = [g for g, _ in guarded_grads], [b for _, b in guarded_grads]
    delta, _ = guarded((B, H, T), torch.float32)
    k_mean, _ = guarded((B, H, D), torch.float32)
    if kind == "split":
        launch.backward_into(lib, q, k, v, o, lse, do, k_mean, scale, *grads, delta)
    else:
        dq_acc, acc_buffer = guarded((B, H, T, D), torch.float32, fill=acc_fill)
        buffers.append(acc_buffer)
        dq_turn = torch.full((B * H * -(-T // 64),), turn_fill, dtype=torch.int32)
        launch.backward_fused_into(lib, q, k, v, o, lse, do, k_mean, scale, *grads, delta, dq_acc, dq_turn)
    assert all(guard_intact(b) for b in buffers), "write out of bounds"
    return grads


def run_fused_backward(*args, **kwargs):
    return run_emulated_backward("fused", *args, **kwargs)


@needs_gxx
@pytest.mark.parametrize("dtype, tolerance, shape, against_split", [
    (torch.bfloat16, 1e-2, (1, 1, 131, 64), True),  # 3 K tiles: first, middle and last adder of Q tile 2; a tail
    (torch.float16, 2e-3, (2, 1, 67, 128), False),  # D = 128: dQ in two column chunks; a second head's counters
    (torch.float16, 2e-3, (1, 1, 1, 64), True),     # one tile: K tile 0 adds first and last
])
def test_emulated_fused_backward_matches_fp64_split_and_itself(dtype, tolerance, shape, against_split):
    """The fused backward reading q, k, v, y, dy inside padded (B, T, 3C) / (B, T, C) buffers and
    writing d(qkv) into one, as the op does: within the dtype's tolerance of fp64, nothing outside
    the views written; (against_split: the emulation is slow) within rounding of the split backward,
    and run again on contiguous tensors with other garbage in its scratch, the same bits (a fixed
    order of the dQ adds, and nothing read of dq_acc before it is written, nor of the counters
    before they are zeroed). y and lse come from the twin's forward: only the backward is emulated."""
    B, H, T, D = shape
    C, scale = H * D, 1 / math.sqrt(D) / 3
    q, k, v, do = random_inputs(*shape, dtype, seed=2)
    o, lse = reference.flash_forward(q, k, v, scale)
    qkv, _, _ = padded_rows(B, T, 3 * C, dtype)
    y, _, _ = padded_rows(B, T, C, dtype)
    dy, _, _ = padded_rows(B, T, C, dtype)
    dqkv, dqkv_storage, dqkv_buffer = padded_rows(B, T, 3 * C, dtype)
    for i, tensor in enumerate((q, k, v)):
        heads_of(qkv[..., i * C:(i + 1) * C], H).copy_(tensor)
    heads_of(y, H).copy_(o)
    heads_of(dy, H).copy_(do)
    views = [heads_of(part, H) for part in qkv.split(C, dim=2)]
    grads = [heads_of(part, H) for part in dqkv.split(C, dim=2)]
    run_fused_backward(*views, heads_of(y, H), lse, heads_of(dy, H), scale, grads=grads)
    assert guard_intact(dqkv_buffer) and dqkv_storage[..., -ROW_PAD:].isnan().all(), "write outside the view"
    assert torch.isfinite(dqkv).all(), "unwritten or poisoned output"
    for name, grad, exact in zip("qkv", grads, naive_grads_fp64(q, k, v, do, scale)):
        if T == 1 and name != "v":  # exactly 0 in exact math: fp32 rounding noise
            assert grad.abs().max() < 1e-5, f"d{name} should be ~0 at T=1"
            continue
        assert relative_error(grad, exact) < tolerance, f"d{name} vs fp64"
    if against_split:
        split = run_emulated_backward("split", q, k, v, o, lse, do, scale)
        for name, grad, split_grad in zip("qkv", grads, split):
            assert relative_error(grad, split_grad) < 1e-3 or (T == 1 and name != "v"), f"d{name} vs split"
        again = run_fused_backward(q, k, v, o, lse, do, scale, acc_fill=7.0, turn_fill=12345)
        assert all(torch.equal(a, b) for a, b in zip(grads, again)), "two fused backward passes differ"


@needs_gxx
def test_emulated_fused_backward_fails_when_blocks_run_in_reverse(monkeypatch, capfd):
    """Block j of the fused backward waits until K tiles 0..j-1 have added into a Q tile, i.e. on
    blocks of smaller index, which a GPU dispatches first. The emulation runs blocks in index order;
    reversed (GUST_EMU_BLOCK_ORDER, a test-only switch), every wait is on a block that has not run,
    and the launch must fail with the emulation's spin-wait error rather than hang or return
    numbers. The split backward depends on no order: the same bits reversed."""
    q, k, v, do = random_inputs(1, 1, 65, 64, torch.bfloat16, seed=4)  # 2 K tiles
    o, lse = reference.flash_forward(q, k, v, 0.125)
    split = run_emulated_backward("split", q, k, v, o, lse, do, 0.125)
    monkeypatch.setenv("GUST_EMU_BLOCK_ORDER", "reverse")
    split_reversed = run_emulated_backward("split", q, k, v, o, lse, do, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(split, split_reversed))
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="spin-wait's condition was false"):
        run_fused_backward(q, k, v, o, lse, do, 0.125)
    assert "block (0, 1) spins until a counter holds 1, but it holds 0" in capfd.readouterr().err
    monkeypatch.delenv("GUST_EMU_BLOCK_ORDER")
    fused = run_fused_backward(q, k, v, o, lse, do, 0.125)  # in order it runs
    assert all(relative_error(a, b) < 1e-3 for a, b in zip(fused, split))


@needs_gxx
def test_emulated_kernels_opt_into_shared_memory_once_each():
    """cudaFuncSetAttribute (a driver call) runs once per kernel, not before every launch; the emulator, like
    a GPU, refuses a launch above 48 KB of shared memory that its own kernel did not opt into, so a cache
    that mixed two kernels up would fail the launches here."""
    lib = pytest.importorskip("attention_cuda.emulate").library()
    scale = 1 / math.sqrt(128)

    def every_kernel():  # forward with and without the max-score output, the split and the fused backward
        q, k, v, do = random_inputs(1, 1, 70, 128, torch.bfloat16, seed=3)
        o, lse, _, _ = run_emulated(q, k, v, do, scale)
        launch.forward_into(lib, q, k, v, scale, torch.empty_like(q), torch.empty_like(lse))
        run_fused_backward(q, k, v, o, lse, do, scale)

    every_kernel()
    after_first = lib.gust_emu_smem_optin_calls()
    assert after_first >= 5, "the kernels did not opt in at all"
    assert any(lib.gust_attention_smem_bytes(128, which) > 48 * 1024 for which in range(3)), \
        "no kernel needs the opt-in at D = 128: this test checks nothing"
    every_kernel()
    assert lib.gust_emu_smem_optin_calls() == after_first


@needs_gxx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_max_score_is_max_abs_not_signed_max(dtype):
    """The kernel's by-product is max |score| per row (after scaling, before softmax, causal
    entries only), held to fp64; with every score negative the signed row max is far from it."""
    q, k, v, do = negative_score_inputs((1, 2, 70, 64), dtype)
    scale = 1 / 8
    _, _, row_abs_max, _ = run_emulated(q, k, v, do, scale)
    expected = max_abs_score_fp64(q, k, scale)  # (B, H, T)
    assert torch.allclose(row_abs_max.double(), expected, rtol=1e-5, atol=1e-5)
    T = q.shape[2]
    signed = (q.double() @ k.double().transpose(-2, -1) * scale).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
    assert (signed.amax(dim=-1) < 0).all() and (expected > 10).all()  # the case a signed max gets wrong


@needs_gxx
def test_emulated_kernel_rejects_bad_arguments():
    lib = pytest.importorskip("attention_cuda.emulate").library()
    q = torch.zeros(1, 1, 4, 96, dtype=torch.float16)
    lse = torch.zeros(1, 1, 4)
    with pytest.raises(RuntimeError, match="head size must be 64 or 128"):
        launch.forward_into(lib, q, q, q, 1.0, q.clone(), lse)
    buffer = torch.zeros(1 + 4 * 64, dtype=torch.float16)
    misaligned = buffer[1:].view(1, 1, 4, 64)  # 2 bytes past an aligned address
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        launch.forward_into(lib, misaligned, misaligned, misaligned, 1.0, misaligned.clone(), lse)
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    for scale in (0.0, -0.125, math.nan, math.inf):  # the forward takes the row max before scaling: scale > 0
        with pytest.raises(RuntimeError, match="scale must be a positive finite number"):
            launch.forward_into(lib, q, q, q, scale, q.clone(), lse)
        with pytest.raises(RuntimeError, match="scale must be a positive finite number"):
            launch.backward_into(lib, q, q, q, q, lse, q, torch.zeros(1, 1, 64), scale, q.clone(), q.clone(),
                                 q.clone(), torch.zeros(1, 1, 4))
        with pytest.raises(RuntimeError, match="scale must be a positive finite number"):
            launch.backward_fused_into(lib, q, q, q, q, lse, q, torch.zeros(1, 1, 64), scale, q.clone(), q.clone(),
                                       q.clone(), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, 64),
                                       torch.zeros(1, dtype=torch.int32))


# ---- the op: autograd, torch.compile, availability ----

def test_op_on_cpu_runs_the_twin_with_autograd():
    q, k, v, do = random_inputs(2, 3, 37, 16, torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 1 / 4 / 2
    y = attention_cuda.attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, scale)  # non-contiguous q
    y.backward(do)
    y_ref, _ = naive_attention_fp64(q.detach(), k.detach(), v.detach(), scale)
    assert relative_error(y.detach(), y_ref) < 1e-10
    for grad, grad_ref in zip((q.grad, k.grad, v.grad), naive_grads_fp64(q, k, v, do, scale)):
        assert relative_error(grad, grad_ref) < 1e-10


def test_op_max_score_on_cpu_is_max_abs_score():
    q, k, v, _ = negative_score_inputs((2, 3, 37, 16), torch.float32)
    y, max_score = attention_cuda.attention_with_max_score(q, k, v, 0.25)
    assert max_score.shape == (2, 3)
    assert torch.allclose(max_score.double(), max_abs_score_fp64(q, k, 0.25).amax(dim=-1), rtol=1e-6)
    assert relative_error(y, naive_attention_fp64(q, k, v, 0.25)[0]) < 1e-5


def qkv_reference_fp64(qkv, H, scale):
    """y (B, T, C) from c_attn's (B, T, 3C) output by nanoGPT's split-and-transpose, in fp64."""
    B, T, C3 = qkv.shape
    q, k, v = (heads_of(part, H) for part in qkv.double().split(C3 // 3, dim=2))
    return naive_attention_fp64(q, k, v, scale)[0].transpose(1, 2).reshape(B, T, C3 // 3)


def test_op_qkv_on_cpu_matches_fp64_with_autograd():
    B, T, H, D = 2, 37, 3, 16
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3 * H * D, generator=generator, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(B, T, H * D, generator=generator, dtype=torch.float64)
    y = attention_cuda.attention_qkv(qkv, H, 0.3)
    assert y.shape == (B, T, H * D)
    y.backward(dy)
    leaf = qkv.detach().clone().requires_grad_()
    y_ref = qkv_reference_fp64(leaf, H, 0.3)
    y_ref.backward(dy)
    assert relative_error(y.detach(), y_ref.detach()) < 1e-10
    assert qkv.grad.shape == qkv.shape and relative_error(qkv.grad, leaf.grad) < 1e-10
    q, k, _, _ = negative_score_inputs((B, H, T, D), torch.float64)
    qkv_negative = torch.cat([t.transpose(1, 2).reshape(B, T, H * D) for t in (q, k, k)], dim=2)
    _, max_score = attention_cuda.attention_qkv_with_max_score(qkv_negative, H, 0.3)
    assert torch.allclose(max_score, max_abs_score_fp64(q, k, 0.3).amax(dim=-1), rtol=1e-10)


@needs_gxx
def test_op_qkv_through_the_emulated_kernel_matches_fp64():
    """The public op end to end (custom op, autograd, strided launch) on attention.cu's own code:
    y, d(qkv) and max |score| against fp64 written here. Tiny: the emulation is slow."""
    B, T, H, D = 1, 37, 2, 64
    generator = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3 * H * D, generator=generator).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(B, T, H * D, generator=generator)
    with attention_cuda.emulated_on_cpu():
        y, max_score = attention_cuda.attention_qkv_with_max_score(qkv, H, 0.1)
        (y.float() * weight).sum().backward()
        with pytest.raises(ValueError, match="head size 16 unsupported"):  # the CUDA path's checks: not the twin
            attention_cuda.attention_qkv(torch.zeros(1, 4, 3 * 2 * 16, dtype=torch.bfloat16), 2, 1.0)
    leaf = qkv.detach().double().requires_grad_()
    y_ref = qkv_reference_fp64(leaf, H, 0.1)
    (y_ref * weight.double()).sum().backward()
    assert relative_error(y.detach(), y_ref.detach()) < 1e-2 and relative_error(qkv.grad, leaf.grad) < 1e-2
    q, k = (heads_of(part, H) for part in qkv.detach().split(H * D, dim=2)[:2])
    assert torch.allclose(max_score.double(), max_abs_score_fp64(q, k, 0.1).amax(dim=-1), rtol=1e-5)


def test_backward_choice_comes_from_the_environment():
    """GUST_ATTN_BACKWARD picks the backward (read once, at import): split unless it says fused."""
    choose = attention_cuda._backward_from_env
    assert choose({}) == "split" and choose({"GUST_ATTN_BACKWARD": ""}) == "split"
    assert choose({"GUST_ATTN_BACKWARD": "fused"}) == "fused" and choose({"GUST_ATTN_BACKWARD": " Split "}) == "split"
    with pytest.raises(ValueError, match="GUST_ATTN_BACKWARD='fast' — expected one of split, fused"):
        choose({"GUST_ATTN_BACKWARD": "fast"})
    with pytest.raises(ValueError, match="expected one of"), attention_cuda.backward_kind("fast"):
        pass


@needs_gxx
def test_op_runs_the_selected_backward(monkeypatch):
    """With the fused backward selected, the op's backward launches it (and only it), and d(qkv)
    matches fp64; afterwards the choice is back to what it was."""
    calls = []
    for name in ("backward_into", "backward_fused_into"):
        def spy(*args, _real=getattr(launch, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(launch, name, spy)
    B, T, H, D = 1, 37, 1, 64
    generator = torch.Generator().manual_seed(12)
    qkv = torch.randn(B, T, 3 * H * D, generator=generator).to(torch.float16).requires_grad_()
    weight = torch.randn(B, T, H * D, generator=generator)
    before = attention_cuda.BACKWARD
    with attention_cuda.emulated_on_cpu(), attention_cuda.backward_kind("fused"):
        (attention_cuda.attention_qkv(qkv, H, 0.1).float() * weight).sum().backward()
    assert calls == ["backward_fused_into"] and attention_cuda.BACKWARD == before
    leaf = qkv.detach().double().requires_grad_()
    (qkv_reference_fp64(leaf, H, 0.1) * weight.double()).sum().backward()
    assert relative_error(qkv.grad, leaf.grad) < 2e-3


def test_op_qkv_rejects_a_width_that_is_not_three_heads():
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3 \* n_head \* D\)"):
        attention_cuda.attention_qkv(torch.zeros(1, 4, 3 * 16 + 1), 2, 1.0)


def test_op_traces_as_one_opaque_op_under_torch_compile():
    q, k, v, do = random_inputs(1, 2, 20, 8, torch.float64)
    q.requires_grad_()
    compiled = torch.compile(lambda q, k, v: attention_cuda.attention(q, k, v, 0.5), backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward(do)
    assert relative_error(q.grad, naive_grads_fp64(q, k, v, do, 0.5)[0]) < 1e-10


class TinyAttentionBlock(torch.nn.Module):
    """c_attn -> attention_qkv (with the max-score by-product) -> c_proj, as model.py would wire it."""

    def __init__(self, C=32, H=2):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C), H

    def forward(self, x):
        y, max_score = attention_cuda.attention_qkv_with_max_score(self.c_attn(x), self.n_head, 0.25)
        return self.c_proj(y), max_score.max()


def test_compiled_block_has_no_graph_break_at_the_op():
    """torch.compile sees each op as one node: dynamo finds one graph, no breaks (the op's fake
    implementation gives it shapes without running anything), and the compiled forward and
    backward equal the eager ones."""
    torch.manual_seed(0)
    block, x = TinyAttentionBlock(), torch.randn(2, 9, 32)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "gust.attention_qkv.default" in ops, ops
    eager_out, eager_max = block(x)
    eager_out.sum().backward()
    eager_grad = block.c_attn.weight.grad.clone()
    block.zero_grad()
    compiled_out, compiled_max = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    compiled_out.sum().backward()
    assert torch.allclose(compiled_out, eager_out) and torch.equal(compiled_max, eager_max)
    assert torch.allclose(block.c_attn.weight.grad, eager_grad)


def test_fake_implementations_give_shapes_on_meta_tensors():
    """What the compiler sees of a CUDA call without running the kernel: the fakes' shapes and dtypes."""
    qkv = torch.empty(2, 1024, 3 * 768, dtype=torch.bfloat16, device="meta")
    y, max_score = attention_cuda.attention_qkv_with_max_score(qkv, 12, 0.125)
    assert (y.shape, y.dtype, y.device.type) == ((2, 1024, 768), torch.bfloat16, "meta")
    assert (max_score.shape, max_score.dtype) == ((2, 12), torch.float32)
    q = torch.empty(2, 12, 1024, 64, dtype=torch.float16, device="meta")
    assert attention_cuda.attention(q, q, q, 0.125).shape == (2, 12, 1024, 64)


@pytest.mark.parametrize("op_name, make_args", [
    ("attention_qkv", lambda: (torch.randn(2, 5, 3 * 2 * 8, dtype=torch.float64, requires_grad=True), 2, 0.3, True)),
    ("flash_attention", lambda: (*(t.requires_grad_() for t in random_inputs(1, 2, 5, 8, torch.float64)[:3]), 0.3, False)),
])
def test_ops_pass_torch_library_opcheck(op_name, make_args):
    """torch's own check of a custom op: schema, fake vs real outputs, autograd registration."""
    torch.library.opcheck(getattr(torch.ops.gust, op_name).default, make_args())


def test_op_rejects_mismatched_shapes():
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="share one"):
        attention_cuda.attention(q, q[:, :1], q, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_available_is_false_without_a_gpu():
    assert attention_cuda.available() is False
    assert "no CUDA device" in attention_cuda.unavailable_reason()


def test_profile_sums_kernel_rows_only():
    """An op's row carries its kernels' device time too: only the GPU's own rows may be summed."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from attention_cuda.profile import kernel_rows

    row = lambda key, device, us: SimpleNamespace(key=key, device_type=device, self_device_time_total=us)  # noqa: E731
    events = [row("gust::flash_attention_backward", DeviceType.CPU, 355.0), row("dkdv_kernel", DeviceType.CUDA, 207.0),
              row("dq_kernel", DeviceType.CUDA, 148.0), row("Activity Buffer Request", DeviceType.CUDA, 7.8),
              row("aten::mean", DeviceType.CPU, 11.5), row("idle", DeviceType.CUDA, 0.0)]
    assert [e.key for e in kernel_rows(events)] == ["dkdv_kernel", "dq_kernel"]


def test_gpu_check_dry_run_passes_on_the_emulated_kernel(tmp_path):
    """`make gpu-check` gets one try on a borrowed GPU: its script, run on the CPU emulation at tiny shapes,
    must reach the end with every check passing (the fp64 comparisons, the fused backward's bitwise repeat,
    the public op) and write its report, so that a GPU session only measures."""
    result = subprocess.run([sys.executable, "-m", "attention_cuda.gpu_check", "--cpu-dry-run", "--out", str(tmp_path),
                             "--time-limit", "240"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.txt").read_text()
    for row in ("correctness ", "correctness fused bwd", "api "):
        assert re.search(rf"^{row}\s*PASS", report, re.MULTILINE), f"no PASS row {row!r} in:\n{report[-2000:]}"
    assert "ALL PASS" in result.stdout


# ---- nvcc: compile-only, as CI can ----

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the compile-only check needs the CUDA toolkit")
def test_kernel_compiles_without_warnings_or_spills_for_sm80_and_sm90():
    """NOTES.md's Resources: no kernel spills registers to local memory, on either arch (ptxas's report), nor
    keeps anything in a stack frame (where a non-inlined call's array arguments, such as a held Stripe, would go)."""
    result = subprocess.run([sys.executable, "-m", "attention_cuda.build", "--arch", "80", "--arch", "90",
                             "--ptxas-verbose"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 warnings" in result.stdout
    report = result.stdout + result.stderr
    assert report.count("bytes spill stores") >= 48, "ptxas's report is missing kernels"  # 12 kernels × 2 dtypes × 2 archs
    kernel, spills = None, []
    for line in report.splitlines():
        if "Compiling entry function" in line:
            kernel = line.split("function ", 1)[1]  # 'mangled name' for 'sm_XX'
        elif re.search(r"\b[1-9]\d* bytes (spill stores|spill loads|stack frame)", line):
            spills.append(f"{kernel}: {line.strip()}")
    assert not spills, "\n".join(spills)
