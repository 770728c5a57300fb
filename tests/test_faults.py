"""Fault tolerance: SIGKILL anywhere (even mid-save), SIGTERM, corrupt checkpoints, NaN, bad resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import checkpoint
from conftest import ROOT, tiny_run
from configs import to_json
from train import train


def state_of(run_dir):
    return checkpoint.load(checkpoint.latest_complete(run_dir))


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def launch(cfg, tmp_path, env=None, torchrun=False):
    """train.py in a subprocess, from a config file; returns the Popen."""
    path = tmp_path / f"{cfg.out_dir.name}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(to_json(cfg)))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    return subprocess.Popen([*prefix, "train.py", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
                            start_new_session=torchrun)


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.fixture
def reference(tiny_data, tmp_path):
    """An uninterrupted 12-step run with checkpoints every 3 steps, and its final state."""
    cfg = tiny_run(tiny_data, tmp_path / "reference", max_steps=12,
                   checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=3),
                   model=replace(tiny_run(tiny_data, tmp_path).model, dropout=0.1))
    train(cfg)
    return cfg, state_of(tmp_path / "reference")


@pytest.mark.parametrize("kill_point", ["mid_step", "mid_save", "after_save"])
def test_sigkill_then_resume_is_bitwise(reference, tmp_path, kill_point):
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / kill_point)
    marker = tmp_path / "saving"
    env = {"GUST_PAUSE_IN_SAVE": f"6:{marker}"} if kill_point == "mid_save" else {}
    proc = launch(run, tmp_path, env)
    if kill_point == "mid_save":
        wait_for(marker.exists, proc)  # inside the save of step 6: state.pt written, no manifest, no rename
    elif kill_point == "mid_step":
        wait_for(lambda: logged_step(run.out_dir) >= 4, proc)
    else:
        wait_for(lambda: checkpoint.step_dir(run.out_dir, 9).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_complete(run.out_dir) is not None
    train(replace(run, resume="auto"))
    assert_same_weights(state_of(run.out_dir), expected)


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_bitwise(reference, tmp_path):
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / "term", checkpoint=replace(cfg.checkpoint, every=100))
    proc = launch(run, tmp_path)
    wait_for(lambda: logged_step(run.out_dir) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = state_of(run.out_dir)["step"]
    assert 4 <= stopped_at < 12
    train(replace(run, resume="auto"))
    assert_same_weights(state_of(run.out_dir), expected)


def test_sigterm_under_torchrun_two_ranks(tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "straight", max_steps=40, checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=100))
    straight = launch(cfg, tmp_path, torchrun=True)
    assert straight.wait(timeout=300) == 0
    run = replace(cfg, out_dir=tmp_path / "term")
    proc = launch(run, tmp_path, torchrun=True)
    wait_for(lambda: logged_step(run.out_dir) >= 3, proc, timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the agent and its workers
    proc.communicate(timeout=120)
    stopped_at = state_of(run.out_dir)["step"]
    assert 3 <= stopped_at < 40
    resumed = launch(replace(run, resume="auto"), tmp_path, torchrun=True)
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    assert_same_weights(state_of(run.out_dir), state_of(tmp_path / "straight"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_newest_checkpoint_is_reported_and_skipped(reference, tmp_path, damage, recwarn):
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / damage)
    train(replace(run, max_steps=9))
    newest = run.out_dir / "checkpoints" / "step-0000009" / "state.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    train(replace(run, resume="auto"))  # resumes at 6, finishes at 12
    messages = " ".join(str(w.message) for w in recwarn)
    assert "step-0000009: skipped" in messages
    assert_same_weights(state_of(run.out_dir), expected)
    assert any(p.name.startswith("broken-step-0000009") for p in (run.out_dir / "checkpoints").iterdir())  # kept


def test_nonfinite_loss_in_fp32_stops_with_the_step_and_saves(tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "nan", max_steps=10, optim=replace(tiny_run(tiny_data, tmp_path).optim,
                                                                             lr=1e6, warmup_steps=1, grad_clip=0.0))
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite loss .* under fp32; last good state saved at step \d+"):
        train(cfg)
    good = state_of(tmp_path / "nan")
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_resume_with_a_different_block_size_names_the_flag(reference, tmp_path):
    cfg, _ = reference
    before = {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")}
    bigger = replace(cfg, resume="auto", model=replace(cfg.model, block_size=64))
    with pytest.raises(ValueError, match="checkpoint has model.block_size = 32, but --model.block-size is 64"):
        train(bigger)
    assert {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")} == before


class NotATensor:
    pass


def test_checkpoint_with_pickled_objects_is_refused(reference, tmp_path):
    cfg, _ = reference
    bad = tmp_path / "evil"
    state = {"model": {}, "payload": NotATensor()}
    checkpoint.save(bad, 1, state, keep=True, keep_last=0)
    with pytest.raises(ValueError, match=r"step-0000001/state.pt: refused by torch.load\(weights_only=True\)"):
        train(replace(cfg, out_dir=tmp_path / "victim", resume=str(checkpoint.step_dir(bad, 1))))


def test_fresh_run_refuses_to_overwrite_existing_checkpoints(reference):
    cfg, _ = reference
    with pytest.raises(ValueError, match="already holds checkpoints — pass --resume auto"):
        train(cfg)


def test_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"x": torch.ones(3)}, keep=False, keep_last=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"step-0000002: checkpoint write failed \(No space left on device\)"):
        checkpoint.save(tmp_path, 2, {"x": torch.zeros(3)}, keep=False, keep_last=0)
    assert checkpoint.latest_complete(tmp_path) == checkpoint.step_dir(tmp_path, 1)
    assert torch.equal(checkpoint.load(checkpoint.step_dir(tmp_path, 1))["x"], torch.ones(3))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
