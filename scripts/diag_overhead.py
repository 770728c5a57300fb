"""What the diagnostics cost: shakespeare-cpu throughput with --diag-interval at its default vs 0 (off).

    python scripts/diag_overhead.py [--steps 200] [--repeats 2]

Runs train.py's loop in this process, alternating the two settings (ABAB...) so drift hits both alike, and
prints each run's tokens/s (its tokens over the loop's time to its last step: `elapsed` of the last train row in
metrics.jsonl) and the median slowdown. --steps must reach at least one diagnosed step. Measured numbers only;
nothing is asserted.
"""
import argparse
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import PRESETS, CheckpointConfig  # noqa: E402
from errors import metrics_rows  # noqa: E402
from train import train  # noqa: E402


def tokens_per_sec(cfg) -> float:
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    train(cfg)
    rows = metrics_rows(cfg.out_dir / "metrics.jsonl")
    last = [row for row in rows if "tokens_per_sec" in row][-1]  # the loop's clock at its last step (no final eval)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    return last["step"] * cfg.global_batch_size * cfg.model.block_size / last["elapsed"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    base = PRESETS["shakespeare-cpu"][1]
    if args.steps < base.diag_interval or args.repeats < 1:
        parser.error(f"--steps {args.steps} --repeats {args.repeats}: the diagnostics run every {base.diag_interval} "
                     f"steps, so --steps must be at least that, and --repeats at least 1")
    base = replace(base, max_steps=args.steps, eval_interval=10**9, eval_batches=1, final_eval_batches=1, log_interval=25,
                   checkpoint=CheckpointConfig(schedule="none", keep_last=1), out_dir=Path("runs/diag-overhead"),
                   data=replace(base.data, verify="size"))
    results = {"on": [], "off": []}
    for _ in range(args.repeats):
        results["on"].append(tokens_per_sec(replace(base, diag_interval=PRESETS["shakespeare-cpu"][1].diag_interval)))
        results["off"].append(tokens_per_sec(replace(base, diag_interval=0)))
    for name, rates in results.items():
        print(f"diagnostics {name}: " + ", ".join(f"{r:,.0f}" for r in rates) + " tokens/s")
    slowdown = 1 - statistics.median(results["on"]) / statistics.median(results["off"])
    print(f"median slowdown with diagnostics every {base.diag_interval} steps: {100 * slowdown:.2f}%")


if __name__ == "__main__":
    main()
