"""Shared test setup: import from the repo root, keep wandb off, and a tiny prepared corpus + run config."""
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models gain nothing from threads; spinning threads of
torch.set_num_threads(1)                        # parallel test processes would starve each other
PLAYS = ROOT / ".cache" / "shakespeare"  # fetched by `make setup`
GPT2_VOCAB = ROOT / ".cache" / "gpt2"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Eight plays, a 512-token BPE trained on the train plays, split by document."""
    from configs import PrepareConfig
    from data import prepare

    if not PLAYS.is_dir():
        pytest.skip(f"{PLAYS} missing: run `make setup`")
    src = tmp_path_factory.mktemp("plays")
    for play in sorted(PLAYS.glob("*_gut.txt"))[:8]:
        (src / play.name).write_text(play.read_text()[:60_000])  # the first 60 kB of each: quick to tokenize
    out = tmp_path_factory.mktemp("tiny_data")
    prepare(PrepareConfig(inputs=(src,), out_dir=out, tokenizer="bpe", bpe_vocab_size=512, val_fraction=0.25))
    return out


def tiny_run(data_dir: Path, out_dir: Path, **overrides):
    """A TrainConfig small enough to train for tens of steps in seconds on 2 CPU cores."""
    from configs import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
    from model import GPTConfig

    cfg = TrainConfig(
        preset="tiny", model=GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        data=DataConfig(dir=data_dir), optim=OptimConfig(lr=3e-3, warmup_steps=5, decay="cosine", decay_steps=40),
        checkpoint=CheckpointConfig(schedule="every", every=5, keep_last=0), max_steps=10, global_batch_size=8,
        micro_batch_size=4, precision="fp32", seed=21, out_dir=out_dir, eval_interval=5, eval_batches=4,
        log_interval=1, diag_interval=5, wandb_mode="disabled")
    return replace(cfg, **overrides)


def eval_on_two_ranks(args: list, out: Path) -> dict:
    """eval.py's result under `torchrun --nproc_per_node=2` (gloo), read from the JSON it writes to out."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", *args, "--json-out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())
