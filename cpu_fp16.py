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
"""

import os
from contextlib import nullcontext
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


def cpu_flags() -> list[str] | None:
    """The x86 feature flags of /proc/cpuinfo, or None where there is none (macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None


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
