"""The one script to run on a GPU machine: build the kernel, check it against fp64 math, and time
it against the naive upcast path and PyTorch's SDPA backends at GPT-2 shapes.

    python -m attention_cuda.gpu_check --out DIR [--quick] [--no-bench]
    python -m attention_cuda.gpu_check --out DIR --cpu-dry-run   # no GPU: checks this script itself

Both backwards (split: today's default; fused: one kernel, attention_cuda.BACKWARD) are checked for
correctness and bitwise repeatability (section b) and timed against each other (section c2, which
ends with the default NOTES.md's rule picks). Needs torch and nvcc only (no model.py: the fp64 and
fp32 oracles are reference.py's). Each section
runs in its own try/except and prints PASS/FAIL lines as it goes; everything also goes to
DIR/gpu_check.txt and DIR/gpu_check.json (with the card, torch version and git commit), and the
summary table prints last. Timings: "back-to-back" is the median per-call time of ≥ 20 calls
queued without a sync between them (what a training step sees); "isolated" is the median of
single calls each started on an idle GPU (it adds the host's launch path to the kernel time).
Finishes in about a minute on an H100/H200 (a third of it the one-time nvcc build).
Not for: CI (no GPU there; see tests/test_attention_cuda.py) or training-loop benchmarks.
"""

import argparse
import faulthandler
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import attention_cuda
from attention_cuda import launch, reference
from attention_cuda.build import PACKAGE_DIR, find_nvcc

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error vs fp64 math
LSE_TOLERANCE = 1e-4  # lse is fp32 end to end: only accumulation-order error
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
DRY_RUN = False  # --cpu-dry-run: CPU tensors, the emulated kernel (emulate.py), tiny shapes, wall-clock timing


def device() -> str:
    return "cpu" if DRY_RUN else "cuda"


def kernel_library():
    """The CUDA library (built on first use), or in a dry run the CPU emulation of the same code."""
    if DRY_RUN:
        from attention_cuda import emulate  # noqa: PLC0415

        return emulate.library()
    return attention_cuda._load_library()


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def current_stream() -> int:
    return 0 if DRY_RUN else torch.cuda.current_stream().cuda_stream


class Report:
    """Prints each line at once (flushed), keeps it for gpu_check.txt, and collects JSON results."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.lines, self.results, self.summary = [], {}, []
        out_dir.mkdir(parents=True, exist_ok=True)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.save()  # written as we go: a hang or a crash still leaves the log behind

    def save(self) -> None:
        (self.out_dir / "gpu_check.txt").write_text("\n".join(self.lines) + "\n")
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def run_section(report: Report, name: str, section, *args) -> None:
    """Runs one section; an exception becomes a FAIL line instead of ending the script."""
    report.say(f"\n=== {name} ===")
    try:
        section(report, *args)
    except Exception as error:  # keep going: one broken section must not hide the others
        report.say(f"FAIL {name}: {type(error).__name__}: {error}")
        report.say(traceback.format_exc().rstrip())
        report.summary.append((name, "FAIL", f"{type(error).__name__}: {str(error)[:80]}"))


# ---- a. build ----

def git_commit() -> str:
    """The checkout's commit, with "+dirty" if tracked files changed; outside git (a copied working tree) the
    environment's GUST_GIT_COMMIT (make gpu-check GIT_COMMIT=<sha> sets it), else "unknown"."""
    given = os.environ.get("GUST_GIT_COMMIT") or "unknown"
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True,  # noqa: E731
                                           timeout=10)
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return (commit + ("+dirty" if dirty else "")) if commit else given
    except (OSError, subprocess.SubprocessError):
        return given


def section_build(report: Report) -> None:
    commit = git_commit()
    report.say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}, "
               f"git commit {commit}")
    name = "CPU dry run (emulated kernel)" if DRY_RUN else torch.cuda.get_device_name()
    report.say(f"device {name}, capability sm_{'--' if DRY_RUN else attention_cuda._current_arch()}")
    nvcc = find_nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    report.say(f"nvcc {nvcc}: {version}")
    start = time.perf_counter()
    library = kernel_library()  # nvcc on first use, then ctypes load and device check
    seconds = time.perf_counter() - start
    smem = {d: [library.gust_attention_smem_bytes(d, which) for which in (0, 1, 2)] for d in launch.HEAD_DIMS}
    report.say(f"PASS build+load in {seconds:.1f} s; shared memory per block (fwd, split bwd, fused bwd): {smem}")
    report.results["build"] = {"seconds": seconds, "smem_bytes": smem, "torch": torch.__version__,
                               "device": name, "nvcc": version, "git_commit": commit}
    report.summary.append(("build", "PASS", f"{seconds:.1f} s"))


# ---- b. correctness ----

def oracle(q, k, v, do, scale, dtype):
    """reference.causal_attention on q, k, v upcast to dtype, on the GPU: (o, lse, dq, dk, dv).

    fp64: the exact answer every case is held to; fp32 (no TF32): how close the naive upcast
    path gets, for context."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o, lse = reference.causal_attention(*leaves, scale)
    o.backward(do.to(dtype))
    return (o.detach(), lse.detach(), *(t.grad for t in leaves))


def sdpa_outputs(q, k, v, do, scale):
    """torch's default SDPA on the 16-bit inputs, forward and backward: (o, dq, dk, dv)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    o.backward(do)
    return (o.detach(), *(t.grad for t in leaves))


def make_inputs(B, H, T, D, dtype, kind, seed):
    """q, k, v, do on the GPU. kind "overflow": a shared component of 260 in dimension 0 makes
    every q·k about 67,600 > 65,504, so fp16 q kᵀ overflows, while the rest of each score
    varies as usual (the deep-GPT-2 failure); random N(0, 1)·40 entries would overflow too, but
    make softmax one-hot and the gradients ~0, which cannot be checked by relative error."""
    generator = torch.Generator(device=device()).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device=device(), generator=generator) for _ in range(4))
    if kind == "overflow":
        q[..., 0], k[..., 0] = 260.0, 260.0
    return [t.to(dtype) for t in (q, k, v, do)]


def run_backward(library, backward, q, k, v, o, lse, do, scale, fill):
    """One backward ("split" or "fused") through the raw launchers into outputs prefilled with `fill`
    (NaN: unwritten shows); the scratch (delta, k_mean, the fused one's accumulator) starts as `fill`
    too: its contents must not matter."""
    B, H, T, D = q.shape
    full = lambda shape, dtype: torch.full(shape, fill, dtype=dtype, device=q.device)  # noqa: E731
    dq, dk, dv = (full(q.shape, q.dtype) for _ in range(3))
    delta, k_mean, stream = full((B, H, T), torch.float32), full((B, H, D), torch.float32), current_stream()
    if backward == "fused":
        dq_acc = full((B, H, T, D), torch.float32)
        dq_turn = torch.full((B * H * -(-T // reference.BLOCK_Q),), 12345, dtype=torch.int32, device=q.device)
        launch.backward_fused_into(library, q, k, v, o, lse, do, k_mean, scale, dq, dk, dv, delta, dq_acc, dq_turn,
                                   stream=stream)
    else:
        launch.backward_into(library, q, k, v, o, lse, do, k_mean, scale, dq, dk, dv, delta, stream=stream)
    return dq, dk, dv


def kernel_outputs(library, q, k, v, do, scale):
    """Forward, then each backward twice, through the raw launchers into NaN-filled outputs.

    Returns (o, lse, row_abs_max, {backward: ((dq, dk, dv), deterministic)}) for backward in
    attention_cuda.BACKWARDS; deterministic: the two passes gave the same bits (the second one
    with 0 instead of NaN in every output and scratch buffer beforehand)."""
    B, H, T, D = q.shape
    nan = lambda shape, dtype: torch.full(shape, math.nan, dtype=dtype, device=q.device)  # noqa: E731
    o, lse, row_abs_max = nan(q.shape, q.dtype), nan((B, H, T), torch.float32), nan((B, H, T), torch.float32)
    launch.forward_into(library, q, k, v, scale, o, lse, row_abs_max, stream=current_stream())
    backwards = {}
    for backward in attention_cuda.BACKWARDS:
        grads = [run_backward(library, backward, q, k, v, o, lse, do, scale, fill) for fill in (math.nan, 0.0)]
        synchronize()
        backwards[backward] = (grads[0], all(torch.equal(a, b) for a, b in zip(*grads)))
    return o, lse, row_abs_max, backwards


def relative_error(out, ref) -> float:
    ref_norm = ref.double().norm().item()
    return (out.double() - ref.double()).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def check_case(report, library, B, H, T, D, dtype, layer_idx, kind, seed):
    """One correctness case for the forward and both backwards: (split passed, fused passed).

    split: o, lse, max |score|, dq, dk, dv of the split backward (today's default) all within
    tolerance and bitwise repeatable; fused: dq, dk, dv of the fused backward the same way."""
    q, k, v, do = make_inputs(B, H, T, D, dtype, kind, seed)
    scale = 1 / math.sqrt(D) / layer_idx
    o, lse, row_abs_max, backwards = kernel_outputs(library, q, k, v, do, scale)
    (dq, dk, dv), deterministic = backwards["split"]
    fused_grads, fused_deterministic = backwards["fused"]
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = oracle(q, k, v, do, scale, torch.float64)
    refs = (o_ref, dq_ref, dk_ref, dv_ref)
    fp32_o, _, *fp32_grads = oracle(q, k, v, do, scale, torch.float32)
    names = ["o", "dq", "dk", "dv"]
    errors = {n: relative_error(x, r) for n, x, r in zip(names, (o, dq, dk, dv), refs)}
    fp32_errors = {n: relative_error(x, r) for n, x, r in zip(names, (fp32_o, *fp32_grads), refs)}
    fused_errors = {n: relative_error(x, r) for n, x, r in zip(names[1:], fused_grads, refs[1:])}
    fused_vs_split = {n: relative_error(x, r) for n, x, r in zip(names[1:], fused_grads, (dq, dk, dv))}
    errors["lse"] = relative_error(lse, lse_ref)
    max_ref = reference.max_abs_score(q.double(), k.double(), scale)  # (B, H) max |score| over causal entries
    max_error = (row_abs_max.amax(dim=-1).double() - max_ref).abs().max().item() / max(1.0, max_ref.max().item())
    finite = all(torch.isfinite(t).all().item() for t in (o, lse, row_abs_max, dq, dk, dv))
    fused_finite = all(torch.isfinite(t).all().item() for t in fused_grads)
    # a case passes at the dtype's tolerance, or at twice what the fp32 upcast path itself gets
    # (scores near 67,600 carry fp32 rounding of ~0.01 that no fp32 method avoids)
    within = all(errors[n] <= max(TOLERANCE[dtype], 2 * fp32_errors[n]) for n in names)
    fused_within = all(fused_errors[n] <= max(TOLERANCE[dtype], 2 * fp32_errors[n]) for n in names[1:])
    passed = finite and deterministic and within and errors["lse"] <= LSE_TOLERANCE and max_error <= 1e-5
    fused_passed = fused_finite and fused_deterministic and fused_within
    label = f"{DTYPE_NAMES[dtype]} B={B} H={H} T={T} D={D} layer={layer_idx} {kind}"
    detail = " ".join(f"{n} {errors[n]:.1e}" for n in names + ["lse"])
    fp32_detail = " ".join(f"{n} {fp32_errors[n]:.1e}" for n in names)
    fused_detail = " ".join(f"{n} {fused_errors[n]:.1e}" for n in names[1:])
    sdpa_errors, sdpa_detail = {}, ""
    if kind == "overflow":  # the accuracy claim in NOTES.md is a comparison: SDPA's errors on the same inputs
        sdpa_errors = {n: relative_error(x, r) for n, x, r in zip(names, sdpa_outputs(q, k, v, do, scale), refs)}
        sdpa_detail = " | sdpa 16-bit: " + " ".join(f"{n} {sdpa_errors[n]:.1e}" for n in names)
    report.say(f"{'PASS' if passed else 'FAIL'} {label}: {detail} max_score {max_error:.1e} "
               f"finite={finite} bitwise_repeat={deterministic} | fp32 naive: {fp32_detail}{sdpa_detail}")
    report.say(f"  {'PASS' if fused_passed else 'FAIL'} fused backward: {fused_detail} finite={fused_finite} "
               f"bitwise_repeat={fused_deterministic} | vs split: "
               + " ".join(f"{n} {fused_vs_split[n]:.1e}" for n in names[1:]))
    report.results.setdefault("correctness", []).append(
        {"case": label, "passed": passed, "errors": errors, "fp32_naive_errors": fp32_errors,
         "sdpa_errors": sdpa_errors, "max_score_error": max_error, "finite": finite, "deterministic": deterministic,
         "fused": {"passed": fused_passed, "errors": fused_errors, "vs_split": fused_vs_split,
                   "finite": fused_finite, "deterministic": fused_deterministic}})
    return passed, fused_passed


def correctness_cases(quick: bool):
    """(B, H, T, D, dtype, layer_idx, kind): tails, T=1, odd B*H, both dtypes, layer scaling."""
    lengths = [1, 100, 257] if quick else [1, 17, 100, 257, 1024]
    batch_heads = [(1, 3)] if quick else [(1, 3), (3, 5)]
    head_dims = [64, 128]
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for D in head_dims:
            for T in lengths if D == 64 else lengths[-2:]:
                for B, H in batch_heads:
                    for layer_idx in (1, 12):
                        cases.append((B, H, T, D, dtype, layer_idx, "random"))
        for T in ([257] if quick else [257, 1024]):
            for layer_idx in (1, 12):
                cases.append((1, 3, T, 64, dtype, layer_idx, "overflow"))
    return cases


def section_correctness(report: Report, quick: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be real fp32
    library = kernel_library()
    cases = [(1, 3, 70, 64, torch.float16, 12, "random"), (1, 1, 130, 64, torch.bfloat16, 1, "overflow")] \
        if DRY_RUN else correctness_cases(quick)
    outcomes = [check_case(report, library, *case, seed=i) for i, case in enumerate(cases)]
    q, k, _, _ = make_inputs(1, 3, 257, 64, torch.float16, "overflow", seed=0)
    fp16_max = (q[0, 0] @ k[0, 0].T).float().abs().max().item()
    report.say(f"note: in the overflow cases plain fp16 q@kᵀ reaches {fp16_max} (inf = overflowed)")
    passed, fused_passed = (sum(outcome[i] for outcome in outcomes) for i in (0, 1))
    report.results["fused_correctness_all_pass"] = fused_passed == len(cases)
    report.summary.append(("correctness", "PASS" if passed == len(cases) else "FAIL",
                           f"{passed}/{len(cases)} cases (forward + split backward)"))
    report.summary.append(("correctness fused bwd", "PASS" if fused_passed == len(cases) else "FAIL",
                           f"{fused_passed}/{len(cases)} cases (dq, dk, dv vs fp64, bitwise repeat)"))


def section_api(report: Report) -> None:
    """The public op on CUDA: same bits as the raw launchers, autograd, errors, torch.compile."""
    q, k, v, do = make_inputs(2, 3, 200, 64, torch.bfloat16, "random", seed=7)
    if DRY_RUN:  # attention() on CPU tensors runs the twin, not the kernel: bits would differ
        q, k, v, do = (t[:1, :1, :70] for t in (q, k, v, do))
    scale = 1 / 8 / 2
    o, _, _, backwards = kernel_outputs(kernel_library(), q, k, v, do, scale)
    (dq, dk, dv), _ = backwards[attention_cuda.BACKWARD]  # the one the op runs
    if DRY_RUN:
        o, dq, dk, dv = attention_twin(q, k, v, do, scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = attention_cuda.attention(*leaves, scale)
    y.backward(do)
    same = torch.equal(y, o) and all(torch.equal(t.grad, g) for t, g in zip(leaves, (dq, dk, dv)))
    report.say(f"{'PASS' if same else 'FAIL'} attention() and its autograd give the raw launchers' bits")
    transposed = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # non-contiguous views
    same_views = torch.equal(attention_cuda.attention(*transposed, scale), o)
    report.say(f"{'PASS' if same_views else 'FAIL'} non-contiguous q, k, v give the same result")
    _, max_score = attention_cuda.attention_with_max_score(q, k, v, scale)
    report.say(f"PASS attention_with_max_score: max_score shape {tuple(max_score.shape)} dtype {max_score.dtype}")
    errors_ok = expect_error(lambda: attention_cuda.attention(q.float(), k.float(), v.float(), scale), "float16 or bfloat16")
    errors_ok &= expect_error(lambda: attention_cuda.attention(q[..., :32], k[..., :32], v[..., :32], scale), "head size")
    report.say(f"{'PASS' if errors_ok else 'FAIL'} unsupported dtype / head size raise one-line errors")
    compiled_ok = check_compiled(q, k, v, do, scale, o, dq)
    qkv_ok = check_qkv(report, q, k, v, do, scale, o, (dq, dk, dv))
    for backward in attention_cuda.BACKWARDS:  # each backward through the op: the raw launchers' bits
        if DRY_RUN or backward == attention_cuda.BACKWARD:
            continue  # the dry run's op runs the twin; the op's own backward was checked above
        with attention_cuda.backward_kind(backward):
            report.say(f"{backward} backward selected (attention_cuda.backward_kind):")
            qkv_ok &= check_qkv(report, q, k, v, do, scale, o, backwards[backward][0])
    ok = same and same_views and errors_ok and compiled_ok and qkv_ok
    report.summary.append(("api", "PASS" if ok else "FAIL", "op, autograd, views, errors, compile, qkv layout"))


def to_rows(x):
    """(B, H, T, D) -> (B, T, H * D): the heads side by side, as c_attn and c_proj hold them."""
    return x.transpose(1, 2).flatten(2)


def check_qkv(report: Report, q, k, v, do, scale, o, grads) -> bool:
    """attention_qkv on a (B, T, 3C) tensor: the same bits as the launchers on contiguous q, k, v,
    y as (B, T, C) and d(qkv) as (B, T, 3C) (same arithmetic, only the addresses differ)."""
    H = q.shape[1]
    qkv = torch.cat([to_rows(t) for t in (q, k, v)], dim=-1).requires_grad_()  # (B, T, 3C)
    y = attention_cuda.attention_qkv(qkv, H, scale)
    y.backward(to_rows(do))
    same = torch.equal(y, to_rows(o)) and torch.equal(qkv.grad, torch.cat([to_rows(g) for g in grads], dim=-1))
    _, max_score = attention_cuda.attention_qkv_with_max_score(qkv.detach(), H, scale)
    max_ok = torch.allclose(max_score.double(), reference.max_abs_score(q.double(), k.double(), scale), rtol=1e-5)
    report.say(f"{'PASS' if same and max_ok else 'FAIL'} attention_qkv: (B, T, 3C) in, (B, T, C) out, d(qkv) "
               f"equal to the contiguous launch's bits ({same}); max |score| vs fp64 ({max_ok})")
    return same and max_ok


def attention_twin(q, k, v, do, scale):
    """Dry run only: what attention() returns on CPU (the twin), to compare the op's plumbing with."""
    from attention_cuda import reference  # noqa: PLC0415

    o, lse = reference.flash_forward(q, k, v, scale)
    return (o, *reference.flash_backward(q, k, v, o, lse, do, scale))


def expect_error(call, fragment: str) -> bool:
    if DRY_RUN:
        return True  # the dtype and head-size errors are CUDA-only: the twin takes anything
    try:
        call()
    except ValueError as error:
        return fragment in str(error)
    return False


def check_compiled(q, k, v, do, scale, o, dq) -> bool:
    """torch.compile(fullgraph=True) sees one opaque op (aot_eager: no Triton needed)."""
    leaf = q.clone().requires_grad_()
    compiled = torch.compile(lambda a, b, c: attention_cuda.attention(a, b, c, scale), backend="aot_eager",
                             fullgraph=True)
    y = compiled(leaf, k, v)
    y.backward(do)
    return torch.equal(y, o) and torch.equal(leaf.grad, dq)


# ---- c. benchmark ----

def naive_upcast(q, k, v, scale):
    """model.py's naive path with upcast, from reference.py's oracle: fp32 (T, T) scores and softmax."""
    return torch.softmax(reference.causal_scores(q.float(), k.float(), scale), dim=-1).to(v.dtype) @ v


def implementations(report: Report) -> dict:
    """name -> f(q, k, v, scale) -> y for every attention path to time."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls = {"naive upcast": naive_upcast,
             "sdpa default": lambda q, k, v, s: sdpa(q, k, v, is_causal=True, scale=s)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    except ImportError:
        report.say("sdpa backends: torch.nn.attention.sdpa_kernel missing, only the default is timed")
        SDPBackend = None
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None) if SDPBackend else None
        if backend is not None:
            impls[f"sdpa {name.lower()}"] = with_backend(sdpa, sdpa_kernel, backend)
    impls["gust"] = attention_cuda.attention
    return impls


def with_backend(sdpa, sdpa_kernel, backend):
    def run(q, k, v, scale):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True, scale=scale)
    return run


def timings_ms(fn, warmup: int = 3, calls: int = 25, isolated: int = 10) -> dict:
    """{"back_to_back": .., "isolated": ..}: medians of CUDA-event times of fn(), in ms, after warm-up.

    back_to_back: `calls` calls queued one after another with an event between each pair and no
    sync, so each interval is one call's share of a busy stream (the host may run ahead, as in
    training). isolated: each call alone after a sync, so host launch latency shows in it."""
    for _ in range(warmup):
        fn()
    if DRY_RUN:
        start = time.perf_counter()
        fn()
        wall = (time.perf_counter() - start) * 1e3
        return {"back_to_back": wall, "isolated": wall}
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
    events[0].record()
    for event in events[1:]:
        fn()
        event.record()
    events[-1].synchronize()
    back_to_back = statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))
    alone = []
    for _ in range(isolated):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        alone.append(start.elapsed_time(end))
    return {"back_to_back": back_to_back, "isolated": statistics.median(alone)}


def peak_mib(fn) -> float:
    """Peak memory fn() allocates beyond what was already allocated, in MiB."""
    if DRY_RUN:
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def qkv_implementations() -> dict:
    """name -> f(qkv (B, T, 3C), n_head, scale) -> y (B, T, C): the attention step as model.py wires
    it, from c_attn's output to c_proj's input, copies and transposes included."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def split_heads(qkv, n_head):  # nanoGPT's split and transpose: (B, n_head, T, D) views
        return [part.unflatten(-1, (n_head, -1)).transpose(1, 2) for part in qkv.chunk(3, dim=-1)]

    return {"sdpa default (qkv)": lambda qkv, n, s: to_rows(sdpa(*split_heads(qkv, n), is_causal=True, scale=s)),
            "gust 4-D (qkv)": lambda qkv, n, s: to_rows(attention_cuda.attention(*split_heads(qkv, n), s)),
            "gust qkv": attention_cuda.attention_qkv}


def bench_one(impl, B, H, T, D, dtype, qkv_layout: bool = False) -> dict:
    """Timings and peak memory of impl's forward and forward + backward on random inputs.

    qkv_layout: impl takes (qkv (B, T, 3C), H, scale) and returns (B, T, C), instead of
    (q, k, v, scale) -> (B, H, T, D)."""
    q, k, v, do = make_inputs(B, H, T, D, dtype, "random", seed=0)
    scale = 1 / math.sqrt(D)
    if qkv_layout:
        inputs, do = [torch.cat([to_rows(t) for t in (q, k, v)], dim=-1)], to_rows(do)  # (B, T, 3C), (B, T, C)
        call = lambda tensors: impl(tensors[0], H, scale)  # noqa: E731
    else:
        inputs, call = [q, k, v], lambda tensors: impl(*tensors, scale)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            return call(inputs)

    def forward_backward():
        return torch.autograd.grad(call(leaves), leaves, do)

    forward()  # raises here if this backend refuses the shape or dtype
    fwd_flops = 2 * 2 * B * H * T * T * D / 2  # causal: half of q kᵀ and of P v
    fwd, fwd_bwd = timings_ms(forward), timings_ms(forward_backward)
    result = {"fwd_ms": fwd["back_to_back"], "fwd_bwd_ms": fwd_bwd["back_to_back"],
              "fwd_isolated_ms": fwd["isolated"], "fwd_bwd_isolated_ms": fwd_bwd["isolated"],
              "fwd_peak_mib": peak_mib(forward), "fwd_bwd_peak_mib": peak_mib(forward_backward)}
    result["fwd_tflops"] = fwd_flops / result["fwd_ms"] / 1e9
    result["fwd_bwd_tflops"] = 3.5 * fwd_flops / result["fwd_bwd_ms"] / 1e9  # backward = 2.5x forward
    return result


def section_benchmark(report: Report, quick: bool) -> None:
    report.say("FLOPs, causal convention: forward = 2 * 2*B*H*T*T*D / 2 (q kᵀ and P v, half masked); "
               "backward = 2.5x forward; fwd+bwd = 3.5x forward")
    report.say("times: median of 25 back-to-back calls (TFLOP/s from these); [isolated: median of 10 single "
               "calls after a sync]")
    report.say(f"gust rows run the {attention_cuda.BACKWARD} backward (GUST_ATTN_BACKWARD); section c2 times both")
    impls = {name: (impl, False) for name, impl in implementations(report).items()}
    impls.update({name: (impl, True) for name, impl in qkv_implementations().items()})
    shapes = [(8, 12)] if quick else [(8, 12), (8, 16), (16, 12), (16, 16)]
    T = 64 if DRY_RUN else 1024
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for B, H in [(1, 1)] if DRY_RUN else shapes:
            for name, (impl, qkv_layout) in impls.items():
                row = {"impl": name, "dtype": DTYPE_NAMES[dtype], "B": B, "H": H, "T": T, "D": 64}
                try:
                    row.update(bench_one(impl, B, H, T, 64, dtype, qkv_layout))
                    report.say(f"{name:22s} {row['dtype']} B={B:2d} H={H}: fwd {row['fwd_ms']:.3f} ms "
                               f"({row['fwd_tflops']:.0f} TFLOP/s), fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
                               f"({row['fwd_bwd_tflops']:.0f} TFLOP/s) [isolated: fwd {row['fwd_isolated_ms']:.3f}, "
                               f"fwd+bwd {row['fwd_bwd_isolated_ms']:.3f}], peak {row['fwd_bwd_peak_mib']:.0f} MiB")
                except Exception as error:  # a backend that refuses this shape/dtype/GPU is skipped
                    row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    report.say(f"{name:22s} {row['dtype']} B={B:2d} H={H}: skipped ({row['skipped']})")
                rows.append(row)
                if not DRY_RUN:
                    torch.cuda.empty_cache()  # one path's cached blocks must not count in the next's peak
    report.results["benchmark"] = rows
    add_speedups(report, rows)


def add_speedups(report: Report, rows) -> None:
    """Per shape: gust's fwd+bwd speedup over naive and its back-to-back time ratio to SDPA's default,
    for (B, H, T, D) inputs ("gust" vs "sdpa default") and from c_attn's output ("gust qkv" vs
    "sdpa default (qkv)"). Issue 13's goal is a ratio <= 1."""
    timed = {(r["impl"], r["dtype"], r["B"], r["H"]): r for r in rows if "fwd_bwd_ms" in r}
    for ours, theirs in (("gust", "sdpa default"), ("gust qkv", "sdpa default (qkv)")):
        for (impl, dtype, B, H), row in timed.items():
            if impl != ours:
                continue
            naive, default = timed.get(("naive upcast", dtype, B, H)), timed.get((theirs, dtype, B, H))
            vs_naive = naive["fwd_bwd_ms"] / row["fwd_bwd_ms"] if naive else float("nan")
            vs_sdpa = row["fwd_bwd_ms"] / default["fwd_bwd_ms"] if default else float("nan")
            row.update(speedup_vs_naive=vs_naive, time_ratio_vs_sdpa_default=vs_sdpa)
            report.summary.append((f"bench {ours} {dtype} B={B} H={H}", "INFO",
                                   f"fwd {row['fwd_tflops']:.0f} / fwd+bwd {row['fwd_bwd_tflops']:.0f} TFLOP/s, "
                                   f"{vs_naive:.2f}x faster than naive, {vs_sdpa:.2f}x {theirs} time (back-to-back; "
                                   f"goal <= 1), peak {row['fwd_bwd_peak_mib']:.0f} MiB"))


# ---- c2. which backward: split or fused ----

# (B, H, D) at T = 1024; C = H * D is GPT-2 Small's 768 (and GPT-2 Medium's 1024) at either head size
BACKWARD_SHAPES = [(8, 12, 64), (16, 16, 64), (8, 6, 128), (16, 8, 128)]
# fused/split fwd+bwd time at or below which fused should be the default: at B=8 H=12 D=64 in both
# dtypes (FUSED_WINS), and at every other D = 64 shape (FUSED_NOT_WORSE)
FUSED_WINS, FUSED_NOT_WORSE = 0.97, 1.03


def section_backward_choice(report: Report, quick: bool) -> None:
    """attention_qkv forward + backward with each backward (back-to-back and isolated), bf16 and fp16,
    D 64 and 128, then the default NOTES.md's rule picks from these numbers and section b's."""
    shapes = [(1, 1, 64)] if DRY_RUN else (BACKWARD_SHAPES[::2] if quick else BACKWARD_SHAPES)
    dtypes = (torch.bfloat16,) if DRY_RUN else (torch.bfloat16, torch.float16)
    T = 64 if DRY_RUN else 1024
    rows, ratios = [], {}
    for dtype in dtypes:
        for B, H, D in shapes:
            times = {}
            for backward in attention_cuda.BACKWARDS:
                with attention_cuda.backward_kind(backward):
                    row = {"backward": backward, "dtype": DTYPE_NAMES[dtype], "B": B, "H": H, "T": T, "D": D,
                           **bench_one(attention_cuda.attention_qkv, B, H, T, D, dtype, qkv_layout=True)}
                rows.append(row)
                times[backward] = row["fwd_bwd_ms"]
                report.say(f"gust qkv, {backward:5s} backward, {row['dtype']} B={B:2d} H={H:2d} D={D:3d}: fwd+bwd "
                           f"{row['fwd_bwd_ms']:.3f} ms back-to-back [isolated {row['fwd_bwd_isolated_ms']:.3f}], "
                           f"fwd {row['fwd_ms']:.3f}, peak {row['fwd_bwd_peak_mib']:.0f} MiB")
                if not DRY_RUN:
                    torch.cuda.empty_cache()
            ratios[(DTYPE_NAMES[dtype], B, H, D)] = times["fused"] / times["split"]
            report.say(f"  fused / split fwd+bwd time: {ratios[(DTYPE_NAMES[dtype], B, H, D)]:.3f} "
                       f"(back-to-back medians; < 1: fused faster)")
    report.results["backward_choice"] = {
        "rows": rows, "fused_over_split": {f"{d} B={b} H={h} D={dd}": r for (d, b, h, dd), r in ratios.items()}}
    # the rule (NOTES.md, "Fused backward: how to decide the default"): fused must pass every correctness
    # case with bitwise repeats, win at GPT-2 Small's shape in both dtypes, and lose at no other D = 64 shape
    correct = report.results.get("fused_correctness_all_pass") is True
    main = [r for (d, b, h, dd), r in ratios.items() if (b, h, dd) == (8, 12, 64)]
    others = [r for (d, b, h, dd), r in ratios.items() if dd == 64 and (b, h) != (8, 12)]
    wins = len(main) == len(dtypes) and max(main) <= FUSED_WINS and all(r <= FUSED_NOT_WORSE for r in others)
    choice = "fused" if correct and wins and not DRY_RUN else "split"
    d128 = [r for (d, b, h, dd), r in ratios.items() if dd == 128]
    detail = (f"fused correct {correct}; fused/split at 8x12 D=64 {', '.join(f'{r:.3f}' for r in main)} (need <= "
              f"{FUSED_WINS}), other D=64 max {max(others, default=float('nan')):.3f} (need <= {FUSED_NOT_WORSE}), "
              f"D=128 max {max(d128, default=float('nan')):.3f} -> default {choice}")
    report.results["backward_choice"]["suggested_default"] = choice
    report.say(f"backward choice: {detail}")
    report.summary.append(("backward choice", "INFO", detail))


# ---- d. summary ----

def print_summary(report: Report) -> None:
    report.say("\n=== summary ===")
    width = max((len(name) for name, _, _ in report.summary), default=10)
    for name, status, detail in report.summary:
        report.say(f"{name:{width}s}  {status:4s}  {detail}")
    report.results["summary"] = [{"section": n, "status": s, "detail": d} for n, s, d in report.summary]
    failed = sum(status == "FAIL" for _, status, _ in report.summary)
    report.say(f"{'ALL PASS' if failed == 0 else f'{failed} FAILED'} — details in {report.out_dir}/gpu_check.txt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build, check and benchmark gust's attention kernel on a GPU.")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.txt and gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="fewer shapes in the checks and the benchmark")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark (e.g. under compute-sanitizer)")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="seconds before dumping every thread's stack and exiting (a hung kernel)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU: run this script on the CPU emulation of the kernel, tiny shapes")
    args = parser.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.cpu_dry_run
    faulthandler.dump_traceback_later(args.time_limit, exit=True)
    report = Report(args.out)
    if not DRY_RUN and not torch.cuda.is_available():
        report.say("FAIL no CUDA device: run this on a GPU machine")
        return 1
    run_section(report, "a. build", section_build)
    run_section(report, "b. correctness vs fp64", section_correctness, args.quick)
    run_section(report, "b2. public op on CUDA", section_api)
    if not args.no_bench:
        run_section(report, "c. benchmark (T=1024, D=64)", section_benchmark, args.quick)
        run_section(report, "c2. backward choice (split vs fused, T=1024)", section_backward_choice, args.quick)
    print_summary(report)
    return 0 if all(status != "FAIL" for _, status, _ in report.summary) else 1


if __name__ == "__main__":
    sys.exit(main())
