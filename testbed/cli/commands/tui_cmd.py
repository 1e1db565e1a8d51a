"""`testbed tui [FILE] [--attach RUN] [--out DIR] [--serve]`: the interactive front end
(package `tui/`), in this terminal or, with --serve, in a browser (tui/web.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from testbed.cli import signals
from testbed.errors import TopologyError
from testbed.model.names import check_run_id

__all__ = ["register"]


def tui(
    file: Path | None = typer.Argument(None, help="topology YAML file (default: the attached run's copy)"),
    attach: str | None = typer.Option(None, "--attach", metavar="RUN", help="follow a running run's events"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed"),
    backend: str = typer.Option("netns", "--backend", help="emulation backend of runs started here"),
    out_dir: Path = typer.Option(Path("out"), "--out", metavar="DIR",
                                 help="runs started here write DIR/<run>/ (result.json, events.jsonl, image.png, "
                                      "logs/), like `testbed run`'s default out/<run>"),
    serve: bool = typer.Option(False, "--serve", help="serve the TUI to a browser (textual-serve) instead of "
                                                      "running it in this terminal; prints the page's URL"),
    host: str = typer.Option("127.0.0.1", "--host", help="with --serve: the address to listen on (loopback "
                                                         "by default; another one is reachable from elsewhere)"),
    port: int = typer.Option(8000, "--port", help="with --serve: the TCP port"),
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
    topo = load_topology(file, seed=seed)  # bad input fails here, also before serving
    if serve:
        _serve(file, attach, seed, backend, out_dir, state_root, host, port)
        return
    from tui.app import TestbedApp

    signals.run_app(TestbedApp(topo, source=str(file), attach=attach, backend=backend, state_root=state_root,
                               out_root=out_dir))  # SIGTERM/SIGHUP: the app's exit, with its run's teardown


def _serve(file: Path, attach: str | None, seed: int | None, backend: str, out_dir: Path, state_root: Path,
           host: str, port: int) -> None:
    """`testbed tui ... --serve`: every browser tab runs `testbed tui` with these arguments."""
    from testbed.cli.console import err, out
    from tui.web import check_host, check_port, serve, served_command

    address, warning = check_host(host)
    check_port(port)
    args = [str(file.absolute()), "--backend", backend, "--out", str(out_dir.absolute()),
            "--state-root", str(state_root)]
    args += ["--seed", str(seed)] if seed is not None else []
    args += ["--attach", attach] if attach is not None else []
    if warning:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)

    def ready(url: str) -> None:
        out.print(f"serving the TUI of {file} on {url} (each browser tab runs its own; runs write "
                  f"{out_dir.absolute()}/<run>/); Ctrl-C stops", highlight=False, soft_wrap=True)
        out.file.flush()  # a pipe (a test, a log) sees the URL now

    serve(served_command(args), address, port, title=f"testbed tui {file.name}", on_ready=ready)


def register(app: typer.Typer) -> None:
    app.command()(tui)
