"""`testbed tui [FILE] [--attach RUN]`: the interactive front end (package `tui/`)."""

from __future__ import annotations

from pathlib import Path

import typer

from testbed.errors import TopologyError
from testbed.model.names import check_run_id

__all__ = ["register"]


def tui(
    file: Path | None = typer.Argument(None, help="topology YAML file (default: the attached run's copy)"),
    attach: str | None = typer.Option(None, "--attach", metavar="RUN", help="follow a running run's events"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed"),
    backend: str = typer.Option("netns", "--backend", help="emulation backend of runs started here"),
    state_root: Path | None = typer.Option(None, "--state-root", hidden=True),
) -> None:
    """Select devices, run multi-stage diffusion and watch it live (keys: s r k q ?)."""
    from testbed.model.topology import load_topology
    from tui.attach import DEFAULT_STATE_ROOT

    state_root = state_root or DEFAULT_STATE_ROOT
    if attach is not None:  # it names a directory below
        check_run_id(attach, "--attach")

    if file is None:
        if attach is None:
            raise TopologyError("give a topology FILE (e.g. topologies/small.yaml) or --attach RUN")
        copy = state_root / attach / "topology.yaml"
        if not copy.is_file():
            raise TopologyError(f"run {attach!r}: no {copy}; give the run's topology FILE as well")
        file = copy
    topo = load_topology(file, seed=seed)
    from tui.app import TestbedApp

    TestbedApp(topo, source=str(file), attach=attach, backend=backend, state_root=state_root).run()


def register(app: typer.Typer) -> None:
    app.command()(tui)
