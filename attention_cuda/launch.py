"""ctypes bindings: call a built attention library's extern "C" functions on torch tensors.

For: passing raw pointers, sizes and the stream to attention.cu's launchers, and turning their
error codes into one-line exceptions. No tensor math happens here (the caller allocates every
output and computes k_mean). The same calls drive the real CUDA library and the CPU emulation
that the tests build (emulate.py); both export the same functions.
Not for: checking shapes or dtypes (__init__.py does that), building (build.py), or autograd.
"""

import ctypes

import torch

DTYPE_FLAGS = {torch.float16: 0, torch.bfloat16: 1}  # attention.cu's GUST_FP16, GUST_BF16
HEAD_DIMS = (64, 128)  # the head sizes attention.cu is instantiated for


def load(path) -> ctypes.CDLL:
    """Opens the shared library at `path` and declares its functions' C signatures."""
    lib = ctypes.CDLL(str(path))
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.gust_attention_forward.argtypes = [pointer] * 6 + [integer, integer, integer, real, integer, pointer]
    lib.gust_attention_forward.restype = integer
    lib.gust_attention_backward.argtypes = [pointer] * 11 + [integer, integer, integer, real, integer, pointer]
    lib.gust_attention_backward.restype = integer
    lib.gust_attention_check_device.argtypes = [integer]
    lib.gust_attention_check_device.restype = integer
    lib.gust_attention_smem_bytes.argtypes = [integer, integer]
    lib.gust_attention_smem_bytes.restype = integer
    lib.gust_attention_error_string.argtypes = [integer]
    lib.gust_attention_error_string.restype = ctypes.c_char_p
    return lib


def check_code(lib, code: int, what: str) -> None:
    """Raises a one-line RuntimeError for a non-zero code returned by the library."""
    if code != 0:
        message = lib.gust_attention_error_string(code).decode()
        raise RuntimeError(f"attention_cuda {what}: error {code}: {message}")


def _pointer(tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else 0)  # None -> NULL


def forward_into(lib, q, k, v, scale: float, o, lse, row_abs_max=None, stream: int = 0) -> None:
    """Runs the forward kernel, writing o (B, H, T, D) and lse (B, H, T), and if given row_abs_max
    (B, H, T): each row's max |scaled score| over its visible keys.

    Every tensor must already be contiguous, 16-byte aligned and on the library's device;
    stream is a cudaStream_t as an int (0: the legacy default stream).
    """
    B, H, T, D = q.shape
    code = lib.gust_attention_forward(
        _pointer(q), _pointer(k), _pointer(v), _pointer(o), _pointer(lse), _pointer(row_abs_max),
        B * H, T, D, float(scale), DTYPE_FLAGS[q.dtype], ctypes.c_void_p(stream))
    check_code(lib, code, "forward")


def backward_into(lib, q, k, v, o, lse, do, k_mean, scale: float, dq, dk, dv, delta, stream: int = 0) -> None:
    """Runs the backward kernels, writing dq, dk, dv (B, H, T, D); delta (B, H, T) fp32 is scratch.

    k_mean: (B, H, D) fp32 contiguous, each head's mean key (the dQ kernel centers keys on it).
    """
    B, H, T, D = q.shape
    code = lib.gust_attention_backward(
        _pointer(q), _pointer(k), _pointer(v), _pointer(o), _pointer(do), _pointer(lse), _pointer(k_mean),
        _pointer(delta), _pointer(dq), _pointer(dk), _pointer(dv),
        B * H, T, D, float(scale), DTYPE_FLAGS[q.dtype], ctypes.c_void_p(stream))
    check_code(lib, code, "backward")
