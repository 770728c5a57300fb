"""Score a gust checkpoint or an HF GPT-2: perplexity and bits per byte of a prepared split or raw text, and the
zero-shot benchmarks GPT-2 is compared on (HellaSwag, LAMBADA, WikiText-103) by their published protocols.

`python eval.py --help`. Perplexity: windows of `context` tokens start every `stride` tokens; each window scores
only the tokens no earlier window scored, so every token after the first is scored exactly once (score_windows).
stride == context gives disjoint windows; context 1024 / stride 512 is the WikiText-103 convention.
Benchmarks: `--task hellaswag|lambada|wikitext --file F`, or several at once with `--all-tasks name:F …`
(train.py's `--eval-tasks` runs the same code in the training loop). Under torchrun the batches are dealt out
to ranks and the results all-reduced in float64, so N ranks report what 1 rank does.
Not in here: training, sampling, weight conversion, downloading any benchmark file.
"""
import json
import math
import os
import re
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro

from checkpoint import find_checkpoint, load_gust
from distributed import autocast, pick_device
from errors import UserError, run_cli
from model import GPT

TASKS = ("hellaswag", "lambada", "wikitext")
BENCHMARK_FILES = ("hellaswag_val.jsonl", "lambada_test.jsonl", "wiki.test.raw")
"""The usual names of the TASKS' files (in that order): eval.py reads the copies a user already has."""
WIKITEXT_CONTEXT, WIKITEXT_STRIDE = 1024, 512
"""WikiText-103's published protocol: windows of 1024 tokens, a new one every 512 (each token sees ≥ 512 of context)."""
Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: the z of a two-sided 95% interval."""


@dataclass
class EvalConfig:
    """Which model to score, on what text or benchmark, with which windows."""

    checkpoint: Path | None = None
    """A gust checkpoint directory (runs/<name>/checkpoints/step-XXXXXXX)."""
    run_dir: Path | None = None
    """A gust run directory: its newest complete checkpoint is scored."""
    hf_dir: Path | None = None
    """A Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    data_dir: Path | None = None
    """Prepared data dir: its --split is scored, and its tokenizer encodes --text and tasks (default: the checkpoint's own)."""
    split: Literal["train", "val"] = "val"
    """Which prepared split to score when no --text is given."""
    text: tuple[Path, ...] = ()
    """Score raw text instead: .txt files, .jsonl files (a "text" field per line) or directories of either."""
    task: Literal["perplexity", "hellaswag", "lambada", "wikitext"] = "perplexity"
    """perplexity: --text or a prepared --split; hellaswag / lambada / wikitext: that benchmark's --file."""
    file: Path | None = None
    """The --task's file: hellaswag_val.jsonl, lambada_test.jsonl (OpenAI's variant) or wiki.test.raw."""
    all_tasks: tuple[str, ...] = ()
    """Several benchmarks in one run, as name:path pairs: hellaswag:hellaswag_val.jsonl lambada:… wikitext:…"""
    max_examples: int = 0
    """Score only the first N examples of a HellaSwag / LAMBADA file (0 = all: the number to report)."""
    gpt2_vocab_dir: Path = Path(".cache/gpt2")
    """GPT-2's vocab.json + merges.txt: the tokenizer for --hf-dir when the HF dir ships none."""
    context: int = 0
    """Tokens of context per window; 0 = the model's block size (wikitext: 1024, at most the block size)."""
    stride: int = 0
    """Tokens between window starts; 0 = context (disjoint windows; wikitext: half the context). Smaller slides:
    more context per scored token (context 1024 / stride 512 is the WikiText-103 convention)."""
    batch_size: int = 8
    """Windows (perplexity) or sequences (one per ending, HellaSwag; one per passage, LAMBADA) per forward pass."""
    max_tokens: int = 0
    """Use only the first N tokens of the source (N − 1 are scored: nothing predicts the first); 0 = all of it."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (the loss is always summed in float64)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    json_out: Annotated[Path | None, tyro.conf.arg(aliases=("--out",))] = None
    """Also write the result as JSON to this file (rank 0): every number, the files' sha256, the model's provenance."""


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

def text_tokens(paths, tokenizer) -> tuple[np.ndarray, int]:
    """Token ids of the documents under paths, <|endoftext|> between documents (as data.py prepare); and their UTF-8 bytes."""
    from data import read_documents
    from tokenizer import EOT

    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise UserError(f"the tokenizer has no {EOT} token to separate documents")
    with warnings.catch_warnings(record=True) as skipped:  # prepare skips a bad file; a score cannot
        warnings.simplefilter("always")
        texts = [text for _, text in read_documents(paths)]
    bad = [str(w.message) for w in skipped if issubclass(w.category, UserWarning)]
    if bad:
        raise UserError(f"--text: {bad[0]} — every file named is scored, or none"
                        + (f" ({len(bad) - 1} more)" if len(bad) > 1 else ""))
    ids = []
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        ids += ([eot_id] if i > 0 else []) + encoding.ids
    return np.asarray(ids, dtype=np.int64), sum(len(t.encode("utf-8")) for t in texts)


def hf_tokenizer(hf_dir: Path, gpt2_vocab_dir: Path):
    """The HF dir's own tokenizer.json or vocab.json + merges.txt, else GPT-2's from gpt2_vocab_dir."""
    from tokenizer import gpt2_tokenizer

    if (hf_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    has_gpt2_files = (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()
    return gpt2_tokenizer(hf_dir if has_gpt2_files else gpt2_vocab_dir)


def load_model(cfg: EvalConfig) -> tuple[GPT, Path | None, dict]:
    """The model; the data dir whose tokenizer goes with it (None: an HF dir's own); where the weights came from."""
    from data import sha256_file

    if sum(x is not None for x in (cfg.checkpoint, cfg.run_dir, cfg.hf_dir)) != 1:
        raise UserError("pass exactly one of --checkpoint, --run-dir, --hf-dir")
    if cfg.hf_dir is not None:
        from hf_bridge import import_hf

        weights = next((cfg.hf_dir / name for name in ("model.safetensors", "pytorch_model.bin")
                        if (cfg.hf_dir / name).is_file()), None)
        model = import_hf(cfg.hf_dir)  # raises the one-line error for a missing config.json or weights
        made_from = {"kind": "huggingface", "hf_dir": str(cfg.hf_dir), "weights": weights.name,
                     "weights_sha256": sha256_file(weights), "config": json.loads((cfg.hf_dir / "config.json").read_text())}
        return model, cfg.data_dir, made_from
    ckpt = find_checkpoint(cfg.checkpoint, cfg.run_dir)
    model, state = load_gust(ckpt)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    made_from = {"kind": "gust", "checkpoint": str(ckpt), "step": state["step"], "preset": state["config"].get("preset"),
                 "files_sha256": {name: entry["sha256"] for name, entry in manifest["files"].items()},
                 "trained_with": state.get("provenance"), "model": state["config"]["model"]}
    return model, cfg.data_dir or Path(state["config"]["data"]["dir"]), made_from


def model_tokenizer(cfg: EvalConfig, data_dir: Path | None):
    """The tokenizer of the data dir the model was trained on, else the HF dir's (or GPT-2's)."""
    from data import load_tokenizer

    return load_tokenizer(data_dir) if data_dir else hf_tokenizer(cfg.hf_dir, cfg.gpt2_vocab_dir)


def load_model_and_data(cfg: EvalConfig) -> tuple[GPT, np.ndarray, int, str, dict, object]:
    """The model; the token stream to score; the source's UTF-8 bytes; a name for the source; where the weights
    came from (load_model); the tokenizer."""
    from data import TokenSplit

    model, data_dir, made_from = load_model(cfg)
    # a split's tokens need no tokenizer, but for the bytes of a --max-tokens prefix of them (score_perplexity)
    tokenizer = model_tokenizer(cfg, data_dir) if cfg.text or (data_dir and cfg.max_tokens) else None
    if cfg.hf_dir is not None and data_dir is None and not cfg.text:
        raise UserError("--hf-dir needs --text or --data-dir (a prepared split) to score")
    if cfg.text:
        tokens, n_bytes = text_tokens(cfg.text, tokenizer)
        source = ", ".join(map(str, cfg.text))
        if tokens.max() >= model.config.vocab_size:
            raise UserError(f"{source}: token id {tokens.max()} >= the model's vocab_size {model.config.vocab_size} "
                            "— wrong tokenizer for this model? (pass --data-dir)")
    else:  # TokenSplit checks the sidecar, sha256 and token ids; block 1 accepts a split of any length
        split = TokenSplit(data_dir, cfg.split, 1, model.config.vocab_size)
        tokens, n_bytes, source = split.tokens, split.bytes, str(split.path)
    return model, tokens, n_bytes, source, made_from, tokenizer


def forward_rounds(n_batches: int, rank: int, world_size: int) -> list[int | None]:
    """This rank's batch indices (dealt out whole, so a batch's numbers never depend on the world size), padded
    with None to as many forwards as the busiest rank: under FSDP every rank must join each forward's gathers."""
    mine = list(range(rank, n_batches, world_size))
    return mine + [None] * (math.ceil(n_batches / world_size) - len(mine))


# ----------------------------------------------------------------------------- perplexity

@torch.no_grad()
def score(model: GPT, tokens: np.ndarray, batches: list, device: torch.device, autocast, rank: int,
          world_size: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood (float64) and count of the scored tokens of this rank's batches."""
    from tqdm import tqdm

    nll_sum, n_scored = torch.zeros((), dtype=torch.float64, device=device), 0
    rounds = forward_rounds(len(batches), rank, world_size)
    for index in tqdm(rounds, desc="eval", unit="batch", disable=rank != 0, file=sys.stderr):
        batch = batches[0 if index is None else index]  # None: a forward only to join the other ranks' gathers
        block = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in batch]).astype(np.int64)).to(device)  # (B, L)
        with autocast:
            logits, _ = model(block[:, :-1])  # (B, L-1, vocab)
        if index is None:
            continue
        logits = logits[..., :model.config.vocab_size]  # a padded vocabulary's extra columns are never targets
        nll = F.cross_entropy(logits.float().transpose(1, 2), block[:, 1:], reduction="none")  # (B, L-1)
        for row, (_, _, n) in enumerate(batch):
            nll_sum += nll[row, -n:].double().sum()  # only the targets no earlier window scored
            n_scored += n
    return nll_sum, n_scored


def score_perplexity(cfg: EvalConfig, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")) -> dict:
    """Load, window, score, all-reduce; the result every rank agrees on."""
    model, tokens, n_bytes, source, made_from, tokenizer = load_model_and_data(cfg)
    total_tokens, prefix_bytes = len(tokens), None
    if 0 < cfg.max_tokens < len(tokens):  # a prefix: its own bytes, those of the tokens scored (all but the first)
        from tokenizer import token_byte_lengths

        tokens = tokens[:cfg.max_tokens]
        prefix_bytes = int(token_byte_lengths(tokenizer)[tokens[1:]].sum())
    from data import max_token_id

    top = None if cfg.text else max_token_id(tokens)  # text was checked whole when it was tokenised
    if top is not None and top >= model.config.vocab_size:  # a split's start-up check read ~1 MB: not an IndexError
        raise UserError(f"{source}: token id {top} >= the model's vocab_size {model.config.vocab_size} — the file "
                        "changed since `data.py prepare`")
    context = cfg.context or model.config.block_size
    if context > model.config.block_size:
        raise UserError(f"--context {context} exceeds the model's block_size {model.config.block_size}")
    windows = score_windows(len(tokens), context, cfg.stride or context)
    model.to(device).set_attn_impl(device)  # resolve "auto" once, not on every forward
    nll_sum, n_scored = score(model, tokens, batch_windows(windows, cfg.batch_size), device, autocast_for(cfg, device),
                              rank, world_size)
    totals = torch.stack([nll_sum, torch.tensor(float(n_scored), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(totals)  # float64 sums: the order of addition moves the result by ~1e-16
    loss = (totals[0] / totals[1]).item()
    # the source's bytes per token × tokens scored: on a whole prepared split this is train.py's val_bpb
    scored_bytes = prefix_bytes if prefix_bytes is not None else n_bytes * totals[1].item() / total_tokens
    return {"source": source, "tokens_scored": int(totals[1]), "windows": len(windows), "context": context,
            "stride": cfg.stride or context, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": totals[0].item() / math.log(2) / scored_bytes, "model": made_from,
            "eval": {**eval_settings(cfg, device, world_size), "max_tokens": cfg.max_tokens}}


def eval_settings(cfg: EvalConfig, device: torch.device, world_size: int) -> dict:
    """How a results file's numbers were computed (beside the model's provenance)."""
    return {"precision": cfg.precision, "device": device.type, "world_size": world_size, "batch_size": cfg.batch_size,
            "torch": str(torch.__version__)}


def autocast_for(cfg: EvalConfig, device: torch.device):
    return autocast(cfg.precision, device)


# ----------------------------------------------------------------------------- benchmarks: reading the files

def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; one line naming file:line if a line is not JSON or lacks a field."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: not JSON ({err.msg})") from None
        missing = [name for name in fields if not isinstance(row, dict) or name not in row]
        if missing:
            raise UserError(f"{path}:{line_no}: no {', '.join(map(repr, missing))} field — "
                            f"expected a JSON object with {', '.join(fields)} on every line")
        rows.append((line_no, row))
    if not rows:
        raise UserError(f"{path}: empty — no examples to score")
    return rows


def wikitext_detokenize(text: str) -> str:
    """WikiText's raw files as ordinary text: the detokeniser of Megatron-LM (tasks/zeroshot_gpt/detokenizer.py,
    `wikitext_detokenizer`), which lm-eval-harness (lm_eval/tasks/wikitext/preprocess_wikitext.py) and Mistral
    (src/corpora/detokenization.py) use too. The rules run in this order; the order matters (" @-@ " before " . ")."""
    text = text.replace("s '", "s'")  # plural possessive: "the players ' union" → "the players' union"
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)  # Megatron's rule, kept as written (it matches literal slashes)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number and hyphen separators: 1 @,@ 000
                           (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(spaced, joined)
    for opening, closing in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")):  # "( a b )" → "(a b)"
        o, c = re.escape(opening), re.escape(closing)
        text = re.sub(rf"{o}\s*([^{c}]*?)\s*{c}", rf"{opening}\1{closing}", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # headings: "= = Career = ="
                           (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"),
                           (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, joined)
    return text


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float]:
    """Wilson's score interval for a proportion (Wilson 1927): unlike the normal approximation p ± z·√(p(1-p)/n),
    it stays inside [0, 1] and keeps its coverage near 0% and 100%."""
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 the lower end is exactly 0 (p = 0 makes center = half), at k = n the upper is 1: not 1e-17 either side
    return [0.0 if successes == 0 else max(center - half, 0.0), 1.0 if successes == n else min(center + half, 1.0)]


# ----------------------------------------------------------------------------- benchmarks: scoring continuations

@dataclass
class Scorer:
    """What every benchmark scores with: the model (eval mode, on device), the forward's autocast, the ranks."""

    model: GPT
    device: torch.device
    autocast: object = nullcontext()
    rank: int = 0
    world_size: int = 1
    batch_size: int = 8


@torch.no_grad()
def continuation_logprobs(scorer: Scorer, requests: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """(n, 2) float64: per (context ids, continuation ids), the continuation's summed log-probability given the
    context, and 1.0 if greedy decoding would have produced every one of its tokens (teacher-forced argmax).

    A context too long for the block is left-truncated: the continuation always fits whole, and keeps the
    nearest block_size - len(continuation) + 1 tokens of context.
    """
    block, vocab = scorer.model.config.block_size, scorer.model.config.vocab_size
    rows = [(ctx + cont)[-(block + 1):] for ctx, cont in requests]  # inputs are row[:-1]: at most block of them
    batches = [range(i, min(i + scorer.batch_size, len(rows))) for i in range(0, len(rows), scorer.batch_size)]
    out = torch.zeros((len(rows), 2), dtype=torch.float64, device=scorer.device)
    for index in forward_rounds(len(batches), scorer.rank, scorer.world_size):
        batch = batches[0 if index is None else index]
        width = max(len(rows[i]) - 1 for i in batch)
        # right-padded with token 0: causal attention keeps the padding out of every real position
        x = torch.tensor([rows[i][:-1] + [0] * (width - len(rows[i]) + 1) for i in batch], device=scorer.device)  # (B, W)
        with scorer.autocast:
            logits, _ = scorer.model(x)  # (B, W, vocab)
        if index is None:
            continue  # a forward only to join the other ranks' FSDP gathers
        logprobs = torch.log_softmax(logits[..., :vocab].float(), dim=-1)  # (B, W, vocab)
        for row, i in enumerate(batch):
            n_inputs, n_cont = len(rows[i]) - 1, len(requests[i][1])
            targets = torch.tensor(rows[i][-n_cont:], device=scorer.device)  # (n_cont,)
            predicted = logprobs[row, n_inputs - n_cont:n_inputs]  # (n_cont, vocab): the positions predicting them
            out[i, 0] = predicted.gather(1, targets[:, None]).double().sum()
            out[i, 1] = (predicted.argmax(-1) == targets).all()  # a tensor, not a bool: no device sync per row
    if scorer.world_size > 1:
        dist.all_reduce(out)  # each row was filled by one rank, the others add 0.0: exact
    return out


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], path: Path, line_nos: list[int], block_size: int):
    """(context ids, continuation ids) of (context, continuation) strings, each encoded on its own (as lm-eval-harness
    and llm.c do); a continuation that cannot fit the model's block is a one-line error naming file:line."""
    contexts = tokenizer.encode_batch([context for context, _ in pairs])
    continuations = tokenizer.encode_batch([continuation for _, continuation in pairs])
    requests = []
    for (context, continuation), line_no in zip(zip(contexts, continuations), line_nos):
        if not context.ids:
            raise UserError(f"{path}:{line_no}: empty context — there is nothing to predict the continuation from")
        if len(continuation.ids) > block_size:
            raise UserError(f"{path}:{line_no}: the continuation is {len(continuation.ids)} tokens, more than the "
                            f"model's block_size {block_size}")
        requests.append((context.ids, continuation.ids))
    return requests


# ----------------------------------------------------------------------------- the three benchmarks

@dataclass
class HellaSwag:
    """HellaSwag (Zellers et al. 2019), the public jsonl (`ctx`, 4 `endings`, `label`), scored as a completion:
    each ending, as " " + ending after the file's `ctx` (the field llm.c's hellaswag.py reads), gets its summed
    log-likelihood. acc picks the largest sum; acc_norm the largest sum per UTF-8 byte of the ending, as
    lm-eval-harness's acc_norm (it divides by the ending's length without the leading space; HellaSwag's text
    is ASCII, so characters and bytes agree). Intervals: Wilson's, 95%."""

    path: Path
    requests: list  # 4 (context ids, " " + ending ids) per example, example by example
    labels: torch.Tensor  # (n,) index of the true ending
    ending_bytes: torch.Tensor  # (n, 4) float64, the acc_norm divisors

    @staticmethod
    def read(path: Path, tokenizer, block_size: int, max_examples: int = 0) -> "HellaSwag":
        rows = read_jsonl(path, ("ctx", "endings", "label"))[:max_examples or None]
        pairs, labels, ending_bytes = [], [], []
        for line_no, row in rows:
            endings, label = row["endings"], row["label"]
            if not isinstance(row["ctx"], str) or not (isinstance(endings, list) and len(endings) == 4
                                                       and all(isinstance(e, str) and e for e in endings)):
                raise UserError(f'{path}:{line_no}: expected "ctx" a string and "endings" a list of 4 non-empty strings')
            if isinstance(label, str) and label.isdigit():
                label = int(label)  # the Hugging Face datasets copy stores "0" … "3"
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
                raise UserError(f"{path}:{line_no}: label {row['label']!r} — expected 0, 1, 2 or 3 (an index into endings)")
            pairs += [(row["ctx"], " " + ending) for ending in endings]
            labels.append(label)
            ending_bytes.append([len(ending.encode("utf-8")) for ending in endings])
        line_nos = [line_no for line_no, _ in rows for _ in range(4)]
        return HellaSwag(path, encode_pairs(tokenizer, pairs, path, line_nos, block_size), torch.tensor(labels),
                         torch.tensor(ending_bytes, dtype=torch.float64))

    def score(self, scorer: Scorer) -> dict:
        logprob = continuation_logprobs(scorer, self.requests)[:, 0].view(-1, 4).cpu()  # (n, 4) summed per ending
        n = len(self.labels)
        correct = int((logprob.argmax(1) == self.labels).sum())
        correct_norm = int(((logprob / self.ending_bytes).argmax(1) == self.labels).sum())
        return {"acc": correct / n, "acc_ci95": wilson_interval(correct, n), "acc_norm": correct_norm / n,
                "acc_norm_ci95": wilson_interval(correct_norm, n), "count": n}


@dataclass
class Lambada:
    """LAMBADA (Paperno et al. 2016) in OpenAI's variant, the one GPT-2's paper reports (lambada_test.jsonl, a `text`
    per line): the target is the last word (after the last space), scored as " " + word after the rest.
    acc: greedy decoding, teacher-forced, gets every token of the word right (Wilson 95% interval);
    ppl: exp of the mean negative log-likelihood per target word (lm-eval-harness's lambada_openai perplexity);
    token_ppl: the same loss per target token."""

    path: Path
    requests: list  # (passage-but-the-last-word ids, " " + last word ids) per example

    @staticmethod
    def read(path: Path, tokenizer, block_size: int, max_examples: int = 0) -> "Lambada":
        rows = read_jsonl(path, ("text",))[:max_examples or None]
        pairs = []
        for line_no, row in rows:
            context, _, word = row["text"].rpartition(" ") if isinstance(row["text"], str) else ("", "", "")
            if not context.strip() or not word:
                raise UserError(f'{path}:{line_no}: "text" must be a passage of words ending in the target word '
                                '(the word after the last space)')
            pairs.append((context, " " + word))
        return Lambada(path, encode_pairs(tokenizer, pairs, path, [line_no for line_no, _ in rows], block_size))

    def score(self, scorer: Scorer) -> dict:
        out = continuation_logprobs(scorer, self.requests).cpu()  # (n, 2)
        n, correct, nll = len(self.requests), int(out[:, 1].sum()), -out[:, 0].sum().item()
        target_tokens = sum(len(continuation) for _, continuation in self.requests)
        return {"acc": correct / n, "acc_ci95": wilson_interval(correct, n), "ppl": math.exp(nll / n),
                "token_ppl": math.exp(nll / target_tokens), "count": n, "target_tokens": target_tokens}


@dataclass
class WikiText:
    """WikiText-103's test set (wiki.test.raw) by GPT-2's protocol: the whole file detokenised (wikitext_detokenize)
    as one stream after <|endoftext|> (so its first token is scored too), windows of 1024 tokens every 512 (at
    most the block size, the stride half the context), every token scored once with the most context a window
    gives. token_ppl: per token; word_ppl: the same summed loss per whitespace-separated word of the ORIGINAL
    file (GPT-2's paper: comparable across tokenizers); bits_per_byte: per UTF-8 byte of the detokenised text."""

    path: Path
    tokens: np.ndarray  # (1 + n_tokens,) <|endoftext|>, then the detokenised file
    n_words: int
    n_bytes: int
    context: int
    stride: int

    @staticmethod
    def read(path: Path, tokenizer, block_size: int, context: int = 0, stride: int = 0) -> "WikiText":
        from tokenizer import EOT

        try:
            original = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot be read as UTF-8 text ({err})") from None
        if not original.split():
            raise UserError(f"{path}: empty — no text to score")
        context = context or min(WIKITEXT_CONTEXT, block_size)
        stride = stride or max(1, context * WIKITEXT_STRIDE // WIKITEXT_CONTEXT)
        if context > block_size or not 1 <= stride <= context:
            raise UserError(f"--context {context} / --stride {stride}: need 1 ≤ stride ≤ context ≤ block_size {block_size}")
        if tokenizer.token_to_id(EOT) is None:
            raise UserError(f"the tokenizer has no {EOT} token to start the stream with")
        text = wikitext_detokenize(original)
        tokens = np.asarray([tokenizer.token_to_id(EOT)] + tokenizer.encode(text).ids, dtype=np.int64)
        return WikiText(path, tokens, len(original.split()), len(text.encode("utf-8")), context, stride)

    def score(self, scorer: Scorer) -> dict:
        windows = score_windows(len(self.tokens), self.context, self.stride)
        nll_sum, n_scored = score(scorer.model, self.tokens, batch_windows(windows, scorer.batch_size), scorer.device,
                                  scorer.autocast, scorer.rank, scorer.world_size)
        totals = torch.stack([nll_sum, torch.tensor(float(n_scored), dtype=torch.float64, device=scorer.device)])
        if scorer.world_size > 1:
            dist.all_reduce(totals)  # float64 sums: the order of addition moves the result by ~1e-16
        nll, tokens_scored = totals[0].item(), int(totals[1])
        return {"token_ppl": math.exp(nll / tokens_scored), "word_ppl": math.exp(nll / self.n_words),
                "bits_per_byte": nll / math.log(2) / self.n_bytes, "loss": nll / tokens_scored,
                "tokens_scored": tokens_scored, "words": self.n_words, "bytes": self.n_bytes,
                "context": self.context, "stride": self.stride, "windows": len(windows)}


def parse_task_specs(specs, flag: str) -> list[tuple[str, Path]]:
    """name:path pairs (hellaswag:hellaswag_val.jsonl) checked against TASKS and the disk; one line naming the flag."""
    tasks = []
    for spec in specs:
        name, _, path = spec.partition(":")
        if name not in TASKS or not path:
            raise UserError(f"{flag} {spec!r}: expected name:path with name one of {', '.join(TASKS)}")
        if not Path(path).is_file():
            raise UserError(f"{flag} {spec!r}: {path} is not a file")
        if name in (seen for seen, _ in tasks):
            raise UserError(f"{flag}: {name} given twice")
        tasks.append((name, Path(path)))
    return tasks


def load_task(name: str, path: Path, tokenizer, block_size: int, max_examples: int = 0, context: int = 0,
              stride: int = 0) -> "HellaSwag | Lambada | WikiText":
    """The named benchmark's file, read, checked and tokenised (once: the training loop scores it many times)."""
    if name == "hellaswag":
        return HellaSwag.read(path, tokenizer, block_size, max_examples)
    if name == "lambada":
        return Lambada.read(path, tokenizer, block_size, max_examples)
    return WikiText.read(path, tokenizer, block_size, context, stride)


def load_tasks(specs, data_dir: Path, block_size: int) -> dict:
    """train.py's --eval-tasks, read with the run's own tokenizer: {name: task}."""
    from data import load_tokenizer

    tokenizer = load_tokenizer(data_dir)
    return {name: load_task(name, path, tokenizer, block_size) for name, path in parse_task_specs(specs, "--eval-tasks")}


def score_tasks(tasks: dict, model: GPT, device: torch.device, autocast, rank: int, world_size: int,
                batch_size: int) -> dict:
    """Every task's numbers under metrics.jsonl keys (hellaswag_acc_norm, lambada_acc, wikitext_word_ppl, …);
    every rank calls it and gets the same numbers. The model is left in the mode it came in."""
    was_training = model.training
    model.eval()  # no dropout while scoring
    scorer = Scorer(model, device, autocast, rank, world_size, batch_size)
    metrics = {f"{name}_{key}": value for name, task in tasks.items() for key, value in task.score(scorer).items()}
    model.train(was_training)
    return metrics


def score_benchmarks(cfg: EvalConfig, rank: int = 0, world_size: int = 1,
                     device: torch.device = torch.device("cpu")) -> dict:
    """--task T --file F, or --all-tasks: every number, the files' sha256 and the model's provenance."""
    from data import sha256_file

    if cfg.all_tasks:
        specs = parse_task_specs(cfg.all_tasks, "--all-tasks")
    elif cfg.file is None:
        raise UserError(f"--task {cfg.task} needs --file (e.g. {dict(zip(TASKS, BENCHMARK_FILES))[cfg.task]})")
    else:
        specs = parse_task_specs([f"{cfg.task}:{cfg.file}"], "--file")
    model, data_dir, made_from = load_model(cfg)
    tokenizer = model_tokenizer(cfg, data_dir)
    model.to(device).set_attn_impl(device)  # resolve "auto" once, not on every forward
    scorer = Scorer(model, device, autocast_for(cfg, device), rank, world_size, cfg.batch_size)
    results = {}
    for name, path in specs:
        task = load_task(name, path, tokenizer, model.config.block_size, cfg.max_examples, cfg.context, cfg.stride)
        largest = int(task.tokens.max()) if isinstance(task, WikiText) else max(max(c + t) for c, t in task.requests)
        if largest >= model.config.vocab_size:
            raise UserError(f"{path}: token id {largest} >= the model's vocab_size {model.config.vocab_size} — wrong "
                            "tokenizer for this model? (pass --data-dir)")
        results[name] = {"file": str(path), "sha256": sha256_file(path), **task.score(scorer)}
    return {"tasks": results, "model": made_from,
            "eval": {**eval_settings(cfg, device, world_size), "max_examples": cfg.max_examples}}



def print_benchmarks(result: dict):
    for name, numbers in result["tasks"].items():
        shown = " | ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in numbers.items() if key not in ("file", "sha256") and not isinstance(value, list))
        print(f"{name} ({numbers['file']}): {shown}")


def check_flags(cfg: EvalConfig):
    """One line naming a numeric flag that cannot work, or an --out that cannot be written — before any loading,
    so a bad flag costs no scoring and never turns into a wrong number (e.g. no batches: every log-probability 0)."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be at least 1")
    for flag, value in (("--max-examples", cfg.max_examples), ("--max-tokens", cfg.max_tokens),
                        ("--context", cfg.context), ("--stride", cfg.stride)):
        if value < 0:
            raise UserError(f"{flag} {value}: must be 0 (the default: all / automatic) or positive")
    if cfg.max_tokens == 1:  # score_windows needs one token to predict from and one to predict
        raise UserError("--max-tokens 1: at least 2 tokens are needed (one to predict from, one to predict)")
    if cfg.context and cfg.stride > cfg.context:
        raise UserError(f"--stride {cfg.stride} must be between 1 and --context {cfg.context}")
    benchmarks = cfg.task != "perplexity" or bool(cfg.all_tasks)
    names = [spec.partition(":")[0] for spec in cfg.all_tasks] if cfg.all_tasks else [cfg.task]
    unused = [("--max-examples", cfg.max_examples, not benchmarks, "hellaswag's and lambada's"),
              ("--max-tokens", cfg.max_tokens, benchmarks, "perplexity's (a split or --text)"),
              ("--context", cfg.context, benchmarks and "wikitext" not in names, "perplexity's and wikitext's"),
              ("--stride", cfg.stride, benchmarks and "wikitext" not in names, "perplexity's and wikitext's")]
    for flag, value, ignored, whose in unused:
        if value and ignored:  # silently ignored, it would look applied
            raise UserError(f"{flag} {value}: a flag of {whose} scoring, not of {', '.join(names)}")
    if cfg.file is not None and cfg.task == "perplexity":
        raise UserError("--file is a benchmark's file: pass --task hellaswag|lambada|wikitext with it (or --text FILE)")
    out = cfg.json_out
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        problem = "is a directory" if out.is_dir() else f"its directory {out.parent} does not exist"
        raise UserError(f"--out {out}: {problem} — pass a file path in an existing directory")


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(EvalConfig, args=argv, prog="eval.py")
    check_flags(cfg)
    benchmarks = cfg.task != "perplexity" or bool(cfg.all_tasks)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device.type == "cuda"
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    try:
        result = (score_benchmarks if benchmarks else score_perplexity)(cfg, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if rank == 0:
        if benchmarks:
            print_benchmarks(result)
        else:
            print(f"{result['source']}: {result['tokens_scored']:,} tokens scored | loss {result['loss']:.4f} nats/token | "
                  f"perplexity {result['perplexity']:.3f} | {result['bits_per_byte']:.4f} bits/byte")
        if cfg.json_out is not None:
            from data import write_json_atomic

            write_json_atomic(cfg.json_out, result)  # a reader never sees half a results file
    return result


if __name__ == "__main__":
    run_cli(main)
