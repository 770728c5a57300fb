"""Builds attention.cu for the CPU (g++ and cuda_on_cpu.h) so tests can run the kernel's code
without a GPU, through the same ctypes calls (launch.py) the CUDA library gets.

For: tests of the kernel's indexing, tiling, masking, tails and shared-memory layout against
reference.py. Not for: speed (every CUDA thread is an OS thread), or proving the real mma.sync
register layout or warp scheduling right; only a GPU run does that (gpu_check.py).
"""

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from attention_cuda.build import BUILD_DIR, PACKAGE_DIR, SOURCE

HEADER = PACKAGE_DIR / "cuda_on_cpu.h"
_loaded = None  # the emulated library, once built


def emulated_source() -> str:
    """attention.cu with CUDA-only syntax rewritten for cuda_on_cpu.h."""
    text = SOURCE.read_text()
    text = re.sub(r"#include <(cuda_bf16|cuda_fp16|cuda_runtime|mma)\.h>\n", "", text)
    text, shared = re.subn(r"extern __shared__ __align__\(128\) unsigned char smem\[\];",
                          "unsigned char* smem = emu_shared_memory();", text)
    text, launches = re.subn(r"(\w+)<<<(.+?)>>>\(", r"emu_launch(\1, \2, ", text)
    if shared != 5 or launches != 5:  # 4 tile kernels and the prologue; forward, prologue, dK/dV, dQ, fused launches
        raise RuntimeError(f"emulate.py: expected 5 shared-memory declarations and 5 launches in attention.cu, "
                           f"found {shared} and {launches} — update emulated_source()")
    return '#include "cuda_on_cpu.h"\n' + text


def build_emulation() -> Path:
    """Compiles the emulated library with g++ (cached by a hash of its inputs); returns its path."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("attention_cuda.emulate: g++ not found — install a C++20 compiler (apt-get install g++)")
    source = emulated_source()
    flags = ["-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", f"-I{PACKAGE_DIR}"]
    digest = hashlib.sha256((source + HEADER.read_text() + " ".join(flags)).encode()).hexdigest()[:16]
    BUILD_DIR.mkdir(exist_ok=True)
    path = BUILD_DIR / f"libgust_attention_cpu_emulation_{digest}.so"
    if not path.exists():
        source_path = BUILD_DIR / f"attention_cpu_emulation_{digest}.cpp"
        source_path.write_text(source)
        partial = path.with_name(path.name + ".partial")
        result = subprocess.run([compiler, *flags, "-o", str(partial), str(source_path)], capture_output=True, text=True)
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-12:])
            raise RuntimeError(f"attention_cuda.emulate: g++ failed: {tail}")
        partial.replace(path)
    return path


def library():
    """The emulated library, loaded with launch.py's signatures (built on first use)."""
    global _loaded
    if _loaded is None:
        from attention_cuda import launch  # imports torch; keep it off the module's import path

        _loaded = launch.load(build_emulation())
    return _loaded
