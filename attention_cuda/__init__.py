"""gust's fused causal attention kernel (attention.cu) as differentiable PyTorch ops.

The door model.py opens: `available()`, then either
- `attention_qkv(qkv, n_head, scale)`: qkv is c_attn's (B, T, 3C) output, y comes back as the
  (B, T, C) that c_proj takes. The kernels read q, k, v and write y in those layouts, and the
  backward returns d(qkv) as one (B, T, 3C) tensor: no split, transpose or copy on either side.
- `attention(q, k, v, scale)` with (B, H, T, D) q, k, v (any strides with a contiguous last
  dimension; the split-and-transpose views of c_attn's output are read in place) -> (B, H, T, D).
Both compute softmax(scale * q kᵀ, causal) v with fp32 scores and softmax ("upcast"), never
storing the (T, T) matrix; fp16 or bf16 on a CUDA device, D = 64 or 128. The `_with_max_score`
variants also return each (batch, head)'s max |score|. CPU tensors (any float dtype, any D) run
reference.py's twin instead: slow, for tests. Each is one torch.library custom op with a fake
(meta) implementation, so torch.compile traces it without a graph break.

The backward on CUDA is one of two, chosen once per process by the environment variable
GUST_ATTN_BACKWARD (read at import into `BACKWARD`): `split` (the default; a dK/dV kernel and a dQ
kernel, 7 matmuls, measured) or `fused` (one kernel for dK, dV and dQ, 5 matmuls, dQ added in a
fixed order so it stays bitwise deterministic; not yet measured on a GPU: NOTES.md says how
gpu_check's output decides which becomes the default). Both give dK, dV, dQ within rounding of
each other and are each bitwise repeatable.

Importing this package compiles nothing; the first CUDA call (or `available()`) runs nvcc once
per source version and GPU architecture and caches the library under attention_cuda/build/.
Not for: non-causal attention, dropout, masks, or GPUs older than sm_80.
"""

import contextlib
import os

import torch

from attention_cuda import launch as _launch
from attention_cuda import reference


def _compile_library(archs):
    # imported here, not at the top: `python -m attention_cuda.build` must not find build.py imported
    from attention_cuda.build import compile_library  # noqa: PLC0415

    return compile_library(archs)


__all__ = ["available", "unavailable_reason", "attention", "attention_with_max_score", "attention_qkv",
           "attention_qkv_with_max_score", "BACKWARD", "backward_kind"]

BACKWARDS = ("split", "fused")


def _backward_from_env(environ) -> str:
    """GUST_ATTN_BACKWARD's value ("split" when unset or empty); a one-line error for anything else."""
    return _checked_backward(environ.get("GUST_ATTN_BACKWARD", "").strip().lower() or "split", "GUST_ATTN_BACKWARD=")


def _checked_backward(name: str, what: str) -> str:
    if name not in BACKWARDS:
        raise ValueError(f"attention_cuda: {what}{name!r} — expected one of {', '.join(BACKWARDS)}")
    return name


# The one switch between the two backwards (see the module docstring): read once, here.
BACKWARD = _backward_from_env(os.environ)

_library = None  # the loaded ctypes library, once built
_failure = None  # why it cannot be loaded, once known (checked once per process)
_cpu_library = None  # inside emulated_on_cpu(): the CPU emulation of attention.cu, used for CPU tensors


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


@contextlib.contextmanager
def emulated_on_cpu():
    """For tests: inside this block, CPU tensors run attention.cu's own code under the CPU
    emulation (emulate.py, g++ needed) instead of reference.py's twin, with the CUDA path's
    checks (fp16/bf16, D 64 or 128) and the same strided reads and writes. Slow: tiny shapes only."""
    global _cpu_library
    from attention_cuda import emulate  # noqa: PLC0415 (builds with g++ on first use)

    previous, _cpu_library = _cpu_library, emulate.library()
    try:
        yield
    finally:
        _cpu_library = previous


@contextlib.contextmanager
def backward_kind(name: str):
    """For tests and gpu_check: inside this block the ops' backward is `name` ("split" or "fused")
    instead of BACKWARD's process-wide choice."""
    global BACKWARD
    previous, BACKWARD = BACKWARD, _checked_backward(name, "backward ")
    try:
        yield
    finally:
        BACKWARD = previous


# ---- checks and the implementations (CUDA kernel or its CPU emulation; the CPU twin) ----

def _runs_twin(tensor) -> bool:
    """CPU tensors run reference.py's twin, unless emulated_on_cpu() put the kernel's code there."""
    return tensor.device.type == "cpu" and _cpu_library is None

def _check_inputs(q, k, v) -> None:
    """One-line errors for inputs the op cannot take."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention_cuda: q, k, v must share one (B, H, T, D) shape; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention_cuda: q, k, v must share dtype and device; got "
                         f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if _runs_twin(q):
        return  # the twin takes any float dtype and head size
    if q.device.type not in ("cuda", "meta", "cpu"):  # meta: shapes only (the fakes); cpu: emulation
        raise ValueError(f"attention_cuda: tensors on {q.device} — the kernel runs on CUDA (CPU runs the twin)")
    if q.dtype not in _launch.DTYPE_FLAGS:
        raise ValueError(f"attention_cuda: dtype {q.dtype} unsupported — the kernel takes float16 or bfloat16 "
                         f"(use autocast or .to(torch.bfloat16))")
    if q.shape[-1] not in _launch.HEAD_DIMS:
        raise ValueError(f"attention_cuda: head size {q.shape[-1]} unsupported — the kernel is built for 64 and 128")


def _ready(tensor):
    """tensor itself if the kernel can read it in place, else a contiguous copy.

    In place means: last dimension contiguous, every stride a multiple of 8 elements and the data
    16-byte aligned (the kernel's tile loads are 16 bytes wide), as for views of c_attn's output.
    """
    strides_ok = all(stride % 8 == 0 for stride, size in zip(tensor.stride()[:-1], tensor.shape[:-1]) if size > 1)
    if tensor.stride(-1) == 1 and strides_ok and tensor.data_ptr() % 16 == 0:
        return tensor
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _kernel_library_for(device):
    """(library, stream, device context) to launch on: the CUDA build, or on CPU the emulation."""
    if device.type == "cpu":
        return _cpu_library, 0, contextlib.nullcontext()
    stream = torch.cuda.current_stream(device).cuda_stream  # launch where torch's work on device is ordered
    return _load_library(), stream, torch.cuda.device(device)


def _heads(x, n_head: int):
    """(B, T, n_head * D) -> the (B, n_head, T, D) view of its heads, sharing x's memory."""
    return x.unflatten(-1, (n_head, x.shape[-1] // n_head)).transpose(1, 2)


def _split_qkv(qkv, n_head: int):
    """c_attn's (B, T, 3C) output -> q, k, v as (B, n_head, T, D) views of it (no copy)."""
    return [_heads(part, n_head) for part in qkv.chunk(3, dim=-1)]


def _forward_into(q, k, v, y, scale: float, with_max_score: bool):
    """Writes y (B, H, T, D, any view) from q, k, v; returns (lse (B, H, T), max_score (B, H) or (0,))."""
    B, H, T, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for 16-bit inputs
    if _runs_twin(q):
        y_twin, lse = reference.flash_forward(q, k, v, scale)
        y.copy_(y_twin)
        max_score = reference.max_abs_score(q, k, scale) if with_max_score else q.new_empty((0,), dtype=acc)
        return lse, max_score
    library, stream, on_device = _kernel_library_for(q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    row_abs_max = torch.empty_like(lse) if with_max_score else None  # (B, H, T) per-row max |score|
    with on_device:
        _launch.forward_into(library, _ready(q), _ready(k), _ready(v), scale, y, lse, row_abs_max, stream=stream)
    max_score = row_abs_max.amax(dim=-1) if with_max_score else q.new_empty((0,), dtype=torch.float32)
    return lse, max_score


def _backward_into(grad_y, q, k, v, y, lse, scale: float, dq, dk, dv) -> None:
    """Writes dq, dk, dv (B, H, T, D, any views) for the forward that gave y and lse."""
    if _runs_twin(q):
        for grad, twin in zip((dq, dk, dv), reference.flash_backward(q, k, v, y, lse, grad_y, scale)):
            grad.copy_(twin)
        return
    library, stream, on_device = _kernel_library_for(q.device)
    q, k, v, y, grad_y = _ready(q), _ready(k), _ready(v), _ready(y), _ready(grad_y)
    B, H, T, D = q.shape  # scratch the kernels fill: delta = rowsum(dO * O), k_mean = each head's mean key (dQ's centre)
    delta, k_mean = torch.empty_like(lse), torch.empty((B, H, D), dtype=torch.float32, device=q.device)
    with on_device:
        if BACKWARD == "fused":  # scratch whose contents do not matter: fp32 dQ accumulator, turn counters
            dq_acc = torch.empty((B, H, T, D), dtype=torch.float32, device=q.device)
            dq_turn = torch.empty((B * H * -(-T // reference.BLOCK_Q),), dtype=torch.int32, device=q.device)
            _launch.backward_fused_into(library, q, k, v, y, lse, grad_y, k_mean, scale, dq, dk, dv, delta, dq_acc,
                                        dq_turn, stream=stream)
        else:
            _launch.backward_into(library, q, k, v, y, lse, grad_y, k_mean, scale, dq, dk, dv, delta, stream=stream)


def _stats_shapes(q, with_max_score: bool):
    """Empty lse (B, H, T) and max_score ((B, H) or (0,)) shaped as the ops return them (for fakes)."""
    B, H, T, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty((B, H, T), dtype=acc), q.new_empty((B, H) if with_max_score else (0,), dtype=acc)


# ---- op 1: (B, H, T, D) q, k, v -> (B, H, T, D) y ----

@torch.library.custom_op("gust::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     with_max_score: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = q.new_empty(q.shape)  # (B, H, T, D) contiguous
    lse, max_score = _forward_into(q, k, v, y, scale, with_max_score)
    return y, lse, max_score


@_flash_attention.register_fake
def _(q, k, v, scale, with_max_score):
    return (q.new_empty(q.shape), *_stats_shapes(q, with_max_score))


@torch.library.custom_op("gust::flash_attention_backward", mutates_args=())
def _flash_attention_backward(grad_y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              y: torch.Tensor, lse: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))  # (B, H, T, D) contiguous each
    _backward_into(grad_y, q, k, v, y, lse, scale, dq, dk, dv)
    return dq, dk, dv


@_flash_attention_backward.register_fake
def _(grad_y, q, k, v, y, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    y, lse, _ = output
    ctx.save_for_backward(q, k, v, y, lse)  # the backward recomputes P from q, k and lse
    ctx.scale = scale


def _flash_backward(ctx, grad_y, grad_lse, grad_max_score):
    q, k, v, y, lse = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y  # None: y unused by the loss
    dq, dk, dv = _flash_attention_backward(grad_y, q, k, v, y, lse, ctx.scale)
    return dq, dk, dv, None, None  # lse and max_score are not differentiated through


_flash_attention.register_autograd(_flash_backward, setup_context=_flash_setup_context)


# ---- op 2: c_attn's (B, T, 3C) qkv -> (B, T, C) y, and d(qkv) as one (B, T, 3C) tensor ----

@torch.library.custom_op("gust::attention_qkv", mutates_args=())
def _attention_qkv(qkv: torch.Tensor, n_head: int, scale: float,
                   with_max_score: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, C3 = qkv.shape
    y = qkv.new_empty((B, T, C3 // 3))  # (B, T, C): the kernel writes each head's D columns of it
    lse, max_score = _forward_into(*_split_qkv(qkv, n_head), _heads(y, n_head), scale, with_max_score)
    return y, lse, max_score


@_attention_qkv.register_fake
def _(qkv, n_head, scale, with_max_score):
    B, T, C3 = qkv.shape
    q = _split_qkv(qkv, n_head)[0]
    return (qkv.new_empty((B, T, C3 // 3)), *_stats_shapes(q, with_max_score))


@torch.library.custom_op("gust::attention_qkv_backward", mutates_args=())
def _attention_qkv_backward(grad_y: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                            n_head: int, scale: float) -> torch.Tensor:
    grad_qkv = qkv.new_empty(qkv.shape)  # (B, T, 3C): dq, dk, dv are written into its three parts
    _backward_into(_heads(grad_y, n_head), *_split_qkv(qkv, n_head), _heads(y, n_head), lse, scale,
                   *_split_qkv(grad_qkv, n_head))
    return grad_qkv


@_attention_qkv_backward.register_fake
def _(grad_y, qkv, y, lse, n_head, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_setup_context(ctx, inputs, output):
    qkv, n_head, scale, _ = inputs
    y, lse, _ = output
    ctx.save_for_backward(qkv, y, lse)
    ctx.n_head, ctx.scale = n_head, scale


def _qkv_backward(ctx, grad_y, grad_lse, grad_max_score):
    qkv, y, lse = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y  # None: y unused by the loss
    return _attention_qkv_backward(grad_y, qkv, y, lse, ctx.n_head, ctx.scale), None, None, None


_attention_qkv.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ---- the door ----

def attention(q, k, v, scale: float):
    """Causal attention softmax(scale * q kᵀ) v with fp32 scores; differentiable in q, k, v.

    q, k, v: (B, H, T, D), fp16 or bf16 on CUDA with D in (64, 128) (CPU: any float, the twin).
    Views are read in place when their last dimension is contiguous (e.g. the split-and-transpose
    of c_attn's output); others are copied first.
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


def _check_qkv(qkv, n_head: int) -> None:
    """One-line errors for a qkv the op cannot take, then the (B, H, T, D) checks on its parts."""
    if qkv.dim() != 3 or n_head <= 0 or qkv.shape[-1] % (3 * n_head) != 0:
        raise ValueError(f"attention_cuda: qkv must be (B, T, 3 * n_head * D); got {tuple(qkv.shape)} "
                         f"with n_head {n_head}")
    _check_inputs(*_split_qkv(qkv, n_head))


def attention_qkv(qkv, n_head: int, scale: float):
    """Causal attention straight from c_attn's output; differentiable in qkv.

    qkv: (B, T, 3C), C = n_head * D, laid out [q | k | v] along the last dimension with each
    part's heads in order (nanoGPT's and Hugging Face's c_attn). Returns y: (B, T, C), heads in
    the same order, ready for c_proj (what `y.transpose(1, 2).reshape(B, T, C)` of attention()'s
    output would be). The backward returns d(qkv) as one (B, T, 3C) tensor.
    """
    _check_qkv(qkv, n_head)
    return _attention_qkv(qkv, int(n_head), float(scale), False)[0]


def attention_qkv_with_max_score(qkv, n_head: int, scale: float):
    """attention_qkv() plus each (batch, head)'s max |score| (as attention_with_max_score): (y, (B, H))."""
    _check_qkv(qkv, n_head)
    y, _, max_score = _attention_qkv(qkv, int(n_head), float(scale), True)
    return y, max_score
