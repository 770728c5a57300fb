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


def test_start_up_evals_and_checkpoints_stay_out_of_elapsed_and_tokens_per_sec(tiny_data, tmp_path, monkeypatch):
    # each made 0.5 s slower: wandb's start (here: the metrics log's), and every eval; a tiny step takes ~10 ms
    import train as train_module

    class SlowStart(train_module.MetricsLog):
        def __init__(self, *args, **kwargs):
            time.sleep(0.5)
            super().__init__(*args, **kwargs)

    def slow_eval(*args, **kwargs):
        time.sleep(0.5)
        return evaluate_and_log(*args, **kwargs)

    evaluate_and_log = train_module.evaluate_and_log
    monkeypatch.setattr(train_module, "MetricsLog", SlowStart)
    monkeypatch.setattr(train_module, "evaluate_and_log", slow_eval)
    cfg = tiny_run(tiny_data, tmp_path / "run", max_steps=8, log_interval=2, eval_interval=2, diag_interval=0)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "tokens_per_sec" in row]
    assert [row["step"] for row in steps] == [2, 4, 6, 8]
    assert steps[0]["elapsed"] < 0.4  # two steps, not the 0.5 s before the first
    tokens_per_step = cfg.global_batch_size * cfg.model.block_size
    for row in steps[1:]:  # each window of 2 steps follows an eval: its rate is the steps' own (time_step: the last)
        assert row["tokens_per_sec"] > 0.25 * tokens_per_step / row["time_step"], row


def test_a_diagnosed_step_is_logged_whatever_the_log_interval(tiny_data, tmp_path):
    train(tiny_run(tiny_data, tmp_path / "run", max_steps=10, log_interval=4, diag_interval=3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "tokens_per_sec" in row]
    assert [row["step"] for row in steps] == [3, 4, 6, 8, 9]  # every 4th and every 3rd
    assert [row["step"] for row in steps if "attn_max_score" in row] == [3, 6, 9]
