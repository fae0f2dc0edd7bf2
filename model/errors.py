"""User-facing errors and the CLI wrapper every entry script uses.

A `FurnaceError` is an error caused by the user's input (a flag, a file, a value). Entry scripts
run their `main` through `run_cli`, which prints such errors as one line and exits non-zero
without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("furnace")


class FurnaceError(Exception):
    """Bad input: the message names the file, flag or value, what was expected and how to fix it."""


def run_cli(main, argv=None) -> None:
    """Run `main(argv)`; print FurnaceError as `error: ...` and exit 2; Ctrl-C exits 130."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        rc = main(argv)
    except FurnaceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
