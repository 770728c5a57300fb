"""Checkpoints on disk: atomic writes, a verifying manifest, the schedule of which steps get one.

A checkpoint is a directory checkpoints/step-XXXXXXX/ holding state.pt (plain dicts, lists and tensors,
so torch.load(weights_only=True) reads it) and MANIFEST.json (file sizes and sha256, step). It is
written under a temporary name, fsynced, and renamed into place, so a reader never sees half of one.
Not in here: what goes into state.pt (train.py decides) or any distributed logic.
"""
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from data import sha256_file

MANIFEST = "MANIFEST.json"
STATE = "state.pt"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


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
    """Write state atomically as step-XXXXXXX; then prune old unkept checkpoints beyond keep_last."""
    final = step_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / STATE, "wb") as file:
            hashing = _HashingWriter(file)
            torch.save(state, hashing)  # hashed as it is written: no second pass over a multi-GB file
            file.flush()
            os.fsync(file.fileno())
        _test_pause_hook(step)
        manifest = {"step": step, "keep": keep, "files": {STATE: {"bytes": hashing.bytes, "sha256": hashing.sha256()}}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the directory complete
        _fsync(tmp / MANIFEST)
        if final.exists():  # only a broken one can be in the way (a complete one ends the resume there):
            final.rename(final.with_name(f"broken-{final.name}-{int(time.time())}"))  # kept for a person to see
        os.rename(tmp, final)
        _fsync(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{final}: checkpoint write failed ({err.strerror or err}); earlier checkpoints are intact") from err
    _prune(run_dir, keep_last)
    return final


class _HashingWriter:
    """The file torch.save writes to, hashing and counting the bytes on their way to disk."""

    def __init__(self, file):
        self.file, self.digest, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.file.write(data)

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


def _test_pause_hook(step: int):
    """For the kill tests: GUST_PAUSE_IN_SAVE=STEP:FILE makes the save of STEP touch FILE, then wait, mid-write."""
    hook = os.environ.get("GUST_PAUSE_IN_SAVE")
    if hook and int(hook.split(":", 1)[0]) == step:
        Path(hook.split(":", 1)[1]).touch()
        time.sleep(60)


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "MANIFEST.json is not valid JSON"
    for name, entry in manifest["files"].items():
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
        raise ValueError(f"{ckpt}: {problem}")
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with a long explanation; keep one line
        raise ValueError(f"{ckpt / STATE}: refused by torch.load(weights_only=True) — it holds pickled "
                         f"objects, not plain tensors and containers ({type(err).__name__})") from None


def _prune(run_dir: Path, keep_last: int):
    """Delete the oldest non-scheduled complete checkpoints beyond keep_last (0 keeps all)."""
    if keep_last <= 0:
        return
    unkept = []
    for ckpt in all_checkpoints(run_dir):  # newest first
        try:
            if not json.loads((ckpt / MANIFEST).read_text()).get("keep", False):
                unkept.append(ckpt)
        except (OSError, json.JSONDecodeError):
            continue  # broken ones are left for a person to look at
    for ckpt in unkept[keep_last:]:
        shutil.rmtree(ckpt, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoint or run dir → model

def find_checkpoint(checkpoint_dir: Path | None, run_dir: Path | None) -> Path:
    """The checkpoint named, or the newest complete one in run_dir; a one-line error if there is none."""
    if checkpoint_dir is not None:
        if not (checkpoint_dir / MANIFEST).is_file() and (checkpoint_dir / "checkpoints").is_dir():
            raise ValueError(f"--checkpoint {checkpoint_dir}: a run directory, not a checkpoint — pass --run-dir")
        return checkpoint_dir
    ckpt = latest_complete(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint — train first with `make train`")
    return ckpt


def load_gust(ckpt: Path):
    """The GPT of a verified checkpoint in eval mode, and the checkpoint's whole state (eval.py, sample.py, hf_bridge.py)."""
    from model import GPT, GPTConfig  # here, not at the top: writing and verifying checkpoints needs no model

    state = load(ckpt)
    # auto: the fused kernel where it works, else sdpa — a run trained with attn_impl cuda still loads on a CPU
    model = GPT(GPTConfig(**dict(state["config"]["model"], attn_impl="auto")))
    model.load_state_dict(state["model"])
    return model.eval(), state
