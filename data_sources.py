"""Reading a text corpus as a stream of documents, for `data.py prepare` (and eval.py's --text).

Inputs: .txt (one document), .jsonl / .jsonl.gz / .jsonl.zst (one document per line, its --text-field), .parquet
(one document per row of the text column), and directories or globs of them. Documents come in a fixed order —
files sorted by path, then line or row — so the split and the token files are reproducible. A document's text comes
as a span of a block's UTF-8 buffer (a tokenizer.Texts; UTF-8 is what the tokenizer reads); JSONL is read in blocks
of lines whose texts gpt2_bpe's C extracts (json.loads, per line, only for the lines it leaves to Python, or where
it could not be built).
Not in here: tokenizing, splitting, writing (data.py). Kept apart from data.py so that file stays readable.
"""
import glob
import json
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import UserError
from tokenizer import Texts

SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")
PACKAGES = {".jsonl.zst": "zstandard", ".parquet": "pyarrow"}  # optional readers: `make setup` installs both
BLOCK_BYTES = 4 << 20  # JSONL is read this much at a time (.gz: what one inflate gives), cut after the last newline


def suffix_of(path: Path) -> str | None:
    """The input format of a file from its name (".jsonl.gz", ...), or None for a file prepare does not read."""
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def corpus_files(inputs, text_field: str = "text") -> list[Path]:
    """Every file under `inputs`, in document order. Bad paths, a file named twice, missing reader packages and
    Parquet files without the text column fail here, before any work."""
    if not inputs:
        raise UserError("--inputs: no file, directory or glob given")
    files = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files += _files_under(path)
        elif path.is_file():
            files.append(path)  # named explicitly: read as plain text unless the name says otherwise
        elif glob.has_magic(str(spec)):
            matched = sorted(Path(p) for p in glob.glob(str(spec), recursive=True))
            # a directory matched is searched, as the shell's expansion of the same pattern would be; a file that
            # `**` matches both itself and under its directory counts once
            found = sorted({f for p in matched for f in (_files_under(p) if p.is_dir() else [p]) if suffix_of(f)})
            if not found:
                raise UserError(f"{spec}: the pattern matches no {'/'.join(SUFFIXES)} file")
            files += found
        else:
            raise UserError(f"{path}: input not found")
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} files in {', '.join(map(str, inputs))}")
    _refuse_repeats(files)
    for suffix, package in PACKAGES.items():
        needing = next((p for p in files if suffix_of(p) == suffix), None)
        if needing is not None:
            _require(package, needing)
    for path in files:
        if suffix_of(path) == ".parquet":
            _open_parquet(path, text_field)  # reads only the footer
    return files


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and suffix_of(p))


def _refuse_repeats(files: list[Path]):
    """A file named twice (or a directory and a file in it) would be read twice: its copies would land in train
    and in val."""
    first_name = {}
    for path in files:
        real = path.resolve()
        if real in first_name:
            spellings = "" if str(first_name[real]) == str(path) else f" (as {first_name[real]} and as {path})"
            raise UserError(f"--inputs: {path} is named twice{spellings} — its documents would be read twice, and "
                            "could land in train and in val")
        first_name[real] = path


def _require(package: str, path: Path):
    try:
        __import__(package)
    except ImportError:
        raise UserError(f"{path}: reading {suffix_of(path)} files needs the {package} package — "
                        f"`pip install {package}` (or `make setup`)") from None


class TextBatch(NamedTuple):
    """Consecutive non-empty documents of one file: what the readers give, a block of lines (or rows) at a time."""
    texts: Texts         # each document's text, UTF-8
    places: np.ndarray   # (n,) int64: each one's line (.jsonl) or row (.parquet), from 1; 0 for a .txt file
    bytes_read: int      # the file's own bytes read so far (the compressed ones, where compressed)


def document_name(path: Path, place: int) -> str:
    """A document's name in warnings and meta.json: path:line, path:row, or the path of a .txt file."""
    return f"{path}:{place}" if place else str(path)


def file_batches(path: Path, text_field: str = "text"):
    """The TextBatches of one file, in order."""
    suffix = suffix_of(path)
    if suffix == ".parquet":
        yield from _parquet_batches(path, text_field)
    elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from _jsonl_batches(path, text_field, suffix)
    else:
        yield from _txt_batch(path)


def file_documents(path: Path, text_field: str = "text"):
    """(name, UTF-8 text) for each non-empty document of one file."""
    for batch in file_batches(path, text_field):
        yield from ((document_name(path, place), text) for text, place in zip(batch.texts, batch.places))


def _txt_batch(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")  # text mode, as before: \r\n becomes \n; a BOM is no text
    except UnicodeDecodeError as err:
        at = err.start + (3 if path.open("rb").read(3) == b"\xef\xbb\xbf" else 0)  # counted after the BOM
        warnings.warn(f"{path}: not UTF-8 ({err.reason} at byte {at}), skipped")
        return
    if has_text(text):
        yield TextBatch(Texts.of([text.encode("utf-8")]), np.zeros(1, dtype=np.int64), path.stat().st_size)
    else:
        warnings.warn(f"{path}: empty, skipped")


def _line_blocks(raw, suffix: str):
    """(block, n, bytes of the file read so far) for the decompressed bytes of an open file: block[:n] is whole
    lines (the file's last may lack its newline). block is one bytearray, refilled for every block: a reader copies
    what it keeps (jsonl_texts copies the texts out). Not a new 4 MB bytes object per block, allocated, faulted in
    and copied again with the line cut off the last one: reading, the C scan and slicing of a plain file cost 1.46
    CPU-ms per MB so against 1.61 (medians of 7 alternated runs, 2026-12-06)."""
    if suffix == ".jsonl.gz":
        import gzip

        stream = gzip.GzipFile(fileobj=raw)
        chunks = iter(lambda: stream.read1(BLOCK_BYTES), b"")  # read1: a truncated file keeps what came before
    else:
        chunks = _zstd_chunks(raw) if suffix == ".jsonl.zst" else None  # None: plain, read straight into block
    block, have = bytearray(BLOCK_BYTES), 0  # block[:have]: read, not yet handed on (a line's start, at most)
    while True:
        if chunks is None:
            if have == len(block):  # a line longer than the block: make room for its end
                block.extend(bytes(len(block)))
            with memoryview(block) as view:
                got = raw.readinto(view[have:])
        else:
            chunk = next(chunks, b"")
            got = len(chunk)
            block[have:have + got] = chunk  # grows block where the chunk does not fit
        if not got:
            break
        have += got
        cut = block.rfind(b"\n", have - got, have) + 1  # block[:have - got] holds no newline: not searched again
        if cut:  # else a line longer than what was read: wait for its end
            yield block, cut, raw.tell()  # tell() once a block: it costs a system call
            block[:have - cut] = block[cut:have]  # the unfinished line moves to the front
            have -= cut
            if len(block) > max(BLOCK_BYTES, 2 * have):  # grown for a long line that has passed: blocks of
                del block[max(BLOCK_BYTES, 2 * have):]      # BLOCK_BYTES again (or room for the line begun)
    if have:
        yield block, have, raw.tell()


ZSTD_READ_BYTES = 1 << 16  # compressed bytes per decompress call: its output is this times the compression ratio


def _zstd_chunks(raw):
    """Decompressed bytes of a .zst file, frame after frame, in pieces of at most BLOCK_BYTES; raises EOFError if the
    last frame is cut short (zstandard's stream reader would end silently there, and its decompressobj has no
    output limit: so it is fed little at a time, and what a very repetitive piece gives is handed on in blocks)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, fed = dctx.decompressobj(), False
    while chunk := raw.read(ZSTD_READ_BYTES):
        while chunk:
            fed = True
            out = frame.decompress(chunk)
            for start in range(0, len(out), BLOCK_BYTES):
                yield out[start:start + BLOCK_BYTES]  # the whole of out, uncopied, when it is one block
            chunk = b""
            if frame.eof:  # dumps are often many frames concatenated
                chunk, frame, fed = frame.unused_data, dctx.decompressobj(), False
    if fed:
        raise EOFError("the last zstd frame ends early")


def has_text(text: str) -> bool:
    """Whether text holds anything but whitespace (what `text.strip()` tells, without copying the text)."""
    return bool(text) and not text.isspace()


def _jsonl_batches(path: Path, text_field: str, suffix: str):
    empty, line_no = True, 0
    with open(path, "rb") as raw:
        try:
            for block, n, bytes_read in _line_blocks(raw, suffix):  # bytes_read: compressed ones, where compressed
                texts, places, n_lines = _block_texts(path, line_no, block, n, text_field)
                line_no += n_lines
                if texts:
                    empty = False
                    yield TextBatch(texts, places, bytes_read)
        except (EOFError, OSError, zlib.error) as err:  # truncated .gz / .zst, or not compressed at all
            raise UserError(f"{path}: truncated or corrupt ({err})") from None
        except Exception as err:
            if type(err).__name__ != "ZstdError":  # zstandard's own error type, without importing it here
                raise
            raise UserError(f"{path}: truncated or corrupt ({err})") from None
    if empty:
        warnings.warn(f"{path}: no non-empty documents, skipped")


def _block_texts(path: Path, line_no: int, block: bytes, n: int, text_field: str):
    """(texts, their line numbers, the number of lines) of the non-empty documents among block[:n]'s lines;
    line_no: the lines before the block."""
    import gpt2_bpe

    if not gpt2_bpe.available():
        lines = block[:n].split(b"\n")
        if lines[-1] == b"":  # the block's last newline ends a line, it does not start one
            lines.pop()
        return *_kept([_jsonl_text(path, line_no + 1 + i, line, text_field) for i, line in enumerate(lines)],
                      line_no), len(lines)
    status, line_ends, text_ends, out = gpt2_bpe.jsonl_texts(block, n, text_field.encode("utf-8"))
    if not (status == gpt2_bpe.ASK_PYTHON).any():  # the common case: every line decided in C, no Python per line
        kept = np.flatnonzero(status == gpt2_bpe.TEXT)
        text_starts = np.concatenate(([0], text_ends[:-1]))  # where the line before ends (only TEXT lines add)
        return Texts(out, text_starts[kept], text_ends[kept]), line_no + 1 + kept, len(status)
    line_ends, text_ends = line_ends.tolist(), text_ends.tolist()
    line_starts, text_starts, texts = [0] + line_ends[:-1], [0] + text_ends[:-1], []
    for i, line_status in enumerate(status.tolist()):
        if line_status == gpt2_bpe.TEXT:
            texts.append(out[text_starts[i]:text_ends[i]])
        elif line_status == gpt2_bpe.BLANK:
            texts.append(None)
        else:  # the C left it to json.loads: anything unusual, errors included
            texts.append(_jsonl_text(path, line_no + 1 + i, block[line_starts[i]:line_ends[i]], text_field))
    return *_kept(texts, line_no), len(status)


def _kept(texts: list[bytes | np.ndarray | None], line_no: int) -> tuple[Texts, np.ndarray]:
    """(the texts that are not None, their line numbers): texts[i] is line line_no + 1 + i's, None for none."""
    kept = [i for i, text in enumerate(texts) if text is not None]
    return Texts.of([texts[i] for i in kept]), line_no + 1 + np.array(kept, dtype=np.int64)


def _jsonl_text(path: Path, line_no: int, line: bytes, text_field: str) -> bytes | None:
    if not line or line.isspace():  # not line.strip(): that copies every line
        return None
    try:  # decoded here, as json.loads(bytes) would (a BOM dropped, surrogates kept), but never guessed as UTF-16/32
        line = line.decode("utf-8-sig", "surrogatepass")
    except UnicodeDecodeError as err:
        warnings.warn(f"{path}:{line_no}: not UTF-8 ({err.reason} at byte {err.start}), skipped")
        return None
    try:
        value = json.loads(line)[text_field]
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{line_no}: not JSON ({err.msg})") from None
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{path}:{line_no}: not a JSON object with a \"{text_field}\" field"
                        + (" (data.py prepare reads another with --text-field)" if text_field == "text" else "")) from None
    except (ValueError, RecursionError) as err:  # an int of over 4,300 digits; nesting deeper than Python's stack
        raise UserError(f"{path}:{line_no}: JSON that Python cannot read ({type(err).__name__}: "
                        f"{str(err)[:100]})") from None
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_no}: \"{text_field}\" holds a {type(value).__name__}, not text")
    if not has_text(value):
        return None
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped ("\ud800") or UTF-8-encoded, both decode in json.loads
        warnings.warn(f"{path}:{line_no}: text holds an unpaired surrogate (not Unicode text), skipped")
        return None


def _parquet_batches(path: Path, text_field: str):
    import pyarrow

    table = _open_parquet(path, text_field)
    size, rows_total, row, empty = path.stat().st_size, max(table.metadata.num_rows, 1), 0, True
    try:
        for batch in table.iter_batches(batch_size=1024, columns=[text_field]):  # bounded memory per read
            texts, places = [], []
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str) and has_text(text):
                    texts.append(text.encode("utf-8"))
                    places.append(row)
                elif text is not None and not isinstance(text, str):
                    raise UserError(f"{path}: column \"{text_field}\" holds {type(text).__name__}, not text")
            if texts:
                empty = False
                yield TextBatch(Texts.of(texts), np.array(places, dtype=np.int64), size * row // rows_total)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: truncated or corrupt at row {row + 1} ({err})") from None
    if empty:  # as an empty .txt or .jsonl is
        warnings.warn(f"{path}: no non-empty documents in column \"{text_field}\", skipped")


def _open_parquet(path: Path, text_field: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    names = table.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column \"{text_field}\" (columns: {', '.join(names)}) — pass --text-field")
    return table


def read_documents(inputs, text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) of every document under `inputs`, as a list (for small inputs: eval.py's --text)."""
    files = corpus_files(inputs, text_field)
    docs = [(name, text.decode("utf-8")) for path in files for name, text in file_documents(path, text_field)]
    if not docs:
        raise UserError(f"no documents found in {', '.join(map(str, inputs))}")
    return docs
