"""How every gust entry point reports a failure: wrong input gets one line and exit status 2; a bug keeps its traceback.

Raise `UserError` (or a subclass) where the user's input is wrong — a file, a flag, a config key — with a message
that names the culprit and the fix. Wrap an entry point's main in `run_cli`. Everything else (a genuine bug,
out-of-memory, an NCCL failure) is left to Python, so its full stack is printed. Not in here: any recovery.
"""
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

OUR_DIR = Path(__file__).resolve().parent  # gust's own modules live here (a library's do not: .venv is deeper)


class UserError(ValueError):
    """The user's input is wrong: the message names the file, flag or key and what was expected.
    A ValueError, so callers that already catch ValueError for bad input keep working."""


def run_cli(main, *args, **kwargs):
    """Call main; a UserError becomes `gust: error: <message>` on stderr and exit status 2, and our own warnings
    (a skipped file, a broken checkpoint passed over) print as one `gust: warning: <message>` line."""
    warnings.formatwarning = format_warning
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f"gust: error: {err}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def said_once_per_node(local_rank: int):
    """Around a check every rank makes alike (the same config, world size and kind of device): a UserError is
    printed by each node's local rank 0; its other ranks exit with the same status quietly, not N copies."""
    try:
        yield
    except UserError:
        if local_rank != 0:
            raise SystemExit(2) from None
        raise


def format_warning(message, category, filename, lineno, line=None, python_format=warnings.formatwarning) -> str:
    """A warning of ours is news for the user, not for a developer: one line, not Python's two with our source line
    (`checkpoint.py:176: UserWarning: ...` then the `warnings.warn(...)` call). A library's keep Python's format."""
    ours = filename.endswith(".py") and Path(filename).resolve().parent == OUR_DIR  # not "sys", "<string>"
    if ours and issubclass(category, UserWarning):  # numpy's RuntimeWarning raised from our line stays numpy's
        return f"gust: warning: {message}\n"
    return python_format(message, category, filename, lineno, line)


def read_json(path, fix: str = ""):
    """The JSON value of a file the user gave, or one UserError line naming it: not UTF-8, not JSON, or JSON Python
    cannot read (an int of over 4,300 digits, nesting deeper than its stack). fix, if given, is appended as what
    to do. A missing file or a directory is the caller's to name (each says what it expected there)."""
    tail = f" — {fix}" if fix else ""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}){tail}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}){tail}") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: JSON that Python cannot read ({type(err).__name__}: {str(err)[:100]}){tail}") from None


def read_metrics_rows(path) -> tuple[list[tuple[str, dict]], str | None]:
    """(line, its row) for each row of a metrics.jsonl, and why its last line was left out (None when it is whole).
    A last line cut short — an append that a crash or a full disk tore, or a live run's write under way — is left
    out; a bad line before it is one UserError line naming path:N (mend or remove it: it is no one's to guess).
    Blank lines (a hand edit's) are skipped."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    while lines and not lines[-1].strip():  # blank lines carry no row: at the end they are no torn line either
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise ValueError("not a row with a step")
        except ValueError as err:  # json.JSONDecodeError is one
            if number == len(lines):
                return rows, f"{path}:{number}: cut short ({err})"
            raise UserError(f"{path}:{number}: not a metrics row ({err}) — mend or remove the line") from None
        rows.append((line, row))
    return rows, None


def metrics_rows(path) -> list[dict]:
    """The rows of a metrics.jsonl, as read_metrics_rows reads them (a torn last line left out), without their lines."""
    return [row for _, row in read_metrics_rows(path)[0]]
