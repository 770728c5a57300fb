"""What the loop measures and where the numbers go: metrics.jsonl, the console and wandb (MetricsLog); the val
loss and bits per byte during training (evaluate); FLOPs per token and the device's peak FLOP/s, for MFU.

Not in here: which numbers a training row holds and when they are logged (train.py's train_row and loop), scoring
a finished checkpoint or the benchmarks (eval.py).
"""
import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from configs import TrainConfig, to_json
from data import TokenSplit, write_atomic
from distributed import Dist
from errors import UserError, read_metrics_rows
from model import GPT

PEAK_FLOPS = {  # device-name fragment: dense FLOP/s for (bf16/fp16 tensor cores, TF32 tensor cores, plain fp32)
    "H100": (989e12, 495e12, 67e12), "H200": (989e12, 495e12, 67e12), "A100": (312e12, 156e12, 19.5e12),
    "L4": (121e12, 60e12, 30e12), "A10": (125e12, 62.5e12, 31e12), "V100": (125e12, 15.7e12, 15.7e12)}
"""Peak FLOP/s for MFU, by the precision the matmuls run in (--peak-flops overrides). V100 has no TF32."""


class MetricsLog:
    """metrics.jsonl (one object per logged step), a console line, and wandb when enabled — rank 0 only."""

    def __init__(self, run_dir: Path, is_main: bool, resume_step: int | None, wandb_run=None):
        self.is_main, self.path, self.wandb = is_main, run_dir / "metrics.jsonl", wandb_run
        if not is_main:
            return
        if resume_step is not None and self.path.exists():  # drop rows of the interval about to be replayed
            rows = [line for line, row in _rows(self.path) if row["step"] <= resume_step]
            write_atomic(self.path, "".join(row + "\n" for row in rows))
        elif resume_step is None:
            self.path.write_text("")

    def log(self, row: dict, console: str | None = None):
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            self.wandb.log(wandb_row(row), step=row["step"])


def wandb_row(row: dict) -> dict:
    """A row as wandb charts it: a list (one value per layer, a benchmark's 95% interval) as KEY/0, KEY/1, ..."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, list):
            flat.update({f"{key}/{i}": item for i, item in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, its row) of metrics.jsonl; a torn last line is dropped with a note: its step is replayed, logged again."""
    rows, torn = read_metrics_rows(path)
    if torn:
        print(f"gust: {torn}, dropped; its step is logged again", flush=True)
    return rows


def start_wandb(cfg: TrainConfig, run_dir: Path, run_id: str):
    """wandb's run for --wandb-mode offline|online, else None (disabled; or wandb missing: a warning). Started before
    the run writes anything, so a start wandb refuses (online without a login) is one line and no config.json."""
    if cfg.wandb_mode == "disabled":
        return None
    try:
        import wandb  # imported lazily: optional, and slow to import
    except ImportError:
        warnings.warn("wandb is not installed; logging to metrics.jsonl only")
        return None
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.preset, id=run_id, resume="allow", mode=cfg.wandb_mode,
                          dir=str(run_dir), config=to_json(cfg))
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as err:  # no or a bad API key
        raise UserError(f"--wandb-mode {cfg.wandb_mode}: wandb cannot start ({str(err).strip()}) — run `wandb login` "
                        "or set WANDB_API_KEY, or use --wandb-mode offline") from None


@torch.no_grad()
def evaluate(model, split: TokenSplit, cfg: TrainConfig, ctx, rt: Dist, max_batches: int) -> dict:
    """Mean loss (nats/token) over consecutive val windows, split across ranks and summed exactly; and bits/byte.
    max_batches counts global batches of windows (0: all): the val set must not move with --micro-batch-size, a
    memory setting, nor with the number of ranks; micro-batches only group the forwards. (--eval-unit micro: the
    old count, micro-batches, for runs configured before 2026-12-07.)"""
    model.eval()
    per_batch = cfg.global_batch_size if cfg.eval_unit == "global" else cfg.micro_batch_size
    starts = split.eval_starts(max_batches * per_batch)
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


def model_flops_utilization(tokens_per_sec: float, flops_token: float, world_size: int,
                            device_flops: float) -> float | None:
    """MFU: the model's FLOP/s over the peak of every device. tokens_per_sec counts the whole run's tokens (the
    global batch), so it is divided among world_size devices; None when the device's peak is unknown."""
    return tokens_per_sec * flops_token / (world_size * device_flops) if device_flops else None


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_flops > 0 or device.type != "cuda":
        return cfg.peak_flops
    name = torch.cuda.get_device_name(device)
    column = 0 if cfg.precision in ("bf16", "fp16") else 1 if cfg.tf32 else 2  # score a run against its own peak
    return next((peaks[column] for key, peaks in PEAK_FLOPS.items() if key in name), 0.0)

