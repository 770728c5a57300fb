"""Processes, devices and sharding: torchrun's ranks, --dist (ddp / zero1 / fsdp), and state that any layout can load.

train.py tells the story of a run; this file holds the plumbing that makes the same story run on one CPU or
on many GPUs: which device a rank uses, how the model and AdamW are wrapped or sharded, when gradients are
reduced, and how the whole model and optimizer state is gathered into one rank-independent layout (so a
checkpoint written by N ranks in one mode resumes on M ranks in another). Not in here: the loop, the loss
scaler, checkpoint files.
"""
import atexit
import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from configs import TrainConfig
import cpu_fp16
from checkpoint import checkpoint_step
from errors import UserError
from model import GPT


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--precision → the autocast dtype (fp32: no autocast)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto → bf16 where `device` multiplies bf16 natively, else fp32; any other value as it is.
    A CPU counts only where its flags say so (avx512_bf16, amx_bf16): where they cannot be read (macOS) or are
    missing, bf16 would be emulated, far slower than fp32. Each process decides for its own device."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if device.type == "cpu" and cpu_fp16.cpu_has_bf16_arithmetic(when_unknown=False) else "fp32"


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda → this process's device (auto: its GPU when there is one). Every entry point (train,
    eval, sample, the benchmarks) picks its device before it computes anything, so this is where MKL's vector math
    is readied first: without it a CPU run's bits can differ from the same run's (cpu_fp16.warm_up_vector_math)."""
    cpu_fp16.warm_up_vector_math()
    if requested == "cuda" and local_rank >= torch.cuda.device_count():  # else a traceback from deep in torch
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--device cuda: torch {torch.__version__} ({build}) sees {torch.cuda.device_count()} GPU(s) "
                        f"here{f', and this is local rank {local_rank}' if local_rank else ''} — use --device cpu "
                        "(or auto)")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def autocast(precision: str, device: torch.device):
    """The forward's precision context: autocast to bf16/fp16, or nothing for fp32."""
    return torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "fp32" else nullcontext()


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mode: str  # --dist, or "single" for one process (plain model and AdamW, whatever --dist says)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_processes(cfg: TrainConfig) -> Dist:
    """One process per device; torchrun sets RANK/WORLD_SIZE. NCCL on GPU, gloo on CPU."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
        torch.use_deterministic_algorithms(True)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if world_size > 1:
        # `import x.y as name` binds only `name`: a bare `import torch.distributed.nn` here would make `torch` a
        # local of this whole function, unbound on the lines above it
        import torch.distributed.nn as _before_init  # noqa: F401 (before the group exists: _hold_group_until_exit)
        if cfg.dist == "zero1":
            import torch.distributed.optim as _zero_before_init  # noqa: F401 (ZeRO imports it anyway, only later)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _hold_group_until_exit(dist.group.WORLD)
    return Dist(rank, local_rank, world_size, device, cfg.dist if world_size > 1 else "single")


_HELD_GROUPS = []
"""The process group, kept by this module from init to exit: _hold_group_until_exit."""


def _hold_group_until_exit(group):
    """Have the group's worker threads joined at exit while Python still runs, not during its finalization.

    destroy_process_group (train.finish) only unregisters the group: its backend, and gloo's worker threads, live on
    while anything holds it. A worker drops each finished collective itself, and their tensors and thread-local
    state hold Python objects, so it needs the GIL. One that asks for it once the interpreter is finalizing is ended
    by CPython (pthread_exit, before 3.14) through a noexcept C++ destructor: "terminate called without an active
    exception", SIGABRT, at the end of a run that went well. Dropping the last reference from C++ instead (DDP's
    reducer, GIL held) deadlocks: the destructor joins a worker that waits for the GIL. So this module holds the group
    and lets go last, at exit, after the run (DDP, ZeRO) has: the Python handle releases the GIL while the backend
    joins its workers. torch.distributed.nn and .optim take `group=group.WORLD` as a default argument; imported after
    init (DDP imports the first via torch.distributed._shard) they would hold the group for good, so they come first.
    FSDP's fully_shard keeps a reference of its own (not found): under --dist fsdp the workers still outlive Python.
    """
    if not _HELD_GROUPS:
        atexit.register(_release_held_groups)  # registered first, so it runs after the run's own exit handlers
    _HELD_GROUPS.append(group)


def _release_held_groups():
    gc.collect()  # holders in reference cycles let go first (the GIL held, but they are not the last)
    _HELD_GROUPS.clear()  # the last reference: the backend joins its worker threads here


def distribute(raw_model: GPT, cfg: TrainConfig, rt: Dist) -> torch.nn.Module:
    """The model the loop calls under --dist (with one process: raw_model itself, compiled if asked).

    ddp: every rank holds everything; gradients are all-reduced. zero1: the same, but AdamW's moments are
    sharded across ranks. fsdp: parameters, gradients and moments are all sharded (dim 0); a block's weights
    are gathered only around its forward and backward.
    """
    if rt.mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept FSDP2 here
            from torch.distributed._composable.fsdp import fully_shard
        for block in raw_model.transformer.h:  # one gather per block: only a block or two is whole at a time
            fully_shard(block, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        fully_shard(raw_model, reshard_after_forward=cfg.fsdp_reshard_after_forward)  # embeddings, ln_f, lm_head
    model = raw_model
    if rt.mode in ("ddp", "zero1"):
        model = torch.nn.parallel.DistributedDataParallel(  # bucket views: no second copy of the gradients
            model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True)
    # compile after wrapping, as torch documents: DDPOptimizer then splits the graph at DDP's bucket
    # boundaries, so gradient all-reduces overlap the rest of the backward
    return torch.compile(model) if cfg.compile else model


def gradient_sync(model, raw_model, rt: Dist, sync: bool):
    """Reduce gradients across ranks only on the last micro-step; before it, accumulate locally."""
    if rt.mode == "fsdp":
        raw_model.set_requires_gradient_sync(sync)
    return model.no_sync() if rt.mode in ("ddp", "zero1") and not sync else nullcontext()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP-sharded DTensor (gathered: every rank must call), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ----------------------------------------------------------------------------- rank-independent state

def full_state(raw_model, optimizer, rt: Dist) -> tuple[dict, dict]:
    """The whole model and AdamW state as one process would hold them, whatever --dist, so any number of ranks
    in any mode can resume. Every rank must call; under zero1 and fsdp only rank 0's copy is complete."""
    if rt.mode == "zero1":
        optimizer.consolidate_state_dict(to=0)  # every rank's shard of the moments, gathered on rank 0
        return raw_model.state_dict(), optimizer.state_dict() if rt.is_main else {}
    if rt.mode != "fsdp":
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered into rank 0's memory
    model_state = get_model_state_dict(raw_model, options=options)
    if not optimizer.state:  # no step yet: DCP would fill the state by a zero-gradient step, making AdamW's count 1
        return model_state, optimizer.state_dict()
    by_name = get_optimizer_state_dict(raw_model, optimizer, options=options)
    if not rt.is_main:
        return {}, {}
    ids = {name: i for i, name in enumerate(param_names(raw_model, optimizer))}  # AdamW's own numbering
    return model_state, {"state": {ids[name]: moments for name, moments in by_name["state"].items()},
                         "param_groups": [{**group, "params": [ids[name] for name in group["params"]]}
                                          for group in by_name["param_groups"]]}


def load_full_state(raw_model, optimizer, model_state: dict, optimizer_state: dict, rt: Dist):
    """The inverse of full_state: each rank keeps its own shard (zero1: of the moments; fsdp: of everything)."""
    if rt.mode != "fsdp":
        raw_model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)  # ZeroRedundancyOptimizer too: it takes the whole dict
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    names = param_names(raw_model, optimizer)
    by_name = {"state": {names[i]: moments for i, moments in optimizer_state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(raw_model, model_state, options=options)
    if optimizer_state["state"]:  # a step-0 checkpoint has none, and DCP would fill it by a zero-gradient step
        set_optimizer_state_dict(raw_model, optimizer, by_name, options=options)


def param_names(raw_model, optimizer) -> list[str]:
    """Parameter names in AdamW's order (group by group): its state_dict numbers them 0, 1, 2, ..."""
    name_of = {p: name for name, p in raw_model.named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def agree_on_resume(ckpt: Path | None, rt: Dist):
    """Every rank must resume from the same step: a run dir not shared by all nodes would silently diverge."""
    if rt.world_size == 1:
        return
    step = torch.tensor([-1 if ckpt is None else checkpoint_step(ckpt)], device=rt.device)
    low, high = step.clone(), step.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise UserError(f"ranks disagree on the checkpoint to resume (steps {low.item()} to {high.item()}; -1 = none): "
                           "--out-dir must be on a filesystem every node sees")


def agree_on_precision(precision: str, rt: Dist):
    """Every rank must train in the same precision. --precision auto is decided by each process for its own device,
    so nodes with different GPUs (or CPUs) could choose differently, while config.json records rank 0's choice."""
    if rt.world_size == 1:
        return
    chosen = [None] * rt.world_size
    dist.all_gather_object(chosen, precision)
    other = next((rank for rank, value in enumerate(chosen) if value != chosen[0]), None)
    if other is not None:
        raise UserError(f"--precision: rank 0 trains in {chosen[0]}, rank {other} in {chosen[other]} (auto decides "
                        "by each node's device) — give every node the same --precision")
