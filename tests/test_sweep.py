"""sweep.py and compare.py: the statistics against independent computations (scipy when installed, brute force,
hand-worked cases), and a 2-arm × 3-seed sweep of a tiny model end to end, including a resumed one."""
import itertools
import json
import math
import shutil
import statistics

import numpy as np
import pytest

import compare
import sweep
from conftest import ROOT, tiny_run
from configs import CheckpointConfig, to_json
from errors import UserError


# ----------------------------------------------------------------------------- statistics

def test_sign_flip_hand_computed():
    # diffs 3, 1, 1: of the 8 sign patterns only +++ and −−− reach |sum| ≥ 5, so p = 2/8
    p, how = compare.sign_flip_p(np.array([3.0, 1.0, 1.0]), seed=0)
    assert p == 0.25 and "all 8" in how
    # 1, 2, −2.5, 0.5 (sum 1): |±1 ±2 ±2.5 ±0.5| ≥ 1 fails only for sums of 0 (1+2−2.5−0.5 and its negation)
    assert compare.sign_flip_p(np.array([1.0, 2.0, -2.5, 0.5]), seed=0)[0] == 14 / 16


def test_relabel_hand_computed():
    # pooled 1 2 3 4, 'other' any 2 of them: mean differences 2, −2, −1, 0, 0, 1 → |·| ≥ 2 twice in 6
    p, how = compare.relabel_p(np.array([1.0, 2.0]), np.array([3.0, 4.0]), seed=0)
    assert p == pytest.approx(1 / 3) and "all 6" in how


def brute_force_relabel_p(base, other):
    """An independent, slow version: every subset by itertools, the statistic recomputed from scratch."""
    pooled = list(base) + list(other)
    observed = abs(statistics.mean(other) - statistics.mean(base))
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(other)):
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += abs(statistics.mean(pooled[i] for i in chosen) - statistics.mean(rest)) >= observed - 1e-12
        total += 1
    return hits / total


def test_relabel_unequal_sizes_brute_force():
    rng = np.random.default_rng(1)
    base, other = rng.normal(0, 1, 4), rng.normal(0.8, 1, 6)
    assert compare.relabel_p(base, other, seed=0)[0] == pytest.approx(brute_force_relabel_p(base, other))


def test_p_values_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    base = rng.normal(2.5, 0.01, 6)
    other = base + rng.normal(0.006, 0.005, 6)  # paired: shared seed noise plus a small effect

    def mean_diff(x, y, axis=-1):
        return np.mean(y, axis=axis) - np.mean(x, axis=axis)

    paired = scipy_stats.permutation_test((base, other), mean_diff, permutation_type="samples",
                                          n_resamples=np.inf, alternative="two-sided", vectorized=True)
    assert compare.sign_flip_p(other - base, seed=0)[0] == pytest.approx(paired.pvalue)
    unpaired_other = rng.normal(2.51, 0.01, 6)
    unpaired = scipy_stats.permutation_test((base, unpaired_other), mean_diff, permutation_type="independent",
                                            n_resamples=np.inf, alternative="two-sided", vectorized=True)
    assert compare.relabel_p(base, unpaired_other, seed=0)[0] == pytest.approx(unpaired.pvalue)
    # the paired difference compare.py reports is the one ttest_rel tests (its t = mean / (std / √n))
    result = compare.compare_arm(dict(enumerate(base)), dict(enumerate(other)), resamples=1000, seed=0)
    t = scipy_stats.ttest_rel(other, base).statistic
    assert result["paired"] and result["diff"] == pytest.approx(t * np.std(other - base, ddof=1) / math.sqrt(6))


def test_monte_carlo_close_to_exact():
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.3, 1, 18)  # 2^18 > EXACT_LIMIT: sampled
    exact = np.mean(np.abs((1 - 2 * ((np.arange(2**18)[:, None] >> np.arange(18)) & 1)) @ diffs)
                    >= abs(diffs.sum()) - 1e-9)
    p, how = compare.sign_flip_p(diffs, seed=0)
    assert how.startswith("Monte Carlo") and abs(p - exact) < 0.01


def test_bootstrap_ci_matches_normal_theory():
    # many seeds: the percentile bootstrap of a mean ≈ mean ± 1.96 σ/√n (independent: a formula)
    rng = np.random.default_rng(5)
    base, other = rng.normal(0, 1, 400), rng.normal(0, 1, 400) + 0.5
    low, high = compare.bootstrap_ci(base, other, paired=True, resamples=20_000, seed=0)
    diffs = other - base
    half_width = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.05)
    assert (high + low) / 2 == pytest.approx(diffs.mean(), abs=0.05 * half_width)


def test_identical_arm_is_no_difference():
    values = {21: 2.51, 49: 2.49, 81: 2.53}
    result = compare.compare_arm(values, dict(values), resamples=1000, seed=0)
    assert result["diff"] == 0 and result["p"] == 1.0 and result["verdict"].startswith("no difference")
    # an interval that covers 0 is no call either, whatever the point estimate; and 3 seeds could not make one
    noisy = compare.compare_arm(values, {21: 2.50, 49: 2.52, 81: 2.50}, resamples=1000, seed=0)
    assert noisy["ci"][0] < 0 < noisy["ci"][1]
    assert noisy["verdict"].startswith("too few seeds to tell: the 95% interval covers 0")


def test_metric_specs():
    run = compare.RunRecord("a", 1, None, {"max_steps": 20},
                            [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.5}, {"step": 15, "loss": 4.2}],
                            [{"step": 10, "val_bpb": 3.0}, {"step": 20, "val_bpb": 2.0}])
    assert compare.metric_value(run, "val_bpb") == 2.0
    assert compare.metric_value(run, "min:loss") == 4.2
    assert compare.metric_value(run, "val_bpb@step=10") == compare.metric_value(run, "val_bpb@10") == 3.0
    assert compare.metric_value(run, "val_bpb@step=15") is None
    with pytest.raises(UserError, match="--metric"):
        compare.metric_value(run, "mean of loss")


def test_bad_arms_are_one_line_errors():
    with pytest.raises(UserError, match="named twice"):
        sweep.parse_arms(["a", "a=--seed 3"])
    with pytest.raises(UserError, match="plain word"):
        sweep.parse_arms(["a/b=--model.n-layer 2"])


# ----------------------------------------------------------------------------- a tiny sweep, end to end

def final_bpb(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_bpb" in r][-1]["val_bpb"]


def test_tiny_sweep_end_to_end(tiny_data, tmp_path, capsys):
    base = tmp_path / "tiny.json"
    tiny = tiny_run(tiny_data, None, max_steps=6, eval_interval=3, eval_batches=2, final_eval_batches=2,
                    checkpoint=CheckpointConfig(schedule="every", every=3, keep_last=0))
    base.write_text(json.dumps(to_json(tiny)))
    argv = [str(base), "--runs-dir", str(tmp_path / "runs"), "--name", "demo", "--seeds", "1", "2", "3",
            "--arm", "base", "--arm", "hot=--optim.lr 0.01", "--parallel", "2"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "runs" / "demo"
    names = [f"{arm}-seed{seed}" for seed in (1, 2, 3) for arm in ("base", "hot")]
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "config.json").is_file()) == sorted(names)
    configs = {name: json.loads((sweep_dir / name / "config.json").read_text()) for name in names}
    assert all(configs[f"{arm}-seed{s}"]["seed"] == s for arm in ("base", "hot") for s in (1, 2, 3))
    # the config diff is exactly the override, from the runs' own files
    arms, notes = compare.load_runs([sweep_dir])
    assert notes == []
    assert compare.config_diff(arms) == {"hot": {"optim.lr": (0.003, 0.01)}}
    assert "hot: optim.lr: 0.003 → 0.01" in out

    # the table's numbers against an independent computation on the runs' own metrics
    bpb = {name: final_bpb(sweep_dir / name) for name in names}
    rows = {row["arm"]: row for row in compare.summarize(arms, ["val_bpb"], resamples=2000, seed=0)}
    base_values = [bpb[f"base-seed{s}"] for s in (1, 2, 3)]
    diffs = [bpb[f"hot-seed{s}"] - bpb[f"base-seed{s}"] for s in (1, 2, 3)]
    assert rows["base"]["mean"] == pytest.approx(statistics.mean(base_values))
    assert rows["base"]["std"] == pytest.approx(statistics.stdev(base_values))
    assert rows["hot"]["vs"]["diff"] == pytest.approx(statistics.mean(diffs))
    brute_p = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= abs(sum(diffs)) - 1e-12
                  for signs in itertools.product((1, -1), repeat=3)) / 8
    assert rows["hot"]["vs"]["paired"] and rows["hot"]["vs"]["p"] == pytest.approx(brute_p)

    report = (sweep_dir / "report.md").read_text()
    assert "![curves](curves.png)" in report and "optim.lr: 0.003 → 0.01" in report and "| hot |" in report
    assert (sweep_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a deliberately identical second arm: copies of the baseline's runs, compared as run directories
    for seed in (1, 2, 3):
        shutil.copytree(sweep_dir / f"base-seed{seed}", tmp_path / "twin" / f"base-seed{seed}")
        shutil.copytree(sweep_dir / f"base-seed{seed}", tmp_path / "twin" / f"copy-seed{seed}")
    assert compare.main([str(tmp_path / "twin"), "--no-plot"]) == 0
    twin = capsys.readouterr().out
    assert "| val_bpb | copy | 3 |" in twin and "no difference" in twin and "copy: none (identical configs)" in twin

    # a killed sweep: one run lost its final state; only that one runs again, from its step-3 checkpoint
    shutil.rmtree(sweep_dir / "hot-seed2" / "checkpoints" / "step-0000006")
    untouched = {name: (sweep_dir / name / "metrics.jsonl").stat().st_mtime_ns for name in names if name != "hot-seed2"}
    assert sweep.main(argv) == 0
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if line.startswith("sweep: run ")] == ["sweep: run hot-seed2"]
    assert again.count("sweep: skip ") == 5
    assert untouched == {name: (sweep_dir / name / "metrics.jsonl").stat().st_mtime_ns for name in untouched}
    assert final_bpb(sweep_dir / "hot-seed2") == pytest.approx(bpb["hot-seed2"])  # bitwise resume: same result
    assert "resumed from" in (sweep_dir / "logs" / "hot-seed2.log").read_text()

    # the same name with different arm flags would mix two experiments: refused before anything runs
    with pytest.raises(UserError, match="optim.lr"):
        sweep.main([*argv[:-4], "--arm", "hot=--optim.lr 0.02", "--parallel", "2"])
    emitted = [line for line in (sweep.main([*argv, "--emit"]), capsys.readouterr().out)[1].splitlines() if line]
    assert len(emitted) == 6 and all("--resume auto" in line and "--out-dir" in line for line in emitted)

    # extended by one more baseline seed: the earlier seeds and the hot arm stay in sweep.json, so compare.py
    # reports all four baseline runs and names hot's missing fourth (a rewritten record hid seeds 1-3)
    assert sweep.main([*argv[:5], "--seeds", "4", "--arm", "base", "--parallel", "2"]) == 0
    extended = capsys.readouterr().out
    assert "sweep: sweep.json keeps the earlier call's seeds 1 2 3 and arms hot" in extended
    assert "| val_bpb | base | 4 |" in extended and "| val_bpb | hot | 3 |" in extended
    arms, notes = compare.load_runs([sweep_dir])
    assert sorted(run.seed for run in arms["base"]) == [1, 2, 3, 4] and len(arms["hot"]) == 3
    assert notes == ["not run (no config.json): hot-seed4 — 1 of arm hot's 4 planned seeds"]


# ----------------------------------------------------------------------------- bad input: one line, nothing written

def no_training(monkeypatch):
    """sweep.run_all replaced by one that fails the test: these checks must stop the sweep before any run starts."""
    def run_all(*args, **kwargs):
        raise AssertionError("sweep.run_all reached: the bad input was not refused up front")
    monkeypatch.setattr(sweep, "run_all", run_all)


@pytest.mark.parametrize("flags, culprit", [(["--parallel", "-1"], "--parallel -1"),
                                            (["--parallel", "0"], "--parallel 0"),
                                            (["--threads", "0"], "--threads 0"),
                                            (["--seeds", "-1"], "--seeds -1"),
                                            (["--metric", "bad::x"], "--metric 'bad::x'"),
                                            (["--launcher", "torchrun 'x"], "--launcher \"torchrun 'x\""),
                                            (["--arm", 'a=--optim.lr "0.01'], "--arm 'a=--optim.lr \"0.01'"),
                                            # the sweep sets these per run: an override would lose, or win
                                            (["--arm", "s=--seed 5"], "--arm 's=--seed 5'"),
                                            (["--arm", "o=--out_dir=x"], "--arm 'o=--out_dir=x'"),
                                            (["--", "--resume", "auto"], "after --")])
def test_bad_flags_refused_before_anything_is_written(flags, culprit, tmp_path, monkeypatch):
    no_training(monkeypatch)
    sweep_dir = tmp_path / "runs" / "demo"
    sweep_dir.mkdir(parents=True)
    record = '{"an existing sweep": "its record must survive a bad flag"}\n'
    (sweep_dir / "sweep.json").write_text(record)
    with pytest.raises(UserError) as refused:
        sweep.main(["shakespeare-quick", "--runs-dir", str(tmp_path / "runs"), "--name", "demo", "--seeds", "1",
                    *flags])
    assert str(refused.value).startswith(f"{culprit}: ") and "\n" not in str(refused.value)
    assert (sweep_dir / "sweep.json").read_text() == record and [p.name for p in sweep_dir.iterdir()] == ["sweep.json"]


def test_malformed_config_json_is_one_line(tmp_path, monkeypatch):
    no_training(monkeypatch)
    run_dir = tmp_path / "runs" / "demo" / "base-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"seed": 1,')  # cut off mid-write
    with pytest.raises(UserError, match=r"base-seed1/config\.json: not a JSON config"):
        sweep.main(["shakespeare-quick", "--runs-dir", str(tmp_path / "runs"), "--name", "demo", "--seeds", "1"])
    assert not (run_dir.parent / "sweep.json").exists()


def test_all_runs_failed_still_says_so(tmp_path, monkeypatch, capsys):
    # every run fails before writing its config.json: compare.py finds no run directories, the summary still prints
    monkeypatch.setattr(sweep, "run_all", lambda runs, *args: list(runs))
    with pytest.raises(SystemExit) as exited:
        sweep.run_cli(sweep.main, ["shakespeare-quick", "--runs-dir", str(tmp_path / "runs"), "--name", "demo",
                                   "--seeds", "1", "2", "--parallel", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "sweep: 2 run(s) failed: base-seed1, base-seed2" in err and "no run directories" in err


def test_an_extended_sweep_keeps_the_earlier_record(tmp_path, capsys):
    sweep_dir, record_path = tmp_path / "runs" / "demo", tmp_path / "runs" / "demo" / "sweep.json"
    common = ["shakespeare-quick", "--runs-dir", str(tmp_path / "runs"), "--name", "demo", "--emit"]
    assert sweep.main([*common, "--seeds", "1", "2", "--arm", "base", "--arm", "hot=--optim.lr 0.01"]) == 0
    assert sweep.main([*common, "--seeds", "2", "3", "--arm", "base"]) == 0  # seed 2 again: listed once
    assert sweep.main([*common, "--seeds", "4", "--arm", "cold=--optim.lr 0.001"]) == 0
    capsys.readouterr()
    record = json.loads(record_path.read_text())
    assert record["seeds"] == [1, 2, 3, 4]
    assert record["arms"] == [{"name": "base", "overrides": []}, {"name": "hot", "overrides": ["--optim.lr", "0.01"]},
                              {"name": "cold", "overrides": ["--optim.lr", "0.001"]}]
    # what would mix two experiments under one name is refused, and the record is left as it was
    before = record_path.read_text()
    for flags, culprit in [(["--arm", "hot=--optim.lr 0.02"], "arm hot was made with '--optim.lr 0.01'"),
                           (["--", "--precision", "fp16"], "made with flags after -- []"),
                           (["--arm", "base"], "made with base 'shakespeare-quick'")]:
        argv = [*common, "--seeds", "5", *flags]
        if culprit.endswith("'shakespeare-quick'"):
            argv[0] = "shakespeare-cpu"
        with pytest.raises(UserError) as refused:
            sweep.main(argv)
        assert str(refused.value).startswith(f"{record_path}: ") and culprit in str(refused.value)
        assert record_path.read_text() == before and sorted(p.name for p in sweep_dir.iterdir()) == ["sweep.json"]
    # a config file named another way is the same base (a preset and a file never are)
    (tmp_path / "base.json").write_text("{}")
    spelled = [*common, "--seeds", "5"]
    spelled[0] = str(tmp_path / "base.json")
    record_path.write_text(before.replace('"base": "shakespeare-quick"', f'"base": "{tmp_path}/./base.json"'))
    assert sweep.main(spelled) == 0 and json.loads(record_path.read_text())["seeds"] == [1, 2, 3, 4, 5]
    record_path.write_text('{"an earlier": "record of something else"}\n')
    with pytest.raises(UserError, match=r"sweep\.json: not a sweep's record \(KeyError"):
        sweep.main([*common, "--seeds", "5"])


def test_the_makefile_and_sweep_py_default_to_mistrals_five_seeds():
    import re
    from configs import MISTRAL_SEEDS
    makefile = re.search(r"^SEEDS \?= ([\d ]+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert tuple(int(s) for s in makefile.split()) == MISTRAL_SEEDS == (21, 49, 81, 343, 777)
    assert sweep.parse_args(["shakespeare-quick", "--arm", "base"]).seeds == list(MISTRAL_SEEDS)
