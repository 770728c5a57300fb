"""data.py at scale: gpt2_bpe = tiktoken = tokenizers, the input formats, the hash split, shards read as one stream,
resuming a killed prepare, and a start-up that reads only what it must (issue 14)."""
import gzip
import importlib.util
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import data
import data_sources
from conftest import GPT2_VOCAB, PLAYS, ROOT
from configs import PrepareConfig
import tokenizer
from data import TokenSplit, hash_fractions, prepare
from tokenizer import gpt2_tiktoken, gpt2_tokenizer
from errors import UserError

AWKWARD = ["", " ", "  \n\n\t  x", "Hello world", "I'm sure they'll say we've done what you'd've done, 'tis it's",
           "I'M SHOUTING THEY'LL", "   leading", "trailing   ", "tabs\t\tand\u00a0nbsp", "naïve café Ærø 日本語のテキスト",
           "emoji 🤖🏳️\u200d🌈 and e\u0301 combining", "Ω≈ç√∫ ＡＢＣ fullwidth", "<|endoftext|>", "a<|endoftext|>b",
           "end. <|endoftext|> Start", "<|endoftext", "\r\n\r\n  \r\n", "123 4567 89.0 1,000,000", "'''\"\"\"",
           "\x00\x01\x7f controls", "x" * 5000, "word " * 300 + "\n" * 7, "\u2028line\u2029sep", "🤖" * 50]


@pytest.fixture(scope="module")
def gpt2_both():
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    pytest.importorskip("tiktoken")
    return gpt2_tokenizer(GPT2_VOCAB), gpt2_tiktoken(GPT2_VOCAB)


@pytest.mark.parametrize("library", ["gpt2_bpe", "tiktoken"])
def test_fast_tokenizers_give_the_tokenizers_ids_on_the_whole_corpus(gpt2_both, library, monkeypatch):
    """All 42 plays (5 MB) and awkward strings: our C tokenizer and the offline tiktoken Encoding, each as prepare
    calls it, must agree id for id with the tokenizers library."""
    import gpt2_bpe

    if library == "tiktoken":
        monkeypatch.setattr(gpt2_bpe, "available", lambda: False)  # what prepare does where no C compiler is
    elif not gpt2_bpe.available():
        pytest.skip("gpt2_bpe could not be built (no C compiler)")
    reference, _ = gpt2_both
    texts = [p.read_text() for p in sorted(PLAYS.glob("*_gut.txt"))] + AWKWARD
    assert len(texts) == 42 + len(AWKWARD)
    expected = [enc.ids for enc in reference.encode_batch(texts)]
    encode, used = tokenizer.gpt2_encoder(GPT2_VOCAB)  # what prepare uses: all the texts in one call
    assert used == library
    joined = encode([text.encode() for text in texts])  # prepare holds a document's text as UTF-8
    assert joined.tolist() == [i for n, ids in enumerate(expected) for i in ([50256] if n else []) + ids]
    got = tokenizer.document_ids(joined, [text.encode() for text in texts], 50256)  # back to each text's ids, "<|endoftext|>" inside texts or not
    for text, want, have in zip(texts, expected, got):
        assert have.tolist() == want, text[:80]
    assert got[-len(AWKWARD) + AWKWARD.index("a<|endoftext|>b")].tolist() == [64, 50256, 65]  # as today


def write_corpus(root, n_docs=240, seed=0):
    """Made-up documents of varied length as .jsonl; returns their texts in order."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "the", "king's", "fool", "and", "I", "shall", "not", "tarry", "café", "日本", "—", "\n"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 120)))) for _ in range(n_docs)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return texts


def gpt2_cfg(inputs, out, **overrides):
    return replace(PrepareConfig(inputs=tuple(inputs), out_dir=out, tokenizer="gpt2", gpt2_vocab_dir=GPT2_VOCAB,
                                 split="hash", val_fraction=0.2, progress=False), **overrides)


def all_tokens(out, split):
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["splits"][split]["shards"]])


def test_compressed_and_parquet_inputs_give_the_same_tokens(tmp_path):
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    zstandard, pq = pytest.importorskip("zstandard"), pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    texts = write_corpus(tmp_path / "plain")
    raw = (tmp_path / "plain" / "docs.jsonl").read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(len(texts))), "content": texts}), tmp_path / "pq" / "docs.parquet",
                   row_group_size=50)
    prepare(gpt2_cfg([tmp_path / "plain"], tmp_path / "o_plain"))
    prepare(gpt2_cfg([tmp_path / "gz"], tmp_path / "o_gz"))
    prepare(gpt2_cfg([str(tmp_path / "zst" / "*.jsonl.zst")], tmp_path / "o_zst"))  # a glob
    prepare(gpt2_cfg([tmp_path / "pq" / "docs.parquet"], tmp_path / "o_pq", text_field="content"))
    reference = gpt2_tokenizer(GPT2_VOCAB)
    for out in ("o_plain", "o_gz", "o_zst", "o_pq"):
        meta = json.loads((tmp_path / out / "meta.json").read_text())
        val = {i for i in range(len(texts)) if hash_says_val(1337, i, 0.2)}  # the rule, written out independently
        for split, keep in (("train", lambda i: i not in val), ("val", lambda i: i in val)):
            chosen = [t for i, t in enumerate(texts) if keep(i)]
            expected = []
            for k, enc in enumerate(reference.encode_batch(chosen)):
                expected += ([50256] if k else []) + enc.ids
            assert np.array_equal(all_tokens(tmp_path / out, split), expected), (out, split)
            assert meta["splits"][split]["bytes"] == sum(len(t.encode()) for t in chosen)
        assert meta["split"] == "hash" and "blake2b" in meta["split_rule"]


def hash_says_val(seed, index, fraction):
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") < fraction * 2**64


def test_the_hash_coins_are_the_recorded_rule_to_the_last_bit():
    """hash_fractions reads the digests as one uint64 array: the same float64 as int / 2**64, also for indices of
    many digits (the rule meta.json records, written out independently)."""
    for seed, first in ((1337, 0), (7, 10**9), (0, 2**40)):
        expected = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") / 2**64
                    for i in range(first, first + 3000)]
        assert hash_fractions(seed, first, 3000).tolist() == expected
    assert len(hash_fractions(1, 5, 0)) == 0


@pytest.mark.parametrize("workers,batch_documents,batch_bytes,shard_tokens,library",
                         [(1, 1, 1 << 20, 10**8, "fastest"), (3, 7, 1 << 20, 400, "fastest"),
                          (2, 64, 900, 1, "fastest"), (3, 7, 1 << 20, 400, "tiktoken"),
                          (2, 64, 900, 1, "tokenizers")])
def test_threads_chunks_and_shards_do_not_change_a_token(tmp_path, workers, batch_documents, batch_bytes,
                                                         shard_tokens, library):
    """Each split is its documents' ids — the tokenizers library's, one document at a time — joined by
    <|endoftext|> in corpus order, and a shard ends after the first document that fills it; whatever the
    threads, the chunk size, the shard size and the library (--gpt2-library), and for documents that hold
    "<|endoftext|>" themselves."""
    import gpt2_bpe

    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    if library == "tiktoken":
        pytest.importorskip("tiktoken")
    texts = write_corpus(tmp_path / "src", n_docs=200, seed=1)
    for i in (0, 5, 6, 77, 199):  # the first and last document too
        texts[i] = ["<|endoftext|>", "a<|endoftext|>b<|endoftext|>", texts[i] + " <|endoftext|>"][i % 3]
    (tmp_path / "src" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    meta = prepare(gpt2_cfg([tmp_path / "src"], out, workers=workers, batch_documents=batch_documents,
                            batch_bytes=batch_bytes, shard_tokens=shard_tokens, gpt2_library=library))
    has_tiktoken = importlib.util.find_spec("tiktoken") is not None
    fastest = "gpt2_bpe" if gpt2_bpe.available() else "tiktoken" if has_tiktoken else "tokenizers"
    assert meta["tokenizer"]["library"] == (fastest if library == "fastest" else library)  # the one asked for ran
    reference = gpt2_tokenizer(GPT2_VOCAB)
    for split, in_split in (("train", lambda i: not hash_says_val(1337, i, 0.2)),
                            ("val", lambda i: hash_says_val(1337, i, 0.2))):
        chosen = [enc.ids for i, enc in enumerate(reference.encode_batch(texts)) if in_split(i)]
        expected, shard_sizes, open_tokens = [], [], 0
        for k, ids in enumerate(chosen):
            expected += ([50256] if k else []) + ids
            open_tokens += len(ids) + (1 if k else 0)
            if open_tokens >= shard_tokens:  # the rule of --shard-tokens, written out here
                shard_sizes.append(open_tokens)
                open_tokens = 0
        shard_sizes += [open_tokens] if open_tokens else []
        assert all_tokens(out, split).tolist() == expected, split
        assert [shard["tokens"] for shard in meta["splits"][split]["shards"]] == shard_sizes, split
        assert meta["splits"][split]["documents"] == len(chosen)
        assert meta["splits"][split]["max_token_id"] == max(expected)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(), reason="Linux only")
def test_shard_bytes_are_handed_to_the_disk_as_they_are_written(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES a shard's new bytes get POSIX_FADV_DONTNEED (Linux starts writing them back without
    waiting), so a commit's fsync does not stall the pipeline for a whole shard's I/O: per shard, the advised ranges
    follow each other from byte 0 with no gap or overlap, each at least WRITEBACK_BYTES long, and end less than
    WRITEBACK_BYTES before the shard's end."""
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "src", n_docs=400, seed=2)
    advised, real_fadvise = {}, os.posix_fadvise

    def record(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED
        assert os.fstat(fd).st_size >= offset + length, "advised before the bytes left Python's buffer"
        advised.setdefault(Path(os.readlink(f"/proc/self/fd/{fd}")).name, []).append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(data, "WRITEBACK_BYTES", 1000)
    meta = prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", shard_tokens=3000, batch_documents=8))
    shards = [shard for info in meta["splits"].values() for shard in info["shards"]]
    assert len(shards) >= 4
    for shard in shards:
        size, start = 2 * shard["tokens"], 0
        for offset, length in advised.get(shard["file"], []):
            assert offset == start and length >= 1000, (shard["file"], advised[shard["file"]])
            start = offset + length
        assert size - start < 1000, (shard["file"], size, start)


def test_chunks_close_where_a_document_by_document_count_closes_them():
    """document_chunks cuts each batch of documents (any sizes) exactly where a chunk reaches max_documents or
    max_bytes counting one document at a time, or at the batch's end, and sorts each document into its split."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=12)
    texts = [b"x" * int(n) for n in rng.integers(1, 40, size=int(sizes.sum()))]
    firsts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    batches = [data.Batch(int(first), 0, 0, Path("f"), data.Texts.of(texts[first:first + size]),
                          np.arange(1, size + 1), 0)
               for first, size in zip(firsts, sizes)]
    batch_ends = set((firsts + sizes - 1).tolist())
    in_val = lambda first, count: np.arange(first, first + count) % 3 == 0
    for max_documents, max_bytes in ((5, 10_000), (1000, 60), (4, 50), (1, 1)):
        want, chunk, n_bytes = [], [], 0  # the rule, one document at a time
        for i, text in enumerate(texts):
            chunk.append(i)
            n_bytes += len(text)
            if len(chunk) >= max_documents or n_bytes >= max_bytes or i in batch_ends:
                want.append(chunk)
                chunk, n_bytes = [], 0
        got = list(data.document_chunks(iter(batches), in_val, max_documents, max_bytes))
        assert [[c.batch.first + j for j in range(c.start, c.stop)] for c in got] == want
        for c, indices in zip(got, want):
            assert list(c.texts["val"]) == [texts[i] for i in indices if i % 3 == 0]
            assert list(c.texts["train"]) == [texts[i] for i in indices if i % 3 != 0]
            assert list(data.chunk_names(c, "val")) == [f"f:{i - c.batch.first + 1}" for i in indices if i % 3 == 0]


REFUSED_FLAGS = [
    ({"batch_documents": 0}, "--batch-documents 0: must be at least 1"),  # chunks never closed: prepare spun forever
    ({"batch_bytes": 0}, "--batch-bytes 0: must be at least 1"),
    ({"shard_tokens": 0}, "--shard-tokens 0: must be at least 1"),
    ({"workers": -1}, "--workers -1: must be 0"),
    ({"split_seed": -1, "split": "permutation"}, "--split-seed -1: must be 0 or more"),  # numpy's traceback, before
    ({"val_fraction": float("nan"), "split": "permutation"}, "--val-fraction nan: must be between 0 and 1"),
    ({"val_fraction": 0.0}, "--val-fraction 0.0: must be"),  # the hash split found out after tokenizing everything
    ({"val_fraction": 1.0}, "--val-fraction 1.0: must be"),
    ({"val_fraction": 7.0, "split": "permutation"}, "--val-fraction 7.0: must be"),  # was clamped without a word
    ({"tokenizer": "bpe", "bpe_vocab_size": 70_000}, "--bpe-vocab-size 70000: must be 257"),  # was found after
    ({"tokenizer": "bpe", "bpe_vocab_size": -1}, "--bpe-vocab-size -1: must be 257"),      # training, then stuck
]


@pytest.mark.parametrize("overrides,message", REFUSED_FLAGS, ids=[m.split(":")[0] for _, m in REFUSED_FLAGS])
def test_a_flag_that_cannot_work_is_refused_before_anything_is_written(tmp_path, overrides, message):
    """Found in review: each of these hung, crashed with a traceback, ran with a silently changed meaning, or left a
    directory that the corrected command then refused."""
    write_corpus(tmp_path / "src", n_docs=20)
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--out-dir .*a_file: exists and is not a directory"):
        prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "a_file"))


def test_a_gpt2_library_that_cannot_run_here_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    import gpt2_bpe

    write_corpus(tmp_path / "src", n_docs=20)
    monkeypatch.setattr(gpt2_bpe, "available", lambda: False)  # as where no C compiler is
    monkeypatch.setitem(sys.modules, "tiktoken", None)         # as where tiktoken is not installed: import fails
    for library, message in (("gpt2_bpe", "--gpt2-library gpt2_bpe: the C library does not build here"),
                             ("tiktoken", "--gpt2-library tiktoken: needs the tiktoken package")):
        with pytest.raises(UserError, match=re.escape(message)):
            prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", gpt2_library=library))
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=re.escape("--gpt2-library tiktokn: must be one of fastest, gpt2_bpe")):
        prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out", gpt2_library="tiktokn"))  # made in code: no tyro check
    assert not (tmp_path / "out").exists()
    if GPT2_VOCAB.is_dir():  # "fastest" falls back to the tokenizers library, as before
        assert prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "out"))["tokenizer"]["library"] == "tokenizers"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_lines_longer_than_a_block_come_whole_and_in_order(tmp_path, monkeypatch, suffix):
    """Read in 64-byte blocks (one buffer, refilled and grown for a long line), lines of 1 to 5 blocks' length
    come back whole: every block ends at a newline, the blocks add up to the file, the texts are json.loads's; and
    once a long line has passed, blocks are back to 64 bytes (at most twice the longest line they hold)."""
    if suffix == ".jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
    monkeypatch.setattr(data_sources, "BLOCK_BYTES", 64)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "é" * int(n)}, ensure_ascii=False) for n in rng.integers(1, 160, size=300)]
    # ^ 15 to 330 bytes of UTF-8
    raw = "\n".join(lines).encode()  # no newline after the last line: it still comes
    compress = {".jsonl": bytes, ".jsonl.gz": gzip.compress,
                ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b)}[suffix]
    (tmp_path / f"docs{suffix}").write_bytes(compress(raw))
    with open(tmp_path / f"docs{suffix}", "rb") as f:
        blocks = [block[:n] for block, n, _ in data_sources._line_blocks(f, suffix)]  # copies: block is reused
    assert b"".join(blocks) == raw and all(block.endswith(b"\n") for block in blocks[:-1])
    assert all(len(block) <= max(64, 2 * max(map(len, block.split(b"\n")))) for block in blocks)
    texts = [text for batch in data_sources.file_batches(tmp_path / f"docs{suffix}") for text in batch.texts]
    assert texts == [json.loads(line)["text"].encode() for line in lines]


def test_a_very_repetitive_zst_comes_in_blocks(tmp_path):
    """Memory follows the block size, not the compression ratio: 12 MB of repeated lines compress to a few kB,
    which one decompress call would hand over whole (found in review: 1 GB of memory for 128 MB of such text)."""
    zstandard = pytest.importorskip("zstandard")
    raw = b'{"text": "the same line again"}\n' * (3 * data_sources.BLOCK_BYTES // 32)
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    with open(tmp_path / "docs.jsonl.zst", "rb") as f:
        blocks = [block[:n] for block, n, _ in data_sources._line_blocks(f, ".jsonl.zst")]
    assert b"".join(blocks) == raw and len(blocks) >= 3
    assert max(map(len, blocks)) <= data_sources.BLOCK_BYTES


def test_the_reader_keeps_a_bounded_number_of_chunks_in_flight():
    """Memory stays flat: however far the tokenizer threads lag, the reader reads at most
    CHUNKS_PER_WORKER · workers chunks ahead of the one being written."""
    read = []

    def chunks():
        for i in range(50):
            read.append(i)
            yield i

    def slow_encode(texts):
        time.sleep(0.002)
        return np.zeros(1, dtype=np.uint16)

    chunk_of = lambda i: data.Chunk(None, 0, 0, np.zeros(0, bool), {"train": [b"x" * (i + 1)], "val": []})
    for workers in (1, 3):
        read.clear()
        for i, (chunk, ids) in enumerate(data.encoded_chunks(map(chunk_of, chunks()), slow_encode, workers)):
            assert len(chunk.texts["train"][0]) == i + 1 and list(ids) == ["train"]  # in order
            assert len(read) - i <= data.CHUNKS_PER_WORKER * workers
        assert len(read) == 50


def watch_files(monkeypatch, hold: dict[str, threading.Event], done: dict[str, threading.Event],
                on_batch=lambda name, given: None) -> dict:
    """data.file_batches, watched: a file named in hold gives its batches after the first only once its event is
    set; a file named in done sets its event when its reading ends (error or not); on_batch(name, batches given so
    far) runs before each batch is given. Returns {name: batches given}."""
    real, given = data.file_batches, {}

    def file_batches(path, text_field):
        try:
            for i, batch in enumerate(real(path, text_field)):
                if path.name in hold and i > 0 and not hold[path.name].wait(10):
                    raise TimeoutError(f"{path.name}: waited 10 s for another file: the files are not read at once")
                given[path.name] = given.get(path.name, 0) + 1
                on_batch(path.name, given[path.name])
                yield batch
        finally:
            if path.name in done:
                done[path.name].set()
    monkeypatch.setattr(data, "file_batches", file_batches)
    return given


def three_files(src, bad_a: bool):
    """a.jsonl: 60 documents in many 256-byte blocks (then a bad line if bad_a); b.jsonl: bad on line 1; c.jsonl:
    60 documents too."""
    write_corpus(src, n_docs=60)
    (src / "docs.jsonl").rename(src / "a.jsonl")
    if bad_a:
        with open(src / "a.jsonl", "a") as f:
            f.write('{"text": \n')
    (src / "b.jsonl").write_text('{"txt": "no text field"}\n')
    write_corpus(src, n_docs=60, seed=1)
    (src / "docs.jsonl").rename(src / "c.jsonl")
    return sorted(src.iterdir())


def test_the_permutation_count_reads_files_at_once_and_names_the_first_bad_one(tmp_path, monkeypatch):
    """The permutation split counts every document before writing, with one thread per core (no tokenizing
    overlaps that pass). a.jsonl gives its second batch only once b.jsonl, bad on its first line, has failed: the
    files must be read at once (else a waits in vain), and of a (bad on its last line) and b, a's error is the one
    named, as a sequential read names it (a count that stopped at b's error would name b). c, after the failed b,
    stops at its first block instead of being read to its end."""
    monkeypatch.setattr(data_sources, "BLOCK_BYTES", 256)  # every file comes in many batches
    files = three_files(tmp_path / "src", bad_a=True)
    b_failed = threading.Event()
    given = watch_files(monkeypatch, hold={"a.jsonl": b_failed, "c.jsonl": b_failed}, done={"b.jsonl": b_failed})
    with pytest.raises(UserError, match=r"a\.jsonl:61: not JSON \(Expecting value"):
        data.count_documents(files, "text", workers=2)
    c_batches = sum(1 for _ in data_sources.file_batches(files[2], "text"))
    assert given.get("c.jsonl", 0) <= 1 < c_batches
    (files[0]).write_text(files[0].read_text().rsplit("\n", 2)[0] + "\n")  # a without its bad line
    files[1].write_text('{"text": "one"}\n\n{"text": "  "}\n{"text": "two"}\n')  # 2 documents
    assert data.count_documents(files, "text", workers=2) == 60 + 2 + 60


def test_ctrl_c_during_the_count_stops_every_file_at_its_next_block(tmp_path, monkeypatch):
    """Ctrl-C in the main thread while the count's threads read: each stops at its next block, not at its file's
    end (here each of 400 batches of a.jsonl takes 10 ms, and the interrupt comes at its 5th)."""
    monkeypatch.setattr(data_sources, "BLOCK_BYTES", 256)  # a line a batch: these lines are longer
    src = tmp_path / "src"
    write_corpus(src, n_docs=400)
    (src / "docs.jsonl").rename(src / "a.jsonl")
    (src / "b.jsonl").write_text('{"text": "one"}\n')

    def slowly(name: str, batches: int):
        if name == "a.jsonl" and batches == 5:
            os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread: KeyboardInterrupt there
        time.sleep(0.01)
    given = watch_files(monkeypatch, hold={}, done={}, on_batch=slowly)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an in-process train.py run sets its own
    started = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            data.count_documents(sorted(src.iterdir()), "text", workers=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sum(1 for _ in data_sources.file_batches(src / "a.jsonl", "text")) >= 300  # a line a batch, about
    assert given["a.jsonl"] <= 20 and time.time() - started < 1.0  # not 400 batches, 4 s


def test_warnings_come_once_and_in_file_order_with_the_permutation_split(tmp_path, monkeypatch):
    """The parallel count says no warning (b.jsonl's would come first: a.jsonl is held back until b is read);
    the pass that writes says each once, in file order. Where the count fails, or finds too few documents, the
    warnings still come, then the error, as from a sequential read."""
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    monkeypatch.setattr(data_sources, "BLOCK_BYTES", 256)
    src = tmp_path / "src"
    write_corpus(src, n_docs=40)
    (src / "docs.jsonl").rename(src / "a.jsonl")
    with open(src / "a.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8: skipped with a warning
    (src / "b.jsonl").write_bytes(b'{"text": "one"}\n{"text": "na\xefve"}\n{"text": "two"}\n')
    b_read = threading.Event()
    watch_files(monkeypatch, hold={"a.jsonl": b_read}, done={"b.jsonl": b_read})

    def said(cfg, error=None) -> list[str]:
        with pytest.warns(UserWarning) as caught:
            if error is None:
                prepare(cfg)
            else:
                with pytest.raises(UserError, match=error):
                    prepare(cfg)
        return [re.sub(r" \(.*", "", str(w.message)).rsplit("/", 1)[-1] for w in caught]
    cfg = gpt2_cfg([src], tmp_path / "out", split="permutation", workers=2)
    assert said(cfg) == ["a.jsonl:41: not UTF-8", "b.jsonl:2: not UTF-8"]
    (src / "c.jsonl").write_text('{"text": 1}\n')  # after the warnings: a bad file
    assert said(replace(cfg, out_dir=tmp_path / "out2"), r"c\.jsonl:1") == ["a.jsonl:41: not UTF-8",
                                                                          "b.jsonl:2: not UTF-8"]
    for name in ("b.jsonl", "c.jsonl"):
        (src / name).unlink()
    (src / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n')  # one document left
    assert said(replace(cfg, out_dir=tmp_path / "out3"), "needs at least 2") == ["a.jsonl:2: not UTF-8"]


def jsonl_and_empty_src(tmp_path) -> tuple[bytes, Path]:
    """400 made-up documents as .jsonl bytes, and an empty input directory to put them in (as the test likes)."""
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "plain", n_docs=400)
    (tmp_path / "src").mkdir()
    return (tmp_path / "plain" / "docs.jsonl").read_bytes(), tmp_path / "src"


@pytest.mark.parametrize("case", ["truncated_gz", "truncated_zst", "parquet_no_column", "bad_json", "no_package"])
def test_bad_inputs_name_the_file(tmp_path, case, monkeypatch):
    raw, src = jsonl_and_empty_src(tmp_path)
    if case == "truncated_gz":
        bad, expected = src / "docs.jsonl.gz", r"docs.jsonl.gz: truncated or corrupt"
        bad.write_bytes(gzip.compress(raw)[:-200])
    elif case == "truncated_zst":
        zstandard = pytest.importorskip("zstandard")
        bad, expected = src / "docs.jsonl.zst", r"docs.jsonl.zst: truncated or corrupt"
        bad.write_bytes(zstandard.ZstdCompressor().compress(raw)[:-200])
    elif case == "parquet_no_column":
        pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
        bad, expected = src / "docs.parquet", r"docs.parquet: no column \"text\" \(columns: body\) — pass --text-field"
        pq.write_table(pa.table({"body": ["a", "b"]}), bad)
    elif case == "bad_json":
        bad, expected = src / "docs.jsonl", r"docs.jsonl:3: not JSON \(Expecting value\) — stopped before anything was done"
        bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    else:
        import builtins

        real_import = builtins.__import__
        monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                            if name == "zstandard" else real_import(name, *a, **k))
        bad, expected = src / "docs.jsonl.zst", r"docs.jsonl.zst: reading .jsonl.zst files needs the zstandard package"
        bad.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=expected):
        prepare(gpt2_cfg([src], out, shard_tokens=500, batch_documents=16))
    if case in ("truncated_gz", "truncated_zst"):  # stopped in the only file: kept is what came before it, nothing
        state = json.loads((out / data.STATE_FILE).read_text())
        assert state["resume"] is None and not list(out.glob("*.bin"))
    elif case != "bad_json":
        assert not out.exists()  # found before anything was written


def test_a_file_mended_after_prepare_stopped_in_it_continues_and_gives_a_fresh_runs_bytes(tmp_path):
    """Found in review: prepare stopped in a truncated .gz kept its completed shards, but the re-downloaded file
    (another size) made the re-run refuse, so they were lost anyway. Now what came before the file is kept, shards
    closed within it are dropped, and the re-run with the mended file goes on: its bytes are a fresh run's, and
    the shards before the file are not written again."""
    raw, src = jsonl_and_empty_src(tmp_path)
    (src / "a.jsonl").write_bytes(raw)
    (src / "b.jsonl.gz").write_bytes(gzip.compress(raw)[:-200])  # cut short: as a download that stopped
    cfg = gpt2_cfg([src], tmp_path / "out", shard_tokens=3000, batch_documents=16)
    with pytest.raises(UserError, match=r"b.jsonl.gz: truncated or corrupt .* what came before .*b.jsonl.gz is kept "
                                        r"\(\d+ completed shards\): mend or replace it and run the same command"):
        prepare(cfg)
    state = json.loads((tmp_path / "out" / data.STATE_FILE).read_text())
    assert state["resume"]["file"] == 0 and state["splits"]["train"]["shards"]
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.bin")}
    named = {s["file"] for split in state["splits"].values() for s in split["shards"]}
    assert named <= kept.keys() and len(kept) <= len(named) + 2  # + the open shard of each split at most

    (src / "b.jsonl.gz").write_bytes(gzip.compress(raw))  # mended: another size
    prepare(cfg)
    fresh = prepare(replace(cfg, out_dir=tmp_path / "fresh"))
    outs = [sorted(p.name for p in d.iterdir() if p.suffix == ".bin") for d in (tmp_path / "out", tmp_path / "fresh")]
    assert outs[0] == outs[1]
    for name in outs[0]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"] == fresh["splits"]
    for name in named:  # done before b.jsonl.gz, not again
        assert (tmp_path / "out" / name).stat().st_mtime_ns == kept[name], name

    # a file before the point reached must not change: its documents are in the shards
    (tmp_path / "out" / "meta.json").unlink()
    state["args"]["inputs"][1][1] += 1  # as if stopped in b again: a.jsonl is before it
    (tmp_path / "out" / data.STATE_FILE).write_text(json.dumps(dict(state, finished=False)))
    (src / "a.jsonl").write_bytes(raw + b'{"text": "one more"}\n')
    with pytest.raises(UserError, match=r"prepared from other --inputs \(.*a.jsonl: \d+ bytes then"):
        prepare(cfg)


def test_a_token_id_changed_where_the_fingerprint_did_not_look_is_one_line(tmp_path):
    # under --data.verify size (or fingerprint, which samples ~1 MB of a file) a changed token reaches the batch;
    # the batch names its shard and place instead of an IndexError in the embedding
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "src", n_docs=300)
    prepare(gpt2_cfg([tmp_path / "src"], tmp_path / "many", shard_tokens=700))
    shards = json.loads((tmp_path / "many" / "meta.json").read_text())["splits"]["train"]["shards"]
    third = tmp_path / "many" / shards[2]["file"]
    tokens = np.fromfile(third, dtype=np.uint16)
    tokens[123] = 60000  # past GPT-2's 50257 ids
    tokens.tofile(third)
    split = TokenSplit(tmp_path / "many", "train", 16, 50257, verify="size")
    before = shards[0]["tokens"] + shards[1]["tokens"]
    split.windows(np.array([0, before + 124]))  # windows that miss it read as before
    with pytest.raises(UserError) as refused:
        split.windows(np.array([0, before + 110]))
    assert str(refused.value).startswith(f"{third}: token id 60000 at token 123 >= --model.vocab-size 50257 — ")


def test_a_bad_token_only_the_never_trained_batch_reads_does_not_stop_the_run(tiny_data, tmp_path):
    # the loop fetches each micro-batch one call early, but not past its last step: no step trains on that batch
    import shutil

    from configs import DataConfig
    from conftest import tiny_run
    from train import train

    shutil.copytree(tiny_data, tmp_path / "data")
    cfg = tiny_run(tmp_path / "data", tmp_path / "run", max_steps=4,
                   data=DataConfig(dir=tmp_path / "data", verify="size"))
    split = TokenSplit(tmp_path / "data", "train", 32, 512, verify="size")

    def read_by(step):  # token positions of the step's global batch: data.py's order, 8 windows of 33 tokens
        starts = split.sample_starts(cfg.seed, step * cfg.global_batch_size, cfg.global_batch_size)
        return set((starts[:, None] + np.arange(33)).ravel().tolist())

    only_after = sorted(read_by(4) - set().union(*(read_by(step) for step in range(4))))
    tokens = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    tokens[only_after[0]] = 600  # past the 512-token vocabulary
    tokens.tofile(tmp_path / "data" / "train.bin")
    assert train(cfg)["step"] == 4


def test_shards_read_as_one_stream_with_todays_batch_order(tmp_path):
    """Many small shards give the same token stream, windows and batch order as one file — today's order,
    written out here independently of data.py, sample by sample."""
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "src", n_docs=300)
    one, many = tmp_path / "one", tmp_path / "many"
    prepare(gpt2_cfg([tmp_path / "src"], one))
    prepare(gpt2_cfg([tmp_path / "src"], many, shard_tokens=700))
    shards = json.loads((many / "meta.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) > 5 and (one / "train.bin").is_file()
    assert np.array_equal(all_tokens(many, "train"), np.fromfile(one / "train.bin", dtype=np.uint16))
    a, b = TokenSplit(one, "train", 16, 50257), TokenSplit(many, "train", 16, 50257)
    tokens = np.fromfile(one / "train.bin", dtype=np.uint16)
    for first, count in ((0, 40), (b.n_windows - 7, 30), (3 * b.n_windows + 5, 9)):  # epoch boundaries included
        starts = todays_sample_starts(len(tokens), 16, seed=5, first=first, count=count)
        assert np.array_equal(a.sample_starts(5, first, count), starts)
        assert np.array_equal(b.sample_starts(5, first, count), starts)
        xa, ya = a.windows(starts)
        xb, yb = b.windows(starts)
        expected = np.stack([tokens[s:s + 17] for s in starts]).astype(np.int64)
        assert np.array_equal(xb.numpy(), expected[:, :-1]) and np.array_equal(yb.numpy(), expected[:, 1:])
        assert np.array_equal(xa.numpy(), xb.numpy())
    assert np.array_equal(b.tokens[5:2000], tokens[5:2000]) and len(b.tokens) == len(tokens)


def todays_sample_starts(n_tokens, block_size, seed, first, count):
    """The batch order of data.py before shards (its docstring's rule), one sample at a time."""
    n_windows = (n_tokens - 1) // block_size
    slack = min(n_tokens - 1 - n_windows * block_size, block_size - 1)
    starts = []
    for j in range(first, first + count):
        epoch, position = divmod(j, n_windows)
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(0, slack + 1))
        starts.append(offset + rng.permutation(n_windows)[position] * block_size)
    return np.array(starts)


def test_format_1_data_still_loads(tiny_data, tmp_path):
    """A train.bin / val.bin + meta.json from before shards (format 1: no shard list, no max id, no fingerprint)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_data, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["format"] = 1
    for info in meta["splits"].values():
        assert info.pop("shards")[0]["sha256"] == info["sha256"]  # a one-shard split keeps format 1's sha256
        del info["max_token_id"]
    (old / "meta.json").write_text(json.dumps(meta))
    a, b = TokenSplit(old, "train", 32, 512), TokenSplit(tiny_data, "train", 32, 512)
    assert np.array_equal(a.sample_starts(3, 0, 50), b.sample_starts(3, 0, 50))
    tokens = np.fromfile(old / "val.bin", dtype=np.uint16)
    tokens[0] = (tokens[0] + 1) % 512
    tokens.tofile(old / "val.bin")
    with pytest.raises(UserError, match="val.bin: sha256 differs"):  # format 1's default check: the full sha256
        TokenSplit(old, "val", 32, 512)


def test_start_up_reads_about_a_megabyte_per_file_not_the_file(tiny_data, monkeypatch):
    """The default check neither hashes whole files nor scans their token ids; --data.verify full does both."""
    calls = []
    monkeypatch.setattr(data, "sha256_file", lambda path: calls.append(("sha256", path)) or "x")
    monkeypatch.setattr(data, "max_token_id", lambda tokens: calls.append(("max", len(tokens))) or 0)
    TokenSplit(tiny_data, "train", 32, 512)
    assert calls == []
    with pytest.raises(UserError, match="sha256 differs"):
        TokenSplit(tiny_data, "train", 32, 512, verify="full")
    assert calls and calls[0][0] == "sha256"


def test_different_arguments_into_the_same_directory_are_refused(tmp_path):
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "src", n_docs=50)
    cfg = gpt2_cfg([tmp_path / "src"], tmp_path / "out")
    prepare(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(UserError, match=r"meta.json: prepared with --val-fraction 0.2, not 0.3"):
        prepare(replace(cfg, val_fraction=0.3))
    with pytest.raises(UserError, match=r"meta.json: prepared with --split hash, not permutation"):
        prepare(replace(cfg, split="permutation"))
    assert prepare(replace(cfg, workers=1, batch_documents=3)) == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # nothing touched


def run_prepare_cli(args, kill_at_shard=None, rng=None):
    """data.py prepare in a child process; with kill_at_shard, kill -9 it soon after its state file lists that many
    completed shards (a random few milliseconds later). True if it ran to the end."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), "prepare", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    state_path = Path(args[args.index("--out-dir") + 1]) / data.STATE_FILE
    while kill_at_shard is not None and proc.poll() is None:
        try:
            state = json.loads(state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {"splits": {}}
        if sum(len(s["shards"]) for s in state["splits"].values()) >= kill_at_shard:
            time.sleep(float(rng.uniform(0, 0.03)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return False
        time.sleep(0.002)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return True


def test_kill_9_at_random_points_then_resume_gives_the_same_bytes(tmp_path):
    """A prepare killed (SIGKILL) at random moments and re-run finishes with exactly the bytes of an uninterrupted
    run, and never rewrites a shard an earlier run had completed."""
    if not GPT2_VOCAB.is_dir():
        pytest.skip("GPT-2 vocabulary missing: run `make setup`")
    write_corpus(tmp_path / "src", n_docs=3000, seed=3)
    out = tmp_path / "killed"
    args = ["--inputs", str(tmp_path / "src"), "--out-dir", str(out), "--tokenizer", "gpt2",
            "--gpt2-vocab-dir", str(GPT2_VOCAB), "--split", "hash", "--val-fraction", "0.1",
            "--shard-tokens", "1500", "--batch-documents", "8", "--no-progress"]
    reference = tmp_path / "reference"
    ref_meta = prepare(gpt2_cfg([tmp_path / "src"], reference, val_fraction=0.1, shard_tokens=1500))
    n_shards = sum(len(info["shards"]) for info in ref_meta["splits"].values())
    rng, kept, kills = np.random.default_rng(0), {}, 0
    for target in sorted(rng.integers(1, n_shards, size=3)):
        if run_prepare_cli(args, kill_at_shard=int(target), rng=rng):
            break
        kills += 1
        state = json.loads((out / data.STATE_FILE).read_text())
        for split in state["splits"].values():
            for shard in split["shards"]:
                kept.setdefault(shard["file"], (out / shard["file"]).stat().st_mtime_ns)
    run_prepare_cli(args)
    assert kills >= 2 and kept, "the kills did not land mid-preparation"
    for name in sorted(p.name for p in reference.iterdir()):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not (out / data.STATE_FILE).exists()


def test_rank_0_checks_the_data_and_the_other_ranks_stop_on_its_verdict(tiny_data, tmp_path):
    """2 ranks under torchrun, a val.bin changed after prepare: both exit (no rank left waiting at a collective),
    and the one message names the file; only rank 0 read it for the fingerprint."""
    import shutil

    from conftest import tiny_run
    from test_train import cli_args, torchrun

    bad = tmp_path / "data"
    shutil.copytree(tiny_data, bad)
    tokens = np.fromfile(bad / "val.bin", dtype=np.uint16)
    tokens[-1] = (tokens[-1] + 1) % 512
    tokens.tofile(bad / "val.bin")
    proc = torchrun("train.py", *cli_args(tiny_run(bad, tmp_path / "run")), timeout=120)
    assert proc.returncode != 0
    assert "val.bin: fingerprint differs from meta.json" in proc.stderr
    # rank 1 heard the verdict rather than checking for itself, and on rank 0's node leaves the saying to it
    assert proc.stderr.count("gust: error:") == 1 and "rejected the data" not in proc.stderr
