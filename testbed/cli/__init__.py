"""Front end: the `testbed` command line (typer); each command in `commands/`."""

from testbed.cli.app import app, main

__all__ = ["app", "main"]
