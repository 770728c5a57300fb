"""Compiles attention.cu into a shared library with nvcc, cached by a hash of source and flags.

Run `python -m attention_cuda.build --arch 80 --arch 90` as the compile-only check CI can do
without a GPU: it always recompiles, prints the library's path and the time taken, and exits
non-zero if nvcc fails or prints any warning. `--ptxas-verbose` adds ptxas's register and
spill report. Not for: loading or calling the library (launch.py, __init__.py).
"""

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE = PACKAGE_DIR / "attention.cu"
BUILD_DIR = PACKAGE_DIR / "build"  # gitignored; one library per (source, flags) hash


def find_nvcc() -> str:
    """Path to nvcc from PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; raises if there is none."""
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("attention_cuda: nvcc not found — install the CUDA toolkit, or put its bin/ on PATH "
                       "or set CUDA_HOME")


def nvcc_flags(archs, ptxas_verbose: bool = False) -> list:
    """nvcc flags for a shared library with machine code for each arch ("80", "90", ...)."""
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0"]  # 0: an arch per CPU
    flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    if ptxas_verbose:
        flags += ["-Xptxas", "-v"]  # registers, shared memory and spills per kernel
    return flags


def library_path(archs, flags) -> Path:
    """Where the library for this source and these flags lives: a second build is a lookup."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    return BUILD_DIR / f"libgust_attention_sm{'_'.join(archs)}_{digest}.so"


def compile_library(archs, ptxas_verbose: bool = False, force: bool = False):
    """Runs nvcc unless the library already exists (or force). Returns (path, nvcc's output)."""
    archs = [str(arch) for arch in archs]
    nvcc = find_nvcc()
    flags = nvcc_flags(archs, ptxas_verbose)
    path = library_path(archs, flags)
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles; the others (DDP ranks) wait, then find it
        if path.exists() and not force:
            return path, ""
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        result = subprocess.run([nvcc, *flags, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = " | ".join(output.splitlines()[-12:])
            raise RuntimeError(f"attention_cuda: nvcc failed building {SOURCE.name} for sm_{','.join(archs)}: {tail}")
        partial.replace(path)  # atomic rename: no process ever loads a half-written library
    return path, output


def warnings_in(output: str) -> list:
    """nvcc, cicc, ptxas and host-compiler warning lines in a build's output."""
    return [line for line in output.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile-only check of attention_cuda/attention.cu (no GPU needed).")
    parser.add_argument("--arch", action="append", default=None,
                        help="compute capability without the dot, repeatable: 80 (A100), 90 (H100/H200)")
    parser.add_argument("--ptxas-verbose", action="store_true", help="print registers/smem/spills per kernel")
    args = parser.parse_args(argv)
    archs = args.arch or ["80", "90"]
    start = time.perf_counter()
    try:
        path, output = compile_library(archs, ptxas_verbose=args.ptxas_verbose, force=True)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if args.ptxas_verbose and output:
        print(output)
    warnings = warnings_in(output)
    for line in warnings:
        print(line, file=sys.stderr)
    print(f"built {path} for sm_{', sm_'.join(archs)} in {seconds:.1f} s, {len(warnings)} warnings")
    return 1 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
