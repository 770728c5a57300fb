"""For the signal tests: run train.py with every logged step slowed down, so that a signal sent mid-run finds the
run mid-run on any machine (a tiny model's 12 steps can finish between a test's look and its signal).

    python tests/slow_steps.py SECONDS CONFIG.json [train.py flags...]

The sleep is patched into MetricsLog.log from here, so train.py carries no test hook. Not a test itself.
"""
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402


def main():
    seconds, *train_args = sys.argv[1:]
    original_log = metrics.MetricsLog.log

    def slow_log(self, *args, **kwargs):
        original_log(self, *args, **kwargs)
        time.sleep(float(seconds))  # a signal still lands at once: its handler runs, the loop sees it at the boundary

    metrics.MetricsLog.log = slow_log
    sys.argv = ["train.py", *train_args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
