"""Where the time of gust's attention goes: GPU time per kernel (torch.profiler) of forward +
backward through the public op, beside the wall time of the same calls.

For: finding the slow kernel before tuning it (NOTES.md records what this printed). If the
kernels' sum is far below the wall time, the GPU waited for the host (Python, launches).
Not for: the numbers we report (gpu_check.py's benchmark is that). Needs a GPU:
    python -m attention_cuda.profile --shapes 8x12,16x16 --dtype bf16 [--backward split,fused]
Each shape is profiled once per backward (both by default: the split dK/dV + dQ kernels and the
fused one, attention_cuda.backward_kind).
"""

import argparse
import math
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import attention_cuda

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_rows(events) -> list:
    """The GPU's own rows of key_averages(): kernels, memsets, copies; largest first.

    A CPU op's row (gust::flash_attention_backward, aten::mean, autograd nodes) carries as its
    "self device time" the kernels it launched, which have rows of their own: summing both
    counted those kernels twice. The profiler's own "Activity Buffer Request" is not our work."""
    rows = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
            and not e.key.startswith("Activity Buffer")]
    return sorted(rows, key=lambda e: -e.self_device_time_total)


def fwd_bwd(q, k, v, do, scale):
    return torch.autograd.grad(attention_cuda.attention(q, k, v, scale), (q, k, v), do)


def profile_shape(B: int, H: int, dtype, iters: int, T: int = 1024, D: int = 64, backward: str = "split") -> None:
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 1 / math.sqrt(D)
    for _ in range(3):  # warm-up: build, load, allocator
        fwd_bwd(q, k, v, do, scale)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fwd_bwd(q, k, v, do, scale)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd(q, k, v, do, scale)
        torch.cuda.synchronize()
    events = kernel_rows(prof.key_averages())
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / iters
    print(f"\nB={B} H={H} T={T} D={D} {dtype}, {backward} backward: wall {wall_ms:.3f} ms per fwd+bwd (back-to-back), "
          f"GPU kernels {gpu_ms:.3f} ms (sum of kernel rows only)")
    for e in events[:12]:
        us = e.self_device_time_total / iters
        print(f"  {us:9.1f} us  x{e.count // iters:<3d} {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x12,16x16", help="comma-separated BxH at T=1024, D=64")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backward", default="split,fused", help="comma-separated: split, fused (both by default)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_cuda.profile: no CUDA device (torch.cuda.is_available() is False); run it on a GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for shape in args.shapes.split(","):
        B, H = (int(x) for x in shape.split("x"))
        for backward in args.backward.split(","):
            with attention_cuda.backward_kind(backward):
                profile_shape(B, H, DTYPES[args.dtype], args.iters, backward=backward)


if __name__ == "__main__":
    main()
