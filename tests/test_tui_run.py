"""End to end from the keyboard: the TUI loads small.yaml, budgets are typed in, `s` selects,
`r` runs on the netns backend (namespaces, shaped links, broker, agents), `k` kills a device
mid-run; the table, the plots' data and the final result on screen are checked against the
run's own result document."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from textual.widgets import Input, Static

import tui.live
from testbed.model.topology import load_topology
from tui.app import TestbedApp
from tui.devices import DevicesTable
from tui.imageview import ImageView
from tui.plots import EnergyPlot, LatencyPlot

pytestmark = [pytest.mark.root, pytest.mark.slow]

SIZE = (100, 30)
RUN_TIMEOUT_S = 420.0


async def _wait(pilot, cond, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            log = "\n".join(pilot.app.run_view.log[-15:])
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; last events:\n{log}")
        await pilot.pause(poll_s)


async def _start(pilot, app) -> list[str]:
    await app.costs_ready.wait()
    app.query_one("#emax", Input).focus()
    await pilot.press(*["backspace"] * 8, "7", "5", "enter")  # E_max 75 J, selects
    await pilot.pause()
    chain = app.cell.chain
    assert chain, "nothing selected under the budgets"
    app.query_one("#devices", DevicesTable).focus()
    await pilot.press("r")
    return chain


async def test_run_end_to_end_from_the_keyboard(topologies, tmp_path, monkeypatch):
    monkeypatch.setattr(tui.live, "OUT_ROOT", tmp_path)
    app = TestbedApp(load_topology(topologies / "small.yaml"))
    async with app.run_test(size=SIZE) as pilot:
        chain = await _start(pilot, app)
        await _wait(pilot, lambda: app.running and app.run_view.events > 0, 120, "the first event")
        await _wait(pilot, lambda: not app.running, RUN_TIMEOUT_S, "the run to end")
        await pilot.pause()
        rv = app.run_view
        assert rv.failed is None, rv.failed
        doc = app.result
        assert doc is not None and doc["selected"] == chain
        result = json.loads((tmp_path / doc["run"] / "result.json").read_text())
        assert result["run"] == doc["run"]
        # stage progress: one done row per chained device, times as measured by the run
        assert [s.device for s in rv.stages] == [st["device"] for st in result["stages"]] == chain
        assert all(s.phase == "done" for s in rv.stages)
        for s, st in zip(rv.stages, result["stages"], strict=True):
            assert s.t_cmp_s == pytest.approx(st["t_cmp_s"])
            assert s.energy_j == pytest.approx(st["energy_j"])
        # plots: measured and predicted bars per stage; cumulative energy ends at the run's
        lat = app.query_one("#latency", LatencyPlot)
        assert [b[0] for b in lat.bars] == [x for i in range(1, len(chain) + 1) for x in (f"{i}", f"{i}p")]
        en = app.query_one("#energy", EnergyPlot)
        assert en.measured[-1] == pytest.approx(sum(st["energy_j"] for st in result["stages"]))
        assert en.e_max_j == 75.0
        # the final result on screen
        caption = str(app.query_one("#imgcaption", Static).render())
        assert f"MS-SSIM {result['ms_ssim']:.3f}" in caption
        assert f"latency {result['latency_s']:.2f} s" in caption
        assert app.query_one("#generated", ImageView).image is not None
        table = app.query_one("#devices", DevicesTable)
        assert [table.text_of(d, "sel") for d in chain] == [str(i) for i in range(1, len(chain) + 1)]
        await _wait(pilot, lambda: app.query_one("#reference", ImageView).image is not None, 120, "the reference")


async def test_kill_from_the_keyboard_recovers(topologies, tmp_path, monkeypatch):
    monkeypatch.setattr(tui.live, "OUT_ROOT", tmp_path)
    app = TestbedApp(load_topology(topologies / "small.yaml"))
    async with app.run_test(size=SIZE) as pilot:
        chain = await _start(pilot, app)
        victim = chain[0]
        table = app.query_one("#devices", DevicesTable)
        table.move_cursor(row=table.get_row_index(victim))
        # as soon as its stage has started (the phase stays until the upload): the kill lands
        # mid-stage even when a loaded machine delivers downloaded+computed back to back
        await _wait(pilot, lambda: any(s.device == victim for s in app.run_view.stages), RUN_TIMEOUT_S,
                    f"{victim}'s stage to start", poll_s=0.05)
        assert app.run_view.stages[-1].phase in ("download", "compute"), app.run_view.stages[-1]
        await pilot.press("k")
        await _wait(pilot, lambda: not app.running, RUN_TIMEOUT_S, "the run to end")
        await pilot.pause()
        rv = app.run_view
        assert rv.failed is None, rv.failed
        assert victim in rv.failed_devices
        rec = app.result["recovered"]
        assert len(rec) == 1 and rec[0]["device"] == victim
        spare = rec[0]["took_over"]
        assert app.cell.chain[0] == spare and victim not in app.cell.chain
        assert table.text_of(victim, "on") == "no"
        assert any(s.device == spare and s.recovered and s.phase == "done" for s in rv.stages)
        assert any(" recovered " in line and f"failed={victim}" in line for line in rv.log)


async def test_quit_during_a_run_tears_the_emulation_down(topologies, tmp_path, monkeypatch):
    monkeypatch.setattr(tui.live, "OUT_ROOT", tmp_path)
    app = TestbedApp(load_topology(topologies / "small.yaml"))
    async with app.run_test(size=SIZE) as pilot:
        await _start(pilot, app)
        await _wait(pilot, lambda: app.runner is not None and app.run_view.run_id is not None, RUN_TIMEOUT_S,
                    "the emulation to be up")
        rid = app.run_view.run_id
        assert any(n.startswith(f"tb-{rid}-") for n in os.listdir("/run/netns"))
        await pilot.press("q")
        for _ in range(600):
            if not app.is_running:
                break
            await asyncio.sleep(0.2)
    assert not app.is_running
    left = [n for n in os.listdir("/run/netns") if n.startswith(f"tb-{rid}-")] if os.path.isdir("/run/netns") else []
    assert left == []
