"""Step time of a training configuration on this machine: `python scripts/bench_cpu.py [--iters N] PRESET [overrides]`.

Trains PRESET with the given train.py overrides for N iterations through train.py's own loop (a metrics row
every step, no periodic eval, no checkpoint kept) and prints the median seconds per iteration over iterations
5..N (the first ones hold start-up and, with --compile, compilation), tokens/s, and the machine. Measured
numbers only; nothing is asserted. Run it alone on the machine (nothing else busy) if you report the numbers.

The side-by-side with nanoGPT (issue 19): GPT-2's vocabulary, 4 layers, 4 heads, width 256, context 256,
batch 8, fp32, dropout 0, on the same uint16 token file (token values do not change the time):

    python scripts/bench_cpu.py --iters 40 shakespeare-cpu --model.vocab-size 50257 --model.n-layer 4 \\
        --model.n-head 4 --model.n-embd 256 --model.block-size 256 --model.dropout 0 --global-batch-size 8 \\
        --micro-batch-size 8 --precision fp32 --no-compile --diag-interval 0
    # the same with --model.vocab-size 50304: nanoGPT's padded vocabulary

and in a nanoGPT checkout (github.com/karpathy/nanoGPT, not vendored here), with data/gust/train.bin and
val.bin copied or linked from gust's data/shakespeare/ (no meta.pkl, so nanoGPT pads the vocabulary to 50304):

    python train.py --dataset=gust --device=cpu --compile=False --dtype=float32 --n_layer=4 --n_head=4 \\
        --n_embd=256 --block_size=256 --batch_size=8 --gradient_accumulation_steps=1 --dropout=0.0 \\
        --max_iters=40 --eval_interval=100000 --eval_iters=1 --log_interval=1 --always_save_checkpoint=False

and take the median of its "time ...ms" over iterations 5..40.
"""
import argparse
import datetime
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from configs import CheckpointConfig  # noqa: E402
from cpu_fp16 import cpu_model  # noqa: E402
from distributed import pick_device, resolve_precision  # noqa: E402
from errors import metrics_rows  # noqa: E402
from train import parse_config, train  # noqa: E402

FIRST_TIMED = 5
"""Iterations before this one are start-up (allocator warm-up, compilation) and left out of the median."""


def step_times(cfg, iters: int) -> list[float]:
    """Seconds of each iteration FIRST_TIMED..iters of cfg, trained in a scratch run directory."""
    with tempfile.TemporaryDirectory(prefix="gust-bench-") as scratch:
        run = replace(cfg, max_steps=iters, log_interval=1, eval_interval=10**9, eval_batches=1, final_eval_batches=1,
                      checkpoint=CheckpointConfig(schedule="none", keep_last=1), out_dir=Path(scratch) / "run",
                      resume="none", init_from=None, wandb_mode="disabled")
        train(run)
        rows = metrics_rows(run.out_dir / "metrics.jsonl")
    return [row["time_step"] for row in rows if "time_step" in row and row["step"] >= FIRST_TIMED]


def build_parser() -> argparse.ArgumentParser:
    """--iters; every other argument is train.py's (a preset and its overrides)."""
    parser = argparse.ArgumentParser(prog="scripts/bench_cpu.py", description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--iters", type=int, default=40, help="iterations to train (the median is over 5..N)")
    return parser


def main():
    parser = build_parser()
    args, train_args = parser.parse_known_args()
    if args.iters < FIRST_TIMED + 1:
        parser.error(f"--iters {args.iters}: at least {FIRST_TIMED + 1} are needed (iterations 1..{FIRST_TIMED - 1} "
                     f"are start-up, and the median wants at least two of {FIRST_TIMED}..N)")
    cfg = parse_config(train_args)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, pick_device(cfg.device)))  # auto: as train() decides
    times = step_times(cfg, args.iters)
    median = statistics.median(times)
    tokens_per_step = cfg.global_batch_size * cfg.model.block_size
    shape = cfg.model
    print(f"config: {cfg.preset} {' '.join(train_args[1:])}".rstrip())
    print(f"shape: vocab {shape.vocab_size}, {shape.n_layer} layers, {shape.n_head} heads, width {shape.n_embd}, "
          f"context {shape.block_size}, batch {cfg.global_batch_size}, {cfg.precision}, compile {cfg.compile}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"median {1000 * median:,.0f} ms/iteration over iterations {FIRST_TIMED}..{args.iters} "
          f"(min {1000 * min(times):,.0f}, max {1000 * max(times):,.0f}) | {tokens_per_step / median:,.0f} tokens/s")


if __name__ == "__main__":
    main()
