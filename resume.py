"""What a run starts from and what it carries forward: a checkpoint's state in and out, every rank's RNG streams,
the checks before resuming (or --init-from), and the record of a start (config.json, config-changes.jsonl,
provenance).

train.py calls these when it builds a run and at every save. Not in here: the loop (train.py), checkpoint
directories on disk — their atomic writes, the manifest, which steps are kept (checkpoint.py) — or how state moves
between distributed layouts (distributed.py).
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import rundir
from configs import TrainConfig, changes_that_need_override, config_changes, to_json
from cpu_fp16 import cpu_numerics, fp16_products
from data import TokenSplit, write_atomic
from distributed import Dist, full_state, load_full_state
from errors import UserError


# ----------------------------------------------------------------------------- seeds, RNG streams

def seed_everything(seed: int):
    seed %= 2**32  # what numpy takes; a seed in range is unchanged (seed + rank, or a step-derived one, may not be)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> dict:
    """This rank's RNG states as plain lists and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": _to_lists(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


# ----------------------------------------------------------------------------- provenance, run records

def provenance(rt: Dist, cfg: TrainConfig, attn_impl: str) -> dict:
    """Where and with what this run was made, for every checkpoint; attn_impl: the attention path taken (config.json
    may say "auto")."""
    import tokenizers

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    made = {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "torch": str(torch.__version__), "numpy": np.__version__, "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0], "device": device_name, "world_size": rt.world_size,
            "fp16_products": fp16_products(cfg.precision, rt.device, cfg.compile),  # which fp16 bits, see cpu_fp16
            "attn_impl": attn_impl}
    return made | (cpu_numerics() if rt.device.type == "cpu" else {})


NUMERICS = ("torch", "device", "cpu", "cpu_capability", "cpu_matrix_flags", "threads", "world_size", "fp16_products",
            "attn_impl")
"""The provenance that decides a run's exact floating-point results: where one changes, a resume is not bitwise."""


def numerics_changed(before: dict, now: dict) -> list[str]:
    """What of NUMERICS differs between a checkpoint's provenance and this run's (a key the checkpoint lacks, from an
    older gust, is not compared)."""
    return [f"{key} {before[key]} → {now.get(key)}" for key in NUMERICS
            if key in before and before[key] != now.get(key)]


# ----------------------------------------------------------------------------- checkpoints in and out

def checkpoint_state(run, step: int, opt_step: int) -> dict:
    """Everything needed to continue bitwise: weights, AdamW moments, scaler, counters, every rank's RNG.
    run: a train.Run (not imported: train.py imports this module)."""
    mine = {"rng": rng_state(), "scaler": run.scaler.state_dict()}  # the scaler too: proof every rank agreed
    per_rank = [mine]
    if run.rt.world_size > 1:
        per_rank = [None] * run.rt.world_size
        dist.all_gather_object(per_rank, mine)
    model_state, optimizer_state = full_state(run.raw_model, run.optimizer, run.rt)
    return {"model": model_state, "optimizer": optimizer_state, "scaler": run.scaler.state_dict(),
            "step": step, "opt_step": opt_step, "per_rank": per_rank, "config": to_json(run.cfg),
            "data_sha256": {"train": run.train_split.meta["splits"]["train"]["sha256"],
                            "val": run.val_split.meta["splits"]["val"]["sha256"]},
            "wandb_run_id": run.run_id, "provenance": run.made_with}


def resume_point(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue, or None for a fresh start; refuses to start over a run by accident."""
    if cfg.resume == "none":
        if checkpoint.all_checkpoints(run_dir):  # never overwrite a run by accident
            raise UserError(f"{run_dir}: already holds checkpoints — pass --resume auto to continue it, "
                            "or choose a new --out-dir")
        return None
    if cfg.resume == "auto":
        found = checkpoint.all_checkpoints(run_dir)
        ckpt = checkpoint.latest_complete(run_dir)
        if found and ckpt is None:  # starting over would lose the run: only the user may decide that
            raise UserError(f"{run_dir}: none of its {len(found)} checkpoint(s) verifies (newest "
                            f"{found[0].name}: {checkpoint.verify(found[0])}) — nothing was changed; pass "
                            "--resume with a checkpoint path you trust, or start over in a new --out-dir")
        return ckpt
    path = Path(cfg.resume)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint directory")
    if not (path / checkpoint.MANIFEST).is_file() and (path / "checkpoints").is_dir():
        raise UserError(f"--resume {path}: a run directory, not a checkpoint — pass --resume auto (with --out-dir "
                        f"{path}) or one of {path / 'checkpoints'}/step-*")
    return path


def check_resume_config(state: dict, cfg: TrainConfig, train_split: TokenSplit, ckpt: Path) -> dict:
    """The fields that differ from the checkpoint's config, {dotted key: (old, new)}; a one-line UserError naming
    them if any changes the data stream or the optimisation (configs.FREE_ON_RESUME lists what may change) and
    --allow-config-change is not given."""
    changes = config_changes(state["config"], cfg)
    old_sha, new_sha = state.get("data_sha256", {}).get("train"), train_split.meta["splits"]["train"]["sha256"]
    if old_sha is not None and old_sha != new_sha:  # same path, other tokens: a different data stream
        changes["data.train_sha256"] = (old_sha, new_sha)
    for act_of_resuming in ("resume", "allow_config_change"):  # how this start was asked for, not a change
        changes.pop(act_of_resuming, None)
    blocked = changes_that_need_override(changes)
    if blocked and not cfg.allow_config_change:
        listed = ", ".join(f"{key} {json.dumps(old)} → {json.dumps(new)}" for key, (old, new) in blocked.items())
        raise UserError(f"{ckpt}: this resume changes the run — {listed} (checkpoint → now); resume with the "
                        "run's own values, or pass --allow-config-change to continue (recorded in config-changes.jsonl)")
    return changes


def record_start(run, ckpt: Path | None, step: int, changes: dict):
    """Rank 0, lock held, run (a train.Run) built: remove killed writers' leftovers; move aside the later checkpoints
    of a resume from an earlier one (a new branch); write config.json for a fresh run (never over a run's own), and
    append a resume's config changes, with the step they take effect, to config-changes.jsonl."""
    for path in rundir.remove_leftovers(run.run_dir):
        print(f"gust: removed {path}, left by a writer that was killed", flush=True)
    # --resume auto continues the newest good checkpoint: any later one is broken, and left for verify to report
    branching = ckpt is not None and run.cfg.resume not in ("auto", "none")
    if branching and (aside := checkpoint.set_aside_after(run.run_dir, step)) is not None:
        print(f"gust: resuming from step {step} starts a new branch: the later checkpoints are moved to {aside}",
              flush=True)
    config_json = run.run_dir / "config.json"
    if ckpt is None or not config_json.exists():
        write_atomic(config_json, json.dumps(to_json(run.cfg), indent=2))
    if changes:
        row = {"step": step, "checkpoint": str(ckpt), "overridden": run.cfg.allow_config_change,
               "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
        with open(run.run_dir / "config-changes.jsonl", "a") as file:
            file.write(json.dumps(row) + "\n")
        print(f"gust: config changes from step {step}: {', '.join(changes)} (config-changes.jsonl)", flush=True)


def check_model_shape(state: dict, cfg: TrainConfig, ckpt: Path, same_padding: bool = False) -> None:
    """A checkpoint's weights fit only a model of the same shape: say which flag differs. The vocabulary's padding
    rows may differ for weights alone (GPT.load_state_dict fits them), not when resuming (AdamW's moments hold them)."""
    saved_model = state["config"]["model"]
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias"):
        if saved_model[name] != getattr(cfg.model, name):
            raise UserError(f"{ckpt}: checkpoint has model.{name} = {saved_model[name]}, but --model.{name.replace('_', '-')} "
                            f"is {getattr(cfg.model, name)}")
    rows = state["model"]["transformer.wte.weight"].size(0)  # what the weights hold: vocab_size plus padding
    if same_padding and rows != cfg.model.padded_vocab_size:
        raise UserError(f"{ckpt}: checkpoint holds {rows} vocabulary rows, but --model.vocab-multiple "
                        f"{cfg.model.vocab_multiple} gives {cfg.model.padded_vocab_size} — resume with "
                        f"--model.vocab-multiple {saved_model.get('vocab_multiple', 1)}")


def init_weights(path: Path, cfg: TrainConfig, raw_model, rt: Dist) -> None:
    """--init-from: only the model weights of a checkpoint directory, or of a run directory's newest one."""
    ckpt = path if (path / checkpoint.MANIFEST).is_file() else checkpoint.latest_complete(path)
    if ckpt is None:
        raise UserError(f"--init-from {path}: no complete checkpoint there (a step-XXXXXXX directory or a run "
                        f"directory holding checkpoints/)")
    state = checkpoint.load(ckpt)
    check_model_shape(state, cfg, ckpt)
    raw_model.load_state_dict(state["model"])
    if rt.is_main:
        print(f"gust: weights from {ckpt} (its step {state['step']}); optimizer and step start fresh", flush=True)


def restore(ckpt: Path, cfg: TrainConfig, model, optimizer, scaler, train_split: TokenSplit, rt: Dist,
            made_with: dict) -> tuple[int, int, str, dict, float]:
    """Load a checkpoint into model, optimizer, scaler and RNG; returns its step, optimizer step, wandb id, the
    config changes (check_resume_config) and the seconds of training before it. made_with: this run's provenance,
    against which a change of numerics is warned of."""
    state = checkpoint.load(ckpt)
    if "optimizer" not in state:  # hf_bridge.py import writes the weights only
        raise UserError(f"{ckpt}: holds weights only (no optimizer state) — train from them with --init-from "
                        f"{ckpt} and a new --out-dir")
    check_model_shape(state, cfg, ckpt, same_padding=True)
    changes = check_resume_config(state, cfg, train_split, ckpt)
    load_full_state(model, optimizer, state["model"], state["optimizer"], rt)
    scaler.load_state_dict(state["scaler"])
    if len(state["per_rank"]) == rt.world_size:
        set_rng_state(state["per_rank"][rt.rank]["rng"])
    else:  # a new world size cannot continue the old per-rank streams; derive fresh ones from the step
        seed_everything(cfg.seed + rt.rank + 1_000_003 * state["step"])
    if rt.is_main:
        print(f"gust: resumed from {ckpt} (step {state['step']})", flush=True)
        changed = numerics_changed(state.get("provenance") or {}, made_with)
        if changed:  # a careful user compares runs bit for bit: say when this one can no longer be
            print(f"gust: warning: {ckpt} was written with other numerics ({'; '.join(changed)}) — training goes on, "
                  "but not bitwise as an uninterrupted run would", file=sys.stderr, flush=True)
    elapsed = state.get("elapsed", 0.0)  # seconds of training before this checkpoint (older checkpoints: 0)
    return state["step"], state["opt_step"], state["wandb_run_id"], changes, elapsed
