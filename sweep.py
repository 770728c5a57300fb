"""One config over seeds and arms: `python sweep.py shakespeare-quick --seeds 21 49 --arm base --arm NAME="--flags"`.

Each (arm, seed) is an ordinary `train.py` run in runs/<sweep>/<arm>-seed<S>/, started with --resume auto, so a
killed sweep continues where it stopped and finished runs are not run again. Arguments after a lone `--` go to
every run (e.g. `-- --precision fp16`). The first arm is the baseline. Before anything runs, every run's full
config is derived from its command line; afterwards each run's own config.json must equal it, so within an arm
only the seed differs and across arms only the stated overrides do. Then compare.py writes the table, the
picture and report.md. `--emit` prints the commands instead (one line per run: Slurm arrays, torchrun jobs).
Run it again under the same --name with more --seeds or another --arm to extend it: sweep.json keeps what an
earlier call recorded and adds to it.
Not in here: the statistics and the picture (compare.py), the training itself (train.py).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import compare
from configs import MISTRAL_SEEDS
from data import write_atomic
from errors import UserError, read_json, read_metrics_rows, run_cli

ROOT = Path(__file__).resolve().parent
IGNORED_KEYS = ("out_dir", "resume")  # differ by design between runs; not part of what a run computes


@dataclass
class Run:
    arm: str
    seed: int
    run_dir: Path
    argv: list[str]  # train.py's arguments

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.splitlines()[0],
                                     epilog="Arguments after a lone -- are passed to every run.")
    parser.add_argument("base", help="a preset name (see train.py --help) or a config.json to start every run from")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(MISTRAL_SEEDS),
                        help="seeds of every arm (default: Mistral's five)")
    parser.add_argument("--arm", action="append", default=[], metavar='NAME[="--flag value ..."]',
                        help="an arm and its train.py overrides; repeat for each arm; the first is the baseline")
    parser.add_argument("--name", help="sweep directory name under --runs-dir (default: <base>-sweep)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the sweep directory goes")
    parser.add_argument("--parallel", type=int, help="runs at once (default: CPU cores // --threads)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--emit", action="store_true", help="print one shell command per run and exit")
    parser.add_argument("--launcher", help="what starts train.py (default: this Python), "
                                           "e.g. 'torchrun --nproc_per_node=8'")
    parser.add_argument("--metric", action="append", default=[], help="extra metrics for compare.py (see there)")
    args = parser.parse_args(own)
    args.common = common
    return args


def check_flags(args) -> None:
    """Refuse flags that cannot work before anything is written: a bad flag must not touch an existing sweep."""
    if args.parallel is not None and args.parallel < 1:  # 0 or less would start nothing and wait forever
        raise UserError(f"--parallel {args.parallel}: give at least 1 (or leave it out: CPU cores // --threads)")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: each run needs at least 1 thread")
    negative = [seed for seed in args.seeds if seed < 0]
    if negative:  # numpy's default_rng([seed, ...]), which orders the batches, takes no negative seed
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: {negative[0]} is negative; seeds are 0 or more")
    if args.launcher is not None and not split_words(args.launcher, f"--launcher {args.launcher!r}"):
        raise UserError(f"--launcher {args.launcher!r}: names no program (leave it out to use this Python)")
    for spec in args.metric:
        compare.parse_metric(spec)  # compare.py's own parser: a bad spec fails now, not after every run
    refuse_sweeps_flags(args.common, "after --")


def split_words(text: str, culprit: str) -> list[str]:
    """text as shell words; an unclosed quote is one line naming the culprit (`--arm 'a=--x "y'`), not a traceback."""
    try:
        return shlex.split(text)
    except ValueError as err:  # shlex: "No closing quotation" / "No escaped character"
        raise UserError(f"{culprit}: {str(err).lower()} — close the quote or escape it") from None


SWEEP_SETS = ("--seed", "--out-dir", "--resume")  # each run's, set by plan(): an override would silently lose or win


def refuse_sweeps_flags(words: list[str], culprit: str) -> None:
    """A train.py flag the sweep sets itself, in an arm's overrides or after --, is one line naming it."""
    for word in words:
        flag = word.split("=", 1)[0].replace("_", "-")
        if flag in SWEEP_SETS:
            raise UserError(f"{culprit}: {flag} is set by sweep.py for each run (--seeds, --name, --runs-dir) — "
                            "leave it out")


def parse_arms(specs: list[str]) -> dict[str, list[str]]:
    """`NAME` or `NAME=--flag value ...` → {name: overrides}; the default is one arm, `base`, with none."""
    arms = {}
    for spec in specs or ["base"]:
        name, _, flags = spec.partition("=")
        if not name or "/" in name or name != name.strip() or " " in name:
            raise UserError(f"--arm {spec!r}: the name before '=' must be a plain word (it names run directories)")
        if name in arms:
            raise UserError(f"--arm {name}: named twice")
        arms[name] = split_words(flags, f"--arm {spec!r}")
        refuse_sweeps_flags(arms[name], f"--arm {spec!r}")
    return arms


def plan(args, arms: dict[str, list[str]], sweep_dir: Path) -> list[Run]:
    """Every (arm, seed) run, seeds outermost: a sweep cut short still has every arm at its first seeds."""
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: give each seed once")
    runs = []
    for seed in args.seeds:
        for arm, overrides in arms.items():
            run_dir = sweep_dir / f"{arm}-seed{seed}"
            argv = [str(args.base), *args.common, *overrides, "--seed", str(seed), "--out-dir", str(run_dir),
                    "--resume", "auto"]
            runs.append(Run(arm, seed, run_dir, argv))
    return runs


def expected_config(run: Run) -> dict:
    """The config train.py will build from this run's command line, as config.json holds it."""
    from configs import to_json
    from train import parse_config

    try:
        return to_json(parse_config(run.argv))
    except SystemExit:  # tyro has printed what is wrong with the flags
        raise UserError(f"arm {run.arm}: train.py rejects `{shlex.join(run.argv)}` (its message is above)") from None


def differing_keys(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (value in a, value in b)} for every leaf that differs (a key missing on one side is None)."""
    out = {}
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out.update(differing_keys(left, right, f"{prefix}{key}."))
        elif left != right:
            out[f"{prefix}{key}"] = (left, right)
    return out


def check_config(run: Run, expected: dict) -> None:
    """A run directory's config.json, if any, must be the one this sweep would write there."""
    path = run.run_dir / "config.json"
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a half-written or foreign file: the user's to clear
        raise UserError(f"{path}: not a JSON config ({err}) — delete {run.run_dir} "
                        f"or choose another --name") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: holds a JSON {type(found).__name__}, not a config — delete {run.run_dir} "
                        f"or choose another --name")
    diff = {k: v for k, v in differing_keys(expected, found).items() if k not in IGNORED_KEYS}
    if diff:
        key, (want, have) = next(iter(diff.items()))
        raise UserError(f"{path}: made with {key} = {have!r}, but this sweep's arm {run.arm} gives {want!r} "
                        f"({len(diff)} field(s) differ) — delete {run.run_dir} or choose another --name")


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """Finished: metrics.jsonl holds the eval at max_steps (train.py writes it just before the last checkpoint)
    and that checkpoint is complete."""
    import checkpoint

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    for _, row in read_metrics_rows(metrics)[0]:  # a torn last line is left out, a bad one before it is one line
        if row["step"] == max_steps and "val_bpb" in row:
            latest = checkpoint.latest_complete(run_dir)
            return latest is not None and latest.name == checkpoint.step_dir(run_dir, max_steps).name
    return False


def command(run: Run, launcher: str | None) -> list[str]:
    program = split_words(launcher, f"--launcher {launcher!r}") if launcher else [sys.executable]
    return [*program, str(ROOT / "train.py"), *run.argv]


def run_all(runs: list[Run], max_steps: dict[str, int], parallel: int, threads: int, log_dir: Path,
            launcher: str | None) -> list[Run]:
    """Start the unfinished runs, `parallel` at a time; returns those that failed (their logs say why)."""
    todo = []
    for run in runs:
        if is_finished(run.run_dir, max_steps[run.name]):
            print(f"sweep: skip {run.name}: finished (step {max_steps[run.name]})", flush=True)
        else:
            todo.append(run)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    running, failed = {}, []
    while todo or running:
        while todo and len(running) < parallel:
            run = todo.pop(0)
            print(f"sweep: run {run.name}", flush=True)
            log = open(log_dir / f"{run.name}.log", "a")
            process = subprocess.Popen(command(run, launcher), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[run.name] = (run, process, log, time.perf_counter())
        time.sleep(0.2)
        for name, (run, process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            seconds = time.perf_counter() - started
            if process.returncode == 0:
                print(f"sweep: done {name} in {seconds:.0f} s", flush=True)
            else:
                failed.append(run)
                print(f"sweep: FAILED {name} (exit {process.returncode}); see {log_dir / (name + '.log')}", flush=True)
    return failed


def verify_configs(runs: list[Run], expected: dict[str, dict]) -> None:
    """Each run's own config.json is the one derived from its command line (nothing else crept in)."""
    for run in runs:
        if (run.run_dir / "config.json").is_file():
            check_config(run, expected[run.name])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_flags(args)
    arms = parse_arms(args.arm)
    base = Path(args.base)
    if args.base.endswith(".json") and not base.is_file():
        raise UserError(f"{args.base}: no such config file")
    name = args.name or f"{base.parent.name if args.base.endswith('.json') else args.base}-sweep"
    sweep_dir = args.runs_dir / name
    runs = plan(args, arms, sweep_dir)
    record = sweep_record(sweep_dir, args, arms)  # before anything is written: a clash with an earlier sweep refuses
    if args.emit:  # no torch, no checks: the cluster's job script runs these as they are
        for run in runs:
            words = command(run, args.launcher)
            print(shlex.join([os.path.relpath(word) if word.startswith(str(ROOT)) else word for word in words]))
        write_sweep_json(sweep_dir, record)
        return 0
    expected = {run.name: expected_config(run) for run in runs}
    say_what_is_kept(record, args, arms)
    for run in runs:
        check_config(run, expected[run.name])  # before anything runs: refuse to mix in a stale run
    write_sweep_json(sweep_dir, record)
    parallel = args.parallel or max(1, (os.cpu_count() or 1) // args.threads)  # check_flags refused values < 1
    print(f"sweep: {len(runs)} runs ({len(arms)} arm(s) × {len(args.seeds)} seed(s)) into {sweep_dir}, "
          f"{parallel} at a time, {args.threads} thread(s) each", flush=True)
    failed = run_all(runs, {run.name: expected[run.name]["max_steps"] for run in runs}, parallel, args.threads,
                     sweep_dir / "logs", args.launcher)
    try:
        verify_configs(runs, expected)
        compare.main([str(sweep_dir), *(f"--metric={m}" for m in args.metric)])
    finally:  # whatever compare says (with every run failed: "no run directories"), say which runs failed
        if failed:
            print(f"sweep: {len(failed)} run(s) failed: {', '.join(run.name for run in failed)}", file=sys.stderr)
    return 1 if failed else 0


def sweep_record(sweep_dir: Path, args, arms: dict[str, list[str]]) -> dict:
    """What compare.py needs to know beyond the run directories: arm order (baseline first), each arm's flags and
    the seeds. A sweep extended by a later call (more seeds, another arm) keeps what the earlier call recorded and
    adds to it — replacing it would hide the earlier seeds from compare.py. The later call must have the same base,
    the same flags after -- and the same flags for an arm it names again, or two experiments would mix."""
    record = {"base": str(args.base), "seeds": list(args.seeds), "common": args.common,
              "arms": [{"name": name, "overrides": overrides} for name, overrides in arms.items()]}
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return record
    fix = "delete it or choose another --name"
    earlier = read_json(path, fix)
    try:
        earlier_arms = {arm["name"]: arm["overrides"] for arm in earlier["arms"]}
        earlier_seeds = list(earlier["seeds"])
        differing = [key for key in ("base", "common") if earlier[key] != record[key]]
        if differing[:1] == ["base"] and same_file(earlier["base"], record["base"]):  # one config, spelled two ways
            differing.pop(0)
    except (TypeError, KeyError) as err:
        raise UserError(f"{path}: not a sweep's record ({type(err).__name__}: {err}) — {fix}") from None
    if differing:
        key = differing[0]
        flag = "base" if key == "base" else "flags after --"
        raise UserError(f"{path}: this sweep was made with {flag} {earlier[key]!r}, this call gives "
                        f"{record[key]!r} — {fix}")
    for name, overrides in arms.items():
        if earlier_arms.get(name, overrides) != overrides:  # an arm named again: the same flags (a new one: any)
            raise UserError(f"{path}: arm {name} was made with {shlex.join(earlier_arms[name]) or 'no flags'!r}, "
                            f"this call gives {shlex.join(overrides) or 'no flags'!r} — {fix}")
    added = [seed for seed in args.seeds if seed not in earlier_seeds]
    record["seeds"] = earlier_seeds + added
    record["arms"] = [*earlier["arms"], *(arm for arm in record["arms"] if arm["name"] not in earlier_arms)]
    return record


def same_file(a: str, b: str) -> bool:
    """Two config.json bases naming one file (`base.json`, `./base.json`, its absolute path); presets never are."""
    return a.endswith(".json") and b.endswith(".json") and Path(a).resolve() == Path(b).resolve()


def say_what_is_kept(record: dict, args, arms: dict[str, list[str]]) -> None:
    """One line when sweep.json holds more than this call runs: compare.py will report those too."""
    seeds = [seed for seed in record["seeds"] if seed not in args.seeds]
    others = [arm["name"] for arm in record["arms"] if arm["name"] not in arms]
    if seeds or others:
        kept = []
        if seeds:
            kept.append(f"seeds {' '.join(map(str, seeds))}")
        if others:
            kept.append(f"arms {', '.join(others)}")
        print(f"sweep: sweep.json keeps the earlier call's {' and '.join(kept)} (compare.py reports them too)",
              flush=True)


def write_sweep_json(sweep_dir: Path, record: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep_dir / "sweep.json", json.dumps(record, indent=2) + "\n")  # the sweep's record: never half


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
