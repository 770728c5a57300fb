"""How every gust entry point reports a failure: wrong input gets one line and exit status 2; a bug keeps its traceback.

Raise `UserError` (or a subclass) where the user's input is wrong — a file, a flag, a config key — with a message
that names the culprit and the fix. Wrap an entry point's main in `run_cli`. Everything else (a genuine bug,
out-of-memory, an NCCL failure) is left to Python, so its full stack is printed. Not in here: any recovery.
"""
import sys


class UserError(ValueError):
    """The user's input is wrong: the message names the file, flag or key and what was expected.
    A ValueError, so callers that already catch ValueError for bad input keep working."""


def run_cli(main, *args, **kwargs):
    """Call main; a UserError becomes `gust: error: <message>` on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f"gust: error: {err}", file=sys.stderr)
        sys.exit(2)
