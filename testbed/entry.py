"""The `testbed` console script: a cold run's worker first, then the command line.

Light on purpose (the package imports only its errors): a cold `testbed run FILE` starts its
worker (composition/worker_start.py) before the command line's own imports (typer, the
commands, the emulation: most of a second), so that the worker's torch import overlaps them.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """The program (argv: its command line, default sys.argv[1:]; given, the process is not
    ended at once but SystemExit raised, as by cli.app.main)."""
    from testbed.composition.worker_start import prestart

    prestart(sys.argv[1:] if argv is None else argv)
    from testbed.cli.app import main as cli_main

    cli_main(argv)
