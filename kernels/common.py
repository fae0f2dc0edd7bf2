"""The helpers every layer shares, at the lowest layer so nothing imports upward: user errors, the CLI
wrapper every entry script runs `main` through, and log-once.

A `FurnaceError` is an error caused by the user's input (a flag, a file, a value). `run_cli` prints it as
one line and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
Importing this module imports neither torch nor the kernels, so `--help` stays fast.
"""
from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger("furnace")


# The exit codes of every command (README.md "Exit codes").
EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit codes: 0 done; 2 bad input (one line on stderr, nothing written); 130 interrupted "
              "(Ctrl-C; training saves a checkpoint first: continue with --resume); 1 a bug (with its traceback)")


class FurnaceError(Exception):
    """Bad input: the message names the file, flag or value, what was expected and how to fix it."""


def run_cli(main, argv=None) -> None:
    """Run `main(argv)` and exit with its return code (0 when None). A FurnaceError is printed as one
    `error: ...` line and exits 2; Ctrl-C (KeyboardInterrupt) exits 130; a command that handles Ctrl-C itself
    (training stops after the step and saves) returns EXIT_INTERRUPTED. Any other exception is a bug: its
    traceback, exit 1."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        rc = main(argv)
    except FurnaceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rc or 0)


@functools.lru_cache(maxsize=None)
def _log_once_cached(msg: str) -> None:
    log.info(msg)


def log_once(msg: str) -> None:
    """Log `msg` the first time it is seen (a runtime choice: which kernel, which attention backend)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():  # dynamo skips lru_cache; logging breaks the graph
        return
    _log_once_cached(msg)
