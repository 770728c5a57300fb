"""compare.py's verdict and its checks of what it is given: a difference is called only when the interval excludes 0
and p ≤ 0.05 (found in review: two agreeing seeds, p 0.5, were called "higher"); seeds too few to ever reach that
say so; metrics the benchmarks log are found; bad input is one line. The p-values themselves: test_sweep.py."""
import json
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
    # a test that could never reach p ≤ 0.05 says so, also when its interval covers 0 (found in review)
    ([0.1, -0.1], "too few seeds to tell: the 95% interval covers 0"),
    ([0.1, -0.1, 0.2, -0.2, 0.05], "too few seeds to tell: the 95% interval covers 0"),
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
    ok = Namespace(resamples=10, out_dir=None, seed=0)
    compare.check_args(ok, ["val_bpb", "min:loss"], arms)
    with pytest.raises(UserError, match="--metric min:los: no run logged 'los'"):
        compare.check_args(ok, ["val_bpb", "min:los"], arms)
    with pytest.raises(UserError, match="--resamples 0: must be at least 1"):
        compare.check_args(Namespace(resamples=0, out_dir=None, seed=0), ["val_bpb"], arms)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--out-dir .*a_file: exists and is not a directory"):
        compare.check_args(Namespace(resamples=10, out_dir=tmp_path / "a_file", seed=0), ["val_bpb"], arms)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"run/config.json: not valid JSON"):
        compare.load_run(tmp_path / "run", "base")


# ----------------------------------------------------------------------------- found in review (2026-12-07)

def write_run(run_dir: Path, seed: int, final: float | str | None, max_steps: int = 10, extra: str = ""):
    """A hand-made gust run directory: config.json and metrics.jsonl with train rows 1..max_steps and evals at
    max_steps // 2 and max_steps (the last with val_bpb = final; None: the run stopped before it)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"seed": seed, "max_steps": max_steps, "preset": "t"}))
    rows = [{"step": step, "loss": 3.0 - step / 100} for step in range(1, max_steps + 1)]
    rows.insert(max_steps // 2, {"step": max_steps // 2, "val_bpb": 2.5})
    if final is not None:
        rows.append({"step": max_steps, "val_bpb": final})
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    (run_dir / "metrics.jsonl").write_text(text.replace('"val_bpb": "NaN"', '"val_bpb": NaN') + extra)


def run_compare(args: list, capsys, out_dir: Path) -> str:
    """compare.py's printed output; report.md goes to out_dir (with several paths the default is the working
    directory: a test must not write into the repository)."""
    assert compare.main([str(a) for a in args] + ["--no-plot", "--out-dir", str(out_dir)]) == 0
    return capsys.readouterr().out.replace(str(out_dir), "OUT")


def test_the_same_arm_and_seed_in_two_directories_is_refused(tmp_path):
    for parent, base in (("a", 2.0), ("b", 2.5)):
        for seed in (1, 2, 3):
            write_run(tmp_path / parent / f"base-seed{seed}", seed, base + seed / 10)
    with pytest.raises(UserError, match=r"a/base-seed1 and .*b/base-seed1: both are arm 'base' with seed 1"):
        compare.load_runs([tmp_path / "a", tmp_path / "b"])


def test_a_finished_run_without_a_finite_value_is_listed_not_dropped_unsaid(tmp_path, capsys):
    for seed in (1, 2, 3):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0 + seed / 10)
        write_run(tmp_path / f"new-seed{seed}", seed, "NaN" if seed == 3 else 2.2 + seed / 10)
    out = run_compare([tmp_path], capsys, tmp_path / "report")
    assert "| val_bpb | new | 2 of 3 (see below) |" in out
    assert f"left out of val_bpb (finished, but val_bpb is nan): {tmp_path / 'new-seed3'}" in out
    # 2 of 3: the seeds no longer match, so unpaired: 2.3, 2.4 against 2.1, 2.2, 2.3
    assert f"| {2.35 - 2.2:+.4f} |" in out and "(unpaired)" in out


def test_a_metric_at_a_step_never_logged_is_one_line(tmp_path, capsys):
    for seed in (1, 2):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0)
    with pytest.raises(UserError, match=r"--metric loss@step=999: no run logged 'loss' at step 999 \(logged at 1, "):
        compare.main([str(tmp_path), "--metric", "loss@step=999", "--no-plot"])
    with pytest.raises(UserError, match=r"--metric 'max:val_bpb@step=5': write KEY"):
        compare.main([str(tmp_path), "--metric", "max:val_bpb@step=5", "--no-plot"])
    assert capsys.readouterr().out == ""


def test_the_p_note_counts_only_seeds_with_a_nonzero_difference(tmp_path, capsys):
    for seed in range(1, 7):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0)
        write_run(tmp_path / f"new-seed{seed}", seed, 2.0 if seed == 6 else 2.125)
    out = run_compare([tmp_path], capsys, tmp_path / "report")
    assert "the smallest possible is 0.0625" in out  # the verdict: 2 / 2^5
    assert "with 6 seeds (5 with a non-zero difference) the smallest possible p is 0.0625." in out


def test_a_sweep_whose_baseline_has_no_runs_is_refused_and_missing_runs_are_listed(tmp_path, capsys):
    sweep = {"arms": [{"name": "base"}, {"name": "b"}, {"name": "c"}], "seeds": [1, 2, 3]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    for arm in ("b", "c"):
        for seed in (1, 2, 3):
            write_run(tmp_path / f"{arm}-seed{seed}", seed, 2.0 + seed / 10)
    with pytest.raises(UserError, match=r"the baseline arm 'base' has no run directories"):
        compare.main([str(tmp_path), "--no-plot"])
    out = run_compare([tmp_path, "--baseline", "b"], capsys, tmp_path / "report")
    assert "not run (no config.json): base-seed1, base-seed2, base-seed3 — 3 of arm base's 3 planned seeds" in out
    assert "| val_bpb | c | 3 |" in out


@pytest.mark.parametrize("damage,says", [
    ({"config.json": '{"max_steps": 10}'}, r"config.json: no integer 'seed'"),
    ({"config.json": "[1, 2]"}, r"config.json: no integer 'seed'"),
    ({"metrics.jsonl": '{"step": 1, "loss": 3.0}\n7\n{"step": 10, "val_bpb": 2.0}\n'}, r"metrics.jsonl:2: not a metrics row"),
    ({"metrics.jsonl": '{"step": 1, "loss": 3.0}\n{"step": 10, "val_bpb": "2.0"}\n'}, r"val_bpb = '2.0', not a number"),
])
def test_damaged_run_files_are_one_line(tmp_path, damage, says):
    for seed in (1, 2):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0)
    for name, text in damage.items():
        (tmp_path / "base-seed2" / name).write_text(text)
    with pytest.raises(UserError, match=says):
        compare.main([str(tmp_path), "--no-plot"])


def test_a_damaged_sweep_json_is_one_line(tmp_path):
    (tmp_path / "sweep.json").write_text('{"seeds": [1]}')
    with pytest.raises(UserError, match=r"sweep.json: not a sweep's record \(KeyError"):
        compare.main([str(tmp_path), "--no-plot"])


def test_a_torn_last_line_makes_an_unfinished_run_that_says_why(tmp_path, capsys):
    for seed in (1, 2, 3):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0 + seed / 10)
    write_run(tmp_path / "base-seed4", 4, None, extra='{"step": 10, "val_b')
    out = run_compare([tmp_path], capsys, tmp_path / "report")
    assert f"not finished (left out of the statistics): {tmp_path / 'base-seed4'} — at step 10 of 10; " in out
    assert "metrics.jsonl:12: cut short" in out


@pytest.mark.parametrize("flags,says", [
    (["--seed", "-1"], r"--seed -1: must be in \[0, 2\*\*63\)"),
    (["--out-dir", "{file}/sub"], r"--out-dir .*a_file/sub: .*a_file is not a directory"),
])
def test_bad_flags_are_one_line_before_anything_is_printed(tmp_path, capsys, flags, says):
    for seed in (1, 2):
        write_run(tmp_path / "runs" / f"base-seed{seed}", seed, 2.0)
    (tmp_path / "a_file").write_text("")
    flags = [flag.format(file=tmp_path / "a_file") for flag in flags]
    with pytest.raises(UserError, match=says):
        compare.main([str(tmp_path / "runs"), *flags, "--no-plot"])
    assert capsys.readouterr().out == ""


def test_the_unpaired_interval_does_not_depend_on_the_order_runs_are_named(tmp_path, capsys):
    values = {1: 2.013, 2: 2.31, 3: 2.1742, 4: 2.6391, 5: 2.9, 6: 2.2, 7: 3.0}  # off any lattice of means
    for seed, value in values.items():
        write_run(tmp_path / f"{'base' if seed <= 4 else 'new'}-seed{seed}", seed, value)
    names = [tmp_path / f"base-seed{seed}" for seed in (1, 2, 3, 4)] + [tmp_path / f"new-seed{s}" for s in (5, 6, 7)]
    forward = run_compare(names, capsys, tmp_path / "report")
    backward = run_compare(names[3::-1] + names[4:], capsys, tmp_path / "report")
    assert forward == backward  # the table, its notes and the config diff
    assert f"| {(2.9 + 2.2 + 3.0) / 3 - (2.013 + 2.31 + 2.1742 + 2.6391) / 4:+.4f} |" in forward
    assert "(unpaired)" in forward


def test_second_review_edges(tmp_path, capsys):
    """Found in the review of the fixes above: a directory spelled two ways is one run, not a duplicate; the
    too-few verdict says which arm has too few; blank lines in metrics.jsonl are skipped, not refused; a run
    without metrics.jsonl says so; a left-out note names the key."""
    for seed in (1, 2, 3):
        write_run(tmp_path / "runs" / f"base-seed{seed}", seed, 2.0 + seed / 10)
        write_run(tmp_path / "runs" / f"new-seed{seed}", seed, None if seed > 1 else 2.5)
    runs = tmp_path / "runs"
    metrics = runs / "base-seed1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace("\n", "\n\n", 1) + "\n\n")  # blank in the middle and at the end
    (runs / "new-seed3" / "metrics.jsonl").unlink()
    out = run_compare([runs, runs / ".." / "runs", "--metric", "min:loss"], capsys, tmp_path / "report")
    assert "| val_bpb | base | 3 |" in out and "cut short" not in out
    assert "too few usable runs: the baseline has 3, this arm 1 (need 2 each)" in out
    assert f"not finished (left out of the statistics): {runs / 'new-seed3'} — no step logged of 10; no " \
           "metrics.jsonl yet" in out
    write_run(runs / "other-seed1", 1, 2.0)
    (runs / "other-seed1" / "metrics.jsonl").write_text('{"step": 10, "val_bpb": 2.0}\n')
    out = run_compare([runs, "--metric", "min:loss"], capsys, tmp_path / "report")
    assert f"left out of min:loss (finished, but it logged no loss): {runs / 'other-seed1'}" in out


@pytest.mark.parametrize("seeds", [[1, 1, 2], [1.7, True]])
def test_a_sweep_json_with_bad_seeds_is_one_line(tmp_path, seeds):
    (tmp_path / "sweep.json").write_text(json.dumps({"arms": [{"name": "base"}], "seeds": seeds}))
    with pytest.raises(UserError, match=r"sweep.json: seeds .* each an integer, each once"):
        compare.main([str(tmp_path), "--no-plot"])


def test_a_baseline_named_without_runs_says_so(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"arms": [{"name": "base"}, {"name": "x"}], "seeds": [1, 2]}))
    for seed in (1, 2):
        write_run(tmp_path / f"base-seed{seed}", seed, 2.0)
    with pytest.raises(UserError, match=r"--baseline x: that arm has no run directories"):
        compare.main([str(tmp_path), "--baseline", "x", "--no-plot"])
