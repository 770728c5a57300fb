"""SIGKILL a training run at random moments (some inside a checkpoint save), resume, and check bitwise equality.

    python scripts/kill_test.py [--kills 10] [--seed 0]

Uses a small model on data/shakespeare (`make setup`). For each trial: start train.py, kill it with SIGKILL
after a random delay — or, for every third trial, while it is inside the save of a random checkpoint
(tests/pause_in_save.py) — then `--resume auto` to the end, and compare the final weights with an uninterrupted run.
Prints one line per trial and a summary. Not a test (it takes minutes): tests/test_faults.py covers 3 kill points.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoint  # noqa: E402
from configs import PRESETS, CheckpointConfig  # noqa: E402
from configs import to_json  # noqa: E402

STEPS, EVERY = 40, 4
SAVE_POINTS = ("mid_state", "before_manifest", "before_rename", "before_prune")  # tests/pause_in_save.py


def small_config(out_dir: Path):
    base = PRESETS["shakespeare-cpu"][1]
    return replace(base, model=replace(base.model, n_layer=2, n_embd=64, n_head=2, block_size=64, dropout=0.1),
                   max_steps=STEPS, global_batch_size=8, micro_batch_size=4, log_interval=1, eval_interval=10**9,
                   eval_batches=2, final_eval_batches=4, out_dir=out_dir, checkpoint=CheckpointConfig(schedule="every", every=EVERY, keep_last=0),
                   optim=replace(base.optim, warmup_steps=5, decay_steps=STEPS))


def run(cfg, work: Path, pause=None, kill_after=None, marker=None) -> int:
    """train.py on cfg; pause: (point, step) stops it inside that save (tests/pause_in_save.py) for the kill."""
    path = work / f"{cfg.out_dir.name}.json"
    path.write_text(json.dumps(to_json(cfg)))
    script = ["tests/pause_in_save.py", pause[0], str(pause[1]), str(marker)] if pause else ["train.py"]
    proc = subprocess.Popen([sys.executable, *script, str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill_after is not None or marker is not None:
        deadline = time.monotonic() + (kill_after or 120)
        while proc.poll() is None and time.monotonic() < deadline and not (marker and marker.exists()):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


def final_weights(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.latest_complete(run_dir))["model"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "kill-test")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rng = random.Random(args.seed)
    started = time.monotonic()
    assert run(small_config(args.work / "reference"), args.work) == 0, "the uninterrupted run failed"
    reference, full_time = final_weights(args.work / "reference"), time.monotonic() - started
    passed = 0
    for trial in range(args.kills):
        cfg = small_config(args.work / f"trial-{trial}")
        if trial % 3 == 2:  # inside a save, at one of the points pause_in_save.py knows
            step, point = rng.choice(range(EVERY, STEPS, EVERY)), rng.choice(SAVE_POINTS)
            marker = args.work / f"saving-{trial}"
            run(cfg, args.work, pause=(point, step), marker=marker)
            where = f"inside the save of step {step} ({point})"
        else:
            delay = rng.uniform(2.0, 0.8 * full_time)  # full_time includes the exit: later kills can miss the run
            run(cfg, args.work, kill_after=delay)
            where = f"after {delay:.1f} s"
        resumed_from = checkpoint.latest_complete(cfg.out_dir)
        code = run(replace(cfg, resume="auto"), args.work)
        same = code == 0 and all(torch.equal(t, final_weights(cfg.out_dir)[k]) for k, t in reference.items())
        passed += same
        print(f"trial {trial}: killed {where}; resumed from {resumed_from.name if resumed_from else 'scratch'}; "
              f"final weights {'bitwise equal' if same else 'DIFFERENT'}", flush=True)
    print(f"{passed}/{args.kills} kill points resumed bitwise equal to the uninterrupted run")
    sys.exit(0 if passed == args.kills else 1)


if __name__ == "__main__":
    main()
