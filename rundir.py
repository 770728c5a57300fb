"""One writer per run directory: the run's lock, the leftovers of killed writers, and workers that die with torchrun.

lock() takes an OS lock (fcntl.flock) on runs/<name>/.lock for the life of the process that writes the run (rank 0);
the kernel drops it when that process dies, however it dies, so a SIGKILLed run never blocks the next one. The file
holds host, PID and start time as text, only to name the holder in the refusal. Readers (eval.py, sample.py,
hf_bridge.py export) never take it: they read complete checkpoints, which are renamed into place whole.
Not in here: what a run writes (train.py, checkpoint.py).
"""
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import checkpoint
from errors import UserError

LOCK = ".lock"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def lock(run_dir: Path):
    """Hold run_dir's lock until this process exits (the returned file must stay open), or a one-line UserError
    naming the live holder. Creates run_dir if needed; writes nothing else, and nothing when refusing."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # it, or a directory above it, is a file
        raise UserError(f"{run_dir}: not a directory (a file is in the way) — choose another --out-dir") from None
    file = open(run_dir / LOCK, "a+")  # a+: never truncates a live holder's text before we know we hold the lock
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process (it has not written its name yet)"
        file.close()
        raise UserError(f"{run_dir}: in use by {holder} — wait for it to finish, stop it, or choose another "
                        "--out-dir") from None
    file.seek(0)
    file.truncate()
    file.write(f"host {socket.gethostname()}, PID {os.getpid()}, since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}\n")
    file.flush()
    return file


@contextmanager
def holding(run_dir: Path):
    """lock() for the life of a with block. A run that fails before writing anything takes away what lock() made —
    the lock file, the directory and the ones above it that it created: bad input leaves no trace."""
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # innermost first
    had = {path.name for path in run_dir.iterdir()} if run_dir.is_dir() else set()
    file = lock(run_dir)
    try:
        yield file
    except BaseException:
        if LOCK not in had and {path.name for path in run_dir.iterdir()} == had | {LOCK}:
            (run_dir / LOCK).unlink()
            for directory in made:  # each is empty now, or holds only what a later run put there: then stop
                try:
                    directory.rmdir()
                except OSError:
                    break
        raise
    finally:
        file.close()  # in-process callers (tests) may start the next run on this directory


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files and directories of killed writers; only call with the lock held (a live writer's
    temporary checkpoint would otherwise go with them). Returns what was removed."""
    # data.write_atomic's text writes go through NAME.tmp; checkpoint.save through checkpoints/.tmp-step-...
    removed = sorted(run_dir.glob("*.tmp")) + sorted((run_dir / "checkpoints").glob(checkpoint.TMP_PREFIX + "*"))
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def die_with_parent(parent_at_start: int):
    """Under torchrun: SIGKILL this worker when its agent dies. torchrun starts workers in sessions of their own, so
    without this a SIGKILLed agent leaves them training on, unsupervised, writing into the run. SIGKILL, not SIGTERM:
    a SIGTERM would make them write one more checkpoint. parent_at_start: os.getppid() read as early as possible,
    to notice an agent that died before prctl took effect. Linux only; elsewhere a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # e.g. a seccomp filter forbids it: run on unguarded, as before
    if os.getppid() != parent_at_start or parent_at_start == 1:  # the agent died before prctl: we were reparented
        os.kill(os.getpid(), signal.SIGKILL)
