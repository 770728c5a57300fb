"""prepare's two hot loops in C, compiled with the system's C compiler and called through ctypes (no GIL held):

  * gpt2_bpe.c: GPT-2's tokenizer — the same ids as tiktoken and the tokenizers library (tested on all 42 plays,
    a synthetic web-like corpus and a set of awkward strings), several times faster per core here;
  * jsonl_text.c: the text field of each line of a JSONL block, decoded to UTF-8 — json.loads's result for the
    lines it is sure of (tested against json.loads), the rest handed back to Python.
For: `data.py prepare` (data_sources.py reads JSONL with jsonl_texts). Optional: where no C compiler is found or the
build fails, `available()` is False and prepare uses tiktoken and json.loads. Not for: trained BPE vocabularies or
decoding. `python -m gpt2_bpe` builds it (make setup does).
"""
import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

SOURCES = [Path(__file__).resolve().with_name(name) for name in ("gpt2_bpe.c", "jsonl_text.c")]
BUILD_DIR = SOURCES[0].parent / "build"  # gitignored; one library per (source, flags) hash
FLAGS = ["-O2", "-std=c11", "-shared", "-fPIC", "-Wall", "-Werror"]
N_CODEPOINTS = 0x110000
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3  # as gpt2_bpe.c numbers them
TEXT, BLANK, ASK_PYTHON = 0, 1, 2  # a JSONL line's status, as jsonl_text.c numbers them
OUT_ROUNDING = 1 << 20  # encode_spans's output buffer, in ids: rounded up to this, so its few sizes are reused
# \s as tiktoken's regex engine (Rust's regex crate) reads it: Unicode's White_Space property
WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000]


def library_path() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:16]
    return BUILD_DIR / f"libgust_gpt2_bpe_{digest}.so"


def build() -> Path:
    """Compiles the C sources unless this source's library exists; raises RuntimeError naming what failed."""
    path, compiler = library_path(), shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if path.exists():
        return path
    if compiler is None:
        raise RuntimeError("gpt2_bpe: no C compiler (cc or gcc) on PATH")
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles; the others (parallel tests, ranks) wait, then find it
        if not path.exists():
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            result = subprocess.run([compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"gpt2_bpe: {compiler} failed on {' '.join(p.name for p in SOURCES)}: "
                                   + " | ".join(result.stderr.strip().splitlines()[-8:]))
            partial.replace(path)  # atomic: no process loads a half-written library
    return path


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None with one warning line where it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build()))  # CDLL, not PyDLL: calls release the GIL, so threads encode in parallel
    except (RuntimeError, OSError) as error:
        print(f"warning: {error} — using tiktoken for GPT-2's tokenizer instead", file=sys.stderr)
        return None
    lib.gpt2_bpe_new.restype = ctypes.c_void_p
    lib.gpt2_bpe_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32]
    lib.gpt2_bpe_encode_spans.restype = ctypes.c_int64
    lib.gpt2_bpe_encode_spans.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_void_p] * 2, ctypes.c_int64,
                                          ctypes.c_void_p]  # the texts' buffer: bytes or an array's address
    lib.gpt2_bpe_free.argtypes = [ctypes.c_void_p]
    lib.jsonl_texts.restype = ctypes.c_int64
    lib.jsonl_texts.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int64,
                                *[ctypes.c_void_p] * 4, ctypes.c_int64]
    return lib


def available() -> bool:
    return library() is not None


@lru_cache(maxsize=1)
def codepoint_classes() -> bytes:
    """(N_CODEPOINTS,) class of each code point: \\p{L}, \\p{N}, \\s or other, from Python's unicodedata.

    Planes 4 and up hold no letters or digits (unassigned, tags, private use), so only planes 0-3 are looked up.
    Code points assigned after Python's Unicode version (unicodedata.unidata_version) read as other; tiktoken's
    regex engine may know them as letters, and there alone the ids could differ.
    """
    classes = np.zeros(N_CODEPOINTS, dtype=np.uint8)
    for cp in range(0x40000):
        category = unicodedata.category(chr(cp))[0]
        classes[cp] = LETTER if category == "L" else NUMBER if category == "N" else OTHER
    classes[WHITE_SPACE] = SPACE
    return classes.tobytes()


class Encoder:
    """GPT-2 ids of a text, "<|endoftext|>" in it included (as tiktoken's allowed_special): one per thread.

    ranks maps each token's bytes to its id (ids 0..n-1, all present: GPT-2's vocab.json less <|endoftext|>).
    """

    def __init__(self, ranks: dict[bytes, int], eot_id: int):
        by_id = sorted(ranks.items(), key=lambda item: item[1])
        if [rank for _, rank in by_id] != list(range(len(by_id))):
            raise ValueError("gpt2_bpe: token ids must be 0..n-1 with none missing")
        offsets = np.cumsum([0] + [len(token) for token, _ in by_id], dtype=np.uint32)
        self._lib = library()
        self._handle = self._lib.gpt2_bpe_new(b"".join(token for token, _ in by_id), offsets.ctypes.data,
                                              len(by_id), codepoint_classes(), eot_id)
        if not self._handle:
            raise MemoryError("gpt2_bpe: out of memory making an encoder")

    def encode(self, text: str) -> np.ndarray:
        """(n_ids,) uint16."""
        try:
            utf8 = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (from JSON "\ud800"): U+FFFD for each, as tiktoken does
            utf8 = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        return self.encode_utf8(utf8)

    def encode_utf8(self, utf8: bytes | np.ndarray) -> np.ndarray:
        """(n_ids,) uint16 ids of a text given as valid UTF-8 (bytes or a uint8 array): one span, all of it."""
        return self.encode_spans(utf8, np.zeros(1, dtype=np.int64), np.array([len(utf8)], dtype=np.int64))

    def encode_spans(self, buffer: bytes | np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """(n_ids,) uint16: the texts buffer[starts[i]:ends[i]] (valid UTF-8 each; buffer bytes or a uint8 array)
        encoded with <|endoftext|> between them — what encode_utf8 gives for the texts joined by "<|endoftext|>",
        without that copy of them."""
        starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends))
        if isinstance(buffer, np.ndarray) and buffer.dtype != np.uint8:
            raise ValueError(f"gpt2_bpe: a texts buffer must hold bytes (uint8), not {buffer.dtype}")
        held = np.ascontiguousarray(buffer) if isinstance(buffer, np.ndarray) else buffer
        pointer = held.ctypes.data if isinstance(held, np.ndarray) else held  # held: alive through the call
        if len(starts) and (starts.min() < 0 or (ends < starts).any() or ends.max() > len(held)):
            raise ValueError("gpt2_bpe: spans outside their buffer")  # the C would read past it
        most = int((ends - starts).sum()) + len(starts)  # ids: at most one a byte, and the separators
        out = np.empty(-(-max(most, 1) // OUT_ROUNDING) * OUT_ROUNDING, dtype=np.uint16)  # few sizes: reused
        count = self._lib.gpt2_bpe_encode_spans(self._handle, pointer, starts.ctypes.data, ends.ctypes.data,
                                                len(starts), out.ctypes.data)
        if count < 0:
            raise MemoryError("gpt2_bpe: out of memory while encoding")
        return out[:count].copy()  # copy: don't keep a buffer the size of the text per chunk

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.gpt2_bpe_free(self._handle)


def thread_local_encoder(ranks: dict[bytes, int], eot_id: int):
    """this_thread() -> the calling thread's own Encoder, made on its first call (an Encoder's piece cache is not
    shared between threads)."""
    local = threading.local()

    def this_thread() -> Encoder:
        if not hasattr(local, "encoder"):
            local.encoder = Encoder(ranks, eot_id)
        return local.encoder
    return this_thread


_scratch = threading.local()  # jsonl_texts's line arrays


def jsonl_texts(block: bytes | bytearray, n: int, field: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                         np.ndarray]:
    """(status, line_ends, text_ends, texts) of the lines of a JSONL block's first n bytes, as jsonl_text.c describes:
    line i is block[line_ends[i - 1]:line_ends[i]] and, where status[i] is TEXT, its field's text (UTF-8) is
    texts[text_ends[i - 1]:text_ends[i]] (an offset before the first line is 0). The arrays: (n_lines,) each; texts
    a uint8 array of its own, written once by the C and never copied (it becomes the block's Texts buffer)."""
    max_lines = n + 1  # room for the most lines there could be: costs no memory until written (np.empty is lazy)
    if getattr(_scratch, "size", -1) < n:  # one set of line arrays per thread, reused: no page faults per block
        _scratch.size = n
        _scratch.arrays = [np.empty(max_lines, dtype=t) for t in (np.int8, np.int64, np.int64)]
    status, line_ends, text_ends = _scratch.arrays
    # the whole block's size, not n: one size for every block, so malloc hands out a freed one's memory again
    # (no page faults anew) and the heap does not fragment as the corpus goes by
    out = np.empty(max(len(block), 1), dtype=np.uint8)
    if isinstance(block, bytearray):  # data_sources's reused block: passed without a copy
        block = (ctypes.c_char * len(block)).from_buffer(block)
    n_lines = library().jsonl_texts(block, n, field, len(field), out.ctypes.data, status.ctypes.data,
                                    line_ends.ctypes.data, text_ends.ctypes.data, max_lines)
    text_bytes = int(text_ends[n_lines - 1]) if n_lines else 0
    # the line arrays copied (the next call overwrites them); out handed over as it is, a new array every call
    return status[:n_lines].copy(), line_ends[:n_lines].copy(), text_ends[:n_lines].copy(), out[:text_bytes]
