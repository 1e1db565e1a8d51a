"""`testbed compare A B`: what differs between two runs or two sweeps, each number with its
kind (testbed/experiments/compare.py does the comparing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from testbed.cli.console import out, print_json

__all__ = ["register"]

_KIND_STYLE = {"measured": "green", "emulated": "yellow", "modelled": "cyan", "setting": "dim", "record": "dim"}


def compare(
    a: Path = typer.Argument(..., help="a run (its --out folder or result.json) or a sweep (its folder or "
                                       "results.csv)"),
    b: Path = typer.Argument(..., help="the other run or sweep, compared with A (B - A, B / A)"),
    show_all: bool = typer.Option(False, "--all", help="also list the values that are equal"),
    points: bool = typer.Option(False, "--points", help="sweeps: also every (method, T_max, E_max) point, "
                                                       "not only each method's mean"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON document (every value, the points "
                                                      "included)"),
) -> None:
    """Compare two runs or two sweeps: a table of what differs, each number measured,
    emulated or modelled (a setting or a record otherwise), with B - A and B / A."""
    from testbed.experiments.compare import compare_paths

    cmp = compare_paths(a, b)
    if as_json:
        print_json(cmp.to_json())
        return
    rows = cmp.rows if show_all else cmp.differences
    if cmp.what == "sweeps" and not points:
        rows = [r for r in rows if " T_max " not in r.scope]
    table = Table(title=f"{cmp.what}: A = {a}, B = {b}", caption=_legend())
    for col in ("where", "what", "kind", "A", "B", "B - A", "B / A"):
        table.add_column(col, justify="right" if col in ("A", "B", "B - A", "B / A") else "left",
                         overflow="fold")
    for r in rows:
        table.add_row(r.scope, r.name, f"[{_KIND_STYLE.get(r.kind, '')}]{r.kind}[/]", _fmt(r.a), _fmt(r.b),
                      "" if r.delta is None else _fmt(r.delta, signed=True),
                      "" if r.ratio is None else f"{r.ratio:.3g}",
                      style=None if r.differs else "dim")
    out.print(table)
    equal = sum(1 for r in cmp.rows if not r.differs)
    hidden = len(cmp.differences) - sum(1 for r in rows if r.differs)
    lines = [f"{len(cmp.differences)} values differ, {equal} are equal" + ("" if show_all else " (--all lists them)")]
    if hidden:
        lines.append(f"{hidden} differences at single (method, T_max, E_max) points: --points lists them")
    if cmp.only_a:
        lines.append(f"only in A: {', '.join(cmp.only_a)}")
    if cmp.only_b:
        lines.append(f"only in B: {', '.join(cmp.only_b)}")
    lines += cmp.notes
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


def _legend() -> str:
    return ("kinds: measured = on this machine; emulated = a device profile's time the run waited out; "
            "modelled = a formula (cost model, energy); setting = asked for; record = what the run did")


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:+.4g}" if signed else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:+d}" if signed else str(v)
    s = str(v)
    sha = s.partition("-")[0]
    if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):  # a commit, as the figures show it
        from testbed.experiments.plots import short_commit

        return short_commit(s)
    return s


def register(app: typer.Typer) -> None:
    app.command()(compare)
