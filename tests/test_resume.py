"""What a resume may and may not do: stop when every checkpoint is broken, never replace config.json, refuse a
changed config unless told (then record it), clean up killed writers' leftovers; and the checkpoint writer's own
rules (pruning counts only good checkpoints, a good checkpoint is never renamed broken, fsync order, bad manifests)."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import checkpoint
from conftest import ROOT, tiny_run
from errors import UserError
from test_faults import snapshot
from train import train


@pytest.fixture
def finished_run(tiny_data, tmp_path):
    """4 steps, checkpoints at 2 and 4."""
    cfg = tiny_run(tiny_data, tmp_path / "run", max_steps=4, checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=2))
    train(cfg)
    return cfg


def test_every_checkpoint_broken_stops_and_loses_nothing(finished_run):
    for ckpt in checkpoint.all_checkpoints(finished_run.out_dir):
        data = bytearray((ckpt / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / "state.pt").write_bytes(bytes(data))
    before = snapshot(finished_run.out_dir)
    with pytest.warns(UserWarning, match="skipped"):
        with pytest.raises(UserError, match=r"run: none of its 2 checkpoint\(s\) verifies \(newest step-0000004: "
                                            r"state.pt sha256 differs .*\) — nothing was changed"):
            train(replace(finished_run, resume="auto", max_steps=8))
    assert snapshot(finished_run.out_dir) == before  # metrics.jsonl keeps its rows; no broken-… renames


def test_resume_naming_a_run_directory_says_so(finished_run):
    """Found in review: it read the run directory as a checkpoint and said "no MANIFEST.json (incomplete write)"."""
    before = snapshot(finished_run.out_dir)
    with pytest.raises(UserError, match=r"--resume .*run: a run directory, not a checkpoint — pass --resume auto"):
        train(replace(finished_run, resume=str(finished_run.out_dir), max_steps=8))
    assert snapshot(finished_run.out_dir) == before


@pytest.mark.parametrize("field, value, shown", [
    ("seed", 22, "seed 21 → 22"),
    ("global_batch_size", 16, "global_batch_size 8 → 16"),
    ("precision", "bf16", 'precision "fp32" → "bf16"'),
])
def test_a_resume_that_changes_the_run_is_refused_naming_the_field(finished_run, field, value, shown):
    before = snapshot(finished_run.out_dir)
    with pytest.raises(UserError, match=rf"step-0000004: this resume changes the run — {shown} \(checkpoint → now\).*"
                                        r"--allow-config-change"):
        train(replace(finished_run, resume="auto", max_steps=6, **{field: value}))
    assert snapshot(finished_run.out_dir) == before


def test_a_changed_schedule_or_data_dir_is_refused_too(finished_run, tiny_data, tmp_path):
    other_data = tmp_path / "data-copy"
    other_data.mkdir()
    for path in tiny_data.iterdir():
        (other_data / path.name).write_bytes(path.read_bytes())
    with pytest.raises(UserError, match=r"optim.decay_steps 40 → 80"):
        train(replace(finished_run, resume="auto", optim=replace(finished_run.optim, decay_steps=80)))
    with pytest.raises(UserError, match=r"data.dir .* → .*data-copy"):
        train(replace(finished_run, resume="auto", data=replace(finished_run.data, dir=other_data)))


def test_an_allowed_change_is_recorded_and_config_json_is_never_replaced(finished_run):
    config_json = (finished_run.out_dir / "config.json").read_text()
    train(replace(finished_run, resume="auto", max_steps=6, log_interval=2))  # free: no flag needed
    train(replace(finished_run, resume="auto", max_steps=8, log_interval=2, seed=22, allow_config_change=True))
    assert (finished_run.out_dir / "config.json").read_text() == config_json
    rows = [json.loads(line) for line in (finished_run.out_dir / "config-changes.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 4 and rows[0]["overridden"] is False
    assert rows[0]["changes"] == {"max_steps": {"from": 4, "to": 6}, "log_interval": {"from": 1, "to": 2}}
    assert rows[1]["step"] == 6 and rows[1]["overridden"] is True
    assert rows[1]["changes"] == {"max_steps": {"from": 6, "to": 8}, "seed": {"from": 21, "to": 22}}
    assert checkpoint.load(checkpoint.latest_complete(finished_run.out_dir))["config"]["seed"] == 22


def test_leftovers_of_killed_writers_go_at_the_next_start(finished_run):
    ckpts = finished_run.out_dir / "checkpoints"
    leftovers = [finished_run.out_dir / "config.json.tmp", finished_run.out_dir / "metrics.jsonl.tmp",
                 ckpts / ".tmp-step-0000006-12345"]
    leftovers[0].write_text("")
    leftovers[1].write_text('{"step": 1')
    leftovers[2].mkdir()
    (leftovers[2] / "state.pt").write_bytes(b"partial")
    train(replace(finished_run, resume="auto", max_steps=6))
    assert not any(path.exists() for path in leftovers)


# ----------------------------------------------------------------------------- the checkpoint writer

def save_steps(run_dir, steps, keep_last, keep=False):
    for step in steps:
        checkpoint.save(run_dir, step, {"x": torch.full((4,), float(step))}, keep=keep, keep_last=keep_last)


def names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_pruning_keeps_the_newest_good_ones_and_scheduled_ones(tmp_path):
    save_steps(tmp_path, [10, 20], keep_last=2, keep=True)  # scheduled: never pruned
    save_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert names(tmp_path) == ["step-0000004", "step-0000005", "step-0000010", "step-0000020"]


def test_pruning_neither_counts_nor_deletes_a_corrupt_checkpoint(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], keep_last=3)
    state = checkpoint.step_dir(tmp_path, 4) / "state.pt"
    data = bytearray(state.read_bytes())
    data[-10] ^= 0xFF  # its manifest is intact: only the sha256 tells
    state.write_bytes(bytes(data))
    save_steps(tmp_path, [5], keep_last=2)
    assert names(tmp_path) == ["step-0000003", "step-0000004", "step-0000005"]  # 5 and 3 good; 4 left for a person
    assert checkpoint.verify(checkpoint.step_dir(tmp_path, 3)) is None


def test_a_good_checkpoint_of_the_same_step_is_kept_not_renamed_broken(tmp_path):
    save_steps(tmp_path, [3], keep_last=0)
    checkpoint.save(tmp_path, 3, {"x": torch.zeros(4)}, keep=False, keep_last=0)
    assert names(tmp_path) == ["step-0000003"]
    assert torch.equal(checkpoint.load(checkpoint.step_dir(tmp_path, 3))["x"], torch.full((4,), 3.0))


def test_the_nonfinite_abort_keeps_the_good_checkpoint_of_its_step(tiny_data, tmp_path):
    base = tiny_run(tiny_data, tmp_path / "nan")
    cfg = replace(base, max_steps=10, optim=replace(base.optim, lr=1e6, warmup_steps=1, grad_clip=0.0),
                  checkpoint=replace(base.checkpoint, every=1))  # every step: the abort re-saves a saved step
    with pytest.raises(FloatingPointError, match="last good state saved at step"):
        train(cfg)
    ckpts = sorted((tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts and not [p for p in ckpts if p.name.startswith("broken-")]
    assert all(checkpoint.verify(p) is None for p in ckpts)


def test_the_rename_is_made_durable_by_fsyncing_the_directories(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = checkpoint._fsync, os.rename

    def fsync(path):
        events.append(("fsync", path.name))
        real_fsync(path)

    def rename(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint, "_fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save_steps(tmp_path, [7], keep_last=0)
    tmp_name = next(name for kind, name in events if kind == "fsync" and name.startswith(".tmp-step-0000007"))
    assert events[-3:] == [("fsync", tmp_name), ("rename", "step-0000007"), ("fsync", "checkpoints")]


def test_a_skipped_checkpoint_is_one_warning_line_on_the_command_line(tmp_path):
    # run_cli prints our warnings as one line (Python's format adds our source line); a library's keep theirs
    save_steps(tmp_path, [1, 2], keep_last=0)
    (checkpoint.step_dir(tmp_path, 2) / checkpoint.MANIFEST).write_text("{}")
    # also not ours: numpy's RuntimeWarning from a line of ours, and a pseudo-file named like no module of ours
    program = ("import sys, warnings, checkpoint, errors; "
               "errors.run_cli(lambda: (checkpoint.latest_complete(sys.argv[1]), "
               "warnings.warn_explicit('a library speaks', UserWarning, '/lib/x.py', 7), "
               "warnings.warn_explicit('overflow', RuntimeWarning, sys.argv[2], 9), "
               "warnings.warn_explicit('from sys', UserWarning, 'sys', 1)))")
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path), str(ROOT / "metrics.py")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith(" ")]  # Python's source lines
    assert len(lines) == 4 and lines[0].startswith(f"gust: warning: {checkpoint.step_dir(tmp_path, 2)}: skipped, ")
    assert lines[1:] == ["/lib/x.py:7: UserWarning: a library speaks",
                         f"{ROOT / 'metrics.py'}:9: RuntimeWarning: overflow", "sys:1: UserWarning: from sys"]


@pytest.mark.parametrize("manifest", ["{}", "[]", '{"files": {}}', '{"files": {"state.pt": {"bytes": 3}}}'])
def test_a_malformed_manifest_is_a_broken_checkpoint(tmp_path, manifest):
    save_steps(tmp_path, [1, 2], keep_last=0)
    (checkpoint.step_dir(tmp_path, 2) / checkpoint.MANIFEST).write_text(manifest)
    assert "malformed" in checkpoint.verify(checkpoint.step_dir(tmp_path, 2))
    with pytest.warns(UserWarning, match="step-0000002: skipped"):
        assert checkpoint.latest_complete(tmp_path) == checkpoint.step_dir(tmp_path, 1)
    with pytest.raises(UserError, match="malformed"):
        checkpoint.load(checkpoint.step_dir(tmp_path, 2))
