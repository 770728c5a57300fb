"""One writer per run directory: a second run is refused naming the holder, a SIGKILLed holder never blocks,
workers die with their torchrun agent, and readers (eval, sample, export) work on a live run."""
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

import checkpoint
import eval as gust_eval  # "eval" the module, not the builtin
import hf_bridge
import sample
from conftest import ROOT, tiny_run
from errors import UserError
from test_faults import launch, logged_step, snapshot, wait_for
from train import train

HOLD = "import sys, time; from pathlib import Path; import rundir; held = rundir.lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"


def hold_lock(run_dir):
    """A process that takes run_dir's lock as train.py does and keeps it; returns once it is held."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def finished_run(tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "run", max_steps=4, checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=2))
    train(cfg)
    return cfg


@pytest.mark.parametrize("resume", ["none", "auto"])
def test_a_second_run_is_refused_naming_the_holder_and_touches_nothing(finished_run, resume):
    holder = hold_lock(finished_run.out_dir)
    try:
        before = snapshot(finished_run.out_dir)
        lock_text = (finished_run.out_dir / ".lock").read_text()
        with pytest.raises(UserError, match=rf"run: in use by host {socket.gethostname()}, PID {holder.pid}, since "):
            train(replace(finished_run, resume=resume, max_steps=8))
        assert snapshot(finished_run.out_dir) == before
        assert (finished_run.out_dir / ".lock").read_text() == lock_text
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_sigkilled_run_does_not_block(finished_run):
    holder = hold_lock(finished_run.out_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert "PID" in (finished_run.out_dir / ".lock").read_text()  # its text is still there; the OS lock is not
    assert train(replace(finished_run, resume="auto", max_steps=6))["step"] == 6


def test_a_checkpoint_left_mid_save_by_a_live_run_is_not_cleaned_up(finished_run):
    """Leftover removal needs the lock: a second run must never delete a live run's temporary checkpoint."""
    holder = hold_lock(finished_run.out_dir)
    in_progress = finished_run.out_dir / "checkpoints" / ".tmp-step-0000006-999999"
    in_progress.mkdir()
    try:
        with pytest.raises(UserError, match="in use by"):
            train(replace(finished_run, resume="auto", max_steps=6))
        assert in_progress.is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_readers_work_on_a_live_run(finished_run, tmp_path, capsys):
    holder = hold_lock(finished_run.out_dir)
    (finished_run.out_dir / "checkpoints" / ".tmp-step-0000006-999999").mkdir()  # a save in progress: not read
    try:
        newest = checkpoint.step_dir(finished_run.out_dir, 4)
        assert gust_eval.find_checkpoint(None, finished_run.out_dir) == newest
        result = gust_eval.main(["--run-dir", str(finished_run.out_dir), "--max-tokens", "200", "--device", "cpu"])
        assert result["tokens_scored"] > 0
        sample.main(["--run-dir", str(finished_run.out_dir), "--max-new-tokens", "5", "--device", "cpu"])
        pytest.importorskip("safetensors")
        hf_bridge.main(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "hf")])
        assert (tmp_path / "hf" / "model.safetensors").is_file()
    finally:
        holder.kill()
        holder.wait()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished; only its exit status is left
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_workers_die_with_their_torchrun_agent(tiny_data, tmp_path):
    cfg = tiny_run(tiny_data, tmp_path / "orphans", max_steps=100_000, eval_interval=100_000,
                   checkpoint=replace(tiny_run(tiny_data, tmp_path).checkpoint, every=2))
    agent = launch(cfg, tmp_path, torchrun=True)
    wait_for(lambda: logged_step(cfg.out_dir) >= 3, agent, timeout=180)
    workers = [pid for pid in children_of(agent.pid) if alive(pid)]
    assert len(workers) == 2, workers
    agent.send_signal(signal.SIGKILL)  # the agent only: its workers are in sessions of their own
    agent.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # don't leave them training if the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "workers trained on after their agent was killed"
    checkpoints_at_kill = checkpoint.all_checkpoints(cfg.out_dir)  # once they are gone: a save may just have ended
    time.sleep(1)  # at ~10 steps/s and a checkpoint every 2 steps, a survivor would have written more
    assert checkpoint.all_checkpoints(cfg.out_dir) == checkpoints_at_kill
