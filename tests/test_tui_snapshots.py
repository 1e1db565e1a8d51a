"""Snapshot tests of the TUI's main screens at 80 x 24 (pytest-textual-snapshot).

Update with `pytest tests/test_tui_snapshots.py --snapshot-update` only after looking at
the pictures (the report: snapshot_report.html)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.model.topology import load_topology
from test_tui import relay_events
from tui.app import TestbedApp

SIZE = (80, 24)


@pytest.fixture(autouse=True)
def _the_packages_own_methods(monkeypatch):
    """The pictures show the package's own methods: a plug-in that another test module
    registered in this process (tests/solo_method.py, imported when the suite is collected)
    must not reach them — or the help screen differs with the set of tests run."""
    from testbed.methods import METHODS

    for name, spec in list(METHODS.items()):
        if not spec.strategy.startswith("testbed."):
            monkeypatch.delitem(METHODS, name)


def _app(topologies: Path) -> TestbedApp:
    return TestbedApp(load_topology(topologies / "small.yaml"), source="topologies/small.yaml")


async def _costs(pilot) -> None:
    await pilot.app.costs_ready.wait()
    await pilot.pause()


def test_first_screen(snap_compare, topologies):
    assert snap_compare(_app(topologies), run_before=_costs, terminal_size=SIZE)


def test_after_select(snap_compare, topologies):
    assert snap_compare(_app(topologies), run_before=_costs, press=["s", "down"], terminal_size=SIZE)


def test_paper_selected(snap_compare, topologies):
    app = TestbedApp(load_topology(topologies / "paper.yaml"), source="topologies/paper.yaml")
    assert snap_compare(app, run_before=_costs, press=["s"], terminal_size=SIZE)


def test_help(snap_compare, topologies):
    from tui.help import HelpScreen

    async def help_open(pilot) -> None:  # the picture once the pop-up is the screen, not a guessed moment later
        await _costs(pilot)
        await pilot.press("question_mark")
        for _ in range(200):
            if isinstance(pilot.app.screen, HelpScreen) and pilot.app.screen.is_mounted:
                break
            await pilot.pause(0.05)
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(_app(topologies), run_before=help_open, terminal_size=SIZE)


def test_run_with_recovery(snap_compare, topologies):
    app = _app(topologies)

    async def feed(pilot):
        await _costs(pilot)
        await pilot.press("s")
        app.running = True
        chain = app.cell.chain
        for ev in relay_events(app.topo, chain, kill=chain[1], spare="dev03"):
            app.feed_event(ev)
        await pilot.press("2")
        await pilot.pause()

    assert snap_compare(app, run_before=feed, terminal_size=SIZE)


def test_final_image(snap_compare, topologies):
    app = _app(topologies)
    yy, xx = np.mgrid[0:64, 0:64]
    ref = np.stack([xx * 4, yy * 4, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    gen = ref.copy()
    gen[24:40, 24:40] = 255  # a visible difference

    async def show(pilot):
        await _costs(pilot)
        result = {"run": "tdemo", "method": "multistage", "ms_ssim": 0.8731, "latency_s": 1.62, "energy_j": 63.2}
        app.show_result(result)
        app.query_one("#generated").set_image(gen)
        app.query_one("#reference").set_image(ref)
        await pilot.press("3")
        await pilot.pause()

    assert snap_compare(app, run_before=show, terminal_size=SIZE)
