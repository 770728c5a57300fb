"""Config files are checked as strictly as the command line: mutate a valid config.json in many seeded ways; each
either parses to exactly what the equivalent command line gives, or fails with one line naming the key, before
anything is written. Also: counts and batch sizes that make no sense are refused naming the flag."""
import copy
import json
import random
import re

import pytest
import tyro

import train
from configs import PRESETS, TrainConfig, check_ranges, to_json
from errors import UserError, run_cli

BASE = to_json(PRESETS["shakespeare-cpu"][1])
ODD_VALUES = [2.5, "x", True, None, [1, 2], {"a": 1}, 7, -1, 0, 1e9]
OLD_MEANING = {"eval_unit": "micro"}  # a file without eval_unit predates it, when eval counted micro-batches


def to_flags(values: dict, prefix: str = "--") -> list[str]:
    """The command line that says what a JSON config says, written independently of configs.from_json."""
    flags = []
    for key, value in values.items():
        flag = prefix + key.replace("_", "-")
        if isinstance(value, dict):
            flags += to_flags(value, flag + ".")
        elif isinstance(value, bool):
            flags.append(flag if value else prefix + "no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, *(str(x) for item in value for x in (item if isinstance(item, list) else [item]))]
        else:
            flags += [flag, "None" if value is None else str(value)]
    return flags


def from_command_line(flags: list[str]):
    """What train.py does with flags on top of TrainConfig's defaults: tyro, then the same range check."""
    cfg = tyro.cli(TrainConfig, args=flags, prog="train.py")
    check_ranges(cfg)
    return cfg


def leaves(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def mutate(values: dict, rng: random.Random) -> tuple[dict, str, str]:
    """A copy of values with one change; returns it, the dotted key touched and the kind of change."""
    values = copy.deepcopy(values)
    key = rng.choice(leaves(values) + ["model", "optim", "checkpoint"])
    *parents, last = key.split(".")
    holder = values
    for part in parents:
        holder = holder[part]
    kind = rng.choice(["drop", "unknown", "type", "range", "valid"])
    if kind == "drop":
        del holder[last]
    elif kind == "unknown":
        name = rng.choice([last + "z", last[:-1], "no_such_key"])
        if name in holder:
            name = "no_such_key"
        holder[name] = holder[last]
        key = ".".join([*parents, name])
    elif kind == "type":
        holder[last] = rng.choice(ODD_VALUES)
    elif kind == "range":
        old = holder[last]
        holder[last] = rng.choice([0, -1, -0.5, 1.0]) if isinstance(old, (int, float)) and not isinstance(old, bool) else old
    elif isinstance(holder[last], bool):
        holder[last] = not holder[last]
    elif isinstance(holder[last], int):
        holder[last] += rng.choice([1, 2])
    elif isinstance(holder[last], float):
        holder[last] *= rng.choice([0.5, 0.9])
    return values, key, kind


def parse_file(values: dict, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return train.parse_config([str(path)]), path


def attempt(fn, *args):
    try:
        return fn(*args), None
    except UserError as err:
        return None, str(err)
    except SystemExit:  # tyro's refusal of a flag
        return None, "tyro"


def test_mutated_config_files_parse_like_the_command_line_or_fail_in_one_line(tmp_path, capsys):
    rng = random.Random(1234)
    kinds_seen = {"ok": set(), "refused": set()}
    for trial in range(150):
        values, key, kind = mutate(BASE, rng)
        from_file, file_error = attempt(lambda v: parse_file(v, tmp_path)[0], values)
        from_flags, flags_error = attempt(from_command_line, to_flags({**OLD_MEANING, **values}))
        capsys.readouterr()
        where = f"trial {trial}: {kind} {key} -> {json.dumps(values)[:300]}"
        if flags_error is not None:  # what the command line refuses, the file refuses too
            assert file_error is not None, where
        if file_error is None:
            assert from_file == from_flags, where  # ... and what the file accepts, it reads as the flags say
            kinds_seen["ok"].add(kind)
        else:
            assert "\n" not in file_error, where
            name = key.split(".")[-1]
            assert name in file_error or name.replace("_", "-") in file_error, f"{where}: {file_error}"
            kinds_seen["refused"].add(kind)
    assert {"drop", "valid"} <= kinds_seen["ok"] and {"unknown", "type", "range"} <= kinds_seen["refused"]


@pytest.mark.parametrize("values, message", [
    ({"max_stepz": 3}, "unknown key max_stepz — did you mean max_steps?"),
    ({"model": {"n_embdd": 64}}, "unknown key model.n_embdd — did you mean model.n_embd?"),
    ({"max_steps": 2.5}, "max_steps = 2.5: expected an integer"),
    ({"compile": "yes"}, 'compile = "yes": expected true or false'),
    ({"checkpoint": {"intervals": [[10, 100, 5]]}}, "checkpoint.intervals = .*: expected a list, each \\[an integer, an integer\\]"),
    ({"precision": "fp8"}, 'precision = "fp8": expected one of "auto", "fp32", "bf16", "fp16"'),
    ({"micro_batch_size": 0}, r"micro_batch_size \(--micro-batch-size\) = 0: must be ≥ 1"),
])
def test_a_bad_config_file_is_one_line_exit_2_and_the_run_untouched(tmp_path, capsys, values, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"the run": "as it ran"}')
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    path = tmp_path / "edited.json"
    # a missing data dir and one step: should the check ever let the file through, the run fails fast, differently
    path.write_text(json.dumps({**BASE, "max_steps": 1, "data": {"dir": str(tmp_path / "no-data")}, **values,
                                "out_dir": str(run_dir), "resume": "auto"}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, [str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("gust: error: "), err
    assert re.search(message, err), err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "metrics.jsonl"]  # no lock, nothing
    assert (run_dir / "config.json").read_text() == '{"the run": "as it ran"}'


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "0"], r"micro_batch_size \(--micro-batch-size\) = 0: must be ≥ 1"),
    (["--global-batch-size", "0"], r"global_batch_size \(--global-batch-size\) = 0: must be ≥ 1"),
    (["--max-steps", "-5"], r"max_steps \(--max-steps\) = -5: must be ≥ 0"),
    (["--log-interval", "0"], r"log_interval \(--log-interval\) = 0: must be ≥ 1"),
    (["--optim.beta2", "1.0"], r"optim.beta2 \(--optim.beta2\) = 1.0: must be in \[0, 1\)"),
    (["--optim.lr", "inf"], r"optim.lr \(--optim.lr\) = inf: must be finite"),  # passed "≥ 0", failed at step 2
    (["--global-batch-size", "12", "--micro-batch-size", "16"], r"--global-batch-size 12 is not divisible by --micro-batch-size 16"),
    # each in range, together contradictory: shakespeare-cpu's min_lr is 1e-4, warmup 50, decay to step 720
    (["--optim.lr", "1e-5"], r"optim.min_lr \(--optim.min-lr\) = 0.0001 is above optim.lr \(--optim.lr\) = 1e-05"),
    (["--optim.decay-steps", "40"], r"optim.warmup_steps \(--optim.warmup-steps\) = 50 is past optim.decay_steps"),
    (["--loss-scale.min-scale", "1e6", "--loss-scale.init-scale", "1024"], r"loss_scale.min_scale .* is above"),
])
def test_counts_that_make_no_sense_name_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, ["shakespeare-cpu", "--out-dir", str(tmp_path / "run"), "--data.dir",
                             str(tmp_path / "no-data"), *flags])  # no data: a check that lets it through fails fast
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize("content, message", [
    (None, "a directory, not a config file"),
    (b'\xff\xfe{"max_steps": 1}', "not UTF-8 text"),
    (b'{"max_steps": ' + b"1" * 5000 + b"}", "JSON that Python cannot read"),
    (b"[" * 100_000, "JSON that Python cannot read"),
], ids=["directory", "not utf-8", "5000 digits", "deep"])
def test_a_config_file_python_cannot_read_is_one_line(tmp_path, capsys, content, message):
    """Found in review: each of these was a traceback (IsADirectoryError, UnicodeDecodeError, ValueError, ...)."""
    path = tmp_path / "config.json"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, [str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"config.json: {message}" in err, err


def test_an_out_dir_that_is_a_file_is_one_line_and_the_file_untouched(tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    for out_dir in (tmp_path / "notes", tmp_path / "notes" / "run"):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(train.main, ["shakespeare-quick", "--out-dir", str(out_dir), "--max-steps", "1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "not a directory" in err, err
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_model_shape_tyro_refuses_names_the_flag(tmp_path, capsys):
    """GPTConfig checks its own shape while tyro builds it; tyro reports that in its own box (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, ["shakespeare-cpu", "--out-dir", str(tmp_path / "run"), "--model.n-head", "0"])
    assert exit_info.value.code == 2 and "--model.n-head 0: must be ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_file_from_before_a_field_existed_names_it_and_todays_default(tmp_path, capsys):
    old = copy.deepcopy(BASE)
    del old["model"]["vocab_multiple"], old["optim"]["decay"], old["eval_unit"]
    old["data"]["verify_sha256"] = old["data"].pop("verify") == "full"  # a renamed key is not missing
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning) as caught:
        cfg = train.parse_config([str(path)])
    (message,) = [str(w.message) for w in caught]
    assert "model.vocab_multiple (today's default 64 applies)" in message and "optim.decay (" in message
    assert "data.verify" not in message and "eval_unit" not in message and cfg.model.vocab_multiple == 64
    assert cfg.eval_unit == "micro"  # what eval_batches meant when the file was written
    with pytest.warns(UserWarning) as caught:  # a field the command line sets is not news
        train.parse_config([str(path), "--model.vocab-multiple", "1"])
    assert [str(w.message) for w in caught if "vocab_multiple" in str(w.message)] == []
    path.write_text(json.dumps({**old, "max_steps": 2.5}))  # a bad old file: one line, the refusal
    with pytest.raises(SystemExit):
        run_cli(train.main, [str(path)])
    assert capsys.readouterr().err.count("\n") == 1


def test_ranks_past_the_first_of_a_node_parse_quietly(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank parses the same command line: one line per node, not per rank."""
    old = copy.deepcopy(BASE)
    del old["model"]["vocab_multiple"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.parse_once_per_node([str(path)]).model.vocab_multiple == 64  # its warning unsaid
    for argv in ([str(path), "--optim.lr", "1e-5"], ["shakespeare-cpu", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_once_per_node(argv)
        assert exit_info.value.code == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="optim.min_lr"):
        train.parse_once_per_node([str(path), "--optim.lr", "1e-5"])
