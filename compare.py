"""Is arm B different from arm A, or could it be seed noise? `python compare.py runs/<sweep>` (or any run directories).

Per arm: mean ± std over seeds of the final val bits/byte and of any metric named with --metric. Per arm against
the baseline: the mean difference, a 95% percentile-bootstrap interval (seeded), an exact permutation p-value
(paired by seed, sign flips, when both arms have the same seeds; otherwise relabelings) and a verdict in words.
Also: the config diff read from the runs' own config.json, a picture (val bits/byte and train loss against step:
each arm's mean, min–max band, seeds faint) and report.md.
A difference is called only when the interval excludes 0 and p ≤ 0.05; seeds too few to ever reach that are
said to be too few. Runs left out (unfinished, nan, never logged the metric) are listed under the table.
numpy only. Not in here: running anything (sweep.py, train.py).
"""
import argparse
import itertools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import write_atomic
from errors import UserError, read_json, read_metrics_rows, run_cli
from plot import series

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # a difference is called at p ≤ ALPHA (and with the interval excluding 0)
EXACT_LIMIT = 200_000  # enumerate every permutation up to this many; beyond, a seeded Monte-Carlo sample
MONTE_CARLO = 100_000
IGNORED_KEYS = ("out_dir", "resume")  # differ between any two runs by design


# ----------------------------------------------------------------------------- runs and their metrics

@dataclass
class RunRecord:
    arm: str
    seed: int
    run_dir: Path
    config: dict
    train_rows: list[dict]
    eval_rows: list[dict]
    metrics_note: str | None = None  # no metrics.jsonl yet, or its last line left out (a crash or live run tore it)

    @property
    def finished(self) -> bool:
        return any(row["step"] == self.config["max_steps"] for row in self.eval_rows)


def load_run(run_dir: Path, arm: str) -> RunRecord:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: no config.json — not a gust run directory")
    config = read_json(config_path)
    for key in ("seed", "max_steps"):  # what compare reads of it; a hand-made or damaged file may lack them
        if not isinstance(config, dict) or type(config.get(key)) is not int:
            raise UserError(f"{config_path}: no integer {key!r} — not a gust run's config.json")
    metrics = run_dir / "metrics.jsonl"
    rows, note = [], f"no {metrics.name} yet"
    if metrics.is_file():
        rows, torn = read_metrics_rows(metrics)
        note = f"{torn}, left out" if torn else None
    train_rows, eval_rows = [row for _, row in rows if "val_bpb" not in row], [row for _, row in rows if "val_bpb" in row]
    return RunRecord(arm, config["seed"], run_dir, config, train_rows, eval_rows, note)


def sweep_runs(sweep_dir: Path) -> tuple[dict[str, list[RunRecord]], list[str]]:
    """{arm: runs} in sweep.json's order, and a note for each planned run that has no directory (yet)."""
    sweep = read_json(sweep_dir / "sweep.json")
    try:
        plan = [(arm["name"], list(sweep["seeds"])) for arm in sweep["arms"]]
    except (TypeError, KeyError) as err:
        raise UserError(f"{sweep_dir / 'sweep.json'}: not a sweep's record ({type(err).__name__}: {err}) — "
                        "sweep.py writes it with arms [{name, ...}] and seeds") from None
    seeds = plan[0][1] if plan else []
    if any(type(seed) is not int for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"{sweep_dir / 'sweep.json'}: seeds {seeds} — each an integer, each once")
    arms, notes = {}, []
    for name, seeds in plan:
        dirs = [sweep_dir / f"{name}-seed{seed}" for seed in seeds]
        arms[name] = [load_run(d, name) for d in dirs if (d / "config.json").is_file()]
        missing = [d.name for d in dirs if not (d / "config.json").is_file()]
        if missing:
            notes.append(f"not run (no config.json): {', '.join(missing)} — {len(missing)} of arm {name}'s "
                         f"{len(seeds)} planned seeds")
    return arms, notes


def load_runs(paths: list[Path]) -> tuple[dict[str, list[RunRecord]], list[str]]:
    """({arm: runs} in baseline-first order, notes). A sweep directory's sweep.json gives the arms and their order;
    otherwise an arm is a run directory's name without its -seed<S> tail, in the order first seen. Two runs of
    one arm with the same seed are refused: one would silently replace the other in the statistics."""
    if len(paths) == 1 and (paths[0] / "sweep.json").is_file():
        arms, notes = sweep_runs(paths[0])
    else:
        run_dirs, arms, notes = [], {}, []
        for path in paths:
            if not path.is_dir():
                raise UserError(f"{path}: no such directory")
            run_dirs += [path] if (path / "config.json").is_file() else sorted(p.parent for p in path.glob("*/config.json"))
        first_named = {}
        for run_dir in run_dirs:  # a directory named twice, however spelled, is one run
            first_named.setdefault(run_dir.resolve(), run_dir)
        for run_dir in first_named.values():
            arm = re.sub(r"-seed\d+$", "", run_dir.name)
            arms.setdefault(arm, []).append(load_run(run_dir, arm))
    for arm, runs in arms.items():
        by_seed = {}
        for run in runs:
            if run.seed in by_seed:
                raise UserError(f"{by_seed[run.seed].run_dir} and {run.run_dir}: both are arm {arm!r} with seed "
                                f"{run.seed} — compare them as two arms (rename one directory), or pass one")
            by_seed[run.seed] = run
    return arms, notes


def parse_metric(spec: str) -> tuple[str | None, str, str | None]:
    """(how, KEY, step) of a --metric spec; a UserError naming it if malformed."""
    match = re.fullmatch(r"(?:(min|max|last):)?([A-Za-z_][A-Za-z0-9_]*)(?:@(?:step=)?(\d+))?", spec)
    if not match or (match[1] and match[3]):  # min:KEY@step=N: one value at a step has nothing to take a min of
        raise UserError(f"--metric {spec!r}: write KEY, min:KEY, max:KEY or KEY@step=N (e.g. val_bpb, min:loss)")
    return match.groups()


def logs(run: RunRecord, key: str) -> list[dict]:
    """The rows a key is logged in: the eval rows (val_*, the benchmarks' scores) if any holds it, else train's."""
    return run.eval_rows if any(key in row for row in run.eval_rows) else run.train_rows


def metric_value(run: RunRecord, spec: str) -> float | None:
    """One number of a run. spec: `KEY` (its last value: val_bpb = the final eval), `min:KEY`, `max:KEY`,
    `KEY@N` or `KEY@step=N` (its value at step N). None when the run never logged it."""
    how, key, at_step = parse_metric(spec)
    steps, values = series(logs(run, key), key)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # a hand-edited row: say which
            raise UserError(f"{run.run_dir / 'metrics.jsonl'}: {key} = {value!r}, not a number")
    if at_step is not None:
        return next((v for s, v in zip(steps, values) if s == int(at_step)), None)
    if not values:
        return None
    return {"min": min, "max": max}.get(how, lambda v: v[-1])(values)


# ----------------------------------------------------------------------------- statistics (numpy only)

def bootstrap_ci(base: np.ndarray, other: np.ndarray, paired: bool, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of mean(other) − mean(base): seeds resampled with replacement
    (the per-seed differences together when paired, each arm on its own otherwise)."""
    rng = np.random.default_rng(seed)
    if paired:
        diffs = other - base
        means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    else:
        means = (other[rng.integers(0, len(other), (resamples, len(other)))].mean(axis=1)
                 - base[rng.integers(0, len(base), (resamples, len(base)))].mean(axis=1))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def at_least_as_extreme(null_stats: np.ndarray, observed: float) -> np.ndarray:
    """|null| ≥ |observed|, with a hair of slack: a permutation that equals the observed one must count,
    even when float rounding of the sum in another order makes it 1e-16 smaller."""
    return np.abs(null_stats) >= abs(observed) * (1 - 1e-9) - 1e-15


def sign_flip_p(diffs: np.ndarray, seed: int) -> tuple[float, str]:
    """Two-sided paired permutation test of mean(diffs) = 0: under the null each seed's difference is as likely
    negated, so flip every subset of signs (all 2^n when ≤ EXACT_LIMIT). Returns (p, how it was computed)."""
    n = len(diffs)
    if 2**n <= EXACT_LIMIT:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # (2^n, n): every ± pattern
        how = f"exact, all {2**n} sign flips"
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(MONTE_CARLO, n))
        how = f"Monte Carlo, {MONTE_CARLO:,} random sign flips"
    null_stats = (signs * diffs).mean(axis=1)
    hits = at_least_as_extreme(null_stats, diffs.mean()).sum()
    exact = how.startswith("exact")
    return float(hits / len(signs) if exact else (hits + 1) / (len(signs) + 1)), how


def relabel_p(base: np.ndarray, other: np.ndarray, seed: int) -> tuple[float, str]:
    """Two-sided unpaired permutation test of equal means: every way of choosing which len(other) of the pooled
    values are 'other' (all C(n+m, m) when ≤ EXACT_LIMIT). Returns (p, how it was computed)."""
    pooled, n_other = np.concatenate([base, other]), len(other)
    total, n_all = pooled.sum(), len(pooled)
    count = math.comb(n_all, n_other)
    if count <= EXACT_LIMIT:
        chosen = np.array(list(itertools.combinations(range(n_all), n_other)))  # (count, m) indices of 'other'
        how = f"exact, all {count} relabelings"
    else:
        rng = np.random.default_rng(seed)
        chosen = np.argsort(rng.random((MONTE_CARLO, n_all)), axis=1)[:, :n_other]
        how = f"Monte Carlo, {MONTE_CARLO:,} random relabelings"
    other_sums = pooled[chosen].sum(axis=1)
    null_stats = other_sums / n_other - (total - other_sums) / (n_all - n_other)
    hits = at_least_as_extreme(null_stats, other.mean() - base.mean()).sum()
    exact = how.startswith("exact")
    return float(hits / len(chosen) if exact else (hits + 1) / (len(chosen) + 1)), how


def compare_arm(base: dict[int, float], other: dict[int, float], resamples: int, seed: int) -> dict:
    """other − base on one metric; {seed: value} per arm. Paired when both arms have exactly the same seeds."""
    paired = sorted(base) == sorted(other) and len(base) > 1
    # in seed order, whatever order the runs were named in: the bootstrap's resamples index into these arrays
    a = np.array([base[s] for s in sorted(base)], dtype=np.float64)
    b = np.array([other[s] for s in sorted(other)], dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return {"paired": paired, "n": (len(a), len(b)), "diff": float("nan"), "ci": (float("nan"),) * 2,
                "p": float("nan"), "how": "too few runs", "floor": float("nan"),
                "verdict": f"too few usable runs: the baseline has {len(a)}, this arm {len(b)} (need 2 each)"}
    low, high = bootstrap_ci(a, b, paired, resamples, seed)
    p, how = sign_flip_p(b - a, seed) if paired else relabel_p(a, b, seed)
    diff = float(b.mean() - a.mean())
    # paired: a seed whose difference is 0 flips to itself, so only the others count towards the smallest p
    nonzero = int(np.count_nonzero(b - a)) if paired else None
    floor = smallest_p(nonzero, True) if paired else smallest_p(len(a), False, len(b))
    return {"paired": paired, "n": (len(a), len(b)), "diff": diff, "ci": (low, high), "p": p, "how": how,
            "floor": floor, "nonzero": nonzero,
            "verdict": verdict(diff, low, high, p, floor)}


def verdict(diff: float, low: float, high: float, p: float, floor: float) -> str:
    """In words. A difference is called only when both say so: the interval excludes 0 and p ≤ ALPHA (with few
    seeds a percentile bootstrap is narrow, so the interval alone would call seed noise a difference). Seeds too
    few for any p ≤ ALPHA say so first, whatever the interval: such a test could not have detected a difference,
    so "no difference detected" would suggest one that could."""
    if low == high == 0.0:
        return "no difference: identical in every resample"
    covers = low <= 0.0 <= high
    direction = f"{'higher' if diff > 0 else 'lower'} by {abs(diff):.4g}"
    if p <= ALPHA and not covers:
        return f"{direction} (p {p:.3g} ≤ {ALPHA:.2g}, {CONFIDENCE:.0%} interval excludes 0)"
    if floor > ALPHA:
        seen = f"the {CONFIDENCE:.0%} interval covers 0" if covers else f"{direction} and the interval excludes 0"
        return (f"too few seeds to tell: {seen}, but these seeds cannot give p ≤ {ALPHA:.2g} (the smallest "
                f"possible is {floor:.3g}) — run more seeds")
    if covers:
        return f"no difference detected: the {CONFIDENCE:.0%} interval covers 0"
    return f"no difference detected: p {p:.3g} > {ALPHA:.2g} (the interval excludes 0, but with few seeds it is narrow)"


def smallest_p(n: int, paired: bool, m: int = 0) -> float:
    """The smallest two-sided p an exact permutation test on these sample sizes can give (paired: n non-zero
    differences, and none at all gives 1; unpaired: n and m runs)."""
    if paired:
        return 2 / 2**n if n else 1.0
    return 2 / math.comb(n + m, n) if n == m else 1 / math.comb(n + m, n)


# ----------------------------------------------------------------------------- config diff

def flatten(config: dict, prefix: str = "") -> dict:
    """{"model.n_layer": 4, ...}: nested config.json as dotted keys."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif key not in IGNORED_KEYS or prefix:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(arms: dict[str, list[RunRecord]]) -> dict[str, dict[str, tuple]]:
    """{arm: {key: (baseline's value, arm's value)}} from the runs' own config.json. Within an arm only the seed
    may differ (else a UserError naming the runs); the baseline is the first arm."""
    reference = {}
    for arm, runs in arms.items():
        if not runs:
            continue
        first = {k: v for k, v in flatten(runs[0].config).items() if k != "seed"}
        for run in runs[1:]:
            other = {k: v for k, v in flatten(run.config).items() if k != "seed"}
            stray = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            if stray:
                raise UserError(f"{run.run_dir}/config.json: arm {arm} differs from {runs[0].run_dir} in "
                                f"{', '.join(stray)}, not only in the seed — one arm must be one config")
        reference[arm] = first
    if not reference:
        return {}
    base_arm = next(iter(reference))
    base = reference[base_arm]
    return {arm: {key: (base.get(key), flat.get(key)) for key in sorted(base.keys() | flat.keys())
                  if base.get(key) != flat.get(key)}
            for arm, flat in reference.items() if arm != base_arm}


def diff_lines(diff: dict[str, dict[str, tuple]], baseline: str) -> list[str]:
    lines = [f"config diff against {baseline} (from each run's config.json; within an arm only the seed differs):"]
    for arm, keys in diff.items():
        changes = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in keys.items()) or "none (identical configs)"
        lines.append(f"  {arm}: {changes}")
    return lines


# ----------------------------------------------------------------------------- table and report

def values_by_seed(runs: list[RunRecord], spec: str) -> tuple[dict[int, float], list[str]]:
    """({seed: value} over the finished runs with a finite value, a line for each finished run left out and why).
    Unfinished runs are listed once, by unfinished_lines, not per metric."""
    out, left_out = {}, []
    for run in (run for run in runs if run.finished):
        value = metric_value(run, spec)
        if value is not None and math.isfinite(value):
            out[run.seed] = value
        else:  # a diverged run (nan, inf) is the kind a stability sweep looks for: never dropped unsaid
            _, key, at_step = parse_metric(spec)
            logged = f"no {key}" + (f" at step {at_step}" if at_step is not None else "")
            why = f"{spec} is {value}" if value is not None else f"it logged {logged}"
            left_out.append(f"left out of {spec} (finished, but {why}): {run.run_dir}")
    return out, left_out


def summarize(arms: dict[str, list[RunRecord]], specs: list[str], resamples: int, seed: int) -> list[dict]:
    """One row per (metric, arm): mean, std, n, the runs left out, and against the baseline compare_arm's result."""
    rows = []
    baseline = next(iter(arms))
    for spec in specs:
        base_values, _ = values_by_seed(arms[baseline], spec)
        for arm, runs in arms.items():
            values, left_out = values_by_seed(runs, spec)
            array = np.array([values[s] for s in sorted(values)], dtype=np.float64)
            row = {"metric": spec, "arm": arm, "n": len(values), "of": len(runs), "left_out": left_out,
                   "mean": float(array.mean()) if len(array) else float("nan"),
                   "std": float(array.std(ddof=1)) if len(array) > 1 else float("nan")}
            if arm != baseline:
                row["vs"] = compare_arm(base_values, values, resamples, seed)
            rows.append(row)
    return rows


def table_lines(rows: list[dict], baseline: str, resamples: int) -> list[str]:
    """A markdown table: reads the same in a terminal and in report.md."""
    lines = [f"| metric | arm | seeds | mean ± std | diff vs {baseline} | 95% CI | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = f"{row['n']}" if row["n"] == row["of"] else f"{row['n']} of {row['of']} (see below)"
        cells = [row["metric"], row["arm"], seeds, f"{row['mean']:.4f} ± {row['std']:.4f}"]
        vs = row.get("vs")
        if vs is None:
            cells += ["(baseline)", "", "", ""]
        elif math.isnan(vs["diff"]):
            cells += ["", "", "", vs["verdict"]]
        else:
            kind = "paired" if vs["paired"] else "unpaired"
            cells += [f"{vs['diff']:+.4f}", f"[{vs['ci'][0]:+.4f}, {vs['ci'][1]:+.4f}]",
                      f"{vs['p']:.4f} ({kind})", vs["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    tested = [row["vs"] for row in rows if "vs" in row and not math.isnan(row["vs"]["p"])]
    notes = sorted({(vs["how"], vs["paired"], vs["n"], vs["nonzero"], vs["floor"]) for vs in tested},
                   key=lambda note: (note[0], note[1], note[2], note[3] or 0))
    lines.append("")
    lines.append(f"std: over seeds (ddof 1). CI: percentile bootstrap, {resamples:,} resamples (seeded), of the "
                 "per-seed differences when paired; with few seeds it is narrower than a t interval, so read "
                 "a CI that barely excludes 0 as a hint, not a finding.")
    for how, paired, (n_base, n_other), nonzero, floor in notes:
        seeds = f"{n_base} seeds" if paired else f"{n_base} + {n_other} seeds"
        if paired and nonzero != n_base:  # a zero difference flips to itself: only the others move p
            seeds += f" ({nonzero} with a non-zero difference)"
        lines.append(f"p: two-sided permutation test, {how}; with {seeds} the smallest possible p is {floor:.4g}.")
    return lines


# ----------------------------------------------------------------------------- picture

LINE_STYLES = ("-", "--", ":", "-.")
CURVES = (("val_bpb", "val bits/byte", "eval"), ("loss", "train loss (nats/token)", "train"))


def arm_curve(runs: list[RunRecord], key: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, steps)) on the steps every seed logged: a mean over seeds needs the same x."""
    per_run = [dict(zip(*series(run.eval_rows if which == "eval" else run.train_rows, key))) for run in runs]
    per_run = [curve for curve in per_run if curve]
    if not per_run:
        return np.array([]), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(curve) for curve in per_run)))
    return np.array(steps), np.array([[curve[s] for s in steps] for curve in per_run])


def draw(arms: dict[str, list[RunRecord]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 4.5))
    for ax, (key, label, which) in zip(axes, CURVES):
        for index, (arm, runs) in enumerate(arms.items()):
            finished = [run for run in runs if run.finished]
            steps, values = arm_curve(finished or runs, key, which)  # the runs the table counts, if any
            if not len(steps):
                continue
            colour, style = f"C{index}", LINE_STYLES[index % len(LINE_STYLES)]  # styles: identical arms both show
            for seed_values in values:  # each seed, faint
                ax.plot(steps, seed_values, color=colour, alpha=0.25, linewidth=0.7, linestyle=style)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.12)
            ax.plot(steps, values.mean(axis=0), color=colour, linewidth=1.8, label=f"{arm} (mean of {len(values)})",
                    linestyle=style, marker="o" if which == "eval" else None, markersize=3)
        ax.set(title=f"{label}: mean, min–max band, seeds faint", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _zoom_to_late_steps(axes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _zoom_to_late_steps(axes):
    """The first steps' losses (≈ ln vocab) would squash the part of the curves where the arms differ."""
    for ax in axes:
        lows, highs = [], []
        for line in ax.get_lines():
            x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
            late = y[x >= x.max() * 0.25] if len(x) else y
            if len(late):
                lows.append(np.nanmin(late))
                highs.append(np.nanmax(late))
        if lows:
            pad = 0.05 * (max(highs) - min(lows) or 1.0)
            ax.set_ylim(min(lows) - pad, max(highs) + pad)


# ----------------------------------------------------------------------------- entry point

def unfinished_lines(arms: dict[str, list[RunRecord]]) -> list[str]:
    """A line for each unfinished run (left out of the statistics), and one for a finished run's torn last line."""
    lines = []
    for run in (run for runs in arms.values() for run in runs):
        steps = [row["step"] for row in run.train_rows]
        at = f"at step {max(steps)}" if steps else "no step logged"
        if not run.finished:
            lines.append(f"not finished (left out of the statistics): {run.run_dir} — {at} of "
                         f"{run.config['max_steps']}" + (f"; {run.metrics_note}" if run.metrics_note else ""))
        elif run.metrics_note:
            lines.append(f"finished, but {run.metrics_note}: {run.run_dir}")
    return lines


def write_report(out_dir: Path, title: str, table: list[str], diff: list[str], picture: Path | None,
                 notes: list[str]) -> Path:
    lines = [f"# {title}", ""]
    if picture is not None:
        lines += [f"![curves]({picture.name})", ""]
    lines += table + ["", "```", *diff, "```", ""] + [f"- {note}" for note in notes]
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines).rstrip() + "\n")  # a rerun over an old report leaves one or the other
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="a sweep directory, or run directories / their parents")
    parser.add_argument("--metric", action="append", default=[],
                        help="also compare KEY, min:KEY, max:KEY or KEY@step=N (e.g. min:loss, val_bpb@step=100)")
    parser.add_argument("--baseline", help="the arm the others are compared against (default: the first)")
    parser.add_argument("--out-dir", type=Path, help="where report.md and curves.png go (default: the sweep directory)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of any Monte-Carlo test")
    parser.add_argument("--no-plot", action="store_true", help="skip the picture (no matplotlib needed)")
    return parser


def check_args(args, specs: list[str], arms: dict[str, list[RunRecord]]):
    """Before anything is printed or written: each --metric well formed and logged by some run, at its step if it
    names one (a typo would otherwise read as "0 of n"), --resamples at least 1, --seed one numpy takes,
    --out-dir a directory or one that can be made."""
    runs = [run for arm_runs in arms.values() for run in arm_runs]
    for spec in specs:
        _, key, at_step = parse_metric(spec)
        rows = [row for run in runs for row in run.eval_rows + run.train_rows if key in row]
        if spec != "val_bpb" and not rows:
            raise UserError(f"--metric {spec}: no run logged {key!r} (in metrics.jsonl)")
        if at_step is not None and not any(row["step"] == int(at_step) for row in rows):
            logged = sorted({row["step"] for row in rows})
            raise UserError(f"--metric {spec}: no run logged {key!r} at step {at_step} (logged at "
                            f"{', '.join(map(str, logged[:8]))}{', ...' if len(logged) > 8 else ''})")
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: must be at least 1")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must be in [0, 2**63)")
    if args.out_dir is not None:
        existing = next(path for path in [args.out_dir, *args.out_dir.parents] if path.exists())  # "." exists
        if not existing.is_dir():
            where = "exists and" if existing == args.out_dir else f"{existing}"
            raise UserError(f"--out-dir {args.out_dir}: {where} is not a directory")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    arms, notes = load_runs(args.paths)
    if arms and not next(iter(arms.values())) and not args.baseline:  # not silently another arm in its place
        raise UserError(f"{args.paths[0]}: the baseline arm {next(iter(arms))!r} has no run directories — run it "
                        "(sweep.py continues a sweep), or pass --baseline ARM")
    if args.baseline in arms and not arms[args.baseline]:
        raise UserError(f"--baseline {args.baseline}: that arm has no run directories (yet)")
    arms = {arm: runs for arm, runs in arms.items() if runs}
    if not arms:
        raise UserError(f"{' '.join(map(str, args.paths))}: no run directories (each holds a config.json)")
    if args.baseline:
        if args.baseline not in arms:
            raise UserError(f"--baseline {args.baseline}: no such arm (arms: {', '.join(arms)})")
        arms = {args.baseline: arms[args.baseline], **{a: r for a, r in arms.items() if a != args.baseline}}
    baseline = next(iter(arms))
    specs = list(dict.fromkeys(["val_bpb", *args.metric]))
    check_args(args, specs, arms)
    out_dir = args.out_dir or (args.paths[0] if len(args.paths) == 1 else Path("."))
    base_config = arms[baseline][0].config
    title = (f"{out_dir.resolve().name}: {len(arms)} arms of {base_config.get('preset')} "
             f"({base_config.get('precision')}, {base_config['max_steps']} steps), baseline {baseline}")
    rows = summarize(arms, specs, args.resamples, args.seed)
    table = table_lines(rows, baseline, args.resamples)
    diff = diff_lines(config_diff(arms), baseline)
    notes += unfinished_lines(arms) + [line for row in rows for line in row["left_out"]]
    print("\n".join([title, *table, "", *diff, *notes]))
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = None if args.no_plot else draw(arms, out_dir / "curves.png", title)
    print(f"wrote {write_report(out_dir, title, table, diff, picture, notes)}" + (f" and {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
