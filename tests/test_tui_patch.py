"""The TUI with patch-parallel runs: the method selector offers every method, each band's
step is a stage view that patch_step completes, and parallel bands count once in the latency."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Select

from testbed.model.topology import load_topology
from tui.app import TestbedApp
from tui.state import RunView

SIZE = (80, 24)


def _band_events(steps: int) -> list[dict]:
    evs = [{"type": "run_started", "ts": 0.0, "run": "tpatch", "device": None, "steps": None,
            "relay_order": ["dev01", "dev02"], "total_steps": steps}]
    for s in range(steps):
        for i, dev in enumerate(("dev01", "dev02")):
            evs.append({"type": "stage_started", "ts": s + 0.1, "run": "tpatch", "device": dev, "steps": [s, s + 1],
                        "stage": s, "band": i, "predicted": {"t_down_s": 0.1, "t_cmp_s": 0.2, "t_up_s": 0.1}})
        for i, dev in enumerate(("dev01", "dev02")):
            evs.append({"type": "patch_step", "ts": s + 0.9, "run": "tpatch", "device": dev, "steps": [s, s + 1],
                        "stage": s, "band": i, "t_down_s": 0.1, "t_cmp_s": 0.2 + 0.1 * i, "t_up_s": 0.1,
                        "energy_j": 2.0, "record": {"overrun_s": 0.0}})
    return evs


async def test_the_method_selector_offers_every_registered_method(topologies: Path):
    from testbed.methods import methods

    app = TestbedApp(load_topology(topologies / "small.yaml"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        for spec in methods():
            app.query_one("#method", Select).value = spec.name  # an option the Select does not have raises
            await pilot.pause()
            assert app.params()["method"] == spec.name


def test_bands_are_stages_and_count_once_in_the_latency():
    rv = RunView()
    for ev in _band_events(3):
        rv.apply(ev)
    assert [(s.device, s.steps, s.phase) for s in rv.stages] == [
        (d, (s, s + 1), "done") for s in range(3) for d in ("dev01", "dev02")]
    assert rv.energy_j == pytest.approx(12.0)
    assert rv.latency_s == pytest.approx(3 * 0.5)  # per step the slower band (0.1 + 0.3 + 0.1), not the sum


async def test_a_patch_run_shows_live(topologies: Path):
    app = TestbedApp(load_topology(topologies / "small.yaml"))
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#method", Select).value = "patch"
        await pilot.pause()
        assert app.params()["method"] == "patch"
        app.running = True
        for ev in _band_events(2):
            app.feed_event(ev)
        await pilot.pause()
        assert len(app.run_view.stages) == 4 and all(s.phase == "done" for s in app.run_view.stages)
        assert app.cell.chain == ["dev01", "dev02"]
