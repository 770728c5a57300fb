"""Text → tokens → batches: `python data.py prepare`, and the memory-mapped batch source.

Not in here: reading the input formats (data_sources.py), the tokenizers (tokenizer.py), the model or the loop.

prepare streams documents from the inputs through the tokenizer into shards of ~shard_tokens uint16 tokens per
split (train.bin / val.bin when a split fits in one shard, else train-000000.bin, ...), with one <|endoftext|>
between documents. The reader (main thread) cuts each block of documents into chunks and one tokenizer thread per
core encodes a chunk at a time — each split's documents in one call, so a chunk's ids come out just as they are
written — with a fixed number of chunks in flight. After each completed shard it records where it is in
prepare-state.json (written atomically), so a killed prepare re-run with the same arguments continues there and
writes the same bytes; meta.json, written last, lists the shards with their sizes, sha256s, cheap fingerprints and
the largest token id.

The order of batches is a pure function of (seed, step); a split's shards are read as one token stream:
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
import os
import re
import resource
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # imported where batches are made: prepare never needs torch (2 CPU-s and ~280 MB to import)
    import torch

from data_sources import corpus_files, document_name, file_batches, read_documents  # noqa: F401  (eval.py's)
from errors import UserError, read_json
from tokenizer import (EOT, Texts, document_ids, find_gpt2_files, gpt2_encoder, gpt2_ranks, gpt2_tokenizer,
                       tokenizers_encoder, train_bpe, usable_gpt2_library)

META_FORMAT = 2  # 2: shards, max_token_id, fingerprints, args; format 1 (one .bin per split) still loads
SPLITS = ("train", "val")
STATE_FILE = "prepare-state.json"
VAL_NAMES_KEPT = 1000  # meta.json lists the first this many val documents by name (all of them for small corpora)
SPLIT_RULES = {
    "permutation": "documents sorted by path (jsonl: by file then line); numpy default_rng(split_seed).permutation(n); "
                   "the first max(1, round(val_fraction·n)) indices are val, the rest train",
    "hash": "documents sorted by path (jsonl/parquet: by file then line/row), counted from 0; document i is val when "
            "int.from_bytes(blake2b(f'{split_seed}:{i}', digest_size=8), 'little') / 2**64 < val_fraction",
}
SPLIT_RULE = SPLIT_RULES["permutation"]  # the format-1 name of today's default rule


def load_tokenizer(data_dir: Path, meta: dict | None = None):
    """The tokenizer a prepared data dir was made with (tokenizer.json beside it, or GPT-2's files)."""
    meta = meta or read_meta(data_dir)
    meta_path = Path(data_dir) / "meta.json"
    if meta["tokenizer"]["kind"] == "bpe":
        from tokenizers import Tokenizer

        path = Path(data_dir) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing (the data was prepared with a trained BPE tokenizer)")
        return Tokenizer.from_file(str(path))
    return gpt2_tokenizer(Path(meta["tokenizer"]["vocab_dir"]),
                          fix=f"the directory {meta_path} names; run `make setup` or edit its tokenizer.vocab_dir")


# ----------------------------------------------------------------------------- prepare: documents and the split

class Batch(NamedTuple):
    """Consecutive documents of one input file, as its reader gives them (a block of lines or rows)."""
    first: int           # corpus index of texts[0], counting non-empty documents from 0 (the split rule's i)
    file_index: int      # which input file they came from
    file_first: int      # index of that file's first document (where a resume starts reading)
    path: Path
    texts: Texts         # UTF-8
    places: np.ndarray   # (n,) each one's line or row (document_name)
    bytes_read: int      # input bytes read so far over all files (for the progress bar)


class InputStopped(UserError):
    """A reader's UserError (a truncated .gz, a malformed line), with the index of the file it stopped in."""

    def __init__(self, message: str, file_index: int):
        super().__init__(message)
        self.file_index = file_index


def iter_batches(files: list[Path], text_field: str, resume: dict | None = None):
    """The Batches of all files in order, from document resume["document"] on (resume: where prepare-state.json
    says it was)."""
    resume = resume or {"document": 0, "file": 0, "file_first_document": 0}
    index, done_bytes = resume["file_first_document"], sum(p.stat().st_size for p in files[:resume["file"]])
    for file_index in range(resume["file"], len(files)):
        file_first = index
        try:
            for texts, places, bytes_read in file_batches(files[file_index], text_field):
                skip = max(resume["document"] - index, 0)  # earlier ones of this file were written before
                if skip < len(texts):
                    yield Batch(index + skip, file_index, file_first, files[file_index],
                                texts[skip:] if skip else texts, places[skip:], done_bytes + bytes_read)
                index += len(texts)
        except UserError as err:
            raise InputStopped(str(err), file_index) from None
        done_bytes += files[file_index].stat().st_size


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of the val documents (SPLIT_RULES["permutation"]); needs at least two documents."""
    if n_docs < 2:
        raise UserError(f"need at least 2 documents to split train/val by document, found {n_docs}")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_val])


def hash_fractions(seed: int, first: int, count: int) -> np.ndarray:
    """(count,) numbers in [0, 1), each fixed by (seed, document index) for indices first..: the hash split's coin
    (SPLIT_RULES["hash"]). The digest of the key's bytes b"{seed}:{index}", its common prefix hashed once."""
    prefix = hashlib.blake2b(b"%d:" % seed, digest_size=8)

    def digest(index: int) -> bytes:
        key = prefix.copy()
        key.update(b"%d" % index)
        return key.digest()
    # read as little-endian uint64 in one step; float64 rounding then /2⁶⁴ (exact) is int / 2**64's correct rounding
    return np.frombuffer(b"".join(map(digest, range(first, first + count))), dtype="<u8") / 2**64


def val_chooser(cfg, files: list[Path]):
    """in_val(first, count) -> (count,) bool: which of documents first.. are val. The permutation rule counts the
    documents first (one extra read); hash needs nothing."""
    if cfg.split == "hash":
        return lambda first, count: hash_fractions(cfg.split_seed, first, count) < cfg.val_fraction
    n_docs = count_documents(files, cfg.text_field, cfg.workers or usable_cores())
    if n_docs < 2:  # first the warnings that say why documents were skipped
        read_through(files, cfg.text_field)
        raise UserError(f"{', '.join(map(str, cfg.inputs))}: {n_docs} non-empty document(s) — --split permutation "
                        "needs at least 2 (one for train, one for val)")
    val = split_documents(n_docs, cfg.val_fraction, cfg.split_seed)

    def in_val(first: int, count: int) -> np.ndarray:
        mask = np.zeros(count, dtype=bool)
        mask[val[np.searchsorted(val, first):np.searchsorted(val, first + count)] - first] = True
        return mask
    return in_val


def count_documents(files: list[Path], text_field: str, workers: int) -> int:
    """The corpus's (non-empty) documents, `workers` files read at once: the C scan releases the GIL, and no
    tokenizing overlaps this pass, so one thread would leave the other cores idle (a .txt is read whole: as many
    of them in memory at once). It says what a sequential read would: the warnings are left to the pass that writes
    (once, in order; a resumed run says those of the files it reads again), and where this pass fails, the files up
    to the first failed one in order are read again one by one, for their warnings and that file's error."""
    first_failed, lock = [len(files)], threading.Lock()  # files after first_failed[0] stop at their next block

    def count(index: int) -> int:
        n = 0
        try:
            for batch in file_batches(files[index], text_field):
                if first_failed[0] < index:
                    return 0  # an earlier file's error is the one raised: this count is never added
                n += len(batch.texts)
        except BaseException:
            with lock:
                first_failed[0] = min(first_failed[0], index)
            raise
        return n

    failed = len(files)  # the file whose error map raised, if one did
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # for every thread: the filters are global while this pass runs
            with ThreadPoolExecutor(max_workers=workers) as pool:
                try:
                    return sum(pool.map(count, range(len(files))))  # in file order: the first failed file's error
                except BaseException:
                    failed, first_failed[0] = first_failed[0], -1  # all stop now: Ctrl-C waits for no file's end
                    raise
    except Exception:
        if failed < len(files):
            read_through(files[:failed + 1], text_field)  # raises that error again, after the warnings before it
        raise


def read_through(files: list[Path], text_field: str):
    """Read files one after another for what they say: their warnings, and the first error."""
    for path in files:
        for _ in file_batches(path, text_field):
            pass


class Chunk(NamedTuple):
    """Consecutive documents of one batch, sorted into their splits: the unit one tokenizer thread encodes."""
    batch: Batch
    start: int                       # the chunk is batch.texts[start:stop]
    stop: int
    val: np.ndarray                  # (stop - start,) bool: which of them are val
    texts: dict[str, Texts]          # split -> its documents' texts, in corpus order (spans of the batch's buffer)


def document_chunks(batches, in_val, max_documents: int, max_bytes: int):
    """Chunks of at most max_documents, or about max_bytes of text, each within one batch: a chunk closes at the
    document that brings it to either, or at its batch's end. Where the cuts fall changes no byte of the output
    (each document is encoded on its own); they size the tokenizer calls, and a batch's texts stay one buffer.

    E.g. max_bytes 10, a batch of texts of 3, 5, 4 bytes: ends is [3, 8, 12], the text reaching 10 bytes is the one
    where ends first is ≥ 10 (by_bytes = 2), so the chunk is texts[0:3]; with max_documents 2, texts[0:2], then [2:3].
    """
    for batch in batches:
        ends, val, start = np.cumsum(batch.texts.lengths()), in_val(batch.first, len(batch.texts)), 0
        while start < len(batch.texts):
            before = int(ends[start - 1]) if start else 0  # bytes of the batch's texts before start
            by_bytes = int(np.searchsorted(ends, before + max_bytes))  # the text that reaches max_bytes
            stop = min(start + max_documents - 1, by_bytes, len(batch.texts) - 1) + 1
            run, chunk_val = batch.texts[start:stop], val[start:stop]
            yield Chunk(batch, start, stop, chunk_val, {"val": run.chosen(chunk_val), "train": run.chosen(~chunk_val)})
            start = stop


def chunk_names(chunk: Chunk, split: str):
    """The names of a chunk's documents of split, in order, made as they are asked for (most never are)."""
    chosen = chunk.val if split == "val" else ~chunk.val
    places = chunk.batch.places[chunk.start:chunk.stop][chosen].tolist()
    return (document_name(chunk.batch.path, place) for place in places)


def resume_after(batch: Batch, position: int) -> dict:
    """prepare-state.json's resume point just after the document batch.texts[position]."""
    return {"document": batch.first + position + 1, "file": batch.file_index, "file_first_document": batch.file_first}


CHUNKS_PER_WORKER = 3  # in flight: one encoding and two waiting per tokenizer thread, so none waits for the reader


def encoded_chunks(chunks, encode, workers: int):
    """(chunk, {split: its documents' ids joined by <|endoftext|>}) in order, encoded by `workers` threads.

    The reader (this thread) keeps up to CHUNKS_PER_WORKER · workers chunks in flight: enough that a thread
    finishing a chunk finds the next one queued, and the bound that keeps memory flat — about that many times
    --batch-bytes of text and its tokens, whatever the size of the corpus.
    """
    def encode_chunk(chunk: Chunk) -> dict:
        return {split: encode(texts) for split, texts in chunk.texts.items() if texts}

    with ThreadPoolExecutor(max_workers=workers) as pool:  # the tokenizers release the GIL while they encode
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(encode_chunk, chunk)))
            if len(pending) >= CHUNKS_PER_WORKER * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# ----------------------------------------------------------------------------- prepare: shards and resuming

WRITEBACK_BYTES = 16 << 20  # a shard's bytes are handed to the disk this many at a time (start_writeback)


def start_writeback(file, written_back: int) -> int:
    """Once WRITEBACK_BYTES have been written to `file` past offset written_back, start the disk writing them, without
    waiting; returns the new written_back. A commit's fsync then finds a shard's bytes mostly on disk, instead of
    stopping the pipeline (and the tokenizer threads behind it) for all of its I/O: ~0.7 s for a 200 MB shard on a
    300 MB/s disk (this VM's, at its slower times). Linux's POSIX_FADV_DONTNEED starts writeback of the range's dirty pages (it drops only clean
    pages: these stay cached); elsewhere it is a hint that may do nothing, and the fsync does it all as before."""
    end = file.tell()
    if end - written_back < WRITEBACK_BYTES or not hasattr(os, "posix_fadvise"):
        return written_back
    file.flush()  # the bytes must be in the kernel's pages first
    try:
        os.posix_fadvise(file.fileno(), written_back, end - written_back, os.POSIX_FADV_DONTNEED)
    except OSError:  # a hint: a file system that refuses it loses nothing, the fsync still makes the bytes durable
        pass
    return end


class ShardWriter:
    """One split's token files: documents are appended to the open shard, which closes once it holds shard_tokens.

    `saved` is this split's entry of prepare-state.json: the closed shards, the open shard's length at the last
    commit (a resume cuts the file back to it), and the running counts.
    """

    def __init__(self, out: Path, split: str, shard_tokens: int, saved: dict | None = None):
        saved = saved or {"shards": [], "open_tokens": 0,
                          "stats": {"documents": 0, "tokens": 0, "bytes": 0, "max_token_id": -1, "names": []}}
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards, self.open_tokens, self.stats = list(saved["shards"]), saved["open_tokens"], dict(saved["stats"])
        self.stats["names"] = list(self.stats["names"])
        self.file, self.hasher = None, None
        self.written_back = 0  # bytes of the open shard whose writing to disk has been started
        if self.open_tokens:
            self._reopen()

    def path(self, shard: int) -> Path:
        return self.out / f"{self.split}-{shard:06d}.bin"

    def _reopen(self):
        """Cut the open shard back to its committed length and continue it (its hash from the kept bytes)."""
        path, size = self.path(len(self.shards)), 2 * self.open_tokens
        if not path.is_file() or path.stat().st_size < size:
            raise UserError(f"{path}: shorter than {STATE_FILE} records — the directory was changed; "
                            "delete it and prepare again")
        self.file = open(path, "r+b")
        self.file.truncate(size)
        self.hasher = hashlib.sha256(self.file.read(size))  # ≤ one shard: 200 MB at the default size
        self.file.seek(size)
        self.written_back = size

    def fits(self, n_tokens: int) -> bool:
        """Whether n_tokens more (after their separator) leave the open shard short of full."""
        return self.open_tokens + n_tokens + (self.stats["documents"] > 0) < self.shard_tokens

    def add(self, ids: np.ndarray, eot_id: int, texts: Texts, names):
        """Append documents (texts; their uint16 ids joined by <|endoftext|>; names: an iterator of their names),
        after an <|endoftext|> unless they are the split's first. The caller closes the shard when it is full."""
        if self.file is None:
            self.file, self.hasher = open(self.path(len(self.shards)), "wb"), hashlib.sha256()
            self.written_back = 0
        stats = self.stats
        separator = np.array([eot_id] if stats["documents"] else [], dtype=np.uint16)  # a boundary the model sees
        for part in (separator, ids):
            self.file.write(part)  # an array is a buffer: written and hashed without a copy
            self.hasher.update(part)
        n_tokens = len(separator) + len(ids)
        self.open_tokens += n_tokens
        stats["documents"], stats["tokens"] = stats["documents"] + len(texts), stats["tokens"] + n_tokens
        stats["bytes"] += texts.n_bytes()
        stats["max_token_id"] = max(stats["max_token_id"], int(ids.max()) if len(ids) else -1, *separator.tolist())
        stats["names"] += islice(names, max(VAL_NAMES_KEPT - len(stats["names"]), 0))
        self.written_back = start_writeback(self.file, self.written_back)

    def sync(self):
        """Make the open shard's bytes durable (before prepare-state.json says they exist)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close_shard(self):
        self.sync()
        self.file.close()
        path = self.path(len(self.shards))
        self.shards.append({"file": path.name, "tokens": self.open_tokens, "sha256": self.hasher.hexdigest(),
                            "fingerprint": fingerprint(path)})
        self.file, self.hasher, self.open_tokens = None, None, 0

    def saved(self) -> dict:
        return {"shards": list(self.shards), "open_tokens": self.open_tokens,
                "stats": dict(self.stats, names=list(self.stats["names"]))}


def commit(out: Path, state: dict, writers: dict, resume: dict | None):
    """Record the closed shards and where to resume (a resume_after), atomically."""
    for writer in writers.values():
        writer.sync()
    if resume is not None:
        state["resume"] = resume
    state["splits"] = {split: writer.saved() for split, writer in writers.items()}
    write_json_atomic(out / STATE_FILE, state)


def prepare_args(cfg, files: list[Path]) -> dict:
    """The arguments that decide prepare's output bytes (recorded; a resume must match them)."""
    args = {"inputs": [[str(p), p.stat().st_size] for p in files], "text_field": cfg.text_field,
            "tokenizer": cfg.tokenizer, "split": cfg.split, "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens}
    if cfg.tokenizer == "bpe":
        args["bpe_vocab_size"] = cfg.bpe_vocab_size
    else:
        args["gpt2_vocab_dir"] = str(cfg.gpt2_vocab_dir)
    return args


def inputs_may_change(before: list, now: list, state: dict | None) -> bool:
    """Whether an unfinished preparation may go on with other --inputs: when nothing is recorded as done (it starts
    over), or under the hash split when every file up to the one of the last document done is as it was. A
    document's split hangs on its index alone there, so what is done is what a run on the new inputs writes: a
    file mended after keep_until stopped before it, or files added at the end, change nothing done."""
    if state is None or state.get("finished"):
        return False
    if state.get("resume") is None:
        return True
    upto = state["resume"]["file"] + 1
    return state["args"].get("split") == "hash" and [list(f) for f in before[:upto]] == [list(f) for f in now[:upto]]


def check_same_args(recorded: dict, args: dict, where: Path, state: dict | None = None):
    """Refuse to continue (or overwrite) a preparation made with other arguments, naming the first that differs;
    state: an unfinished preparation's, whose later inputs may have changed (inputs_may_change)."""
    for key in [*args, *(key for key in recorded if key not in args)]:  # in a fixed order: the first difference
        before, now = recorded.get(key), args.get(key)
        if before == now or (key == "inputs" and inputs_may_change(before or [], now, state)):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "inputs":
            if before and sorted(map(tuple, before)) == sorted(map(tuple, now)):
                raise UserError(f"{where}: prepared from the same --inputs in another order ("
                                f"{', '.join(name for name, _ in before)} then) — the order decides the documents' "
                                "order: pass them as then, use another --out-dir, or delete it to start over")
            before_files, now_files = dict(map(tuple, before or [])), dict(map(tuple, now))
            changed = next((f for f in sorted(before_files.keys() | now_files.keys())
                            if before_files.get(f) != now_files.get(f)), "?")
            raise UserError(f"{where}: prepared from other --inputs ({changed}: "
                            f"{before_files.get(changed, 'absent')} bytes then, {now_files.get(changed, 'absent')} "
                            "now) — use another --out-dir, or delete it to start over")
        raise UserError(f"{where}: prepared with {flag} {before}, not {now} — pass the same arguments to resume, "
                        "use another --out-dir, or delete it to start over")


def existing_preparation(out: Path, args: dict) -> tuple[dict | None, dict | None]:
    """(meta of a finished preparation, state of an interrupted one) in out, after checking their arguments."""
    meta_path, state_path = out / "meta.json", out / STATE_FILE
    fix = "use another --out-dir, or delete it to start over"
    if state_path.is_file():
        state = read_json(state_path, fix)
        if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
            raise UserError(f"{state_path}: not a state file of data.py prepare — {fix}")
        check_same_args(state["args"], args, state_path, state)
        state["args"] = args  # the inputs as they are now (inputs_may_change): what meta.json will record
        return None, state
    if meta_path.is_file():
        meta = read_json(meta_path, fix)
        if not isinstance(meta, dict) or not isinstance(meta.get("args", {}), dict):
            raise UserError(f"{meta_path}: not a meta.json of data.py prepare — {fix}")
        if "args" not in meta:
            raise UserError(f"{meta_path}: prepared by an older data.py (its arguments are not recorded) — "
                            "use another --out-dir, or delete it to prepare again")
        check_same_args(meta["args"], args, meta_path)
        return meta, None
    if out.is_dir() and any(p.name.startswith(SPLITS) and p.suffix == ".bin" for p in out.iterdir()):
        raise UserError(f"{out}: holds .bin files but no meta.json or {STATE_FILE} — "
                        "use another --out-dir, or delete them")
    return None, None


# ----------------------------------------------------------------------------- prepare: the whole job

def prepare(cfg) -> dict:
    """Read, split by document, tokenize, and write the shards and meta.json into cfg.out_dir (see the docstring).

    Everything that can be checked is checked before the first byte is written: the inputs, the reader packages,
    the GPT-2 files (and, for the permutation split or a trained BPE, every document, read once beforehand).
    """
    check_flags(cfg)
    files, out = corpus_files(cfg.inputs, cfg.text_field), Path(cfg.out_dir)
    args = prepare_args(cfg, files)
    meta, state = existing_preparation(out, args)
    if meta is not None:
        return meta  # already prepared with these arguments
    # GPT-2's files both there and vocab.json GPT-2's, else one line and nothing written; its ranks make the encoder
    ranks = gpt2_ranks(cfg.gpt2_vocab_dir) if cfg.tokenizer == "gpt2" else None
    in_val = val_chooser(cfg, files)
    state = state or {"args": args, "resume": None, "splits": {}, "finished": False}
    tok = None
    if cfg.tokenizer == "bpe" and not _saved_bpe_is_intact(out, state):
        train_texts = (text.decode() for batch in iter_batches(files, cfg.text_field)
                       for text in batch.texts.chosen(~in_val(batch.first, len(batch.texts))))
        tok = train_bpe(train_texts, cfg.bpe_vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATE_FILE, state)  # from here on the directory is ours: a re-run resumes it
    encode, tok_meta, vocab_size, eot_id = open_encoder(cfg, out, state, tok, ranks)
    if vocab_size > 65536:
        raise UserError(f"tokenizer has {vocab_size} tokens; uint16 .bin files hold at most 65536")
    writers = {split: ShardWriter(out, split, cfg.shard_tokens, state["splits"].get(split)) for split in SPLITS}
    if not state["finished"]:
        write_shards(cfg, files, encode, in_val, eot_id, out, state, writers)
    meta = {"format": META_FORMAT, "dtype": "uint16", "vocab_size": vocab_size, "eot_id": eot_id,
            "tokenizer": tok_meta, "split": cfg.split, "split_rule": SPLIT_RULES[cfg.split],
            "split_seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
            "val_documents": writers["val"].stats["names"], "args": args}
    return finish(out, meta, writers)


def check_flags(cfg):
    """Refuse, naming the flag, any value that could not make a preparation — before anything is read or written
    (a value found wrong later would leave a directory that a corrected command refuses as prepared otherwise)."""
    rules = [("--batch-documents", cfg.batch_documents, cfg.batch_documents >= 1, "at least 1"),  # else chunks
             ("--batch-bytes", cfg.batch_bytes, cfg.batch_bytes >= 1, "at least 1"),              # never close
             ("--shard-tokens", cfg.shard_tokens, cfg.shard_tokens >= 1, "at least 1"),
             ("--workers", cfg.workers, cfg.workers >= 0, "0 (every core) or more"),
             ("--split-seed", cfg.split_seed, cfg.split_seed >= 0, "0 or more"),
             ("--val-fraction", cfg.val_fraction, 0 < cfg.val_fraction < 1, "between 0 and 1, both excluded")]
    if cfg.tokenizer == "bpe":
        rules.append(("--bpe-vocab-size", cfg.bpe_vocab_size, 257 <= cfg.bpe_vocab_size <= 65536,
                      "257 (the 256 bytes and <|endoftext|>) to 65536 (what uint16 holds)"))
    for flag, value, holds, rule in rules:
        if not holds:  # `not`, so that NaN fails too
            raise UserError(f"{flag} {value}: must be {rule}")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise UserError(f"--out-dir {cfg.out_dir}: exists and is not a directory")
    if cfg.tokenizer == "gpt2":
        usable_gpt2_library(cfg.gpt2_library)  # a library named that cannot run: one line, before anything is written


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a container's cpuset), not the
    machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _saved_bpe_is_intact(out: Path, state: dict) -> bool:
    path = out / "tokenizer.json"
    return bool(state.get("tokenizer_sha256")) and path.is_file() and sha256_file(path) == state["tokenizer_sha256"]


def open_encoder(cfg, out: Path, state: dict, trained_bpe, ranks: dict | None):
    """(encode, tokenizer's meta entry, vocab size, <|endoftext|> id); a new BPE is saved next to the tokens."""
    if cfg.tokenizer == "gpt2":
        # ranks: vocab.json parsed once (gpt2_ranks), not again
        encode, library = gpt2_encoder(cfg.gpt2_vocab_dir, ranks, cfg.gpt2_library)
        files = {p.name: sha256_file(p) for p in find_gpt2_files(cfg.gpt2_vocab_dir)}
        return encode, {"kind": "gpt2", "vocab_dir": str(cfg.gpt2_vocab_dir), "files": files, "library": library}, \
            50257, 50256
    from tokenizers import Tokenizer

    path = out / "tokenizer.json"
    if trained_bpe is not None:
        trained_bpe.save(str(path.with_suffix(".json.tmp")))
        os.replace(path.with_suffix(".json.tmp"), path)
        state["tokenizer_sha256"] = sha256_file(path)
        write_json_atomic(out / STATE_FILE, state)
    tok = Tokenizer.from_file(str(path))
    meta = {"kind": "bpe", "files": {"tokenizer.json": state["tokenizer_sha256"]}}
    return tokenizers_encoder(tok, tok.token_to_id(EOT)), meta, tok.get_vocab_size(), tok.token_to_id(EOT)


def write_shards(cfg, files, encode, in_val, eot_id: int, out: Path, state: dict, writers: dict):
    """The one pass that tokenizes: documents → ids → the split's open shard; a commit after each closed shard."""
    from tqdm import tqdm

    batches = iter_batches(files, cfg.text_field, state["resume"])
    chunks = document_chunks(batches, in_val, cfg.batch_documents, cfg.batch_bytes)
    total, workers = sum(p.stat().st_size for p in files), cfg.workers or usable_cores()
    started, tokens_before, resume = time.time(), sum(w.stats["tokens"] for w in writers.values()), state["resume"]
    file_start = (state["resume"]["file"] if state["resume"] else 0, state["resume"], written(writers))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {out}", file=sys.stderr,
              disable=not cfg.progress, smoothing=0.1) as bar:
        try:
            for chunk, ids in encoded_chunks(chunks, encode, workers):
                if chunk.batch.file_index != file_start[0]:  # where a rollback to this file's start would go
                    file_start = (chunk.batch.file_index, resume, written(writers))
                write_chunk(chunk, ids, eot_id, out, state, writers)
                resume = resume_after(chunk.batch, chunk.stop - 1)
                bar.update(chunk.batch.bytes_read - bar.n)
                tokens_now = sum(w.stats["tokens"] for w in writers.values()) - tokens_before
                bar.set_postfix_str(f"{tokens_now / max(time.time() - started, 1e-9) / 1e6:.2f}M tokens/s",
                                    refresh=False)
        except InputStopped as err:
            at = file_start if file_start[0] == err.file_index else (err.file_index, resume, written(writers))
            raise UserError(f"{err} — {keep_until(out, state, writers, at, files)}") from None
    if all(writer.stats["documents"] == 0 for writer in writers.values()):
        discard(out, writers, state)
        raise UserError(f"{', '.join(map(str, cfg.inputs))}: no non-empty document (the warnings above say why)")
    for split, writer in writers.items():
        if writer.stats["documents"] == 0:
            discard(out, writers, state)
            raise UserError(f"{', '.join(map(str, cfg.inputs))}: no document went to {split} "
                            f"(--split {cfg.split}, --val-fraction {cfg.val_fraction}) — use --split permutation "
                            "for a small corpus (it puts at least one document in each), or more documents")
        if writer.open_tokens:
            writer.close_shard()
    state["finished"] = True
    commit(out, state, writers, resume)


def written(writers: dict) -> dict:
    """What each split holds so far, as prepare-state.json records it: what a rollback returns to."""
    return {split: writer.saved() for split, writer in writers.items()}


def keep_until(out: Path, state: dict, writers: dict, at: tuple, files: list[Path]) -> str:
    """After a reader stopped in files[at[0]]: record as done exactly the documents before that file (at: the
    file's index, the resume point and written() at its start), drop what came after, and say what a re-run does.
    Then that file may be mended or replaced, its size changing: a re-run goes on from its first document
    (check_same_args lets files after the resume point change). Shards closed within the file are removed — at
    most one file's work redone, against all of it lost to a re-run that must start over."""
    file_index, resume, splits = at
    for split, writer in writers.items():
        if writer.file is not None:
            writer.file.close()
        kept, open_tokens = len(splits[split]["shards"]), splits[split]["open_tokens"]
        if open_tokens:  # its first open_tokens are what the state will say: durable first
            with open(writer.path(kept), "r+b") as file:
                file.truncate(2 * open_tokens)
                os.fsync(file.fileno())
    state["resume"], state["splits"] = resume, splits
    write_json_atomic(out / STATE_FILE, state)
    for split, writer in writers.items():  # after the state no longer names them: a crash here loses nothing
        kept = len(splits[split]["shards"]) + (splits[split]["open_tokens"] > 0)
        for index in range(kept, len(writer.shards) + 1):
            writer.path(index).unlink(missing_ok=True)
    done = sum(len(split["shards"]) for split in splits.values())
    if resume is None:
        return f"stopped before anything was done: mend {files[file_index]} and run the same command"
    if resume["file"] == file_index:  # resumed inside this file: its start is written
        return (f"stopped; {done} completed shards are kept, and they hold documents of {files[file_index]}: with "
                "it as it was, the same command goes on after them — mended, it needs a new --out-dir")
    return (f"stopped; what came before {files[file_index]} is kept ({done} completed shards): mend or replace it "
            "and run the same command, and prepare goes on after what is kept")


def write_chunk(chunk: Chunk, ids: dict, eot_id: int, out: Path, state: dict, writers: dict):
    """Append a chunk's documents to their splits. Where no shard fills, each split's run is written at once;
    else document by document in corpus order, closing each full shard and committing right after its document."""
    if all(writers[split].fits(len(split_ids)) for split, split_ids in ids.items()):
        for split, split_ids in ids.items():
            writers[split].add(split_ids, eot_id, chunk.texts[split], chunk_names(chunk, split))
        return
    each_ids = {split: iter(document_ids(split_ids, chunk.texts[split], eot_id)) for split, split_ids in ids.items()}
    batch = chunk.batch
    for position, is_val in zip(range(chunk.start, chunk.stop), chunk.val.tolist()):
        writer = writers["val" if is_val else "train"]
        writer.add(next(each_ids[writer.split]), eot_id, batch.texts[position:position + 1],
                   iter([document_name(batch.path, batch.places[position])]))
        if writer.open_tokens >= writer.shard_tokens:
            writer.close_shard()
            commit(out, state, writers, resume_after(batch, position))


def discard(out: Path, writers: dict, state: dict):
    """Remove what this preparation wrote (it cannot be finished), and the directory if that leaves it empty."""
    for writer in writers.values():
        if writer.file is not None:
            writer.file.close()
        for shard in range(len(writer.shards) + 1):
            writer.path(shard).unlink(missing_ok=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    if "tokenizer_sha256" in state:  # a BPE this preparation trained and saved; else a tokenizer.json is not ours
        (out / "tokenizer.json").unlink(missing_ok=True)
    if not any(out.iterdir()):
        out.rmdir()


def finish(out: Path, meta: dict, writers: dict) -> dict:
    """Name a one-shard split {split}.bin (today's layout), then write meta.json and drop the state file."""
    meta["splits"] = {}
    for split, writer in writers.items():
        shards = [dict(shard) for shard in writer.shards]
        if len(shards) == 1:
            single = out / f"{split}.bin"
            if (out / shards[0]["file"]).is_file():  # not yet renamed by an interrupted finish
                os.replace(out / shards[0]["file"], single)
            shards[0]["file"] = single.name
        stats = {key: value for key, value in writer.stats.items() if key != "names"}
        meta["splits"][split] = dict(stats, sha256=split_sha256(shards), shards=shards)
    write_json_atomic(out / "meta.json", meta)  # written last: its presence means "complete"
    (out / STATE_FILE).unlink()
    return meta


def split_sha256(shards: list[dict]) -> str:
    """A split's identity (checkpoints record it): its file's sha256 when it has one (as in format 1),
    else the sha256 of its shards' sha256s in order."""
    if len(shards) == 1:
        return shards[0]["sha256"]
    return hashlib.sha256("\n".join(shard["sha256"] for shard in shards).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK_BYTES = 16, 1 << 16


def fingerprint(path: Path) -> str:
    """sha256 of the file's size and 16 chunks of 64 KiB spread evenly over it: ~1 MB read, whatever the size.
    Catches a truncated, replaced or regenerated file; a few flipped bits in between need --data.verify full."""
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for i in range(FINGERPRINT_CHUNKS):
            f.seek(max(size - FINGERPRINT_CHUNK_BYTES, 0) * i // (FINGERPRINT_CHUNKS - 1))
            digest.update(f.read(FINGERPRINT_CHUNK_BYTES))
    return digest.hexdigest()


def write_atomic(path: Path, text: str):
    """Write NAME.tmp, fsync, rename over, fsync the directory: a reader sees the old file or the new one, never
    half (a killed write leaves NAME.tmp, which the next write replaces). The one atomic text write of gust."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, value: dict):
    write_atomic(path, json.dumps(value, indent=2))


# ----------------------------------------------------------------------------- batches

def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: data directory not found — run `python data.py prepare` "
                        "(or `make setup`), or point the data-dir flag elsewhere")
    if not path.is_file():
        hint = " (a prepare was interrupted: re-run it to continue)" if (Path(data_dir) / STATE_FILE).is_file() else ""
        raise UserError(f"{path}: sidecar missing{hint} — prepare the data with `python data.py prepare`")
    return read_json(path, fix="prepare the data again")


def split_info(meta: dict, split: str, meta_path: Path) -> dict:
    """A split's entry of meta.json with its shard list, for format 2 and format 1 (one {split}.bin, no shards)."""
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not isinstance(splits.get(split), dict):
        present = ", ".join(splits) if isinstance(splits, dict) and splits else "none"
        raise UserError(f"{meta_path}: no \"{split}\" split (splits: {present}) — prepare the data again")
    info = splits[split]
    missing = [key for key in ("tokens", "bytes") if key not in info]
    if "shards" not in info and "sha256" not in info:
        missing.append("shards")
    if missing or "dtype" not in meta or "vocab_size" not in meta:
        absent = missing + [key for key in ("dtype", "vocab_size") if key not in meta]
        raise UserError(f"{meta_path}: \"{split}\" entry lacks {', '.join(absent)} — prepare the data again")
    if "shards" not in info:  # format 1
        info = dict(info, shards=[{"file": f"{split}.bin", "tokens": info["tokens"], "sha256": info["sha256"]}])
    shards, vocab_size = info["shards"], meta["vocab_size"]
    if not (isinstance(shards, list) and shards and all(isinstance(shard, dict) and isinstance(shard.get("file"), str)
                                                        and type(shard.get("tokens")) is int for shard in shards)):
        raise UserError(f"{meta_path}: \"{split}\" shards are not a list of {{\"file\": name, \"tokens\": count}} "
                        "— prepare the data again")
    if type(vocab_size) is not int:
        raise UserError(f"{meta_path}: vocab_size {vocab_size!r} is not a whole number — prepare the data again")
    return info


class TokenShards:
    """Several uint16 token files read as one stream: len() and indexing as a single np.memmap would give."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])  # (n_shards + 1,) first token of each shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self[np.arange(start, stop, step)]
        index = np.asarray(index)
        shard = np.searchsorted(self.starts, index, side="right") - 1  # which shard each position falls in
        out = np.empty(index.shape, dtype=np.uint16)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.parts[s][index[mask] - self.starts[s]]
        return out if out.ndim else out[()]


class TokenSplit:
    """One split's tokens (one file or several shards as one stream), memory-mapped and checked against meta.json.

    verify: "size" checks each file's size; "fingerprint" (the default) also ~1 MB of each; "full" its sha256 and
    largest token id (reads all of it). True / False mean "full" / "size", as the old verify_sha256 flag did.
    """

    def __init__(self, data_dir: Path, split: str, block_size: int, model_vocab: int,
                 verify: str | bool = "fingerprint"):
        verify = {True: "full", False: "size"}.get(verify, verify)
        self.data_dir, meta_path = Path(data_dir), Path(data_dir) / "meta.json"
        meta = read_meta(data_dir)
        info = split_info(meta, split, meta_path)
        self.block_size, self.bytes, self.meta, self.model_vocab = block_size, info["bytes"], meta, model_vocab
        if meta["dtype"] != "uint16":
            raise UserError(f"{meta_path}: dtype {meta['dtype']} unsupported (uint16 only)")
        if meta["vocab_size"] > model_vocab:
            raise UserError(f"{meta_path}: vocab_size {meta['vocab_size']} > --model.vocab-size {model_vocab}")
        parts = [self._open_checked(shard, verify) for shard in info["shards"]]
        self.path = self.data_dir / (info["shards"][0]["file"] if len(parts) == 1 else f"{split}-*.bin")
        self.shards = info["shards"]  # [{file, tokens, sha256, fingerprint}]: what these tokens are
        self.tokens = parts[0] if len(parts) == 1 else TokenShards(parts)
        if len(self.tokens) < self.block_size + 1:
            raise UserError(f"{self.path}: {len(self.tokens):,} tokens, but block_size + 1 = {self.block_size + 1:,} "
                            "are needed — use more data or a smaller --model.block-size")
        recorded_top = info.get("max_token_id")  # format 2 records it: no need to read the tokens
        top = max(max_token_id(part) for part in parts) if recorded_top is None or verify == "full" else recorded_top
        if top >= model_vocab:
            raise UserError(f"{self.path}: token id {top} >= --model.vocab-size {model_vocab}")
        # windows of block_size + 1 tokens: x is the first T, y the last T
        self.n_windows = (len(self.tokens) - 1) // block_size

    def _open_checked(self, shard: dict, verify: str) -> np.ndarray:
        path = self.data_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: missing")
        size = path.stat().st_size
        if size == 0:
            raise UserError(f"{path}: empty (0 tokens) — prepare the data again, with more documents "
                            "(or a larger --val-fraction for val)")
        if size % 2:
            raise UserError(f"{path}: {size:,} bytes is not a multiple of 2 (uint16) — truncated or not a token file")
        if size // 2 != shard["tokens"]:
            raise UserError(f"{path}: {size // 2:,} tokens, but meta.json says {shard['tokens']:,}")
        # format 1 has no fingerprint: "fingerprint" falls back to the sha256, as it always did
        if verify == "fingerprint" and "fingerprint" in shard:
            if fingerprint(path) != shard["fingerprint"]:
                raise UserError(f"{path}: fingerprint differs from meta.json — the file changed since "
                                "`data.py prepare`")
        elif verify in ("fingerprint", "full") and sha256_file(path) != shard.get("sha256"):
            raise UserError(f"{path}: sha256 differs from meta.json — the file changed since `data.py prepare`")
        return np.memmap(path, dtype=np.uint16, mode="r")

    def windows(self, starts: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        """x, y (len(starts), T) int64 for windows starting at the given token offsets."""
        import torch

        rows = starts[:, None] + np.arange(self.block_size + 1)[None, :]  # (n, T+1)
        tokens = self.tokens[rows]  # (n, T+1) uint16
        if int(tokens.max()) >= self.model_vocab:  # a change the start-up check missed: one line, not an IndexError
            self._refuse_token(rows, tokens)
        block = torch.from_numpy(tokens.astype(np.int64))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def _refuse_token(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Name the file and place of the first token id the model has no row for."""
        first = int(np.flatnonzero(tokens.reshape(-1) >= self.model_vocab)[0])
        offset, value = int(rows.reshape(-1)[first]), int(tokens.reshape(-1)[first])
        starts = np.cumsum([0] + [shard["tokens"] for shard in self.shards])  # (n_shards + 1,) as TokenShards's
        shard = int(np.searchsorted(starts, offset, side="right")) - 1
        raise UserError(f"{self.data_dir / self.shards[shard]['file']}: token id {value} at token "
                        f"{offset - starts[shard]:,} >= "
                        f"--model.vocab-size {self.model_vocab} — the file changed since `data.py prepare`; the "
                        "start-up check reads ~1 MB of each file (--data.verify fingerprint) or none (size), "
                        "--data.verify full all of it")

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


def max_token_id(tokens: np.ndarray) -> int:
    return max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))  # chunked: bounded memory


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int, slack: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    return int(rng.integers(0, slack + 1)), rng.permutation(n_windows)


def rank_rows(global_batch: int, world_size: int, rank: int, micro_batch: int, micro_step: int) -> slice:
    """Which rows of the global batch this rank reads at this micro-step."""
    per_rank = global_batch // world_size
    first = rank * per_rank + micro_step * micro_batch
    return slice(first, first + micro_batch)


def peak_memory_mb() -> float:
    """This process's peak resident memory: VmHWM, not ru_maxrss, which on Linux also counts the memory its parent
    had when it forked this process (a large parent would read as our peak)."""
    try:
        return int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None):
    import tyro

    from configs import PrepareConfig

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "prepare":
        raise UserError("usage: python data.py prepare [--inputs PATH ...] [--out-dir DIR] [--tokenizer gpt2|bpe] "
                        "(see python data.py prepare --help)")
    cfg = tyro.cli(PrepareConfig, args=argv[1:], prog="data.py prepare")
    started = time.time()
    meta = prepare(cfg)
    for split, info in meta["splits"].items():
        print(f"{cfg.out_dir}/{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
              f"{info['bytes']:,} bytes ({info['bytes'] / info['tokens']:.2f} bytes/token), "
              f"{len(info['shards'])} shard(s)")
    seconds, n_bytes = time.time() - started, sum(info["bytes"] for info in meta["splits"].values())
    print(f"prepared {sum(i['documents'] for i in meta['splits'].values()):,} documents, "
          f"{sum(i['tokens'] for i in meta['splits'].values()):,} tokens, {n_bytes:,} bytes in {seconds:.1f} s "
          f"({n_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s this run); peak memory {peak_memory_mb():,.0f} MB")


if __name__ == "__main__":
    from errors import run_cli

    run_cli(main)
