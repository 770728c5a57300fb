"""compare.py's verdict and its checks of what it is given: a difference is called only when the interval excludes 0
and p ≤ 0.05 (found in review: two agreeing seeds, p 0.5, were called "higher"); seeds too few to ever reach that
say so; metrics the benchmarks log are found; bad input is one line. The p-values themselves: test_sweep.py."""
from argparse import Namespace
from pathlib import Path

import pytest

import compare
from errors import UserError


def paired_verdict(diffs: list[float]) -> str:
    base = {seed: 1.0 for seed in range(len(diffs))}
    return compare.compare_arm(base, {seed: 1.0 + d for seed, d in enumerate(diffs)}, 2000, 0)["verdict"]


@pytest.mark.parametrize("diffs,starts", [
    ([0.1, 0.1], "too few seeds to tell"),               # p 0.5: the smallest 2 seeds allow
    ([0.2, 0.3, 0.25, 0.2, 0.3], "too few seeds to tell"),  # all agree, p 0.0625 = 2/2⁵ > 0.05
    ([0.2, 0.3, 0.25, 0.2, 0.3, 0.22], "higher by"),       # all agree, p 2/2⁶ = 0.031
    ([-0.2, -0.3, -0.25, -0.2, -0.3, -0.22], "lower by"),
    ([1, 1, 1, 1, 1, -0.1], "no difference detected: p 0.0625"),  # interval excludes 0, p does not
    ([1, 1, 1, 1, 1, 0], "too few seeds to tell"),         # a zero flips to itself: 5 seeds count, p ≥ 0.0625
    ([0.1, -0.1, 0.2, -0.2, 0.05, -0.05], "no difference detected: the 95% interval covers 0"),
])
def test_a_difference_is_called_only_at_p_005_with_the_interval_excluding_0(diffs, starts):
    assert paired_verdict(diffs).startswith(starts)


def test_unpaired_arms_too_small_for_p_005_say_so():
    # 2 + 2 runs: C(4, 2) = 6 relabelings, the smallest two-sided p is 1/3
    result = compare.compare_arm({1: 1.0, 2: 1.1}, {3: 2.0, 4: 2.1}, 2000, 0)
    assert not result["paired"] and result["verdict"].startswith("too few seeds to tell")
    assert "0.333" in result["verdict"]


def run_record(tmp_path: Path, eval_rows: list[dict]) -> compare.RunRecord:
    return compare.RunRecord("base", 1, tmp_path, {"max_steps": 10}, [{"step": 10, "loss": 3.0}], eval_rows)


def test_a_benchmark_score_in_the_eval_rows_is_a_metric(tmp_path):
    run = run_record(tmp_path, [{"step": 10, "val_bpb": 2.0, "hellaswag_acc_norm": 0.31}])
    assert compare.metric_value(run, "hellaswag_acc_norm") == 0.31 and compare.metric_value(run, "loss") == 3.0
    assert compare.metric_value(run, "max:hellaswag_acc_norm") == 0.31


def test_bad_arguments_are_one_line_before_anything_is_written(tmp_path):
    arms = {"base": [run_record(tmp_path, [{"step": 10, "val_bpb": 2.0}])]}
    ok = Namespace(resamples=10, out_dir=None)
    compare.check_args(ok, ["val_bpb", "min:loss"], arms)
    with pytest.raises(UserError, match="--metric min:los: no run logged 'los'"):
        compare.check_args(ok, ["val_bpb", "min:los"], arms)
    with pytest.raises(UserError, match="--resamples 0: must be at least 1"):
        compare.check_args(Namespace(resamples=0, out_dir=None), ["val_bpb"], arms)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--out-dir .*a_file: exists and is not a directory"):
        compare.check_args(Namespace(resamples=10, out_dir=tmp_path / "a_file"), ["val_bpb"], arms)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"run/config.json: not valid JSON"):
        compare.load_run(tmp_path / "run", "base")
