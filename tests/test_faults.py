"""Fault tolerance: SIGKILL anywhere (even mid-save), SIGTERM, corrupt checkpoints, NaN, bad resumes."""
import errno
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
from errors import UserError
from train import train


def state_of(run_dir):
    return checkpoint.load(checkpoint.latest_complete(run_dir))


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def launch(cfg, tmp_path, env=None, torchrun=False, pause=None, slow=None):
    """train.py in a subprocess, from a config file; returns the Popen.
    pause: (point, step, marker) runs it through tests/pause_in_save.py, which stops inside that save;
    slow: seconds of sleep after each logged step (tests/slow_steps.py)."""
    path = tmp_path / f"{cfg.out_dir.name}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(to_json(cfg)))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    script = (["tests/pause_in_save.py", *map(str, pause)] if pause else ["tests/slow_steps.py", str(slow)] if slow
              else ["train.py"])
    return subprocess.Popen([*prefix, *script, str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
                            start_new_session=torchrun)


def verified_checkpoints(run_dir) -> list:
    return [ckpt for ckpt in checkpoint.all_checkpoints(run_dir) if checkpoint.verify(ckpt) is None]


def snapshot(run_dir) -> dict:
    """Every file of a run directory with its mtime and bytes: what "touches nothing" compares. Not .lock, whose
    holder line every run that gets the lock rewrites."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.name != ".lock"}


def leftovers(run_dir) -> list:
    return sorted((run_dir / "checkpoints").glob(".tmp-*")) + sorted(run_dir.glob("*.tmp"))


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


SAVE_POINTS = ["mid_state", "before_manifest", "before_rename", "before_prune"]  # see tests/pause_in_save.py


@pytest.mark.parametrize("kill_point", ["mid_step", *SAVE_POINTS])
def test_sigkill_then_resume_is_bitwise(reference, tmp_path, kill_point):
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / kill_point)
    marker = tmp_path / "saving"
    proc = launch(run, tmp_path, pause=(kill_point, 6, marker) if kill_point in SAVE_POINTS else None)
    if kill_point in SAVE_POINTS:
        wait_for(marker.exists, proc)  # inside the save of step 6
    else:
        wait_for(lambda: logged_step(run.out_dir) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    earlier = verified_checkpoints(run.out_dir)
    assert earlier and all(checkpoint.verify(c) is None for c in checkpoint.all_checkpoints(run.out_dir))
    if kill_point in ("mid_state", "before_manifest", "before_rename"):
        assert leftovers(run.out_dir)  # the killed save's temporary directory, for the next start to remove
    train(replace(run, resume="auto"))
    assert all(checkpoint.verify(c) is None for c in earlier), "an earlier checkpoint was damaged"
    assert leftovers(run.out_dir) == []
    assert_same_weights(state_of(run.out_dir), expected)


@pytest.mark.parametrize("where", ["inside_torch_save", "at_fsync"])
def test_disk_full_during_a_save_names_it_cleans_up_and_resumes_bitwise(reference, tmp_path, monkeypatch, where):
    """ENOSPC inside torch.save arrives as torch's RuntimeError ("unexpected pos"); at fsync as a plain OSError."""
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / "full")
    real_write, real_fsync = checkpoint._HashingWriter.write, os.fsync
    real_save, saving = checkpoint.save, []

    def save_noting_the_step(run_dir, step, *args, **kwargs):
        saving.append(step)
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_noting_the_step)

    def disk_full_at_step_6(real):
        def injected(*args):
            if saving and saving[-1] == 6:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)
        return injected

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write_until_the_disk_fills(self, data):
        if saving and saving[-1] == 6 and self.bytes > 4096:  # some of state.pt is out: torch is mid-archive
            self.file = FullDisk()
        return real_write(self, data)

    if where == "inside_torch_save":
        monkeypatch.setattr(checkpoint._HashingWriter, "write", write_until_the_disk_fills)
    else:
        monkeypatch.setattr(os, "fsync", disk_full_at_step_6(real_fsync))
    with pytest.raises(UserError, match=r"step-0000006: checkpoint not written, the disk is full \(No space left"):
        train(run)
    assert [c.name for c in verified_checkpoints(run.out_dir)] == ["step-0000003"]
    assert leftovers(run.out_dir) == []  # the partial state.pt is gone at once: it would keep the disk full
    monkeypatch.undo()
    train(replace(run, resume="auto"))
    assert_same_weights(state_of(run.out_dir), expected)


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_bitwise(reference, tmp_path):
    cfg, expected = reference
    run = replace(cfg, out_dir=tmp_path / "term", checkpoint=replace(cfg.checkpoint, every=100))
    proc = launch(run, tmp_path, slow=0.2)  # unslowed, its 12 steps could end before the signal (seen here)
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
    before = snapshot(cfg.out_dir)
    bigger = replace(cfg, resume="auto", model=replace(cfg.model, block_size=64))
    with pytest.raises(UserError, match="checkpoint has model.block_size = 32, but --model.block-size is 64"):
        train(bigger)
    assert snapshot(cfg.out_dir) == before


class NotATensor:
    pass


def test_checkpoint_with_pickled_objects_is_refused(reference, tmp_path):
    cfg, _ = reference
    bad = tmp_path / "evil"
    state = {"model": {}, "payload": NotATensor()}
    checkpoint.save(bad, 1, state, keep=True, keep_last=0)
    with pytest.raises(UserError, match=r"step-0000001/state.pt: refused by torch.load\(weights_only=True\)"):
        train(replace(cfg, out_dir=tmp_path / "victim", resume=str(checkpoint.step_dir(bad, 1))))


def test_fresh_run_refuses_to_overwrite_existing_checkpoints(reference):
    cfg, _ = reference
    with pytest.raises(UserError, match="already holds checkpoints — pass --resume auto"):
        train(cfg)


def test_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"x": torch.ones(3)}, keep=False, keep_last=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"step-0000002: checkpoint not written, the disk is full"):
        checkpoint.save(tmp_path, 2, {"x": torch.zeros(3)}, keep=False, keep_last=0)
    assert checkpoint.latest_complete(tmp_path) == checkpoint.step_dir(tmp_path, 1)
    assert torch.equal(checkpoint.load(checkpoint.step_dir(tmp_path, 1))["x"], torch.ones(3))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
