"""How fast `data.py prepare` and the start of training are on this machine (issue 14's numbers); not a test.

  python bench_data.py --parts corpus --size-mb 2048        # write the synthetic corpus once, into .cache/bench_data/
  python bench_data.py --parts prepare --size-mb 2048       # data.py prepare on it: MB/s, tokens/s, peak RSS
  python bench_data.py --parts encode --size-mb 2048        # each raw encode API, all cores: the fastest is the ceiling
  python bench_data.py --parts old --size-mb 256 --old-data-py /tmp/old/data.py   # an earlier data.py, same corpus
  python bench_data.py --parts startup --startup-gb 4       # python train.py → first step on a 4 GB train.bin
  python bench_data.py --parts pairs --size-mb 512 --encode-sample-mb 512 --pairs 5   # prepare and the ceiling
                                                          # alternated, on the same text: the median ratio
  python bench_data.py --parts bound --size-mb 512 --encode-sample-mb 512 --pairs 4   # the same for an ideal
                                                          # pipeline (no per-document Python): the most here
  python bench_data.py --parts pairs --size-mb 512 --encode-sample-mb 512 --pairs 3 --gpt2-library tiktoken
                                                          # prepare and the ceiling, both encoding with tiktoken
  python bench_data.py --parts count --size-mb 2048 --pairs 4   # the permutation split's count, 1 thread / all cores
  python bench_data.py --parts costs --size-mb 512   # each step's CPU-ms per MB of text, apart, in one thread

Each part prints its numbers and appends them, with the machine, to .cache/bench_data/results.jsonl. Parts are
separate so that each measurement fits a short exclusive hold of the machine (`/work/wt/cpu bench ...`).
Not in here: anything the tests rely on.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from configs import GPT2_LIBRARIES

ROOT = Path(__file__).resolve().parent
BENCH_DIR = ROOT / ".cache" / "bench_data"
PLAYS = ROOT / ".cache" / "shakespeare"
GPT2_VOCAB = ROOT / ".cache" / "gpt2"
FILE_MB = 128  # the corpus is written as .jsonl files of about this size, like a sharded dump


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # > cores: other work shared the machine


def corpus_dir(size_mb: int) -> Path:
    return BENCH_DIR / f"corpus-{size_mb}MB"


def write_corpus(size_mb: int) -> Path:
    """Documents of lognormal length (median ~2.5 kB, like web text) cut from the plays at random places."""
    out = corpus_dir(size_mb)
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    pool = "\n".join(p.read_text() for p in sorted(PLAYS.glob("*_gut.txt")))
    rng, written, file_index = np.random.default_rng(0), 0, 0
    while written < size_mb << 20:
        with open(out / f"part-{file_index:04d}.jsonl", "w") as f:
            file_bytes = 0
            while file_bytes < FILE_MB << 20 and written + file_bytes < size_mb << 20:
                length = int(min(rng.lognormal(np.log(2500), 1.0), 200_000))
                start = int(rng.integers(0, len(pool) - length))
                line = json.dumps({"text": pool[start:start + length]}) + "\n"
                f.write(line)
                file_bytes += len(line)
        written += file_bytes
        file_index += 1
    (out / ".complete").touch()
    return out


# Runs the measured script in this same child process and writes its VmHWM (peak resident memory) at exit.
# Not wait4's ru_maxrss: on Linux that also counts the memory this parent had when it forked the child.
PEAK_WRAPPER = """import atexit, os, runpy, sys
peak_file, script = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(peak_file, "w").write(
    next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))))
sys.argv, sys.path[0] = sys.argv[2:], os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
"""


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds: user + system, all threads) of `python script args...`.
    CPU seconds hardly change when other jobs share the machine; wall seconds do."""
    peak_file = BENCH_DIR / "peak-rss-kb.txt"
    peak_file.unlink(missing_ok=True)
    started = time.time()
    proc = subprocess.Popen([cmd[0], "-c", PEAK_WRAPPER, str(peak_file), *cmd[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit status {proc.returncode}\n{stdout[-2000:]}")
    return time.time() - started, int(peak_file.read_text()) / 1024, usage.ru_utime + usage.ru_stime


def corpus_stats(corpus: Path) -> int:
    return sum(p.stat().st_size for p in corpus.glob("*.jsonl"))


def bench_prepare(size_mb: int, data_py: Path, label: str, extra: list[str]) -> dict:
    corpus, out = corpus_dir(size_mb), BENCH_DIR / f"out-{label}-{size_mb}MB"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, str(data_py), "prepare", "--inputs", str(corpus), "--out-dir", str(out),
           "--tokenizer", "gpt2", "--gpt2-vocab-dir", str(GPT2_VOCAB), *extra]
    seconds, peak_mb, cpu_seconds = run_measured(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    meta = json.loads((out / "meta.json").read_text())
    text_bytes = sum(info["bytes"] for info in meta["splits"].values())
    tokens = sum(info["tokens"] for info in meta["splits"].values())
    subprocess.run(["rm", "-rf", str(out)], check=True)  # tokens of a synthetic corpus: not worth the disk
    return {"part": label, "size_mb": size_mb, "seconds": round(seconds, 1),
            "text_MB_per_s": round(text_bytes / seconds / 1e6, 2),
            "file_MB_per_s": round(corpus_stats(corpus) / seconds / 1e6, 2), "tokens_per_s": round(tokens / seconds),
            "peak_rss_mb": round(peak_mb), "tokens": tokens, "text_bytes": text_bytes,
            "cpu_seconds": round(cpu_seconds, 1), "text_MB_per_cpu_s": round(text_bytes / cpu_seconds / 1e6, 2)}


def sample_texts(size_mb: int, sample_mb: int) -> list[bytes]:
    texts, total = [], 0
    for path in sorted(corpus_dir(size_mb).glob("*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                texts.append(json.loads(line)["text"].encode())  # as prepare holds a text: UTF-8
                total += len(texts[-1])
                if total >= sample_mb << 20:
                    return texts
    return texts


def prepare_chunks(texts: list[bytes]) -> list[list[bytes]]:
    """The texts cut by prepare's rule for its tokenizer threads (--batch-documents, --batch-bytes); prepare also
    cuts at each 4 MB block's end, these chunks run on across it."""
    from configs import PrepareConfig

    max_documents, max_bytes = PrepareConfig().batch_documents, PrepareConfig().batch_bytes
    chunks, chunk, n_bytes = [], [], 0
    for text in texts:
        chunk.append(text)
        n_bytes += len(text)
        if len(chunk) >= max_documents or n_bytes >= max_bytes:
            chunks.append(chunk)
            chunk, n_bytes = [], 0
    return chunks + [chunk] if chunk else chunks


def as_texts(chunks: list[list[bytes]]) -> list:
    """The chunks as prepare holds a chunk for gpt2_bpe: a Texts, its documents spans of one buffer."""
    from tokenizer import Texts

    return [Texts.of(chunk) for chunk in chunks]


def as_str(chunks: list[list[bytes]]) -> list[list[str]]:
    """The chunks' texts as str: the libraries' input (gpt2_bpe takes UTF-8, as prepare holds it)."""
    return [[text.decode() for text in chunk] for chunk in chunks]


def utf8_bytes(chunks: list[list[bytes]]) -> int:
    """UTF-8 bytes of the texts in chunks: the MB every rate here is counted in."""
    return sum(len(text) for chunk in chunks for text in chunk)


def raw_encoders(cores: int) -> dict:
    """Every way to run GPT-2's tokenizers on all cores: name -> encode(chunks) -> number of ids (separators not
    counted). The fastest of them is the ceiling prepare is compared with. gpt2_bpe's take the texts as UTF-8 (as
    prepare holds them), the libraries' as str (their API)."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    import tokenizer

    enc, pool, special = tokenizer.gpt2_tiktoken(GPT2_VOCAB), ThreadPoolExecutor(max_workers=cores), {tokenizer.EOT}
    prepares_encode, library = tokenizer.gpt2_encoder(GPT2_VOCAB)
    tok = tokenizer.gpt2_tokenizer(GPT2_VOCAB)

    def joined(encode, chunks):  # prepare's call: a chunk's texts in one call, one chunk per thread
        return sum(len(ids) - (len(chunk) - 1) for ids, chunk in zip(pool.map(encode, chunks), chunks))

    def gpt2_bpe_joined(chunks):  # our C tokenizer, as prepare calls it (chunks of Texts: spans of one buffer)
        return joined(prepares_encode, chunks)

    def tiktoken_joined_numpy(chunks):  # tiktoken, as prepare calls it where gpt2_bpe cannot be built
        return joined(lambda texts: enc.encode_to_numpy(tokenizer.EOT.join(texts), allowed_special=special), chunks)

    def tiktoken_numpy_per_document(chunks):  # one call per document, the ids as a buffer
        texts = [text for chunk in chunks for text in chunk]
        return sum(len(ids) for ids in pool.map(partial(enc.encode_to_numpy, allowed_special=special), texts))

    def tiktoken_encode_batch(chunks):  # tiktoken's own threads; the ids as Python lists
        return sum(len(ids) for chunk in chunks
                   for ids in enc.encode_batch(chunk, num_threads=cores, allowed_special=special))

    def tiktoken_encode_ordinary_batch(chunks):  # the same without the special-token check
        return sum(len(ids) for chunk in chunks for ids in enc.encode_ordinary_batch(chunk, num_threads=cores))

    def tokenizers_encode_batch(chunks):  # the tokenizers library's Rust threads
        return sum(len(encoding.ids) for chunk in chunks for encoding in tok.encode_batch(chunk))

    encoders = (gpt2_bpe_joined,) if library == "gpt2_bpe" else ()
    return {f.__name__: f for f in (*encoders, tiktoken_joined_numpy, tiktoken_numpy_per_document,
                                    tiktoken_encode_batch, tiktoken_encode_ordinary_batch, tokenizers_encode_batch)}


def bench_encode(size_mb: int, sample_mb: int) -> dict:
    """Each raw encode with all cores on the corpus's first sample_mb, the texts already in memory; the fastest
    (MB/s) is the ceiling for prepare on this machine. The slow tokenizers library runs on a quarter of it."""
    sys.path.insert(0, str(ROOT))
    cores = os.cpu_count()
    chunks = prepare_chunks(sample_texts(size_mb, sample_mb))
    result = {"part": "encode", "sample_MB": round(utf8_bytes(chunks) / 1e6, 1),
              "cores": cores}
    str_chunks, texts_chunks = as_str(chunks), as_texts(chunks)
    for name, encode in raw_encoders(cores).items():
        use = texts_chunks if name.startswith("gpt2_bpe") else str_chunks
        use = use if not name.startswith("tokenizers") else use[:max(1, len(use) // 4)]
        use_bytes = utf8_bytes(chunks[:len(use)])
        started, cpu_before = time.time(), cpu_seconds_so_far()
        tokens = encode(use)
        seconds, cpu_seconds = time.time() - started, cpu_seconds_so_far() - cpu_before
        result[f"{name}_MB_per_s"] = round(use_bytes / seconds / 1e6, 2)
        result[f"{name}_MB_per_cpu_s"] = round(use_bytes / cpu_seconds / 1e6, 2)
        result[f"{name}_tokens_per_s"] = round(tokens / seconds)
    rates = {name[:-len("_MB_per_s")]: rate for name, rate in result.items() if name.endswith("_MB_per_s")}
    result["ceiling"] = max(rates, key=rates.get)
    result["ceiling_MB_per_s"] = rates[result["ceiling"]]
    result["ceiling_MB_per_cpu_s"] = result[f"{result['ceiling']}_MB_per_cpu_s"]
    return result


def bench_pairs(size_mb: int, sample_mb: int, pairs: int, extra: list[str], ceiling_kind: str,
                against: str = "prepare", library: str = "fastest") -> dict:
    """prepare (against "prepare") or the ideal pipeline (against "bound") and the ceiling's encode (prepare's
    tokenizer, a chunk per call, all cores) alternated `pairs` times, in turn first: on a machine whose speed
    drifts within minutes (this KVM guest: the same raw encode measured 11–23 MB/s in one afternoon), one sequential
    pair is mostly noise; the median of adjacent pairs' ratios is the number to read.

    ceiling_kind "fresh": each ceiling call starts as prepare does, with new encoders (vocab.json read, empty piece
    caches) — with --encode-sample-mb at least the corpus size, both then encode the same text from the same start.
    "warm": the encoders of the first call are kept, so later calls re-encode a text their piece caches have seen
    (the method of the README's tables before 2026-12-04). library: prepare's --gpt2-library, for both."""
    import statistics

    sys.path.insert(0, str(ROOT))
    import tokenizer

    chunks = prepare_chunks(sample_texts(size_mb, sample_mb))
    sample_bytes, chunks = utf8_bytes(chunks), as_texts(chunks)  # as prepare holds them, whatever its tokenizer
    warm_encode, used = tokenizer.gpt2_encoder(GPT2_VOCAB, library=library)  # made once: its caches stay warm
    if against == "bound":
        need_gpt2_bpe("bound")

    from concurrent.futures import ThreadPoolExecutor

    warm_pool = ThreadPoolExecutor(max_workers=os.cpu_count())  # warm: the same threads, so the same encoders

    def encode_all(encode, pool) -> None:  # prepare's calls, a chunk per call, on all cores
        for _ in pool.map(encode, chunks):
            pass

    def ceiling() -> tuple[float, float]:
        started, cpu_before = time.time(), cpu_seconds_so_far()
        if ceiling_kind == "fresh":  # new encoders and threads, as prepare starts
            with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
                encode_all(tokenizer.gpt2_encoder(GPT2_VOCAB, library=library)[0], pool)
        else:  # the first call's encoders again, their piece caches filled
            encode_all(warm_encode, warm_pool)
        return sample_bytes / (time.time() - started) / 1e6, sample_bytes / (cpu_seconds_so_far() - cpu_before) / 1e6

    def candidate() -> tuple[float, float]:
        if against == "bound":
            return ideal_pipeline(size_mb)
        result = bench_prepare(size_mb, ROOT / "data.py", "prepare", [*extra, "--gpt2-library", library])
        return result["text_MB_per_s"], result["text_MB_per_cpu_s"]

    candidate_rates, ceiling_rates = [], []  # (MB/s, MB per CPU-s) each
    for i in range(pairs):
        for step in ((candidate, ceiling) if i % 2 == 0 else (ceiling, candidate)):
            rates = tuple(round(rate, 2) for rate in step())
            (candidate_rates if step is candidate else ceiling_rates).append(rates)
        (mine, mine_cpu), (encode, encode_cpu) = candidate_rates[-1], ceiling_rates[-1]
        print(f"pair {i + 1}: {against} {mine} MB/s ({mine_cpu} per CPU-s), encode {encode} MB/s ({encode_cpu} "
              f"per CPU-s): {mine / encode:.0%} ({mine_cpu / encode_cpu:.0%} per CPU-s)", flush=True)
    ratios = [p[0] / c[0] for p, c in zip(candidate_rates, ceiling_rates)]
    cpu_ratios = [p[1] / c[1] for p, c in zip(candidate_rates, ceiling_rates)]
    return {"part": "pairs" if against == "prepare" else "bound", "size_mb": size_mb, "library": used,
            "sample_MB": round(sample_bytes / 1e6, 1), "pairs": pairs, "ceiling": ceiling_kind,
            f"{against}_MB_per_s": [p[0] for p in candidate_rates], "encode_MB_per_s": [c[0] for c in ceiling_rates],
            f"{against}_MB_per_cpu_s": [p[1] for p in candidate_rates],
            "encode_MB_per_cpu_s": [c[1] for c in ceiling_rates],
            "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3),
            "cpu_ratios": [round(r, 3) for r in cpu_ratios], "median_cpu_ratio": round(statistics.median(cpu_ratios), 3)}


def need_gpt2_bpe(part: str):
    import gpt2_bpe

    if not gpt2_bpe.available():
        sys.exit(f"--parts {part}: needs gpt2_bpe (the C library: `python -m gpt2_bpe` says why it does not build)")


def corpus_blocks(size_mb: int):
    """(path, block, n) of the corpus's .jsonl files, block[:n] whole lines: prepare's reader, one reused buffer."""
    from data_sources import _line_blocks

    for path in sorted(write_corpus(size_mb).glob("*.jsonl")):  # written first if it is not there yet
        with open(path, "rb") as f:
            for block, n, _ in _line_blocks(f, ".jsonl"):
                yield path, block, n


def ideal_pipeline(size_mb: int) -> tuple[float, float]:
    """(MB/s, MB per CPU-s) of text through the least a pipeline of prepare's shape must do on this machine: this
    thread reads the corpus's .jsonl files 4 MB at a time and hashes (sha256) and writes the ids (handing them to the
    disk as it goes, as prepare's shards do: start_writeback); the tokenizer threads, one per core, decode a block's
    JSON (gpt2_bpe's C scan) and encode all its texts as one call. Nothing per document in Python, no split, no
    resume points: its ids are no valid output (texts run together), only its cost counts. Against the ceiling it
    bounds what reworking prepare's Python could reach here."""
    import hashlib
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import gpt2_bpe
    import tokenizer
    from data import CHUNKS_PER_WORKER, start_writeback

    started, cpu_before = time.time(), cpu_seconds_so_far()
    this_thread = gpt2_bpe.thread_local_encoder(tokenizer.gpt2_ranks(GPT2_VOCAB), 50256)

    def decode_and_encode(block: bytes) -> tuple[np.ndarray, int]:
        texts = gpt2_bpe.jsonl_texts(block, len(block), b"text")[3]  # every line's text, back to back
        return this_thread().encode_utf8(texts), len(texts)  # all of it as one text

    text_bytes, hasher, in_flight, written_back = 0, hashlib.sha256(), deque(), 0
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool, open(BENCH_DIR / "ideal.bin", "wb") as out:
        def write_oldest():
            nonlocal text_bytes, written_back
            ids, n_text = in_flight.popleft().result()
            hasher.update(ids)
            out.write(ids)
            written_back = start_writeback(out, written_back)  # as prepare's shards: the disk writes as we go
            text_bytes += n_text
        for _, block, n in corpus_blocks(size_mb):
            in_flight.append(pool.submit(decode_and_encode, bytes(block[:n])))  # a copy for the thread
            if len(in_flight) >= CHUNKS_PER_WORKER * os.cpu_count():  # as many in flight as prepare keeps
                write_oldest()
        while in_flight:
            write_oldest()
        out.flush()
        os.fsync(out.fileno())
    (BENCH_DIR / "ideal.bin").unlink()
    return text_bytes / (time.time() - started) / 1e6, text_bytes / (cpu_seconds_so_far() - cpu_before) / 1e6


def bench_costs(size_mb: int) -> dict:
    """CPU-ms per MB of text of each step prepare takes, measured apart in this one thread, a ~4 MB block of JSONL
    at a time: read it, decode its texts (the C scan, into spans of one buffer as prepare holds them), encode them
    (all the block's documents in one call, prepare's call for a chunk), sha256 and write the ids (handed to the
    disk as they go). Beside the encoding, the rest is what a 2-core pipeline whose cores both tokenize has no
    spare core to hide. Not in it: prepare's per-block Python (the split, the chunk cuts, the bookkeeping)."""
    import hashlib

    import gpt2_bpe
    import tokenizer
    from data import start_writeback
    from data_sources import _block_texts

    need_gpt2_bpe("costs")
    encoder, hasher = gpt2_bpe.Encoder(tokenizer.gpt2_ranks(GPT2_VOCAB), 50256), hashlib.sha256()
    cpu = dict.fromkeys(("read", "json", "encode", "sha256", "write"), 0.0)  # step -> CPU seconds
    clock, text_bytes, written_back = [time.thread_time()], 0, 0

    def lap(step: str):  # this thread's CPU since the last lap goes to step
        now = time.thread_time()
        cpu[step] += now - clock[0]
        clock[0] = now

    with open(BENCH_DIR / "costs.bin", "wb") as out:
        for path, block, n in corpus_blocks(size_mb):
            lap("read")
            texts = _block_texts(path, 0, block, n, "text")[0]
            lap("json")
            ids = encoder.encode_spans(texts.buffer, texts.starts, texts.ends)
            lap("encode")
            hasher.update(ids)
            lap("sha256")
            out.write(ids)
            written_back = start_writeback(out, written_back)
            lap("write")
            text_bytes += texts.n_bytes()
        out.flush()
        os.fsync(out.fileno())
        lap("write")
    (BENCH_DIR / "costs.bin").unlink()
    per_mb = {f"{step}_cpu_ms_per_MB": round(seconds * 1e3 / (text_bytes / 1e6), 3) for step, seconds in cpu.items()}
    rest = sum(value for key, value in per_mb.items() if not key.startswith("encode"))
    return {"part": "costs", "size_mb": size_mb, "text_MB": round(text_bytes / 1e6, 1), **per_mb,
            "rest_over_encode": round(rest / per_mb["encode_cpu_ms_per_MB"], 3)}


def bench_versus(size_mb: int, pairs: int, extra: list[str], old_data_py: Path | None) -> dict:
    """Today's prepare alternated `pairs` times with an earlier data.py's (old_data_py: a copy of it, which imports
    today's other modules) or, without one, with the ideal pipeline (part bound's): the median of adjacent pairs'
    MB/s ratios, the figure to read on a machine whose speed drifts."""
    import statistics

    def mine() -> float:
        return bench_prepare(size_mb, ROOT / "data.py", "prepare", extra)["text_MB_per_s"]

    def theirs() -> float:
        if old_data_py is not None:
            return bench_prepare(size_mb, old_data_py, "old", extra)["text_MB_per_s"]
        return ideal_pipeline(size_mb)[0]

    against = str(old_data_py) if old_data_py is not None else "bound"
    rates = {mine: [], theirs: []}
    for i in range(pairs):
        for step in ((mine, theirs) if i % 2 == 0 else (theirs, mine)):
            rates[step].append(round(step(), 2))
        print(f"pair {i + 1}: prepare {rates[mine][-1]} MB/s, {against} {rates[theirs][-1]} MB/s: "
              f"{rates[mine][-1] / rates[theirs][-1]:.3f}", flush=True)
    ratios = [m / t for m, t in zip(rates[mine], rates[theirs])]
    return {"part": "versus", "size_mb": size_mb, "against": against, "pairs": pairs,
            "prepare_MB_per_s": rates[mine], "against_MB_per_s": rates[theirs],
            "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3)}


def bench_count(size_mb: int, pairs: int) -> dict:
    """The permutation split's counting pass (data.count_documents) with one thread and with one per core,
    alternated `pairs` times: the seconds each took."""
    import statistics

    sys.path.insert(0, str(ROOT))
    import data
    import data_sources

    files, cores = data_sources.corpus_files([corpus_dir(size_mb)]), data.usable_cores()
    if cores < 2:
        sys.exit("--parts count: one usable core, nothing to compare")
    seconds = {1: [], cores: []}
    for i in range(pairs):
        for workers in ((1, cores) if i % 2 == 0 else (cores, 1)):
            started = time.time()
            data.count_documents(files, "text", workers)
            seconds[workers].append(round(time.time() - started, 2))
        print(f"pair {i + 1}: 1 thread {seconds[1][-1]} s, {cores} threads {seconds[cores][-1]} s", flush=True)
    return {"part": "count", "size_mb": size_mb, "files": len(files), "pairs": pairs,
            "one_thread_s": seconds[1], "all_cores_s": seconds[cores],
            "median_speedup": round(statistics.median(a / b for a, b in zip(seconds[1], seconds[cores])), 2)}


def cpu_seconds_so_far() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def write_big_split(directory: Path, gigabytes: float):
    """A train.bin of random GPT-2 ids (written once) and a small val.bin, with a format-2 meta.json."""
    sys.path.insert(0, str(ROOT))
    import data

    directory.mkdir(parents=True, exist_ok=True)
    rng, chunk = np.random.default_rng(0), 1 << 26
    n_tokens = int(gigabytes * 2**30) // 2
    if not (directory / "meta.json").is_file():
        for split, count in (("train", n_tokens), ("val", 1 << 20)):
            with open(directory / f"{split}.bin", "wb") as f:
                for first in range(0, count, chunk):
                    rng.integers(0, 50257, size=min(chunk, count - first), dtype=np.uint16).tofile(f)
        splits = {}
        for split in ("train", "val"):
            path = directory / f"{split}.bin"
            tokens = path.stat().st_size // 2
            shard = {"file": path.name, "tokens": tokens, "sha256": data.sha256_file(path),
                     "fingerprint": data.fingerprint(path)}
            splits[split] = {"documents": 1, "tokens": tokens, "bytes": 3 * tokens, "max_token_id": 50256,
                             "shards": [shard]}
        meta = {"format": data.META_FORMAT, "dtype": "uint16", "vocab_size": 50257, "eot_id": 50256,
                "tokenizer": {"kind": "gpt2", "vocab_dir": str(GPT2_VOCAB)}, "splits": splits}
        data.write_json_atomic(directory / "meta.json", meta)


def time_to_first_step(data_dir: Path, verify: str) -> float:
    """Seconds from starting `python train.py` to its first metrics row (step 1 done), a tiny model."""
    run_dir = BENCH_DIR / f"run-startup-{verify}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "gpt2-small", "--data.dir", str(data_dir), "--data.verify", verify,
           "--model.n-layer", "1", "--model.n-head", "1", "--model.n-embd", "32", "--model.block-size", "64",
           "--model.dropout", "0", "--global-batch-size", "1", "--micro-batch-size", "1", "--precision", "fp32",
           "--max-steps", "5", "--log-interval", "1", "--eval-interval", "1000", "--diag-interval", "0",
           "--checkpoint.schedule", "none", "--wandb-mode", "disabled", "--device", "cpu", "--out-dir", str(run_dir)]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.is_file() and any(json.loads(line)["step"] >= 1 for line in metrics.read_text().splitlines()):
            seconds = time.time() - started
            proc.kill()
            proc.wait()
            return seconds
        time.sleep(0.02)
    sys.exit(f"train.py exited before its first step:\n{proc.stderr.read().decode()[-2000:]}")


def bench_startup(gigabytes: float) -> dict:
    directory = BENCH_DIR / f"tokens-{gigabytes:g}GB"
    write_big_split(directory, gigabytes)
    result = {"part": "startup", "train_bin_GB": round((directory / "train.bin").stat().st_size / 1e9, 2)}
    sys.path.insert(0, str(ROOT))
    from data import TokenSplit

    for verify in ("fingerprint", "full"):  # the data check alone, in this process: wall and CPU seconds
        started, cpu_before = time.time(), cpu_seconds_so_far()
        TokenSplit(directory, "train", 1024, 50304, verify)
        result[f"open_train_s_{verify}"] = round(time.time() - started, 2)
        result[f"open_train_cpu_s_{verify}"] = round(cpu_seconds_so_far() - cpu_before, 2)
    for verify in ("fingerprint", "full"):
        result[f"first_step_s_{verify}"] = round(time_to_first_step(directory, verify), 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="corpus,prepare,encode",
                        help="comma-separated: corpus,prepare,encode,old,startup,pairs,bound,versus,count,costs")
    parser.add_argument("--size-mb", type=int, default=2048, help="synthetic corpus size (MiB of jsonl)")
    parser.add_argument("--encode-sample-mb", type=int, default=128, help="text the raw encode rate is measured on")
    parser.add_argument("--old-data-py", type=Path, default=None,
                        help="an earlier data.py to compare (parts old, versus)")
    parser.add_argument("--startup-gb", type=float, default=4.0, help="size of the synthetic train.bin (part startup)")
    parser.add_argument("--pairs", type=int, default=5,
                        help="pairs alternated: (prepare or the ideal pipeline, encode) in parts pairs, bound; "
                             "(prepare, the old data.py or the ideal pipeline) in part versus; "
                             "(1 thread, all cores) in part count")
    parser.add_argument("--ceiling", choices=["fresh", "warm"], default="fresh",
                        help="part pairs: each ceiling call from new encoders (as prepare starts) or the first's")
    parser.add_argument("--gpt2-library", default="fastest", choices=GPT2_LIBRARIES,
                        help="part pairs: the library both prepare and the ceiling encode with")
    parser.add_argument("--prepare-args", default="--split hash --no-progress", help="extra args for data.py prepare")
    return parser


def main():
    args = build_parser().parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}")
    results = {}
    for part in args.parts.split(","):
        if part == "corpus":
            started = time.time()
            corpus = write_corpus(args.size_mb)
            result = {"part": "corpus", "size_mb": args.size_mb, "bytes": corpus_stats(corpus),
                      "seconds": round(time.time() - started, 1)}
        elif part == "prepare":
            result = bench_prepare(args.size_mb, ROOT / "data.py", "prepare", args.prepare_args.split())
        elif part == "old":
            result = bench_prepare(args.size_mb, args.old_data_py, "old", [])
        elif part == "encode":
            result = bench_encode(args.size_mb, args.encode_sample_mb)
        elif part == "startup":
            result = bench_startup(args.startup_gb)
        elif part == "pairs":
            result = bench_pairs(args.size_mb, args.encode_sample_mb, args.pairs, args.prepare_args.split(),
                                 args.ceiling, library=args.gpt2_library)
        elif part == "bound":
            result = bench_pairs(args.size_mb, args.encode_sample_mb, args.pairs, [], args.ceiling, "bound")
        elif part == "versus":
            result = bench_versus(args.size_mb, args.pairs, args.prepare_args.split(), args.old_data_py)
        elif part == "count":
            result = bench_count(args.size_mb, args.pairs)
        elif part == "costs":
            result = bench_costs(args.size_mb)
        else:
            sys.exit(f"--parts: unknown part {part!r}")
        print(json.dumps(result))
        with open(BENCH_DIR / "results.jsonl", "a") as f:
            f.write(json.dumps(dict(result, machine=info, time=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
        results[part] = result
    if "prepare" in results and "encode" in results:
        print(compare_with_ceiling(results["prepare"], results["encode"]))
    if "prepare" in results and "old" in results:
        old, new = results["old"], results["prepare"]
        print(f"prepare vs the old data.py: {new['text_MB_per_s'] / old['text_MB_per_s']:.2f}x the MB/s, "
              f"{new['text_MB_per_cpu_s'] / old['text_MB_per_cpu_s']:.2f}x the MB per CPU-second")


def compare_with_ceiling(prepare: dict, encode: dict) -> str:
    """One line: prepare's rate as a share of the ceiling's, and both in CPU-seconds per MB of text."""
    share = prepare["text_MB_per_s"] / encode["ceiling_MB_per_s"]
    return (f"prepare: {prepare['text_MB_per_s']} MB/s = {share:.0%} of the fastest raw encode "
            f"({encode['ceiling']}, {encode['ceiling_MB_per_s']} MB/s); CPU-s per MB of text: prepare "
            f"{1 / prepare['text_MB_per_cpu_s']:.4f}, that encode {1 / encode['ceiling_MB_per_cpu_s']:.4f}")


if __name__ == "__main__":
    main()
