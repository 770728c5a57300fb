"""`elapsed` in metrics.jsonl: every row has it, it never runs backwards, and a resumed run continues the clock."""
import json
import time
from dataclasses import replace

import checkpoint
from conftest import tiny_run
from train import train


def timed_train(cfg) -> float:
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def test_elapsed_is_in_every_row_and_continues_across_resume(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_run(tiny_data, run_dir, max_steps=10)  # eval and checkpoint every 5 steps
    first_wall = timed_train(replace(cfg, max_steps=5))
    saved = checkpoint.load(checkpoint.step_dir(run_dir, 5))["elapsed"]
    second_wall = timed_train(replace(cfg, resume="auto"))

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(row.get("elapsed"), float) for row in rows), rows  # train rows and eval rows alike
    clock = [row["elapsed"] for row in rows]
    assert clock == sorted(clock)  # in file order: steps 1..5 (+ eval), then the resumed 6..10 (+ eval)
    assert 0 < saved <= first_wall  # the checkpoint's clock, bounded by the wall clock of its own process
    after_resume = [row["elapsed"] for row in rows if row["step"] > 5]
    assert min(after_resume) >= saved  # continued from the checkpoint, not restarted at 0
    assert clock[-1] <= first_wall + second_wall
