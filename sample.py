"""Text from a trained gust model: `python sample.py [--run-dir runs/NAME] [--prompt TEXT] ...` (see --help).

The same --seed prints the same text: every random draw comes from one torch.Generator.
Not in here: loading weights from Hugging Face (hf_bridge.py), scoring text (eval.py).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from checkpoint import find_checkpoint, load_gust
from distributed import pick_device
from errors import UserError, run_cli


@dataclass
class SampleConfig:
    """Which model to sample from and how."""

    run_dir: Path = Path("runs/shakespeare-cpu")
    """Run directory: its newest complete checkpoint is used."""
    checkpoint: Path | None = None
    """A specific checkpoint directory (overrides --run-dir)."""
    data_dir: Path | None = None
    """Prepared data dir whose tokenizer to use (default: the checkpoint's own --data.dir)."""
    prompt: str = ""
    """Text to continue; empty starts a fresh document (after <|endoftext|>)."""
    num_samples: int = 3
    """How many samples to print."""
    max_new_tokens: int = 300
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Divide the logits by this: < 1 is more conservative, > 1 more random."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens (None: all)."""
    seed: int = 1337
    """Seed of the sampling generator: the same seed prints the same text."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""


def check_flags(cfg: SampleConfig):
    """One line naming a sampling flag that cannot work, before any checkpoint is loaded."""
    if cfg.num_samples < 1:
        raise UserError(f"--num-samples {cfg.num_samples}: must be at least 1")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens}: must be at least 1")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):  # the logits are divided by it
        raise UserError(f"--temperature {cfg.temperature}: must be a positive number (1 leaves the logits as they are)")
    if cfg.top_k is not None and cfg.top_k < 1:  # torch.topk of k < 1 leaves nothing to sample from
        raise UserError(f"--top-k {cfg.top_k}: must be at least 1 (or None: all tokens)")


def sample(cfg: SampleConfig) -> list[str]:
    """num_samples continuations of the prompt (prompt included), drawn one after another from one generator."""
    from data import load_tokenizer
    from tokenizer import EOT

    check_flags(cfg)
    try:
        cfg.prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes of no text in argv: Python keeps them as lone surrogates
        raise UserError(f"--prompt: not UTF-8 text (at character {err.start})") from None
    model, state = load_gust(find_checkpoint(cfg.checkpoint, cfg.run_dir))
    tokenizer = load_tokenizer(cfg.data_dir or Path(state["config"]["data"]["dir"]))
    device = pick_device(cfg.device)
    model.to(device).set_attn_impl(device)  # resolve "auto" once, not on every forward
    # an empty prompt starts where every training document starts: right after <|endoftext|>
    prompt_ids = tokenizer.encode(cfg.prompt).ids if cfg.prompt else [tokenizer.token_to_id(EOT)]
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    texts = []
    for _ in range(cfg.num_samples):
        out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator=generator)  # (1, T + new)
        texts.append(tokenizer.decode(out[0].tolist()))  # decode drops <|endoftext|> (a special token)
    return texts


def main(argv: list[str] | None = None):
    import tyro

    cfg = tyro.cli(SampleConfig, args=argv, prog="sample.py")
    for text in sample(cfg):
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    run_cli(main)
