"""gust's fused causal attention kernel (attention.cu) as one differentiable PyTorch op.

The one door model.py opens: `available()`, then `attention(q, k, v, scale)` with q, k, v of
shape (B, H, T, D), fp16 or bf16, on a CUDA device, D = 64 or 128. It computes
softmax(scale * q kᵀ, causal) v with fp32 scores and softmax ("upcast"), never storing the
(T, T) matrix. CPU tensors (any float dtype, any D) run reference.py's twin instead: slow, for tests.

Importing this package compiles nothing; the first CUDA call (or `available()`) runs nvcc once
per source version and GPU architecture and caches the library under attention_cuda/build/.
Not for: non-causal attention, dropout, masks, or GPUs older than sm_80.
"""

from pathlib import Path

import torch

from attention_cuda import launch as _launch
from attention_cuda import reference



def _compile_library(archs):
    # imported here, not at the top: `python -m attention_cuda.build` must not find build.py imported
    from attention_cuda.build import compile_library  # noqa: PLC0415

    return compile_library(archs)


__all__ = ["available", "unavailable_reason", "attention", "attention_with_max_score"]

_library = None  # the loaded ctypes library, once built
_failure = None  # why it cannot be loaded, once known (checked once per process)


def _current_arch() -> str:
    """The running GPU's compute capability as nvcc spells it: (9, 0) -> "90"."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def _load_library():
    """Builds (cached) and loads the library for the current GPU, or raises a one-line error."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("attention_cuda: no CUDA device (torch.cuda.is_available() is False)")
        arch = _current_arch()
        if int(arch) < 80:
            raise RuntimeError(f"attention_cuda: needs an sm_80+ GPU (Ampere or newer) for bf16 tensor cores; "
                               f"this one is sm_{arch}")
        path, _ = _compile_library([arch])
        library = _launch.load(path)
        _launch.check_code(library, library.gust_attention_check_device(64), f"device check of {path.name}")
    except Exception as error:  # remembered: a failed build is not retried on every call
        _failure = str(error)
        raise
    _library = library
    return _library


def available() -> bool:
    """True if a CUDA GPU is present and the kernel builds and loads for it. Never raises."""
    try:
        _load_library()
        return True
    except Exception:
        return False


def unavailable_reason() -> str:
    """Why available() is False, in one line ("" when it is True)."""
    try:
        _load_library()
        return ""
    except Exception as error:
        return str(error)


# ---- checks and the two implementations (CUDA kernel, CPU twin) ----

def _check_inputs(q, k, v) -> None:
    """One-line errors for inputs the op cannot take."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention_cuda: q, k, v must share one (B, H, T, D) shape; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention_cuda: q, k, v must share dtype and device; got "
                         f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if q.device.type == "cpu":
        return  # the twin takes any float dtype and head size
    if q.device.type != "cuda":
        raise ValueError(f"attention_cuda: tensors on {q.device} — the kernel runs on CUDA (CPU runs the twin)")
    if q.dtype not in _launch.DTYPE_FLAGS:
        raise ValueError(f"attention_cuda: dtype {q.dtype} unsupported — the kernel takes float16 or bfloat16 "
                         f"(use autocast or .to(torch.bfloat16))")
    if q.shape[-1] not in _launch.HEAD_DIMS:
        raise ValueError(f"attention_cuda: head size {q.shape[-1]} unsupported — the kernel is built for 64 and 128")


def _ready(tensor):
    """Contiguous and 16-byte aligned, as the kernel's 16-byte tile loads need (copies if not)."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream  # launch where torch's work on device is ordered


def _forward(q, k, v, scale: float, with_max_score: bool):
    """(y, lse, max_score): y (B, H, T, D); lse (B, H, T); max_score (B, H), or (0,) if not asked."""
    B, H, T, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for 16-bit inputs
    if q.device.type == "cpu":
        y, lse = reference.flash_forward(q.contiguous(), k, v, scale)
        max_score = reference.max_abs_score(q, k, scale) if with_max_score else q.new_empty((0,), dtype=acc)
        return y, lse, max_score
    library = _load_library()
    q, k, v = _ready(q), _ready(k), _ready(v)
    y = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    row_abs_max = torch.empty_like(lse) if with_max_score else None  # (B, H, T) per-row max |score|
    with torch.cuda.device(q.device):
        _launch.forward_into(library, q, k, v, scale, y, lse, row_abs_max, stream=_stream(q.device))
    max_score = row_abs_max.amax(dim=-1) if with_max_score else q.new_empty((0,), dtype=torch.float32)
    return y, lse, max_score


def _backward(grad_y, q, k, v, y, lse, scale: float):
    """(dq, dk, dv), each (B, H, T, D) in q's dtype."""
    if q.device.type == "cpu":
        return reference.flash_backward(q.contiguous(), k, v, y, lse, grad_y, scale)  # contiguous, as faked
    library = _load_library()
    q, k, v, y, grad_y = _ready(q), _ready(k), _ready(v), _ready(y), _ready(grad_y)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)  # (B, H, T) rowsum(dO * O), scratch for the kernels
    k_mean = k.mean(dim=2, dtype=torch.float32)  # (B, H, D) each head's mean key: the dQ kernel centers on it
    with torch.cuda.device(q.device):
        _launch.backward_into(library, q, k, v, y, lse, grad_y, k_mean, scale, dq, dk, dv, delta,
                              stream=_stream(q.device))
    return dq, dk, dv


# ---- autograd of the custom op (one opaque op for torch.compile) ----

def _setup_context(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    y, lse, _ = output
    ctx.save_for_backward(q, k, v, y, lse)  # the backward recomputes P from q, k and lse
    ctx.scale = scale


def _backward_from_context(ctx, grad_y, grad_lse, grad_max_score):
    q, k, v, y, lse = ctx.saved_tensors
    if grad_y is None:  # y unused by the loss
        grad_y = torch.zeros_like(y)
    dq, dk, dv = _backward_op(grad_y, q, k, v, y, lse, ctx.scale)
    return dq, dk, dv, None, None  # lse and max_score are not differentiated through


@torch.library.custom_op("gust::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     with_max_score: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, with_max_score)


@_flash_attention.register_fake
def _(q, k, v, scale, with_max_score):
    B, H, T, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    return (q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=acc),
            q.new_empty((B, H) if with_max_score else (0,), dtype=acc))


@torch.library.custom_op("gust::flash_attention_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                 lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_y, q, k, v, y, lse, scale)


@_backward_op.register_fake
def _(grad_y, q, k, v, y, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


_flash_attention.register_autograd(_backward_from_context, setup_context=_setup_context)


# ---- the door ----

def attention(q, k, v, scale: float):
    """Causal attention softmax(scale * q kᵀ) v with fp32 scores; differentiable in q, k, v.

    q, k, v: (B, H, T, D), fp16 or bf16 on CUDA with D in (64, 128) (CPU: any float, the twin).
    scale: e.g. 1/sqrt(D), times 1/layer_idx for GPT-2's deep-layer scaling; applied in fp32.
    Returns y: (B, H, T, D) contiguous, in q's dtype.
    """
    _check_inputs(q, k, v)
    return _flash_attention(q, k, v, float(scale), False)[0]


def attention_with_max_score(q, k, v, scale: float):
    """attention() plus each (batch, head)'s max |score|: (y, max_score (B, H) fp32).

    max_score = max over causal entries (j <= i) of |scale * q_i·k_j|, after scaling and before
    softmax (what model.py's naive and sdpa paths record): how close the scores come to
    overflowing. It carries no gradient.
    """
    _check_inputs(q, k, v)
    y, _, max_score = _flash_attention(q, k, v, float(scale), True)
    return y, max_score
