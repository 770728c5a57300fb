"""The training loop: `python train.py <preset> [--overrides]`, unchanged under `torchrun --nproc_per_node=N`.

Reads as the story of a run: parse config → set up processes and seeds → build data, model, optimizer,
loss scaler → loop (batch, forward, backward, unscale/clip/step, log, eval, checkpoint) → clean exit.
Not in here: the model (model.py), tokens and batch order (data.py), checkpoint files (checkpoint.py), what a
checkpoint holds and the checks before resuming (resume.py), the metrics log, val loss and MFU (metrics.py).
"""
import os

PARENT_AT_START = os.getppid()  # read before the slow imports: under torchrun, the agent (rundir.die_with_parent)

import io  # noqa: E402 (the line above must come first)
import json
import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext, redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import rundir
from configs import PRESETS, TrainConfig, absent_keys, check_ranges, from_json, to_json
from cpu_fp16 import emulated_bf16_warning, fp16_matmuls
from data import TokenSplit, rank_rows
from distributed import (Dist, agree_on_precision, agree_on_resume, autocast, distribute, full, gradient_sync,
                         pick_device, resolve_precision, setup_processes)
from errors import UserError, read_json, run_cli, said_once_per_node
from loss_scaler import DynamicLossScaler, unscale_and_clip
from metrics import MetricsLog, evaluate, flops_per_token, model_flops_utilization, peak_flops, start_wandb
from model import GPT
from resume import checkpoint_state, init_weights, provenance, record_start, restore, resume_point, seed_everything


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


# ----------------------------------------------------------------------------- the run

def check_batch_sizes(cfg: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps per optimizer step, or a one-line error naming the flags."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step != 0:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
                        f"{cfg.micro_batch_size} × world size {world_size}")
    return cfg.global_batch_size // per_step


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checks it at the next step boundary (all ranks agree)."""

    def __init__(self):
        self.signal = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum


def open_data(cfg: TrainConfig, rt: Dist) -> tuple[TokenSplit, TokenSplit]:
    """Local rank 0 of each node checks that node's token files against its meta.json (--data.verify); the other
    ranks wait for every node's verdict, then only map the files. Nodes whose copies were prepared differently
    (other shards or sha256s in meta.json) are refused: every rank must read the same tokens."""
    def open_splits(verify):
        return [TokenSplit(cfg.data.dir, split, cfg.model.block_size, cfg.model.vocab_size, verify)
                for split in ("train", "val")]

    verdict, error, identity, splits = "", None, None, None
    if rt.local_rank == 0:
        try:
            splits = open_splits(cfg.data.verify)
            # the tokens themselves (sizes, sha256s, fingerprints): not the tokenizer entry, which holds paths
            identity = (splits[0].meta["vocab_size"], [split.shards for split in splits])
        except Exception as err:  # any failure: the other ranks must not wait forever at the gather
            verdict, error = str(err) or type(err).__name__, err
    heard = [(verdict, identity)]
    if rt.world_size > 1:
        heard = [None] * rt.world_size
        dist.all_gather_object(heard, (verdict, identity))
    if error is not None:
        raise error
    with said_once_per_node(rt.local_rank):  # every rank heard the same verdicts (local rank 0 raised its own above)
        refuse_data(cfg, heard)
    return tuple(splits) if rt.local_rank == 0 else tuple(open_splits("size"))  # verified: the others map


def refuse_data(cfg: TrainConfig, heard: list[tuple[str, object]]) -> None:
    """Stop on a rank's rejection or on nodes that hold differently prepared data (heard: every rank's verdict and
    the identity of the tokens it checked, None where it checked none)."""
    rejected = next(((rank, verdict) for rank, (verdict, _) in enumerate(heard) if verdict), None)
    checked = [(rank, identity) for rank, (_, identity) in enumerate(heard) if identity is not None]
    other = next((rank for rank, identity in checked if identity != checked[0][1]), None)
    if rejected is not None:
        raise UserError(f"rank {rejected[0]} rejected the data: {rejected[1]}")
    if other is not None:
        raise UserError(f"{cfg.data.dir}: rank {other}'s node holds other prepared data than rank {checked[0][0]}'s "
                        "(meta.json's shards or their sha256s differ) — give every node the same preparation")


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
        # not past the last step: that batch is never trained on (and a bad token in it must not stop the run)
        self.ahead = (following, self._fetch(following)) if following[0] < self.cfg.max_steps else None
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
    made_with: dict  # provenance, computed once: git and versions don't change mid-run; attn_impl: the path taken
    clock_start: float = 0.0  # time.perf_counter() at `elapsed` 0, earlier processes' seconds already subtracted

    def elapsed(self) -> float:
        """Seconds of training so far, continued across resume: the loop with its evals and checkpoint writes."""
        return time.perf_counter() - self.clock_start


def build_run(cfg: TrainConfig) -> tuple[Run, int, int, Path | None, dict]:
    """Processes, data, model, optimizer and scaler; restored from a checkpoint when resuming. Writes nothing.
    Returns the run, the step and optimizer step to start from, the checkpoint resumed (or None) and the config
    fields that differ from that checkpoint's ({dotted key: (old, new)})."""
    rt = setup_processes(cfg)
    with said_once_per_node(rt.local_rank):  # every rank sees every rank's choice
        agree_on_precision(cfg.precision, rt)
    run_dir = cfg.run_dir()
    accum_steps = check_batch_sizes(cfg, rt.world_size)
    train_split, val_split = open_data(cfg, rt)

    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    raw_model = GPT(cfg.model).to(rt.device)
    ckpt = resume_point(cfg, run_dir)  # each rank's own: one may find what another, a moment before, did not
    with said_once_per_node(rt.local_rank):  # every rank heard the same steps
        agree_on_resume(ckpt, rt)
    if ckpt is None and cfg.init_from is not None:
        init_weights(cfg.init_from, cfg, raw_model, rt)  # before distribute: every rank loads the same full weights
    with said_once_per_node(rt.local_rank):  # a node's ranks have the same kind of device
        attn_impl = raw_model.set_attn_impl(rt.device)
    model = distribute(raw_model, cfg, rt)
    optimizer = build_optimizer(raw_model, cfg.optim, rt.device, sharded=rt.mode == "zero1")
    scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.precision == "fp16")
    step, opt_step, run_id, changes = 0, 0, f"{cfg.preset}-{cfg.seed}-{int(time.time())}", {}
    trained_before = 0.0  # seconds of training in earlier processes of this run (from the checkpoint)
    made_with = provenance(rt, cfg, attn_impl)
    if ckpt is not None:
        step, opt_step, run_id, changes, trained_before = restore(ckpt, cfg, raw_model, optimizer, scaler, train_split,
                                                                  rt, made_with)
    else:
        seed_everything(cfg.seed + rt.rank)  # dropout differs per rank, repeatably
    ctx = autocast(cfg.precision, rt.device)
    keep_steps = checkpoint.scheduled_steps(cfg.checkpoint.schedule, cfg.checkpoint.intervals, cfg.max_steps)
    run = Run(cfg, rt, run_dir, raw_model, model, optimizer, scaler, [p for p in raw_model.parameters() if p.requires_grad],
              train_split, val_split, Batches(train_split, cfg, rt, accum_steps), ctx, accum_steps, keep_steps, run_id,
              made_with)
    run.clock_start = time.perf_counter() - trained_before  # start-up (data, model, restore) is not training time
    return run, step, opt_step, ckpt, changes


def train(cfg: TrainConfig) -> dict:
    """Check the config, take the run directory's lock (rank 0: the one writer), then build the run and loop."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # precision auto: decided once, recorded in config.json as such
    device = pick_device(cfg.device, local_rank)  # outside: a local rank past the node's GPU count fails alone
    with said_once_per_node(local_rank):  # every rank checks the same config alike
        cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
        check_ranges(cfg)  # parse_config checked already; this covers a TrainConfig built in code (tests, scripts)
        check_batch_sizes(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # here too: bad input is refused before the lock
    writer = int(os.environ.get("RANK", 0)) == 0  # rank 0 writes the run directory: it holds the lock
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # StopRequest's: for this run only
    with (rundir.holding(cfg.run_dir()) if writer else nullcontext(),  # before anything there is written or cleaned
          fp16_matmuls(cfg.precision, pick_device(cfg.device), cfg.compile)):  # CPU fp16 without fp16 units
        try:
            return _train(cfg)
        finally:  # train() called in a notebook or a test: Ctrl-C interrupts again once it returns
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _train(cfg: TrainConfig) -> dict:
    run, step, opt_step, ckpt, changes = build_run(cfg)
    built, rt = time.perf_counter(), run.rt
    tasks = None
    if cfg.eval_tasks:  # benchmark files read and tokenised once, before anything is written
        from eval import load_tasks
        tasks = load_tasks(cfg.eval_tasks, cfg.data.dir, cfg.model.block_size)
    wandb_run = start_wandb(cfg, run.run_dir, run.run_id) if rt.is_main else None  # may refuse: before any write
    if rt.is_main:
        record_start(run, ckpt, step, changes)
    log = MetricsLog(run.run_dir, rt.is_main, step if ckpt is not None else None, wandb_run)
    if rt.is_main:
        print(f"gust: {cfg.preset} | {run.raw_model.num_params() / 1e6:.2f}M params | "
              f"attention {run.made_with['attn_impl']} | {cfg.precision} | {rt.world_size} × {rt.device.type} "
              f"({rt.mode}) | accumulation {run.accum_steps} | from step {step}")
        if warning := emulated_bf16_warning(cfg.precision, rt.device.type):
            print(warning, file=sys.stderr)
    tokens_per_step = cfg.global_batch_size * cfg.model.block_size
    flops_token, device_flops = flops_per_token(run.raw_model), peak_flops(cfg, rt.device)
    stop = StopRequest()
    run.clock_start += time.perf_counter() - built  # the tasks, config.json and wandb's start are start-up too
    if step == 0 and 0 in run.keep_steps and ckpt is None:
        save(run, 0, 0)
    last_log_time, last_log_step, result = time.perf_counter(), step, None
    run.model.train()
    while step < cfg.max_steps:
        diagnose = cfg.diag_interval > 0 and (step + 1) % cfg.diag_interval == 0  # a diagnosed step is logged too
        timed = diagnose or (step + 1) % cfg.log_interval == 0  # logged steps synchronise the device for timings
        t0 = time.perf_counter()
        out = optimization_step(run, step, opt_step, stop.signal, diagnose, timed)
        if out.non_finite:
            save(run, step, opt_step)  # the state before this step, the last good one (an existing good checkpoint stays)
            raise FloatingPointError(f"step {step + 1}: non-finite loss {out.loss} / grad norm {float(out.grad_norm)} "
                                     f"under {cfg.precision}; last good state saved at step {step}. "
                                     f"Last diagnostics: {out.stats}")
        step, opt_step = step + 1, out.opt_step

        if step % cfg.log_interval == 0 or out.stats is not None:
            now = time.perf_counter()
            tokens_per_sec = tokens_per_step * (step - last_log_step) / (now - last_log_time)
            last_log_time, last_log_step = now, step
            row = train_row(step, out, opt_step, cfg, run.scaler, tokens_per_sec, flops_token, device_flops,
                            now - t0, run.raw_model, rt)
            row["elapsed"] = run.elapsed()
            log.log(row, console_line(row, cfg.max_steps))
        result, paused = None, time.perf_counter()
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            result = evaluate_and_log(run, log, tasks, step)
        rolling = cfg.checkpoint.schedule == "every" and step % cfg.checkpoint.every == 0
        if step in run.keep_steps or rolling or out.stop_requested:
            save(run, step, opt_step)
        last_log_time += time.perf_counter() - paused  # tokens/s counts training steps, not evals and checkpoints
        if out.stop_requested:
            exit_for_signal(log, rt, stop.signal, step)
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
    clipped = min(norm, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 and math.isfinite(norm) else norm  # a skip
    with torch.no_grad():
        param_norm = float(torch.linalg.vector_norm(torch.stack([full(p.detach().float().norm())
                                                                 for p in raw_model.parameters()])))
    data_time, compute_time, optimizer_time = out.times
    row = {"step": step, "loss": out.loss, "lr": lr_at(max(opt_step - 1, 0), cfg.optim), "grad_norm": norm,
           "grad_norm_clipped": clipped, "loss_scale": scaler.scale, "skipped_steps": scaler.skipped_steps,
           "tokens_per_sec": tokens_per_sec, "param_norm": param_norm,
           "mfu": model_flops_utilization(tokens_per_sec, flops_token, rt.world_size, device_flops),
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


def evaluate_and_log(run: Run, log: MetricsLog, tasks: dict | None, step: int) -> dict:
    """Val loss and bits/byte (over final_eval_batches at the last step), the --eval-tasks benchmarks, one row."""
    cfg, rt = run.cfg, run.rt
    result = evaluate(run.model, run.val_split, cfg, run.ctx, rt,
                      cfg.final_eval_batches if step == cfg.max_steps else cfg.eval_batches)
    if tasks:  # the raw model: fsdp's gathers still run, DDP and compile are for training
        from eval import score_tasks  # imported only when --eval-tasks is given, as load_tasks is in _train
        result.update(score_tasks(tasks, run.raw_model, rt.device, run.ctx, rt.rank, rt.world_size,
                                  cfg.micro_batch_size))
    log.log({"step": step, **result, "elapsed": run.elapsed()},
            f"step {step:>7} | val loss {result['val_loss']:.4f} | val bits/byte {result['val_bpb']:.4f}")
    return result


def finish(log: MetricsLog, rt: Dist):
    if log.wandb is not None:
        log.wandb.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()


def exit_for_signal(log: MetricsLog, rt: Dist, signum: int, step: int):
    """After the stop checkpoint at step is written: every rank ends as the signal would have ended it."""
    signum = signum or signal.SIGTERM  # a rank that was not signalled itself exits as if it had been
    if rt.is_main:
        print(f"gust: {signal.Signals(signum).name} received; checkpoint at step {step} written, exiting", flush=True)
    finish(log, rt)
    sys.exit(128 + signum)  # the shell's convention for "ended by this signal"


def warn_of_absent_keys(path: Path, values: dict, cfg: TrainConfig) -> None:
    """A config.json written before some field existed runs with today's default there: maybe not the run it was.
    A field the command line sets is not news."""
    defaults, final = absent_keys(values, to_json(TrainConfig())), absent_keys(values, to_json(cfg))
    kept = {key: value for key, value in defaults.items() if final[key] == value}
    if kept:
        fields = ", ".join(f"{key} (today's default {json.dumps(value)} applies)" for key, value in kept.items())
        warnings.warn(f"{path} has no {fields}: written by an older gust, so this may not be the run it describes; "
                      "pass the value it ran with if it differs")


def parse_config(argv: list[str]) -> TrainConfig:
    """`train.py <preset> [--overrides]`, or `train.py path/to/config.json [--overrides]` to re-run a run.
    A config file is checked as strictly as the command line (unknown keys, types, ranges), before anything runs."""
    import tyro

    values = None  # the config file's, if one is given
    if argv and argv[0].endswith(".json"):
        path = Path(argv[0])
        if not path.exists():
            raise UserError(f"{path}: no such config file")
        if path.is_dir():
            raise UserError(f"{path}: a directory, not a config file (a run's is <run dir>/config.json)")
        values = read_json(path)
        cfg = tyro.cli(TrainConfig, default=from_json(TrainConfig, values, where=str(path)), args=argv[1:],
                       prog="train.py CONFIG.json")
    else:
        cfg = tyro.extras.overridable_config_cli(PRESETS, args=argv, prog="train.py")
    check_ranges(cfg)
    if values is not None:  # last: a file refused is one line, not a warning and the refusal
        warn_of_absent_keys(path, values, cfg)
    return cfg


def parse_once_per_node(argv: list[str]) -> TrainConfig:
    """parse_config; under torchrun every rank parses the same command line, so only each node's local rank 0
    speaks (its warnings, its refusal, tyro's); the others exit with the same status, quietly."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    with said_once_per_node(local_rank), redirect_stderr(io.StringIO()) if local_rank else nullcontext():
        return parse_config(argv)


def main(argv: list[str]):
    rundir.die_with_parent(PARENT_AT_START)  # first: a worker whose torchrun agent is gone must not train on
    try:
        train(parse_once_per_node(argv))
    except FloatingPointError as err:  # the run diverged: the message says where and what was saved
        print(f"gust: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
