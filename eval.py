"""Perplexity and bits per byte of a gust checkpoint or an HF GPT-2 on a prepared split or raw text: `python eval.py --help`.

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens no earlier
window scored, so every token after the first is scored exactly once (score_windows). stride == context
gives disjoint windows; context 1024 / stride 512 is the WikiText-103 convention. Under torchrun the
batches are dealt out to ranks and the sums all-reduced in float64, so N ranks report what 1 rank does.
Also home of "checkpoint or run dir → model" (find_checkpoint, load_gust), shared with sample.py and hf_bridge.py.
Not in here: training, sampling, weight conversion.
"""
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
from errors import UserError, run_cli
from model import GPT, GPTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalConfig:
    """Which model to score, on what text, with which windows."""

    checkpoint: Path | None = None
    """A gust checkpoint directory (runs/<name>/checkpoints/step-XXXXXXX)."""
    run_dir: Path | None = None
    """A gust run directory: its newest complete checkpoint is scored."""
    hf_dir: Path | None = None
    """A Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    data_dir: Path | None = None
    """Prepared data dir: its --split is scored, and its tokenizer encodes --text (default: the checkpoint's own)."""
    split: Literal["train", "val"] = "val"
    """Which prepared split to score when no --text is given."""
    text: tuple[Path, ...] = ()
    """Score raw text instead: .txt files, .jsonl files (a "text" field per line) or directories of either."""
    gpt2_vocab_dir: Path = Path(".cache/gpt2")
    """GPT-2's vocab.json + merges.txt: the tokenizer for --hf-dir --text when the HF dir ships none."""
    context: int = 0
    """Tokens of context per window; 0 = the model's block size."""
    stride: int = 0
    """Tokens between window starts; 0 = context (disjoint windows). Smaller slides: more context per scored token
    (context 1024 / stride 512 is the WikiText-103 convention)."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_tokens: int = 0
    """Score only the first N tokens of the source; 0 = all of it."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (the loss is always summed in float64)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    json_out: Path | None = None
    """Also write the result as JSON to this file (rank 0)."""


# ----------------------------------------------------------------------------- windows

def score_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window over a stream of n_tokens tokens.

    A window is tokens[begin:end] (at most context + 1 of them): inputs tokens[begin:end-1] predict
    targets tokens[begin+1:end], and only the last n_scored targets count — those no earlier window
    scored. Token 0 is never a target; every later token is scored exactly once.
    """
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride} must be between 1 and --context {context}")
    if n_tokens < 2:
        raise UserError(f"{n_tokens} token(s) to score: at least 2 are needed (one to predict from, one to predict)")
    windows, scored_until = [], 1  # targets [1, scored_until) are done
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context + 1, n_tokens)
        windows.append((begin, end, end - scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def batch_windows(windows: list, batch_size: int) -> list[list]:
    """Consecutive windows grouped into batches of equal length (only the last window can be shorter)."""
    batches = []
    for window in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == window[1] - window[0]:
            last.append(window)  # equal lengths: the windows stack into one (B, L) tensor
        else:
            batches.append([window])
    return batches


# ----------------------------------------------------------------------------- models and tokens

def find_checkpoint(checkpoint_dir: Path | None, run_dir: Path | None) -> Path:
    """The checkpoint named, or the newest complete one in run_dir; a one-line error if there is none."""
    if checkpoint_dir is not None:
        if not (checkpoint_dir / checkpoint.MANIFEST).is_file() and (checkpoint_dir / "checkpoints").is_dir():
            raise UserError(f"--checkpoint {checkpoint_dir}: a run directory, not a checkpoint — pass --run-dir")
        return checkpoint_dir
    ckpt = checkpoint.latest_complete(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no complete checkpoint — train first with `make train`")
    return ckpt


def load_gust(ckpt: Path) -> tuple[GPT, dict]:
    """The model of a verified checkpoint in eval mode, and the checkpoint's whole state."""
    state = checkpoint.load(ckpt)
    # auto: the fused kernel where it works, else sdpa — a run trained with attn_impl cuda still loads on a CPU
    model = GPT(GPTConfig(**dict(state["config"]["model"], attn_impl="auto")))
    model.load_state_dict(state["model"])
    return model.eval(), state


def text_tokens(paths, tokenizer) -> tuple[np.ndarray, int]:
    """Token ids of the documents under paths, <|endoftext|> between documents (as data.py prepare); and their UTF-8 bytes."""
    from data import EOT, read_documents

    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise UserError(f"the tokenizer has no {EOT} token to separate documents")
    texts = [text for _, text in read_documents(paths)]
    ids = []
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        ids += ([eot_id] if i > 0 else []) + encoding.ids
    return np.asarray(ids, dtype=np.int64), sum(len(t.encode("utf-8")) for t in texts)


def hf_tokenizer(hf_dir: Path, gpt2_vocab_dir: Path):
    """The HF dir's own tokenizer.json or vocab.json + merges.txt, else GPT-2's from gpt2_vocab_dir."""
    from data import gpt2_tokenizer

    if (hf_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    has_gpt2_files = (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()
    return gpt2_tokenizer(hf_dir if has_gpt2_files else gpt2_vocab_dir)


def load_model_and_data(cfg: EvalConfig) -> tuple[GPT, np.ndarray, int, str]:
    """The model; the token stream to score; the source's UTF-8 bytes; a name for the source."""
    from data import TokenSplit, load_tokenizer

    if sum(x is not None for x in (cfg.checkpoint, cfg.run_dir, cfg.hf_dir)) != 1:
        raise UserError("pass exactly one of --checkpoint, --run-dir, --hf-dir")
    if cfg.hf_dir is not None:
        from hf_bridge import import_hf

        model, data_dir = import_hf(cfg.hf_dir), cfg.data_dir
        if data_dir is None and not cfg.text:
            raise UserError("--hf-dir needs --text or --data-dir (a prepared split) to score")
    else:
        model, state = load_gust(find_checkpoint(cfg.checkpoint, cfg.run_dir))
        data_dir = cfg.data_dir or Path(state["config"]["data"]["dir"])
    if cfg.text:
        tokenizer = load_tokenizer(data_dir) if data_dir else hf_tokenizer(cfg.hf_dir, cfg.gpt2_vocab_dir)
        tokens, n_bytes = text_tokens(cfg.text, tokenizer)
        source = ", ".join(map(str, cfg.text))
        if tokens.max() >= model.config.vocab_size:
            raise UserError(f"{source}: token id {tokens.max()} >= the model's vocab_size {model.config.vocab_size} "
                            "— wrong tokenizer for this model? (pass --data-dir)")
    else:  # TokenSplit checks the sidecar, sha256 and token ids; block 1 accepts a split of any length
        split = TokenSplit(data_dir, cfg.split, 1, model.config.vocab_size)
        tokens, n_bytes, source = split.tokens, split.bytes, str(split.path)
    return model, tokens, n_bytes, source


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model: GPT, tokens: np.ndarray, batches: list, device: torch.device, autocast, rank: int,
          world_size: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood (float64) and count of the scored tokens of this rank's batches."""
    from tqdm import tqdm

    nll_sum, n_scored = torch.zeros((), dtype=torch.float64, device=device), 0
    mine = batches[rank::world_size]  # dealt out whole: a window's numbers never depend on the world size
    for batch in tqdm(mine, desc="eval", unit="batch", disable=rank != 0, file=sys.stderr):
        block = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in batch]).astype(np.int64)).to(device)  # (B, L)
        with autocast:
            logits, _ = model(block[:, :-1])  # (B, L-1, vocab)
        nll = F.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")  # (B, L-1)
        for row, (_, _, n) in enumerate(batch):
            nll_sum += nll[row, -n:].double().sum()  # only the targets no earlier window scored
            n_scored += n
    return nll_sum, n_scored


def evaluate(cfg: EvalConfig, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")) -> dict:
    """Load, window, score, all-reduce; the result every rank agrees on."""
    model, tokens, n_bytes, source = load_model_and_data(cfg)
    total_tokens = len(tokens)
    if cfg.max_tokens > 0:
        tokens = tokens[:cfg.max_tokens]
    context = cfg.context or model.config.block_size
    if context > model.config.block_size:
        raise UserError(f"--context {context} exceeds the model's block_size {model.config.block_size}")
    windows = score_windows(len(tokens), context, cfg.stride or context)
    model.to(device).set_attn_impl(device)  # resolve "auto" once, not on every forward
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.precision]) if cfg.precision != "fp32" else nullcontext()
    nll_sum, n_scored = score(model, tokens, batch_windows(windows, cfg.batch_size), device, autocast, rank, world_size)
    totals = torch.stack([nll_sum, torch.tensor(float(n_scored), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(totals)  # float64 sums: the order of addition moves the result by ~1e-16
    loss = (totals[0] / totals[1]).item()
    # the source's bytes per token × tokens scored: on a whole prepared split this is train.py's val_bpb
    scored_bytes = n_bytes * totals[1].item() / total_tokens
    return {"source": source, "tokens_scored": int(totals[1]), "windows": len(windows), "context": context,
            "stride": cfg.stride or context, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": totals[0].item() / math.log(2) / scored_bytes}


def main(argv: list[str] | None = None) -> dict:
    import tyro

    cfg = tyro.cli(EvalConfig, args=argv, prog="eval.py")
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if use_cuda else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    try:
        result = evaluate(cfg, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if rank == 0:
        print(f"{result['source']}: {result['tokens_scored']:,} tokens scored | loss {result['loss']:.4f} nats/token | "
              f"perplexity {result['perplexity']:.3f} | {result['bits_per_byte']:.4f} bits/byte")
        if cfg.json_out is not None:
            cfg.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
