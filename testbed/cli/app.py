"""The `testbed` command line (typer). Exit codes: see README "Exit codes" and errors.py.

Each sub-command lives in `testbed/cli/commands/<module>.py` with a `register(app)` function;
add new modules to `_COMMAND_MODULES`. Errors of the `TestbedError` tree become one
readable line on stderr and their exit code — never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import typer

from testbed.cli.console import err
from testbed.errors import EXIT_BAD_INPUT, TestbedError

__all__ = ["app", "main"]

_COMMAND_MODULES = (
    "testbed.cli.commands.topology_cmds",
    "testbed.cli.commands.select_cmd",
    "testbed.cli.commands.run_cmd",
    "testbed.cli.commands.emulation_cmds",
    "testbed.cli.commands.tui_cmd",
    "testbed.cli.commands.diffusion_cmds",
    "testbed.cli.commands.sweep_cmd",
    "testbed.cli.commands.docker_cmds",
    "testbed.cli.commands.fault_cmd",
    "testbed.cli.commands.compare_cmd",
    "testbed.cli.commands.cluster_cmd",
)

app = typer.Typer(
    name="testbed",
    help="Emulation testbed for collaborative diffusion across mobile edge networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exits with the exit code. Without `argv` (the
    program's own command line) the process ends without the interpreter's teardown once
    torch is loaded (see `_leave`); callers that pass `argv` (tests) get SystemExit."""
    try:
        _main(argv)
    except SystemExit as e:
        if argv is None:
            _leave(e.code)
        raise


def _leave(code: int | str | None) -> None:
    """End the process now: freeing torch's and diffusers' thousands of modules and objects
    takes seconds (3-5 s measured here under load) after every output is written and every
    cell torn down. Streams and logs are flushed first; nothing else runs at exit here."""
    if "torch" not in sys.modules:
        return
    import logging
    import os

    logging.shutdown()
    if isinstance(code, str):  # sys.exit("message"): the interpreter would print it
        err.print(code, highlight=False)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def _main(argv: list[str] | None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except TestbedError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:
        # click's usage errors (typer vendors click) carry show() and an exit code (2)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code or EXIT_BAD_INPUT)
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
