"""Checkpoints on disk: atomic writes, a verifying manifest, the schedule of which steps get one.

A checkpoint is a directory checkpoints/step-XXXXXXX/ holding state.pt (plain dicts, lists and tensors,
so torch.load(weights_only=True) reads it) and MANIFEST.json (file sizes and sha256, step). It is
written under a temporary name, fsynced, and renamed into place, so a reader never sees half of one.
Not in here: what goes into state.pt (resume.py decides) or any distributed logic.
"""
import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from data import sha256_file
from errors import UserError

MANIFEST = "MANIFEST.json"
STATE = "state.pt"
TMP_PREFIX = ".tmp-"  # checkpoints/.tmp-step-XXXXXXX-PID: a save in progress, or the leftover of a killed one


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint holds, from its manifest: a copy of one may be named anything (--resume ~/backup)."""
    return json.loads((Path(ckpt) / MANIFEST).read_text())["step"]


def set_aside_after(run_dir: Path, step: int) -> Path | None:
    """Move the complete checkpoints of steps after `step` into checkpoints/superseded-at-step-<step>-<unix time>/;
    returns that folder, or None when there were none. A resume from an earlier checkpoint starts a new branch of
    the run: its saves must not be skipped as "the same step, the same state" for the old branch's, nor its pruning
    count them. Moved, never deleted: they may be the better branch. Ones without a manifest (killed saves) stay
    where verify reports them."""
    later = [ckpt for ckpt in all_checkpoints(run_dir)
             if (ckpt / MANIFEST).is_file() and int(ckpt.name.split("-")[1]) > step]
    if not later:
        return None
    aside = Path(run_dir) / "checkpoints" / f"superseded-at-step-{step}-{int(time.time())}"
    aside.mkdir()
    for ckpt in later:
        os.rename(ckpt, aside / ckpt.name)
    _fsync(aside.parent)  # the renames survive a power cut: a resume after one must not find the old branch
    return aside


def scheduled_steps(schedule: str, intervals, max_steps: int) -> set[int]:
    """The steps whose checkpoint is kept for good (the last step always is)."""
    if schedule == "mistral":  # every N until M, for each (N, M), plus step 0
        steps, start = {0}, 0
        for interval, until in intervals:
            steps |= set(range(start + interval, until + 1, interval))
            start = until
    else:  # "every" checkpoints roll (keep_last prunes them); "none" writes only the last
        steps = set()
    return {s for s in steps if s <= max_steps} | {max_steps}


def save(run_dir: Path, step: int, state: dict, keep: bool, keep_last: int) -> Path:
    """Write state atomically as step-XXXXXXX; then prune old unkept checkpoints beyond keep_last.
    A complete checkpoint of this step already there is kept as it is (the same step is the same state)."""
    final = step_dir(run_dir, step)
    if final.exists() and verify(final) is None:
        return final
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashing = None
    try:
        with open(tmp / STATE, "wb") as file:
            hashing = _HashingWriter(file)
            torch.save(state, hashing)  # hashed as it is written: no second pass over a multi-GB file
            file.flush()
            os.fsync(file.fileno())
        manifest = {"step": step, "keep": keep, "files": {STATE: {"bytes": hashing.bytes, "sha256": hashing.sha256()}}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the directory complete
        _fsync(tmp / MANIFEST)
        _fsync(tmp)  # the directory entries of both files, before the rename publishes them
        if final.exists():  # only a broken one can be in the way (a complete one returned above):
            final.rename(final.with_name(f"broken-{final.name}-{int(time.time())}"))  # kept for a person to see
        os.rename(tmp, final)
        _fsync(final.parent)  # the rename itself survives a power cut
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial state.pt must not keep the disk full
        raise _write_failure(final, err, hashing) from err
    _prune(run_dir, keep_last, written=final)
    return final


def _write_failure(final: Path, err: Exception, hashing) -> Exception:
    """The error to raise for a failed save: one line naming the checkpoint, saying so when the disk is full.
    torch.save turns an OSError from its writer into RuntimeError("... unexpected pos ..."); the writer kept it."""
    cause = err if isinstance(err, OSError) else (hashing.error if hashing is not None else None)
    if cause is None:
        return err  # a RuntimeError that is not a failed write: a bug, keep it as it is
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{final}: checkpoint not written, the disk is full ({cause.strerror}); the partial write "
                         "was removed and earlier checkpoints are intact — free space, then --resume auto")
    return OSError(cause.errno, f"{final}: checkpoint write failed ({cause.strerror or cause}); earlier checkpoints "
                                "are intact")


class _HashingWriter:
    """The file torch.save writes to, hashing and counting the bytes on their way to disk."""

    def __init__(self, file):
        self.file, self.digest, self.bytes, self.error = file, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err  # torch.save replaces it by a RuntimeError that names neither errno nor file
            raise

    def flush(self):
        self.file.flush()

    def sha256(self) -> str:
        return self.digest.hexdigest()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "MANIFEST.json is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE not in files or not all(
            isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys() for entry in files.values()):
        return "MANIFEST.json does not list state.pt with its bytes and sha256 (malformed)"
    for name, entry in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} is {path.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} sha256 differs from the manifest (corrupt)"
    return None


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Every step-XXXXXXX directory, newest first (temporary directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []


def latest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported by path and skipped, never deleted."""
    for ckpt in all_checkpoints(run_dir):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(f"{ckpt}: skipped, {problem}")
    return None


def load(ckpt: Path) -> dict:
    """state.pt of a verified checkpoint; weights_only=True refuses pickled objects."""
    problem = verify(ckpt)
    if problem is not None:
        raise UserError(f"{ckpt}: {problem}")
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with a long explanation; keep one line
        raise UserError(f"{ckpt / STATE}: refused by torch.load(weights_only=True) — it holds pickled "
                        f"objects, not plain tensors and containers ({type(err).__name__})") from None


def _prune(run_dir: Path, keep_last: int, written: Path):
    """Delete the oldest unscheduled checkpoints beyond the newest keep_last that verify (0 keeps all).
    Only checkpoints that verify count and are deleted: a broken one is left for a person to look at and never
    takes the place of a good one. `written` was verified by being written."""
    if keep_last <= 0:
        return
    good_unkept = 0
    for ckpt in all_checkpoints(run_dir):  # newest first
        try:
            if json.loads((ckpt / MANIFEST).read_text()).get("keep", False):
                continue
        except (OSError, json.JSONDecodeError, AttributeError):
            continue  # no readable manifest: broken
        if ckpt != written and verify(ckpt) is not None:
            continue
        good_unkept += 1
        if good_unkept > keep_last:
            shutil.rmtree(ckpt)


# ----------------------------------------------------------------------------- checkpoint or run dir → model

def find_checkpoint(checkpoint_dir: Path | None, run_dir: Path | None) -> Path:
    """The checkpoint named, or the newest complete one in run_dir; a one-line error if there is none."""
    if checkpoint_dir is not None:
        if not checkpoint_dir.is_dir():
            raise UserError(f"--checkpoint {checkpoint_dir}: no such directory")
        if not (checkpoint_dir / MANIFEST).is_file() and (checkpoint_dir / "checkpoints").is_dir():
            latest = latest_complete(checkpoint_dir)
            raise UserError(f"--checkpoint {checkpoint_dir}: a run directory, not a checkpoint — name one of its "
                            f"checkpoints{f' (the newest complete: {latest})' if latest else ''}")
        return checkpoint_dir
    ckpt = latest_complete(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no complete checkpoint — train first with `make train`")
    return ckpt


def load_gust(ckpt: Path):
    """The GPT of a verified checkpoint in eval mode, and the checkpoint's whole state (eval.py, sample.py, hf_bridge.py)."""
    from model import GPT, GPTConfig  # here, not at the top: writing and verifying checkpoints needs no model

    state = load(ckpt)
    # auto: the fused kernel where it works, else sdpa — a run trained with attn_impl cuda still loads on a CPU
    model = GPT(GPTConfig(**dict(state["config"]["model"], attn_impl="auto")))
    model.load_state_dict(state["model"])
    return model.eval(), state
