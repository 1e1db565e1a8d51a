"""Terminal output shared by the CLI commands: rich for people, plain JSON for programs.

With `--json`, stdout carries only the JSON document; everything else goes to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

__all__ = ["out", "err", "print_json"]

# Piped output is not wrapped at 80 columns: tables stay readable in logs and CI.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_json(doc: Any) -> None:
    """Write one JSON document to stdout (nothing else goes there under --json)."""
    sys.stdout.write(json.dumps(doc, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
