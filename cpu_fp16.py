"""fp16 on a CPU without fp16 arithmetic: matrix products of fp16 tensors run in fp32 and round back to fp16.

Where the CPU has no AVX512-FP16 or AMX-FP16 (e.g. the AMD EPYC gust's CPU numbers come from; Intel server parts
before Sapphire Rapids), torch multiplies fp16 matrices in a scalar fallback: a quick-preset step took 4.0 s there
against 0.41 s through this file and 0.26 s in fp32 (README, "fp16 on a CPU", has the command). That fallback,
like a GPU's tensor cores, takes fp16 inputs, accumulates in fp32 and rounds the result to fp16. Doing the same
with torch's fp32 matrix kernels gives the same arithmetic — the same fp16 inputs (exact in fp32), fp32
accumulation, fp16's range and rounding of the result (a product past 65504 is inf); only the summation order
differs, as between any two gemm kernels. Everything else (elementwise ops, the softmax, the loss scaler) stays
as autocast runs it. Not under --compile (the compiled graph has its own kernels), and GUST_CPU_FP16=native in
the environment keeps torch's own fp16 path (to compare, or where this one is in doubt).

bf16 on a CPU without bf16 arithmetic is only warned about (emulated_bf16_warning): its slow path is torch's own,
and `make train`'s recorded bits are bf16's.

Also here, the CPU's other numerics: the facts that decide a CPU run's exact bits, for its provenance
(cpu_numerics), and the warm-up that keeps MKL's vector math from giving a run other bits at random
(warm_up_vector_math).
"""

import os
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}
"""What nn.Linear, @ and their backward reach under autocast (linear and matmul decompose into these)."""


class Fp16MatmulsInFp32(TorchDispatchMode):
    """Inside this mode an fp16 matrix product on the CPU is computed as fp32(inputs) → fp32 product → fp16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in MATMULS and tensors and all(t.dtype == torch.float16 and t.device.type == "cpu" for t in tensors):
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]  # fp16 → fp32 is exact
            return func(*wide, **kwargs).half()  # fp16's rounding and range: past 65504 is inf
        return func(*args, **kwargs)


@lru_cache(maxsize=1)
def cpuinfo() -> str | None:
    """/proc/cpuinfo's text, read once per process, or None where there is none (macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_flags() -> list[str] | None:
    """The x86 feature flags of /proc/cpuinfo, or None where there is none (macOS)."""
    text = cpuinfo()
    return None if text is None else text.split()


MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
"""The x86 flags that decide which matrix kernels oneDNN and torch pick, so a CPU run's exact numbers."""


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo, else what the platform says."""
    import platform

    names = [line.split(":", 1)[1].strip() for line in (cpuinfo() or "").splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def cpu_numerics() -> dict:
    """What decides a CPU run's floating-point results besides gust's own config: the CPU, the kernels torch
    dispatches to on it, and the thread count (a sum split over threads is summed in another order)."""
    flags = cpu_flags() or []
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_matrix_flags": [flag for flag in MATRIX_FLAGS if flag in flags], "threads": torch.get_num_threads()}


VECTOR_MATH = ("exp", "log", "log2", "log10", "sqrt", "tanh", "erf", "erfc", "erfinv", "sin", "cos", "tan", "asin",
               "acos", "atan", "trunc")
"""The float ops torch's CPU build hands to MKL's vector math (VML; ATen/cpu/vml.h), in fp32 and fp64."""


@lru_cache(maxsize=1)
def warm_up_vector_math():
    """Call each of VECTOR_MATH once, on one element and on this thread only, before any runs on two threads.

    MKL (2024.2, in torch's x86 wheels) picks its vector-math kernels at the first call; when that first call is
    made by two intra-op threads at once, one thread's half of the tensor can go through a low-accuracy kernel
    (relative error 1.5e-4, against 6e-8) although torch asks for the accurate one (pytorch/pytorch#188792, fixed
    from MKL 2025.0). Found here: `make train` on this 2-core Xeon ended at 2.3072 bits/byte instead of 2.2891 in 1
    of 6 runs, and a 10-step run's step-5 grad norm differed in 3 of 11; the first exp of the first loss was the
    one. Once the kernels are picked no call races (tests/test_cpu_fp16.py: fresh processes, against fp64).
    """
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)  # in every op's domain; one element: never split over threads
        for op in VECTOR_MATH:
            getattr(torch, op)(one)


def cpu_has_fp16_arithmetic() -> bool:
    """True where the CPU multiplies fp16 natively (x86 flags avx512_fp16 / amx_fp16), or where we cannot tell
    (no /proc/cpuinfo: macOS, whose Apple cores have fp16 arithmetic)."""
    flags = cpu_flags()
    return flags is None or "avx512_fp16" in flags or "amx_fp16" in flags


def cpu_has_bf16_arithmetic(when_unknown: bool = True) -> bool:
    """True where the CPU multiplies bf16 natively (avx512_bf16 / amx_bf16); where we cannot tell (no
    /proc/cpuinfo), `when_unknown`: the warning gives the benefit of the doubt, --precision auto does not."""
    flags = cpu_flags()
    return when_unknown if flags is None else "avx512_bf16" in flags or "amx_bf16" in flags


def emulated_bf16_warning(precision: str, device_type: str) -> str | None:
    """One line for a bf16 run on a CPU that emulates bf16 (most laptops, AVX2-only servers): there torch's bf16
    is far slower than fp32 — measured 104 against 3,990 tokens/s for `make train` on an AVX2-only AMD EPYC."""
    if precision != "bf16" or device_type != "cpu" or cpu_has_bf16_arithmetic():
        return None
    return ("gust: warning: this CPU has no bf16 arithmetic (no avx512_bf16 / amx_bf16), so bf16 is emulated, "
            "~40x slower than fp32 on such a CPU — pass --precision fp32 (the result then differs in its last "
            "digits)")


IN_FP32 = "fp32, rounded to fp16"  # fp16_products' name for Fp16MatmulsInFp32's path


def fp16_products(precision: str, device: torch.device, compiled: bool = False) -> str | None:
    """How a run's fp16 matrix products are computed, as its provenance records it: "fp32, rounded to fp16"
    (Fp16MatmulsInFp32: eager fp16 on a CPU without fp16 arithmetic), "torch" (torch's own fp16 kernels), or None
    when the run is not fp16. Recorded because the two give different bits, though the same arithmetic."""
    if precision != "fp16":
        return None
    native = os.environ.get("GUST_CPU_FP16") == "native"
    if device.type == "cpu" and not compiled and not native and not cpu_has_fp16_arithmetic():
        return IN_FP32
    return "torch"


def fp16_matmuls(precision: str, device: torch.device, compiled: bool = False):
    """The context a run trains in: Fp16MatmulsInFp32 where fp16_products says so, else nothing. It covers
    forward and backward (the backward's products are fp16 too), so it wraps the whole loop."""
    if fp16_products(precision, device, compiled) == IN_FP32:
        return Fp16MatmulsInFp32()
    return nullcontext()
