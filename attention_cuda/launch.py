"""ctypes bindings: call a built attention library's extern "C" functions on torch tensors.

For: passing raw pointers, strides, sizes and the stream to attention.cu's launchers, and turning
their error codes into one-line exceptions. No tensor math happens here (the caller allocates
every output and scratch buffer). The same calls drive the real CUDA library and the CPU
emulation that the tests build (emulate.py); both export the same functions.
Not for: checking shapes or dtypes (__init__.py does that), building (build.py), or autograd.
"""

import ctypes

import torch

from attention_cuda.reference import BLOCK_Q  # the kernels' Q-tile rows: one turn counter per Q tile

DTYPE_FLAGS = {torch.float16: 0, torch.bfloat16: 1}  # attention.cu's GUST_FP16, GUST_BF16
HEAD_DIMS = (64, 128)  # the head sizes attention.cu is instantiated for


def load(path) -> ctypes.CDLL:
    """Opens the shared library at `path` and declares its functions' C signatures."""
    lib = ctypes.CDLL(str(path))
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sizes = [pointer, integer, integer, integer, integer, real, integer, pointer]  # strides, B, H, T, D, scale, dtype, stream
    lib.gust_attention_forward.argtypes = [pointer] * 6 + sizes
    lib.gust_attention_forward.restype = integer
    lib.gust_attention_backward.argtypes = [pointer] * 11 + sizes
    lib.gust_attention_backward.restype = integer
    lib.gust_attention_backward_fused.argtypes = [pointer] * 13 + sizes
    lib.gust_attention_backward_fused.restype = integer
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


def _strides(*tensors):
    """The (batch, head, row) element strides of each (B, H, T, D) tensor, as one C long long array.

    A size-1 dimension's stride is never used to step, so it goes in as 0 (torch may give it any value).
    """
    values = []
    for tensor in tensors:
        if tensor.stride(3) != 1 and tensor.shape[3] > 1:
            raise ValueError(f"attention_cuda: the head dimension must be contiguous; got strides {tensor.stride()}")
        values += [tensor.stride(dim) if tensor.shape[dim] > 1 else 0 for dim in range(3)]
    return (ctypes.c_longlong * len(values))(*values)


def forward_into(lib, q, k, v, scale: float, o, lse, row_abs_max=None, stream: int = 0) -> None:
    """Runs the forward kernel, writing o (B, H, T, D) and lse (B, H, T), and if given row_abs_max
    (B, H, T): each row's max |scaled score| over its visible keys.

    q, k, v, o: any (B, H, T, D) views with a contiguous last dimension, 16-byte aligned data and
    strides that are multiples of 8 elements (views of c_attn's (B, T, 3C) output qualify); lse
    and row_abs_max contiguous fp32. All on the library's device; stream is a cudaStream_t as an
    int (0: the legacy default stream).
    """
    B, H, T, D = q.shape
    code = lib.gust_attention_forward(
        _pointer(q), _pointer(k), _pointer(v), _pointer(o), _pointer(lse), _pointer(row_abs_max),
        _strides(q, k, v, o), B, H, T, D, float(scale), DTYPE_FLAGS[q.dtype], ctypes.c_void_p(stream))
    check_code(lib, code, "forward")


def backward_into(lib, q, k, v, o, lse, do, k_mean, scale: float, dq, dk, dv, delta, stream: int = 0) -> None:
    """Runs the backward kernels, writing dq, dk, dv (B, H, T, D), and, as by-products of their first
    kernel, delta (B, H, T) = rowsum(dO * O) and k_mean (B, H, D) = each head's mean key (the dQ kernel
    centers keys on it), both contiguous fp32 whose contents beforehand do not matter.

    The 16-bit tensors are views as in forward_into.
    """
    B, H, T, D = q.shape
    code = lib.gust_attention_backward(
        _pointer(q), _pointer(k), _pointer(v), _pointer(o), _pointer(do), _pointer(lse), _pointer(k_mean),
        _pointer(delta), _pointer(dq), _pointer(dk), _pointer(dv), _strides(q, k, v, o, do, dq, dk, dv),
        B, H, T, D, float(scale), DTYPE_FLAGS[q.dtype], ctypes.c_void_p(stream))
    check_code(lib, code, "backward")


def backward_fused_into(lib, q, k, v, o, lse, do, k_mean, scale: float, dq, dk, dv, delta, dq_acc, dq_turn,
                        stream: int = 0) -> None:
    """The fused backward (one kernel for dK, dV and dQ, dQ added in a fixed order): the same
    arguments and outputs as backward_into, plus two scratch tensors whose contents do not matter
    (the kernel stores before it adds; the counters are zeroed on the stream): dq_acc, contiguous
    fp32 with B*H*T*D elements, 16-byte aligned (the fused backward's extra memory), and dq_turn,
    B*H*⌈T/64⌉ contiguous 32-bit counters."""
    B, H, T, D = q.shape
    if not (dq_acc.is_contiguous() and dq_acc.dtype == torch.float32 and dq_acc.numel() == B * H * T * D):
        raise ValueError("attention_cuda: dq_acc must be a contiguous fp32 tensor of B*H*T*D elements")
    if not (dq_turn.is_contiguous() and dq_turn.element_size() == 4 and dq_turn.numel() >= B * H * -(-T // BLOCK_Q)):
        raise ValueError("attention_cuda: dq_turn must hold B*H*ceil(T/64) contiguous 32-bit counters")
    code = lib.gust_attention_backward_fused(
        _pointer(q), _pointer(k), _pointer(v), _pointer(o), _pointer(do), _pointer(lse), _pointer(k_mean),
        _pointer(delta), _pointer(dq_acc), _pointer(dq_turn), _pointer(dq), _pointer(dk), _pointer(dv),
        _strides(q, k, v, o, do, dq, dk, dv), B, H, T, D, float(scale), DTYPE_FLAGS[q.dtype], ctypes.c_void_p(stream))
    check_code(lib, code, "fused backward")
