"""The training loop: `python train.py <preset> [--overrides]`, unchanged under `torchrun --nproc_per_node=N`.

Reads as the story of a run: parse config → set up processes and seeds → build data, model, optimizer,
loss scaler → loop (batch, forward, backward, unscale/clip/step, log, eval, checkpoint) → clean exit.
Not in here: the model (model.py), tokens and batch order (data.py), checkpoint files (checkpoint.py).
"""
import os

PARENT_AT_START = os.getppid()  # read before the slow imports: under torchrun, the agent (rundir.die_with_parent)

import json  # noqa: E402 (the line above must come first)
import math
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import rundir
from configs import PRESETS, TrainConfig, changes_that_need_override, check_ranges, config_changes, from_json, to_json
from data import TokenSplit, rank_rows
from distributed import (Dist, agree_on_resume, autocast, distribute, full, full_state, gradient_sync, load_full_state,
                         setup_processes)
from errors import UserError, run_cli
from loss_scaler import DynamicLossScaler, unscale_and_clip
from model import GPT

PEAK_FLOPS = {  # device-name fragment: dense FLOP/s for (bf16/fp16 tensor cores, TF32 tensor cores, plain fp32)
    "H100": (989e12, 495e12, 67e12), "H200": (989e12, 495e12, 67e12), "A100": (312e12, 156e12, 19.5e12),
    "L4": (121e12, 60e12, 30e12), "A10": (125e12, 62.5e12, 31e12), "V100": (125e12, 15.7e12, 15.7e12)}
"""Peak FLOP/s for MFU, by the precision the matmuls run in (--peak-flops overrides). V100 has no TF32."""


# ----------------------------------------------------------------------------- processes, seeds

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> dict:
    """This rank's RNG states as plain lists and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": _to_lists(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


# ----------------------------------------------------------------------------- schedule, optimizer

def lr_at(opt_step: int, optim) -> float:
    """Warmup then decay to min_lr, as a function of the number of optimizer steps taken."""
    if opt_step < optim.warmup_steps:
        return optim.lr * (opt_step + 1) / optim.warmup_steps
    if optim.decay == "constant" or opt_step >= optim.decay_steps:
        return optim.lr if optim.decay == "constant" else optim.min_lr
    progress = (opt_step - optim.warmup_steps) / max(1, optim.decay_steps - optim.warmup_steps)
    shape = 1.0 - progress if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + shape * (optim.lr - optim.min_lr)


def build_optimizer(model: torch.nn.Module, optim, device: torch.device, sharded: bool = False):
    """AdamW with weight decay on ≥2-D weights only: biases and LayerNorm gains are not shrunk.
    sharded: ZeRO-1, each rank keeps the moments of (and updates) its share of the parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    hyper = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps,
             "fused": optim.fused and device.type == "cuda"}
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported here: 2 s at every start otherwise
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **hyper)
    return torch.optim.AdamW(groups, **hyper)


# ----------------------------------------------------------------------------- metrics, eval

class MetricsLog:
    """metrics.jsonl (one object per logged step), a console line, and wandb when enabled — rank 0 only."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, is_main: bool, resume_step: int | None, run_id: str):
        self.is_main, self.path, self.wandb = is_main, run_dir / "metrics.jsonl", None
        if not is_main:
            return
        if resume_step is not None and self.path.exists():  # drop rows of the interval about to be replayed
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            _write_atomic(self.path, "".join(row + "\n" for row in rows))
        elif resume_step is None:
            self.path.write_text("")
        if cfg.wandb_mode != "disabled":
            self.wandb = _start_wandb(cfg, run_dir, run_id)

    def log(self, row: dict, console: str | None = None):
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if not isinstance(v, list)}, step=row["step"])


def _start_wandb(cfg: TrainConfig, run_dir: Path, run_id: str):
    try:
        import wandb  # imported lazily: optional, and slow to import
    except ImportError:
        print("wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    return wandb.init(project=cfg.wandb_project, name=cfg.preset, id=run_id, resume="allow", mode=cfg.wandb_mode,
                      dir=str(run_dir), config=to_json(cfg))


@torch.no_grad()
def evaluate(model, split: TokenSplit, cfg: TrainConfig, ctx, rt: Dist, max_batches: int) -> dict:
    """Mean loss (nats/token) over consecutive val windows, split across ranks and summed exactly; and bits/byte."""
    model.eval()
    starts = split.eval_starts(max_batches * cfg.micro_batch_size)
    loss_sum, token_count = torch.zeros((), dtype=torch.float64, device=rt.device), 0
    per_round = rt.world_size * cfg.micro_batch_size
    for first in range(rt.rank * cfg.micro_batch_size, math.ceil(len(starts) / per_round) * per_round, per_round):
        idle = first >= len(starts)  # still run a forward: under fsdp every rank must join each block's gather
        x, y = split.windows(starts[:cfg.micro_batch_size] if idle else starts[first:first + cfg.micro_batch_size])
        with ctx:
            _, loss = model(x.to(rt.device), y.to(rt.device))
        if not idle:
            loss_sum += loss.double() * y.numel()
            token_count += y.numel()
    totals = torch.stack([loss_sum, torch.tensor(float(token_count), dtype=torch.float64, device=rt.device)])
    if rt.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    val_loss = (totals[0] / totals[1]).item()
    tokens_per_byte = len(split.tokens) / split.bytes  # the split's own ratio: tokenizer-independent bpb
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * tokens_per_byte, "val_tokens": int(totals[1])}


def flops_per_token(model: GPT) -> float:
    """6N for the weights (forward + backward) plus 12·L·C·T for attention scores (C = n_head × head size)."""
    c = model.config
    weights = model.num_params() - model.transformer.wpe.weight.numel()  # lookups, not matmuls
    return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_flops > 0 or device.type != "cuda":
        return cfg.peak_flops
    name = torch.cuda.get_device_name(device)
    column = 0 if cfg.precision in ("bf16", "fp16") else 1 if cfg.tf32 else 2  # score a run against its own peak
    return next((peaks[column] for key, peaks in PEAK_FLOPS.items() if key in name), 0.0)


# ----------------------------------------------------------------------------- provenance

def provenance(rt: Dist) -> dict:
    """Where and with what this run was made, for config.json and every checkpoint."""
    import tokenizers

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "torch": str(torch.__version__), "numpy": np.__version__, "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0], "device": device_name, "world_size": rt.world_size}


def _write_atomic(path: Path, text: str):
    """path holds the old text or the new, never half of one (a killed write leaves NAME.tmp, removed at the next start)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def check_batch_sizes(cfg: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps per optimizer step, or a one-line error naming the flags."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step != 0:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
                        f"{cfg.micro_batch_size} × world size {world_size}")
    return cfg.global_batch_size // per_step


# ----------------------------------------------------------------------------- the run

class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checks it at the next step boundary (all ranks agree)."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum


def open_data(cfg: TrainConfig, rt: Dist) -> tuple[TokenSplit, TokenSplit]:
    """Rank 0 checks the token files against meta.json (--data.verify); the others wait for its verdict."""
    def open_splits(verify):
        return [TokenSplit(cfg.data.dir, split, cfg.model.block_size, cfg.model.vocab_size, verify)
                for split in ("train", "val")]

    verdict, error = "", None
    if rt.is_main:
        try:
            splits = open_splits(cfg.data.verify)
        except Exception as err:  # any failure: the other ranks must not wait forever at the broadcast
            verdict, error = str(err) or type(err).__name__, err
    if rt.world_size > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if error is not None:
        raise error
    if verdict:
        raise UserError(f"rank 0 rejected the data: {verdict}")
    return tuple(splits) if rt.is_main else tuple(open_splits("size"))  # verified: the others only map the files


class Batches:
    """This rank's micro-batches, in the order of data.py's rule, delivered on the device.

    Each get() also starts fetching the micro-batch after it: gathered from the memory map into pinned memory
    and copied with non_blocking=True, so on a GPU the copy overlaps the compute of the current one (from
    ordinary pageable memory, a "non-blocking" copy is synchronous). Values and order are unchanged by this.
    """

    def __init__(self, split: TokenSplit, cfg: TrainConfig, rt: Dist, accum_steps: int):
        self.split, self.cfg, self.rt, self.accum_steps = split, cfg, rt, accum_steps
        self.pin = rt.device.type == "cuda"
        self.ahead = None  # ((step, micro_step), (x, y)) fetched one call early

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (micro_batch, T) int64 on the device for this step and micro-step."""
        key = (step, micro_step)
        batch = self.ahead[1] if self.ahead is not None and self.ahead[0] == key else self._fetch(key)
        following = (step, micro_step + 1) if micro_step + 1 < self.accum_steps else (step + 1, 0)
        self.ahead = (following, self._fetch(following))
        return batch

    def _fetch(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro_step = key
        cfg, rt = self.cfg, self.rt
        rows = rank_rows(cfg.global_batch_size, rt.world_size, rt.rank, cfg.micro_batch_size, micro_step)
        starts = self.split.sample_starts(cfg.seed, step * cfg.global_batch_size + rows.start, cfg.micro_batch_size)
        x, y = self.split.windows(starts)
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)


@dataclass
class Run:
    """Everything a run builds once and every step uses."""

    cfg: TrainConfig
    rt: Dist
    run_dir: Path
    raw_model: GPT  # the plain module: its parameters, diagnostics, state dicts
    model: torch.nn.Module  # what the loop calls: raw_model wrapped by --dist and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler
    params: list  # raw_model's trainable parameters, after distribute (fsdp swaps in sharded ones)
    train_split: TokenSplit
    val_split: TokenSplit
    batches: Batches  # this rank's micro-batches of train_split, on the device
    ctx: object  # autocast for bf16/fp16, a no-op for fp32
    accum_steps: int
    keep_steps: set  # checkpoints kept for good (the schedule); others roll with keep_last
    run_id: str
    made_with: dict  # provenance, computed once: git and versions don't change mid-run
    attn_impl: str  # the attention path taken on this device ("auto" resolved)
    clock_start: float = 0.0  # time.perf_counter() at `elapsed` 0, earlier processes' seconds already subtracted

    def elapsed(self) -> float:
        """Seconds of training so far, continued across resume: the loop with its evals and checkpoint writes."""
        return time.perf_counter() - self.clock_start


def build_run(cfg: TrainConfig) -> tuple[Run, int, int, Path | None, dict]:
    """Processes, data, model, optimizer and scaler; restored from a checkpoint when resuming. Writes nothing.
    Returns the run, the step and optimizer step to start from, the checkpoint resumed (or None) and the config
    fields that differ from that checkpoint's ({dotted key: (old, new)})."""
    rt = setup_processes(cfg)
    run_dir = cfg.run_dir()
    accum_steps = check_batch_sizes(cfg, rt.world_size)
    train_split, val_split = open_data(cfg, rt)

    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    raw_model = GPT(cfg.model).to(rt.device)
    ckpt = resume_point(cfg, run_dir)
    agree_on_resume(ckpt, rt)
    if ckpt is None and cfg.init_from is not None:
        init_weights(cfg.init_from, cfg, raw_model, rt)  # before distribute: every rank loads the same full weights
    attn_impl = raw_model.set_attn_impl(rt.device)
    model = distribute(raw_model, cfg, rt)
    optimizer = build_optimizer(raw_model, cfg.optim, rt.device, sharded=rt.mode == "zero1")
    scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.precision == "fp16")
    step, opt_step, run_id, changes = 0, 0, f"{cfg.preset}-{cfg.seed}-{int(time.time())}", {}
    trained_before = 0.0  # seconds of training in earlier processes of this run (from the checkpoint)
    if ckpt is not None:
        step, opt_step, run_id, changes, trained_before = restore(ckpt, cfg, raw_model, optimizer, scaler, train_split, rt)
    else:
        seed_everything(cfg.seed + rt.rank)  # dropout differs per rank, repeatably
    ctx = autocast(cfg.precision, rt.device)
    keep_steps = checkpoint.scheduled_steps(cfg.checkpoint.schedule, cfg.checkpoint.intervals, cfg.max_steps)
    run = Run(cfg, rt, run_dir, raw_model, model, optimizer, scaler, [p for p in raw_model.parameters() if p.requires_grad],
              train_split, val_split, Batches(train_split, cfg, rt, accum_steps), ctx, accum_steps, keep_steps, run_id,
              provenance(rt), attn_impl)
    run.clock_start = time.perf_counter() - trained_before  # start-up (data, model, restore) is not training time
    return run, step, opt_step, ckpt, changes


def train(cfg: TrainConfig) -> dict:
    """Check the config, take the run directory's lock (rank 0: the one writer), then build the run and loop."""
    check_ranges(cfg)  # parse_config checked already; this covers a TrainConfig built in code (tests, scripts)
    check_batch_sizes(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # here too: bad input is refused before the lock
    writer = int(os.environ.get("RANK", 0)) == 0  # rank 0 writes the run directory: it holds the lock
    with rundir.holding(cfg.run_dir()) if writer else nullcontext():  # before anything there is written or cleaned
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    run, step, opt_step, ckpt, changes = build_run(cfg)
    rt = run.rt
    tasks = None
    if cfg.eval_tasks:  # benchmark files read and tokenised once, before anything is written
        from eval import load_tasks, score_tasks
        tasks = load_tasks(cfg.eval_tasks, cfg.data.dir, cfg.model.block_size)
    if rt.is_main:
        record_start(run, ckpt, step, changes)
    log = MetricsLog(run.run_dir, cfg, rt.is_main, step if ckpt is not None else None, run.run_id)
    if rt.is_main:
        print(f"gust: {cfg.preset} | {run.raw_model.num_params() / 1e6:.2f}M params | attention {run.attn_impl} | "
              f"{cfg.precision} | {rt.world_size} × {rt.device.type} ({rt.mode}) | "
              f"accumulation {run.accum_steps} | from step {step}")
    tokens_per_step = cfg.global_batch_size * cfg.model.block_size
    flops_token, device_flops = flops_per_token(run.raw_model), peak_flops(cfg, rt.device)
    stop = StopRequest()
    if step == 0 and 0 in run.keep_steps and ckpt is None:
        save(run, 0, 0)
    last_log_time, last_log_step, result = time.perf_counter(), step, None
    run.model.train()
    while step < cfg.max_steps:
        timed = (step + 1) % cfg.log_interval == 0  # logged steps also synchronise the device for their timings
        diagnose = cfg.diag_interval > 0 and (step + 1) % cfg.diag_interval == 0
        t0 = time.perf_counter()
        out = optimization_step(run, step, opt_step, stop.signal, diagnose, timed)
        if out.non_finite:
            save(run, step, opt_step)  # the state before this step, the last good one (an existing good checkpoint stays)
            raise FloatingPointError(f"step {step + 1}: non-finite loss {out.loss} / grad norm {float(out.grad_norm)} "
                                     f"under {cfg.precision}; last good state saved at step {step}. "
                                     f"Last diagnostics: {out.stats}")
        step, opt_step = step + 1, out.opt_step

        if step % cfg.log_interval == 0:
            now = time.perf_counter()
            tokens_per_sec = tokens_per_step * (step - last_log_step) / (now - last_log_time)
            last_log_time, last_log_step = now, step
            row = train_row(step, out, opt_step, cfg, run.scaler, tokens_per_sec, flops_token, device_flops,
                            now - t0, run.raw_model, rt)
            row["elapsed"] = run.elapsed()
            log.log(row, console_line(row, cfg.max_steps))
        result = None
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            result = evaluate(run.model, run.val_split, cfg, run.ctx, rt,
                              cfg.final_eval_batches if step == cfg.max_steps else cfg.eval_batches)
            if tasks:  # the raw model: fsdp's gathers still run, DDP and compile are for training
                result.update(score_tasks(tasks, run.raw_model, rt.device, run.ctx, rt.rank, rt.world_size,
                                          cfg.micro_batch_size))
            log.log({"step": step, **result, "elapsed": run.elapsed()},
                    f"step {step:>7} | val loss {result['val_loss']:.4f} | val bits/byte {result['val_bpb']:.4f}")
        rolling = cfg.checkpoint.schedule == "every" and step % cfg.checkpoint.every == 0
        if step in run.keep_steps or rolling or out.stop_requested:
            save(run, step, opt_step)
        if out.stop_requested:
            signum = stop.signal or signal.SIGTERM  # a rank that was not signalled itself exits as if it had been
            if rt.is_main:
                print(f"gust: {signal.Signals(signum).name} received; checkpoint at step {step} written, exiting",
                      flush=True)
            finish(log, rt)
            sys.exit(128 + signum)  # the shell's convention for "ended by this signal"
    if result is None:  # resumed at the end: report the final numbers again, without a duplicate row
        result = evaluate(run.model, run.val_split, cfg, run.ctx, rt, cfg.final_eval_batches)
    finish(log, rt)
    if rt.is_main:
        print(f"gust: done at step {step} | val loss {result['val_loss']:.4f} | val bits/byte {result['val_bpb']:.4f}")
    return {"step": step, **result}


@dataclass
class StepResult:
    """What one optimizer step hands back to the loop."""

    loss: float  # mean training loss over the global batch (all ranks, all micro-batches)
    grad_norm: torch.Tensor  # true global norm, before clipping (inf/NaN on overflow)
    opt_step: int  # optimizer steps taken so far (a skipped fp16 step does not count)
    non_finite: bool  # fp32/bf16 only: the loss or gradients are inf/NaN, the run must stop
    stop_requested: bool  # some rank received SIGTERM/SIGINT
    stats: dict | None  # per-layer diagnostics, on diagnostic steps
    times: tuple  # seconds in data loading, forward + backward, optimizer


def optimization_step(run: Run, step: int, opt_step: int, stop_signal: int, diagnose: bool, timed: bool) -> StepResult:
    """One optimizer step: forward/backward over the micro-batches, unscale and clip, agree across ranks, then
    AdamW's step unless the loss scaler skips it."""
    cfg, rt, scaler = run.cfg, run.rt, run.scaler
    loss_sum = torch.zeros((), device=rt.device)
    data_time, compute_time, stats = 0.0, 0.0, None
    for micro_step in range(run.accum_steps):
        t_data = time.perf_counter()
        x, y = run.batches.get(step, micro_step)
        t_compute = time.perf_counter()
        data_time += t_compute - t_data
        record = diagnose and micro_step == 0  # the first micro-batch speaks for the step
        with gradient_sync(run.model, run.raw_model, rt, sync=micro_step == run.accum_steps - 1):
            with run.ctx:
                out = run.model(x, y, diagnose=record)  # (None, loss) or (None, loss, per-layer stats)
            loss = out[1]
            (loss * (scaler.scale / run.accum_steps)).backward()  # scaled: fp16 gradients stay above underflow
        loss_sum += loss.detach()
        compute_time += time.perf_counter() - t_compute
        if record:
            stats = {name: values.tolist() for name, values in out[2].items()}  # act_norm, attn_max_score

    t_opt = _sync(rt.device, timed)
    grad_norm = unscale_and_clip(run.params, scaler, cfg.optim.grad_clip)
    # one all-reduce carries three things: any rank overflowed, any rank was signalled, the mean loss.
    # Reading them back is the one host-device sync every step makes (the scaler must know before stepping).
    flags = torch.stack([(~torch.isfinite(grad_norm)).float(), torch.tensor(float(stop_signal > 0), device=rt.device),
                         loss_sum.float() / run.accum_steps])
    if rt.world_size > 1:
        dist.all_reduce(flags)  # the same decision on every rank, also when optimizer state is sharded
    overflow, stop_requested = bool(flags[0] > 0), bool(flags[1] > 0)
    loss_value = flags[2].item() / rt.world_size
    non_finite = not scaler.enabled and (overflow or not math.isfinite(loss_value))
    if not non_finite and not scaler.update(overflow):
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(opt_step, cfg.optim)
        run.optimizer.step()
        opt_step += 1
    run.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped, AdamW never saw them
    optimizer_time = _sync(rt.device, timed) - t_opt
    return StepResult(loss_value, grad_norm, opt_step, non_finite, stop_requested, stats,
                      (data_time, compute_time, optimizer_time))


def save(run: Run, at_step: int, opt_step: int):
    """A checkpoint of the state after at_step optimizer-loop steps (every rank calls; rank 0 writes)."""
    state = checkpoint_state(run, at_step, opt_step)
    state["elapsed"] = run.elapsed()  # a resumed run continues this clock
    if run.rt.is_main:
        checkpoint.save(run.run_dir, at_step, state, keep=at_step in run.keep_steps, keep_last=run.cfg.checkpoint.keep_last)
    if run.rt.world_size > 1:
        dist.barrier()  # nobody races ahead (or exits) while rank 0 is still writing


def _sync(device: torch.device, really: bool) -> float:
    if really and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_row(step, out: StepResult, opt_step, cfg, scaler, tokens_per_sec, flops_token, device_flops, step_time,
              raw_model, rt) -> dict:
    """One metrics.jsonl row: the numbers that tell a healthy run from one about to blow up."""
    norm = float(out.grad_norm)
    clipped = min(norm, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else norm
    with torch.no_grad():
        param_norm = float(torch.linalg.vector_norm(torch.stack([full(p.detach().float().norm())
                                                                 for p in raw_model.parameters()])))
    data_time, compute_time, optimizer_time = out.times
    row = {"step": step, "loss": out.loss, "lr": lr_at(max(opt_step - 1, 0), cfg.optim), "grad_norm": norm,
           "grad_norm_clipped": clipped, "loss_scale": scaler.scale, "skipped_steps": scaler.skipped_steps,
           "tokens_per_sec": tokens_per_sec, "param_norm": param_norm,
           "mfu": tokens_per_sec * rt.world_size * flops_token / device_flops if device_flops else None,
           "time_data": data_time, "time_fwd_bwd": compute_time, "time_optimizer": optimizer_time, "time_step": step_time,
           "peak_memory_gb": torch.cuda.max_memory_allocated(rt.device) / 1e9 if rt.device.type == "cuda" else None}
    if out.stats is not None:
        row.update(act_norm=out.stats["act_norm"], attn_max_score=out.stats["attn_max_score"])
    return row


def console_line(row: dict, max_steps: int) -> str:
    line = (f"step {row['step']:>7}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"grad {row['grad_norm']:.3f} | scale {row['loss_scale']:g} | skipped {row['skipped_steps']} | "
            f"{row['tokens_per_sec']:,.0f} tok/s")
    if row["mfu"] is not None:
        line += f" | mfu {100 * row['mfu']:.1f}%"
    if "attn_max_score" in row:
        line += f" | max|score| {max(row['attn_max_score']):.1f}"
    return line


def finish(log: MetricsLog, rt: Dist):
    if log.wandb is not None:
        log.wandb.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints in and out

def checkpoint_state(run: Run, step: int, opt_step: int) -> dict:
    """Everything needed to continue bitwise: weights, AdamW moments, scaler, counters, every rank's RNG."""
    mine = {"rng": rng_state(), "scaler": run.scaler.state_dict()}  # the scaler too: proof every rank agreed
    per_rank = [mine]
    if run.rt.world_size > 1:
        per_rank = [None] * run.rt.world_size
        dist.all_gather_object(per_rank, mine)
    model_state, optimizer_state = full_state(run.raw_model, run.optimizer, run.rt)
    return {"model": model_state, "optimizer": optimizer_state, "scaler": run.scaler.state_dict(),
            "step": step, "opt_step": opt_step, "per_rank": per_rank, "config": to_json(run.cfg),
            "data_sha256": {"train": run.train_split.meta["splits"]["train"]["sha256"],
                            "val": run.val_split.meta["splits"]["val"]["sha256"]},
            "wandb_run_id": run.run_id, "provenance": run.made_with}


def resume_point(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue, or None for a fresh start; refuses to start over a run by accident."""
    if cfg.resume == "none":
        if checkpoint.all_checkpoints(run_dir):  # never overwrite a run by accident
            raise UserError(f"{run_dir}: already holds checkpoints — pass --resume auto to continue it, "
                            "or choose a new --out-dir")
        return None
    if cfg.resume == "auto":
        found = checkpoint.all_checkpoints(run_dir)
        ckpt = checkpoint.latest_complete(run_dir)
        if found and ckpt is None:  # starting over would lose the run: only the user may decide that
            raise UserError(f"{run_dir}: none of its {len(found)} checkpoint(s) verifies (newest "
                            f"{found[0].name}: {checkpoint.verify(found[0])}) — nothing was changed; pass "
                            "--resume with a checkpoint path you trust, or start over in a new --out-dir")
        return ckpt
    path = Path(cfg.resume)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint directory")
    return path


def check_resume_config(state: dict, cfg: TrainConfig, train_split: TokenSplit, ckpt: Path) -> dict:
    """The fields that differ from the checkpoint's config, {dotted key: (old, new)}; a one-line UserError naming
    them if any changes the data stream or the optimisation (configs.FREE_ON_RESUME lists what may change) and
    --allow-config-change is not given."""
    changes = config_changes(state["config"], cfg)
    old_sha, new_sha = state.get("data_sha256", {}).get("train"), train_split.meta["splits"]["train"]["sha256"]
    if old_sha is not None and old_sha != new_sha:  # same path, other tokens: a different data stream
        changes["data.train_sha256"] = (old_sha, new_sha)
    for act_of_resuming in ("resume", "allow_config_change"):  # how this start was asked for, not a change
        changes.pop(act_of_resuming, None)
    blocked = changes_that_need_override(changes)
    if blocked and not cfg.allow_config_change:
        listed = ", ".join(f"{key} {json.dumps(old)} → {json.dumps(new)}" for key, (old, new) in blocked.items())
        raise UserError(f"{ckpt}: this resume changes the run — {listed} (checkpoint → now); resume with the "
                        "run's own values, or pass --allow-config-change to continue (recorded in config-changes.jsonl)")
    return changes


def record_start(run: Run, ckpt: Path | None, step: int, changes: dict):
    """Rank 0, lock held, run built: remove killed writers' leftovers; write config.json for a fresh run (never over
    a run's own), and append a resume's config changes, with the step they take effect, to config-changes.jsonl."""
    for path in rundir.remove_leftovers(run.run_dir):
        print(f"gust: removed {path}, left by a writer that was killed", flush=True)
    config_json = run.run_dir / "config.json"
    if ckpt is None or not config_json.exists():
        _write_atomic(config_json, json.dumps(to_json(run.cfg), indent=2))
    if changes:
        row = {"step": step, "checkpoint": str(ckpt), "overridden": run.cfg.allow_config_change,
               "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
        with open(run.run_dir / "config-changes.jsonl", "a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"gust: config changes from step {step}: {', '.join(changes)} (config-changes.jsonl)", flush=True)


def check_model_shape(state: dict, cfg: TrainConfig, ckpt: Path, same_padding: bool = False) -> None:
    """A checkpoint's weights fit only a model of the same shape: say which flag differs. The vocabulary's padding
    rows may differ for weights alone (GPT.load_state_dict fits them), not when resuming (AdamW's moments hold them)."""
    saved_model = state["config"]["model"]
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias"):
        if saved_model[name] != getattr(cfg.model, name):
            raise UserError(f"{ckpt}: checkpoint has model.{name} = {saved_model[name]}, but --model.{name.replace('_', '-')} "
                            f"is {getattr(cfg.model, name)}")
    rows = state["model"]["transformer.wte.weight"].size(0)  # what the weights hold: vocab_size plus padding
    if same_padding and rows != cfg.model.padded_vocab_size:
        raise UserError(f"{ckpt}: checkpoint holds {rows} vocabulary rows, but --model.vocab-multiple "
                        f"{cfg.model.vocab_multiple} gives {cfg.model.padded_vocab_size} — resume with "
                        f"--model.vocab-multiple {saved_model.get('vocab_multiple', 1)}")


def init_weights(path: Path, cfg: TrainConfig, raw_model, rt: Dist) -> None:
    """--init-from: only the model weights of a checkpoint directory, or of a run directory's newest one."""
    ckpt = path if (path / checkpoint.MANIFEST).is_file() else checkpoint.latest_complete(path)
    if ckpt is None:
        raise UserError(f"--init-from {path}: no complete checkpoint there (a step-XXXXXXX directory or a run "
                        f"directory holding checkpoints/)")
    state = checkpoint.load(ckpt)
    check_model_shape(state, cfg, ckpt)
    raw_model.load_state_dict(state["model"])
    if rt.is_main:
        print(f"gust: weights from {ckpt} (its step {state['step']}); optimizer and step start fresh", flush=True)


def restore(ckpt: Path, cfg: TrainConfig, model, optimizer, scaler, train_split: TokenSplit,
            rt: Dist) -> tuple[int, int, str, dict, float]:
    """Load a checkpoint into model, optimizer, scaler and RNG; returns its step, optimizer step, wandb id, the
    config changes (check_resume_config) and the seconds of training before it."""
    state = checkpoint.load(ckpt)
    check_model_shape(state, cfg, ckpt, same_padding=True)
    changes = check_resume_config(state, cfg, train_split, ckpt)
    load_full_state(model, optimizer, state["model"], state["optimizer"], rt)
    scaler.load_state_dict(state["scaler"])
    if len(state["per_rank"]) == rt.world_size:
        set_rng_state(state["per_rank"][rt.rank]["rng"])
    else:  # a new world size cannot continue the old per-rank streams; derive fresh ones from the step
        seed_everything(cfg.seed + rt.rank + 1_000_003 * state["step"])
    if rt.is_main:
        print(f"gust: resumed from {ckpt} (step {state['step']})", flush=True)
    elapsed = state.get("elapsed", 0.0)  # seconds of training before this checkpoint (older checkpoints: 0)
    return state["step"], state["opt_step"], state["wandb_run_id"], changes, elapsed


def parse_config(argv: list[str]) -> TrainConfig:
    """`train.py <preset> [--overrides]`, or `train.py path/to/config.json [--overrides]` to re-run a run.
    A config file is checked as strictly as the command line (unknown keys, types, ranges), before anything runs."""
    import tyro

    if argv and argv[0].endswith(".json"):
        path = Path(argv[0])
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        cfg = tyro.cli(TrainConfig, default=from_json(TrainConfig, values, where=str(path)), args=argv[1:],
                       prog="train.py CONFIG.json")
    else:
        cfg = tyro.extras.overridable_config_cli(PRESETS, args=argv, prog="train.py")
    check_ranges(cfg)
    return cfg


def main(argv: list[str]):
    rundir.die_with_parent(PARENT_AT_START)  # first: a worker whose torchrun agent is gone must not train on
    try:
        train(parse_config(argv))
    except FloatingPointError as err:  # the run diverged: the message says where and what was saved
        print(f"gust: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
