"""Every gust command line README.md shows is parsed by the real parser, and those that can run on this CPU run
at a tiny size: a flag the README spells wrongly (`--model.upcast-attn False`) fails here, not for a reader.

README.md is read at test time. Code blocks give command lines (`python X.py …`, `torchrun … X.py …`); inline code
that starts with `--` gives single flags, which must parse under one of the entry points. A line that cannot run
here is still parsed, and is skipped from running only for one of the reasons in SKIP_REASONS.
"""
import contextlib
import importlib
import importlib.util
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
OUTPUT_FLAGS = ("--out", "--out-dir", "--json-out")  # their values are written, not read: redirected to tmp
SKIP_REASONS = {
    "torchrun": "needs several processes: parsed only (tests/test_dist.py and test_recipes.py run torchrun)",
    "gpt2": "a GPT-2 preset: a GPU-sized model and OpenWebText",
    "missing": "reads a path that is a placeholder or data not prepared here",
    "long": "a benchmark or a sweep: minutes of CPU, run by hand (tests/test_sweep.py runs a tiny sweep end to end)",
}
LONG_RUNNING = ("bench_data.py", "scripts/bench_cpu.py", "sweep.py", "compare.py", "bench.py")
TINY = {  # appended to a runnable line: the same command, a few steps or tokens
    "train.py": ["--max-steps", "2", "--eval-interval", "2", "--eval-batches", "1", "--final-eval-batches", "1",
                 "--checkpoint.schedule", "none", "--wandb-mode", "disabled"],
    "eval.py": ["--max-tokens", "2048", "--device", "cpu"],
    "sample.py": ["--max-new-tokens", "4", "--num-samples", "1", "--device", "cpu"],
}
FOREIGN_FLAGS = {  # inline flags of other programs the README mentions: not checked here
    "--lr": "scripts/stability_demo.py", "--all": "scripts/memory_estimate.py", "--max-restarts": "torchrun",
    "--requeue": "sbatch", "--nproc_per_node": "torchrun",
    **{flag: "sweep.py" for flag in ("--", "--name", "--parallel", "--threads", "--emit", "--launcher", "--arm", "--seeds")},
    **{flag: "compare.py" for flag in ("--metric", "--baseline")}, "--x": "plot.py", "--panels": "plot.py",
    **{flag: "bench_data.py" for flag in ("--parts", "--old-data-py", "--prepare-args")},
}


def parse(script: str, args: list[str]):
    """The entry point's own parser on args, as its main() calls it; nothing runs."""
    import tyro

    if script == "train.py":
        from train import parse_config
        return parse_config(args)
    if script == "eval.py":
        from eval import EvalConfig
        return tyro.cli(EvalConfig, args=args, prog="eval.py")
    if script == "sample.py":
        from sample import SampleConfig
        return tyro.cli(SampleConfig, args=args, prog="sample.py")
    if script == "hf_bridge.py":
        from hf_bridge import ExportArgs, ImportArgs
        return tyro.extras.subcommand_cli_from_dict({"export": ExportArgs, "import": ImportArgs}, args=args,
                                                    prog="hf_bridge.py")
    if script == "plot.py":
        from plot import PlotConfig
        return tyro.cli(PlotConfig, args=args, prog="plot.py")
    if script == "data.py" and args[:1] == ["prepare"]:
        from configs import PrepareConfig
        return tyro.cli(PrepareConfig, args=args[1:], prog="data.py prepare")
    if script == "sweep.py":
        from sweep import parse_args
        return parse_args(args)
    if script in ("compare.py", "bench_data.py"):
        return importlib.import_module(script[:-3]).build_parser().parse_args(args)
    if script == "scripts/bench_cpu.py":  # its own --iters, then train.py's arguments
        from train import parse_config
        spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / script)
        bench_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_cpu)
        _, train_args = bench_cpu.build_parser().parse_known_args(args)
        return parse_config(train_args)
    raise AssertionError(f"README.md runs `{script} {' '.join(args)}`: no parser known for it — add it to parse()")


def parse_or_error(script: str, args: list[str]) -> str | None:
    """None if args parse (--help counts), else the parser's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(script, args)
    except SystemExit as exit_:
        return None if exit_.code == 0 else (err.getvalue().strip()[-800:] or f"exit {exit_.code}")
    return None


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """(line, launcher, [script, *args]) for each gust command in README.md's code blocks."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
            launcher = next((t for t in tokens[:scripts[0]] if t in ("python", "python3", "torchrun")), None) \
                if scripts else None
            if launcher:
                commands.append((line.strip(), launcher, tokens[scripts[0]:]))
    return commands


def readme_inline_flags() -> list[str]:
    """Inline code spans outside code blocks that start with `--`: `--model.upcast-attn`, `--resume auto`, ..."""
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    return [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("--")]


def test_readme_has_commands_to_check():
    scripts = {tokens[0] for _, _, tokens in readme_commands()}
    assert {"train.py", "eval.py", "sample.py"} <= scripts, scripts  # the extraction itself still works


@pytest.mark.parametrize("line,launcher,tokens", readme_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_readme_command_parses(line, launcher, tokens, tmp_path):
    script, args = tokens[0], redirect_outputs(tokens[1:], tmp_path)
    if script == "train.py" and args and args[0].endswith(".json") and not Path(args[0]).is_file():
        args = [str(stand_in_config(tmp_path)), *args[1:]]  # a run's own config.json, made by an earlier run
    assert parse_or_error(script, args) is None, f"README.md: `{line}` does not parse: {parse_or_error(script, args)}"


def redirect_outputs(args: list[str], tmp_path: Path) -> list[str]:
    return [str(tmp_path / a) if i and args[i - 1] in OUTPUT_FLAGS else a for i, a in enumerate(args)]


def stand_in_config(tmp_path: Path) -> Path:
    import json

    from configs import PRESETS, to_json
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_json(PRESETS["gpt2-small"][1])))
    return path


def skip_reason(launcher: str, tokens: list[str], run_root: Path) -> str | None:
    script, args = tokens[0], tokens[1:]
    if launcher == "torchrun":
        return "torchrun"
    if "--help" in args:
        return None
    if script in LONG_RUNNING:
        return "long"
    if script == "train.py" and args and args[0].startswith("gpt2"):
        return "gpt2"
    inputs = [a for i, a in enumerate(args) if not (i and args[i - 1] in OUTPUT_FLAGS) and not a.startswith("-")]
    for path in inputs:
        if ("/" in path or path.endswith((".txt", ".jsonl", ".json"))) and not (run_root / path).exists() \
                and not (ROOT / path).exists():
            return "missing"
    return None


def test_readme_commands_that_can_run_here_run(tmp_path, monkeypatch):
    """Training lines first (later lines read the runs they make), in tmp_path, at a tiny size."""
    import train
    from eval import main as eval_main
    from sample import main as sample_main

    if not (ROOT / "data" / "shakespeare" / "meta.json").is_file():
        pytest.skip("data/shakespeare not prepared: run `make setup`")
    for link in ("data", ".cache"):
        (tmp_path / link).symlink_to(ROOT / link)
    monkeypatch.chdir(tmp_path)  # runs/ and any output land here; data/ and .cache/ are the repo's
    commands = sorted(readme_commands(), key=lambda c: c[2][0] != "train.py")
    ran, skipped = [], {}
    for line, launcher, tokens in commands:
        reason = skip_reason(launcher, tokens, tmp_path)
        if reason is not None:
            assert reason in SKIP_REASONS
            skipped[line] = SKIP_REASONS[reason]
            continue
        script, args = tokens[0], redirect_outputs(tokens[1:], Path("out")) + TINY.get(tokens[0], [])
        if "--help" in args:
            assert parse_or_error(script, args) is None, line
        elif script == "train.py":
            train.train(train.parse_config(args))
        elif script == "eval.py":
            eval_main(args)
        elif script == "sample.py":
            sample_main(args)
        else:
            raise AssertionError(f"README.md: `{line}` could run here, but this test does not know how — add it")
        ran.append(line)
    print("ran:", *ran, "skipped:", *(f"{line}  ({why})" for line, why in skipped.items()), sep="\n  ")
    assert any(line in ran and t[0] == "train.py" and "--help" not in t for line, _, t in commands), "no training ran"


@functools.cache
def help_flags() -> frozenset[str]:
    """Every flag the entry points' --help lists (train.py's for a preset)."""
    flags = set()
    for script, args in (("train.py", ["shakespeare-cpu"]), ("eval.py", []), ("sample.py", []), ("data.py", ["prepare"])):
        out = io.StringIO()
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):
            parse(script, [*args, "--help"])
        flags |= set(re.findall(r"--[\w.-]+", out.getvalue()))
    return frozenset(flags)


@pytest.mark.parametrize("span", readme_inline_flags())
def test_readme_inline_flag_parses(span):
    """A bare flag must exist; a flag with a value must parse, under one of the entry points."""
    args = shlex.split(span)
    if args[0].split("=")[0] in FOREIGN_FLAGS:
        return
    if len(args) == 1:
        assert args[0] in help_flags(), f"README.md: `{span}` is no flag of train.py, eval.py, sample.py or data.py"
        return
    attempts = {"train.py": ["shakespeare-cpu", *args], "eval.py": args, "sample.py": args,
                "data.py": ["prepare", *args]}
    errors = {script: parse_or_error(script, argv) for script, argv in attempts.items()}
    assert any(error is None for error in errors.values()), f"README.md: `{span}` parses under no entry point: {errors}"
