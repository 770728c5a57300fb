"""Reading a text corpus as a stream of documents, for `data.py prepare` (and eval.py's --text).

Inputs: .txt (one document), .jsonl / .jsonl.gz / .jsonl.zst (one document per line, its --text-field), .parquet
(one document per row of the text column), and directories or globs of them. Documents come in a fixed order —
files sorted by path, then line or row — so the split and the token files are reproducible.
Not in here: tokenizing, splitting, writing (data.py). Kept apart from data.py so that file stays readable.
"""
import glob
import json
import warnings
import zlib
from pathlib import Path

from errors import UserError

SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")
PACKAGES = {".jsonl.zst": "zstandard", ".parquet": "pyarrow"}  # optional readers: `make setup` installs both


def suffix_of(path: Path) -> str | None:
    """The input format of a file from its name (".jsonl.gz", ...), or None for a file prepare does not read."""
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def corpus_files(inputs, text_field: str = "text") -> list[Path]:
    """Every file under `inputs`, in document order. Bad paths, missing reader packages and Parquet files without
    the text column fail here, before any work."""
    files = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p))
        elif path.is_file():
            files.append(path)  # named explicitly: read as plain text unless the name says otherwise
        elif glob.has_magic(str(spec)):
            matched = sorted(Path(p) for p in glob.glob(str(spec), recursive=True))
            files += [p for p in matched if p.is_file() and suffix_of(p)]
            if not any(p.is_file() and suffix_of(p) for p in matched):
                raise UserError(f"{spec}: the pattern matches no {'/'.join(SUFFIXES)} file")
        else:
            raise UserError(f"{path}: input not found")
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} files in {', '.join(map(str, inputs))}")
    for suffix, package in PACKAGES.items():
        needing = next((p for p in files if suffix_of(p) == suffix), None)
        if needing is not None:
            _require(package, needing)
    for path in files:
        if suffix_of(path) == ".parquet":
            _open_parquet(path, text_field)  # reads only the footer
    return files


def _require(package: str, path: Path):
    try:
        __import__(package)
    except ImportError:
        raise UserError(f"{path}: reading {suffix_of(path)} files needs the {package} package — "
                        f"`pip install {package}` (or `make setup`)") from None


def file_documents(path: Path, text_field: str = "text"):
    """(name, text, bytes_read) for each non-empty document of one file; bytes_read counts the file's own bytes."""
    suffix = suffix_of(path)
    if suffix == ".parquet":
        yield from _parquet_documents(path, text_field)
    elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from _jsonl_documents(path, text_field, suffix)
    else:
        yield from _txt_document(path)


def _txt_document(path: Path):
    try:
        text = path.read_text(encoding="utf-8")  # text mode, as before: \r\n becomes \n
    except UnicodeDecodeError as err:
        warnings.warn(f"{path}: not UTF-8 ({err.reason} at byte {err.start}), skipped")
        return
    if has_text(text):
        yield str(path), text, path.stat().st_size
    else:
        warnings.warn(f"{path}: empty, skipped")


def _open_lines(raw, suffix: str):
    """A binary line reader over the decompressed bytes of an open file."""
    if suffix == ".jsonl.gz":
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if suffix == ".jsonl.zst":
        return _split_lines(_zstd_chunks(raw))
    return raw


def _zstd_chunks(raw):
    """Decompressed bytes of a .zst file, frame after frame; raises EOFError if the last frame is cut short
    (zstandard's stream reader would end silently there)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, fed = dctx.decompressobj(), False
    while chunk := raw.read(1 << 20):
        while chunk:
            fed = True
            yield frame.decompress(chunk)
            chunk = b""
            if frame.eof:  # dumps are often many frames concatenated
                chunk, frame, fed = frame.unused_data, dctx.decompressobj(), False
    if fed:
        raise EOFError("the last zstd frame ends early")


def _split_lines(chunks):
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from (line + b"\n" for line in lines)
    if pending:
        yield pending


def has_text(text: str) -> bool:
    """Whether text holds anything but whitespace (what `text.strip()` tells, without copying the text)."""
    return bool(text) and not text.isspace()


def _jsonl_documents(path: Path, text_field: str, suffix: str):
    empty = True
    with open(path, "rb") as raw:
        try:
            for line_no, line in enumerate(_open_lines(raw, suffix), start=1):
                text = _jsonl_text(path, line_no, line, text_field)
                if text is not None and has_text(text):
                    empty = False
                    yield f"{path}:{line_no}", text, raw.tell()  # raw.tell(): compressed bytes read so far
        except (EOFError, OSError, zlib.error) as err:  # truncated .gz / .zst, or not compressed at all
            raise UserError(f"{path}: truncated or corrupt ({err}) — stopped; completed shards are kept") from None
        except Exception as err:
            if type(err).__name__ != "ZstdError":  # zstandard's own error type, without importing it here
                raise
            raise UserError(f"{path}: truncated or corrupt ({err}) — stopped; completed shards are kept") from None
    if empty:
        warnings.warn(f"{path}: no non-empty documents, skipped")


def _jsonl_text(path: Path, line_no: int, line: bytes, text_field: str) -> str | None:
    if not line or line.isspace():  # not line.strip(): that copies every line
        return None
    try:
        value = json.loads(line)[text_field]
    except UnicodeDecodeError as err:
        warnings.warn(f"{path}:{line_no}: not UTF-8 ({err.reason} at byte {err.start}), skipped")
        return None
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"{path}:{line_no}: not a JSON object with a \"{text_field}\" field"
                        + (" — pass --text-field" if text_field == "text" else "")) from None
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_no}: \"{text_field}\" holds a {type(value).__name__}, not text")
    if b"\\u" in line and not _is_utf8_encodable(value):  # an escaped lone surrogate ("\ud800") decodes
        warnings.warn(f"{path}:{line_no}: text holds an unpaired surrogate (not Unicode text), skipped")
        return None
    return value


def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parquet_documents(path: Path, text_field: str):
    import pyarrow

    table = _open_parquet(path, text_field)
    size, rows_total, row = path.stat().st_size, max(table.metadata.num_rows, 1), 0
    try:
        for batch in table.iter_batches(batch_size=1024, columns=[text_field]):  # bounded memory per read
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str) and has_text(text):
                    yield f"{path}:{row}", text, size * row // rows_total
                elif text is not None and not isinstance(text, str):
                    raise UserError(f"{path}: column \"{text_field}\" holds {type(text).__name__}, not text")
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: truncated or corrupt at row {row + 1} ({err}) — stopped; "
                        "completed shards are kept") from None


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
    docs = [(name, text) for path in files for name, text, _ in file_documents(path, text_field)]
    if not docs:
        raise UserError(f"no documents found in {', '.join(map(str, inputs))}")
    return docs
