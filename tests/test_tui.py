"""The TUI headless (Pilot): first screen, budgets, selection, event rendering, help,
attach, images. Runs without root; the end-to-end run is in test_tui_run.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import Input, Static

from testbed.model.radio import compute_links
from testbed.selection import device_costs, select
from testbed.model.topology import load_topology, place
from tui.app import TestbedApp
from tui.cellmap import CellMap
from tui.devices import DevicesTable
from tui.help import HelpScreen
from tui.imageview import fit_image, halfblock_text
from tui.plots import EnergyPlot, LatencyPlot
from tui.state import RunView

SIZE = (80, 24)


@pytest.fixture
def small(topologies: Path):
    return load_topology(topologies / "small.yaml")


def _costs(topo):
    return {c.id: c for c in device_costs(topo, compute_links(topo, place(topo)))}


def relay_events(topo, chain: list[str], run: str = "tdemo", slow: float = 1.1, kill: str | None = None,
                 spare: str | None = None) -> list[dict]:
    """The orchestrator's event sequence (testbed/methods/multistage/orchestrator.py) for `chain`, with measured
    times `slow` x the predicted ones; `kill` goes offline mid-stage and `spare` takes over."""
    costs = _costs(topo)
    k = topo.workload.steps_per_stage
    ts = 1000.0
    evs = [{"type": "run_started", "ts": ts, "run": run, "device": None, "steps": None, "relay_order": list(chain),
            "total_steps": k * len(chain), "steps_per_stage": k}]
    for i, dev in enumerate(list(chain)):
        steps = [i * k, (i + 1) * k]
        attempt = 1
        while True:
            c = costs[dev]
            pred = {"t_down_s": c.t_down_s, "t_cmp_s": c.t_cmp_s, "t_up_s": c.t_up_s, "energy_j": c.energy_j}
            base = {"run": run, "device": dev, "steps": steps, "stage": i}
            evs.append({**base, "type": "stage_started", "ts": ts, "attempt": attempt, "predicted": pred})
            ts += c.t_down_s * slow
            evs.append({**base, "type": "downloaded", "ts": ts, "t_down_s": c.t_down_s * slow})
            if dev == kill:
                evs.append({**base, "type": "device_offline", "ts": ts + 0.1})
                evs.append({**base, "type": "recovered", "ts": ts + 0.1, "device": spare, "failed": dev,
                            "reason": "offline"})
                dev, attempt, kill = spare, attempt + 1, None
                continue
            ts += c.t_cmp_s * slow
            evs.append({**base, "type": "computed", "ts": ts, "t_cmp_s": c.t_cmp_s * slow, "overrun_s": 0.0})
            ts += c.t_up_s * slow
            evs.append({**base, "type": "uploaded", "ts": ts, "t_up_s": c.t_up_s * slow, "energy_j": c.energy_j * slow})
            break
    return evs


async def test_first_screen_shows_every_device_and_budgets(small):
    app = TestbedApp(small, source="small.yaml")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.query_one("#devices", DevicesTable)
        # the first screen does not wait for the selection library: ids and budgets are there
        assert [table.text_of(k.value, "id") for k in table.rows] == [d.id for d in place(small).devices]
        await app.costs_ready.wait()
        await pilot.pause()
        table = app.query_one("#devices", DevicesTable)
        ids = [table.text_of(k.value, "id") for k in table.rows]
        assert ids == [d.id for d in place(small).devices]
        assert float(app.query_one("#tmax", Input).value) == small.budgets.t_max_s
        assert float(app.query_one("#emax", Input).value) == small.budgets.e_max_j
        costs = _costs(small)
        for dev_id, c in costs.items():  # predicted T_j, E_j from the library's cost model
            assert table.text_of(dev_id, "t_j") == f"{c.latency_s:.2f}"
            assert table.text_of(dev_id, "e_j") == f"{c.energy_j:.1f}"
            assert table.text_of(dev_id, "on") == "yes"
            assert table.text_of(dev_id, "sel") == ""
        # every region is inside the 80 x 24 screen
        for wid in ("#controls", "#summary", "#devices", "#map"):
            r = app.query_one(wid).region
            assert r.right <= SIZE[0] and r.bottom <= SIZE[1] and r.height > 0, wid


async def test_change_budgets_and_select_from_the_keyboard(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await pilot.pause()
        want = select(list(_costs(small).values()), small.budgets.t_max_s, small.budgets.e_max_j, "dp", small.seed)
        table = app.query_one("#devices", DevicesTable)
        assert app.cell.chain == want.selected
        for i, dev in enumerate(want.selected, 1):
            assert table.text_of(dev, "sel") == str(i)
        summary = str(app.query_one("#summary", Static).render())
        assert " → ".join(want.selected) in summary
        assert f"E {want.energy_j:.1f} J of {small.budgets.e_max_j:g} J" in summary

        # a tighter energy budget, typed into the E_max field, Enter selects again
        app.query_one("#emax", Input).focus()
        await pilot.press(*["backspace"] * 8, "3", "0", "enter")
        await pilot.pause()
        tight = select(list(_costs(small).values()), small.budgets.t_max_s, 30.0, "dp", small.seed)
        assert tight.selected != want.selected
        assert app.cell.chain == tight.selected
        assert tight.energy_j <= 30.0
        assert " of 30 J" in str(app.query_one("#summary", Static).render())
        for dev in set(want.selected) - set(tight.selected):
            assert table.text_of(dev, "sel") == ""

        # infeasible: no device fits 0.1 s; the screen says so and nothing stays selected
        app.query_one("#tmax", Input).focus()
        await pilot.press(*["backspace"] * 8, "0", ".", "1", "enter")
        await pilot.pause()
        assert "infeasible" in str(app.query_one("#summary", Static).render())
        assert app.cell.chain == []
        assert all(table.text_of(d, "sel") == "" for d in app.cell.devices)


async def test_selector_control_changes_selection(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        app.query_one("#selector").value = "greedy"
        await pilot.press("s")
        await pilot.pause()
        want = select(list(_costs(small).values()), small.budgets.t_max_s, small.budgets.e_max_j, "greedy", small.seed)
        assert app.cell.selection.selector == "greedy"
        assert app.cell.chain == want.selected


async def test_map_draws_devices_to_scale_and_the_chain(small):
    app = TestbedApp(small)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("s")
        await pilot.pause()
        cmap = app.query_one("#map", CellMap)
        w, h = cmap.content_size.width, cmap.content_size.height
        lines = str(cmap.render()).split("\n")
        for row in app.cell.devices.values():
            c, r = cmap.cell_of(row.x_m, row.y_m, w, h)
            assert lines[r][c] in "OX", row.id
            if row.order:
                assert lines[r][c + 1] == str(row.order)
        sc, sr = cmap.cell_of(250, 250, w, h)
        assert lines[sr][sc] == "◉"
        # to scale: 500 m across is twice as many columns as 500 m down is rows (cells are 1:2)
        c0, r0 = cmap.cell_of(0, 500, w, h)
        c1, r1 = cmap.cell_of(499.9, 0.1, w, h)
        assert abs((c1 - c0 + 1) - 2 * (r1 - r0 + 1)) <= 2
        # mobility: a position event moves the glyph
        app.feed_event({"type": "moved", "device": "dev04", "x_m": 20.0, "y_m": 20.0})
        await pilot.pause()
        lines = str(cmap.render()).split("\n")
        c, r = cmap.cell_of(20.0, 20.0, w, h)
        assert lines[r][c] == "X"
        table = app.query_one("#devices", DevicesTable)
        assert table.text_of("dev04", "dist") == f"{np.hypot(230, 230):.0f}"


async def test_events_render_stages_plots_and_recovery(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        chain = app.cell.chain
        app.running = True
        evs = relay_events(small, chain, kill=chain[1], spare="dev03")
        for ev in evs:
            app.feed_event(ev)
        await pilot.press("2")
        await pilot.pause()
        rv = app.run_view
        assert [s.device for s in rv.stages] == [chain[0], chain[1], "dev03"]
        assert [s.phase for s in rv.stages] == ["done", "failed", "done"]
        assert rv.stages[2].recovered and rv.stages[2].steps == rv.stages[1].steps
        costs = _costs(small)
        lat = app.query_one("#latency", LatencyPlot)
        assert [b[0] for b in lat.bars] == ["1", "1p", "2", "2p"]
        assert lat.bars[0][2] == pytest.approx(costs[chain[0]].t_cmp_s * 1.1)
        assert lat.bars[1][2] == pytest.approx(costs[chain[0]].t_cmp_s)
        en = app.query_one("#energy", EnergyPlot)
        e0, e3 = costs[chain[0]].energy_j, costs["dev03"].energy_j
        # one point per finished attempt; the failed one adds nothing until the result says what it wasted
        assert en.measured == pytest.approx([e0 * 1.1, e0 * 1.1, (e0 + e3) * 1.1])
        assert en.predicted == pytest.approx([e0, e0, e0 + e3])
        assert en.e_max_j == small.budgets.e_max_j
        # the chain now runs through the spare; the failed device is offline in the table
        assert app.cell.chain == [chain[0], "dev03"]
        table = app.query_one("#devices", DevicesTable)
        assert table.text_of(chain[1], "on") == "no"
        assert table.text_of("dev03", "sel") == "2"
        rec = [line for line in rv.log if " recovered dev03 steps 5-10 " in line]
        assert len(rec) == 1 and f"failed={chain[1]}" in rec[0]
        status = str(app.query_one("#runstatus", Static).render())
        assert f"failed: {chain[1]}" in status
        # the result reports the failed attempt's energy: it joins the measured curve
        app.show_result({"run": "tdemo", "method": "multistage", "ms_ssim": 0.9, "latency_s": 2.1,
                         "energy_j": (e0 + e3) * 1.1 + 3.0, "recovered": [
                             {"device": chain[1], "steps": [5, 10], "stage": 1, "reason": "offline",
                              "took_over": "dev03", "detected_after_s": 1.0, "energy_j": 3.0}]})
        await pilot.pause()
        assert en.measured[-1] == pytest.approx((e0 + e3) * 1.1 + 3.0)
        assert f"E {(e0 + e3) * 1.1 + 3.0:.1f}/70 J" in str(app.query_one("#runstatus", Static).render())


async def test_kill_without_a_run_only_warns(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("k", "c")
        await pilot.pause()
        msgs = [n.message for n in app._notifications]
        assert any("k kills" in m for m in msgs) and any("c cuts" in m for m in msgs)
        assert all(r.online for r in app.cell.devices.values())


async def test_help_screen_opens_and_closes(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help-text", Static).render())
        # every key in the footer is explained in the help
        shown = {"esc" if b.key == "escape" else b.key for b in TestbedApp.BINDINGS if b.show}
        assert {"s", "r", "k", "c", "q", "esc"} <= shown
        lines = text.splitlines()
        for key in shown - {"question_mark"}:  # the key, two spaces or more, what it does
            assert any(re.search(rf"(^|\s){re.escape(key)}\s{{2,}}\S", line) for line in lines), key
        assert "--attach RUN" in text
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_final_result_shows_images_and_ms_ssim(small, tmp_path, monkeypatch):
    from PIL import Image

    import testbed.diffusion.quality as quality

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    gen = np.clip(ref.astype(int) + 10, 0, 255).astype(np.uint8)
    Image.fromarray(gen).save(tmp_path / "gen.png")
    asked = []
    monkeypatch.setattr(quality, "reference_image", lambda *a, **kw: asked.append(a) or ref)  # the disk cache's
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        app.show_result({"run": "tdemo", "method": "multistage", "ms_ssim": 0.8731, "latency_s": 1.62,
                         "energy_j": 63.2, "image": str(tmp_path / "gen.png"), "seed": 5})
        await pilot.press("3")
        await app.workers.wait_for_complete()
        await pilot.pause()
        wl = app.topo.workload  # the reference of the result's seed, the topology's model and prompt
        assert asked == [(wl.model, wl.prompt, 5, wl.reference_steps, wl.scheduler)]
        caption = str(app.query_one("#imgcaption", Static).render())
        assert "MS-SSIM 0.873" in caption and "latency 1.62 s" in caption
        assert np.array_equal(app.query_one("#generated").image, gen)
        assert np.array_equal(app.query_one("#reference").image, ref)


def test_halfblock_image_keeps_colours_and_aspect():
    img = np.zeros((40, 20, 3), dtype=np.uint8)
    img[:20] = (255, 0, 0)
    img[20:] = (0, 0, 255)
    px = fit_image(img, 10, 10)
    assert px.shape == (20, 10, 3)  # 2 px per row, aspect kept
    text = halfblock_text(px)
    lines = text.plain.split("\n")
    assert len(lines) == 10 and all(line == "▀" * 10 for line in lines)
    from rich.console import Console

    con = Console()
    top, bottom = text.get_style_at_offset(con, 0), text.get_style_at_offset(con, len(text.plain) - 1)
    assert top.color.triplet == (255, 0, 0) and bottom.bgcolor.triplet == (0, 0, 255)


def test_runview_ignores_events_of_unknown_devices_and_logs_them():
    rv = RunView()
    line = rv.apply({"type": "downloaded", "ts": 5.0, "run": "x", "device": "ghost", "steps": [0, 5], "t_down_s": 0.1})
    assert rv.stages == [] and "downloaded ghost steps 0-5" in line


def test_no_torch_at_startup():
    code = "import sys, testbed.cli, tui.app; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_cli_needs_a_file_or_attach():
    exe = Path(sys.executable).with_name("testbed")
    out = subprocess.run([str(exe), "tui"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "topology FILE" in out.stderr


async def test_attach_without_observer_file_says_so(small, tmp_path):
    app = TestbedApp(small, attach="tnone", state_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("observer.json" in n.message for n in app._notifications)


@pytest.fixture
def mosquitto_port(tmp_path):
    """A mosquitto on a free loopback port (anonymous), ended after the test."""
    from mqtt_loopback import start_mosquitto, stop_process

    broker, port = start_mosquitto(tmp_path / "mosquitto.conf", lambda p: f"listener {p} 127.0.0.1\nallow_anonymous true\n",
                                   tmp_path / "mosquitto.log")
    try:
        yield port
    finally:
        stop_process(broker)


@pytest.mark.mosquitto
async def test_attach_follows_events_published_on_the_run_topic(small, tmp_path, unique_run_id, mosquitto_port):
    import aiomqtt

    port = mosquitto_port
    run_dir = tmp_path / unique_run_id
    run_dir.mkdir()
    (run_dir / "observer.json").write_text(json.dumps({
        "run": unique_run_id, "host": "127.0.0.1", "port": port, "username": "observer", "password": "x",
        "topic": f"tb/{unique_run_id}/events"}))
    app = TestbedApp(small, attach=unique_run_id, state_root=tmp_path)
    chain = ["dev01", "dev02"]
    evs = relay_events(small, chain, run=unique_run_id)
    evs.append({"type": "run_finished", "ts": evs[-1]["ts"] + 0.01, "run": unique_run_id, "device": None,
                "steps": None, "latency_s": 1.7, "energy_j": 66.0, "ms_ssim": 0.91})
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(50):  # the TUI subscribes; wait for it
            await pilot.pause(0.1)
            if any("attached to" in line for line in _log_text(app)):
                break
        await pilot.pause(0.3)
        async with aiomqtt.Client("127.0.0.1", port) as pub:
            for ev in evs:
                await pub.publish(f"tb/{unique_run_id}/events", json.dumps(ev).encode(), qos=1)
        for _ in range(50):
            await pilot.pause(0.1)
            if app.run_view.finished:
                break
        assert app.run_view.finished
        assert [s.device for s in app.run_view.stages] == chain
        assert app.cell.chain == chain
        assert "MS-SSIM 0.910" in str(app.query_one("#imgcaption", Static).render())
        await pilot.press("r")  # runs are not started from an attached TUI
        assert app.runner is None


def _log_text(app) -> list[str]:
    log = app.query_one("#log")
    return [strip.text for strip in log.lines]


async def test_seed_control_replaces_drawn_devices_like_the_cli(topologies):
    paper = load_topology(topologies / "paper.yaml")
    app = TestbedApp(paper)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        app.query_one("#seed", Input).focus()
        await pilot.press(*["backspace"] * 10, "4", "2", "enter")
        await pilot.pause()
        want = place(load_topology(topologies / "paper.yaml", seed=42))
        got = {d.id: (d.x_m, d.y_m) for d in app.cell.devices.values()}
        assert got == {d.id: (d.x_m, d.y_m) for d in want.devices}
        assert got != {d.id: (d.x_m, d.y_m) for d in place(paper).devices}
        table = app.query_one("#devices", DevicesTable)
        costs = _costs(load_topology(topologies / "paper.yaml", seed=42))
        assert table.text_of("dev05", "e_j") == f"{costs['dev05'].energy_j:.1f}"
        assert app.cell.selection is not None and app.cell.chain == app.cell.selection.selected


async def test_mobility_batch_updates_move_devices_and_rates(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        table = app.query_one("#devices", DevicesTable)
        before = float(table.text_of("dev01", "up"))
        # the shape of Emulation.on_update's LinkUpdate.devices, as the TUI forwards it
        app.feed_event({"type": "positions", "positions": {
            "dev01": {"id": "dev01", "x_m": 480.0, "y_m": 480.0, "rate_up_mbps": 12.5, "rate_down_mbps": 20.0},
            "dev02": [100.0, 100.0]}})
        await pilot.pause()
        assert table.text_of("dev01", "up") == "12.5" and table.text_of("dev01", "down") == "20.0"
        assert float(table.text_of("dev01", "up")) < before
        assert table.text_of("dev01", "dist") == f"{np.hypot(230, 230):.0f}"
        # dev02 moved without rates: the radio model gives them, farther means slower
        assert app.cell.devices["dev02"].distance_m == pytest.approx(np.hypot(150, 150))
        from testbed.model.radio import link_for_position

        dev02 = app.cell.devices["dev02"]
        orig = {lk.id: lk for lk in compute_links(small, place(small))}["dev02"]
        assert dev02.rate_up_mbps == pytest.approx(link_for_position(small.radio, dev02.distance_m, orig.los)[3])
        assert dev02.rate_up_mbps < orig.rate_up_mbps
        # predicted costs follow the new rates (the library's cost model on the moved links)
        moved = [lk.model_copy(update={"rate_up_mbps": 12.5, "rate_down_mbps": 20.0}) if lk.id == "dev01" else lk
                 for lk in compute_links(small, place(small)) if lk.id != "dev02"]
        want = {c.id: c for c in device_costs(small, moved)}
        assert table.text_of("dev01", "t_j") == f"{want['dev01'].latency_s:.2f}"
        assert app.cell.devices["dev01"].t_j_s == pytest.approx(want["dev01"].latency_s)
        assert app.run_view.events == 0  # position updates are not run events


async def test_split_steps_render_as_stages_and_cap_the_bars(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        app.running = True
        app.feed_event({"type": "run_started", "ts": 0.0, "run": "tsplit", "device": None, "steps": None,
                        "relay_order": ["dev01", "dev02"], "total_steps": 20})
        for i in range(20):
            app.feed_event({"type": "split_step", "ts": 0.1 * (i + 1), "run": "tsplit", "device": "dev01>dev02",
                            "steps": [i, i + 1], "stage": i, "t_down_s": 0.01, "t_cmp_s": 0.05 + i * 0.001,
                            "t_up_s": 0.02, "energy_j": 1.5,
                            "predicted": {"t_down_s": 0.01, "t_cmp_s": 0.05, "t_up_s": 0.02, "energy_j": 1.4}})
        await pilot.pause()
        rv = app.run_view
        assert len(rv.stages) == 20 and all(s.phase == "done" for s in rv.stages)
        assert rv.energy_j == pytest.approx(30.0)
        assert app.cell.chain == ["dev01", "dev02"]
        lat = app.query_one("#latency", LatencyPlot)
        assert len(lat.bars) == LatencyPlot.MAX_BARS and lat.bars[-2][0] == "20"
        assert lat.bars[-2][2] == pytest.approx(0.05 + 19 * 0.001)
        en = app.query_one("#energy", EnergyPlot)
        assert en.measured[-1] == pytest.approx(30.0) and en.predicted[-1] == pytest.approx(28.0)


async def test_attach_through_mosquitto_sub_reads_events_line_by_line(tmp_path, unique_run_id, mosquitto_port):
    """The path for runs that do not hold the host's route (netns None: this namespace)."""
    import aiomqtt

    from tui.attach import follow_events_in_netns, server_netns

    (tmp_path / unique_run_id).mkdir()
    (tmp_path / unique_run_id / "state.json").write_text(json.dumps(
        {"host_route": False, "nodes": [{"id": "server", "netns": f"/run/netns/tb-{unique_run_id}-server"}]}))
    assert server_netns(unique_run_id, tmp_path) == f"/run/netns/tb-{unique_run_id}-server"
    port = mosquitto_port
    info = {"run": unique_run_id, "host": "127.0.0.1", "port": port, "username": "observer", "password": "x",
            "topic": f"tb/{unique_run_id}/events"}
    sent = [{"type": "stage_started", "seq": i, "device": "dev01", "note": "x" * (3000 * i)} for i in range(3)]
    got: list[dict] = []
    subscribed = asyncio.Event()

    async def publish() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as pub:
            while not subscribed.is_set():  # until mosquitto_sub sees one: it subscribes when it can
                await pub.publish(info["topic"], b'{"type": "probe"}', qos=1)
                await asyncio.sleep(0.1)
            for ev in sent:
                await pub.publish(info["topic"], json.dumps(ev).encode(), qos=1)

    task = asyncio.create_task(publish())
    async with asyncio.timeout(60), contextlib.aclosing(follow_events_in_netns(info, None)) as events:
        async for ev in events:
            if ev["type"] == "probe":
                subscribed.set()
                continue
            got.append(ev)
            if len(got) == len(sent):
                break
    await task
    assert got == sent
    # closing the stream ended its mosquitto_sub
    out = subprocess.run(["pgrep", "-f", f"mosquitto_sub .*{info['topic']}"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


# ---- focus, the chain line, where runs write (issue: what a new user sees) -------------------

@pytest.mark.parametrize("tab", ["1", "2", "3"])
async def test_a_pop_up_gives_the_keys_back_on_every_tab(small, tab):
    """On the Image tab, ? then Esc used to leave focus in the T_max field: q did nothing,
    1 and 2 were typed into the budget and the footer lost its keys."""
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        await pilot.press(tab, "question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        assert not isinstance(app.focused, Input), app.focused
        keys = {k.key for k in app.query("FooterKey")}
        assert {"s", "r", "q"} <= keys, keys
        await pilot.press("2" if tab != "2" else "3")
        await pilot.pause()
        assert app.query_one("#tabs").active == ("run" if tab != "2" else "image")
        assert app.query_one("#tmax", Input).value == f"{small.budgets.t_max_s:g}"  # nothing typed in
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_tabs_focus_their_own_widget_and_esc_leaves_a_field(small):
    app = TestbedApp(small)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        await pilot.press("2")
        assert app.focused is app.query_one("#log")
        await pilot.press("3")
        assert app.focused is None  # every key reaches the app
        await pilot.press("tab")  # into the controls, on purpose
        assert isinstance(app.focused, Input)
        assert {k.key for k in app.query("FooterKey")} >= {"escape"}  # the way out is shown
        await pilot.press("escape")
        assert app.focused is app.query_one("#devices") and app.query_one("#tabs").active == "cell"


async def test_chain_line_names_the_planning_margin(topologies):
    """`T 1.48/1.96 s` read like a typo of T_max 2: the plan fills the budgets less margin_pct."""
    paper = load_topology(topologies / "paper.yaml")
    assert paper.budgets.margin_pct == 2
    app = TestbedApp(paper)
    async with app.run_test(size=(120, 24)) as pilot:
        await app.costs_ready.wait()
        await pilot.press("s")
        await pilot.pause()
        sel = app.cell.selection
        line = str(app.query_one("#summary", Static).render())
        assert f"T {sel.latency_s:.2f} s of 2 s" in line and f"E {sel.energy_j:.1f} J of 200 J" in line
        assert "; planned within 1.96 s, 196 J: 2 % margin" in line
        assert "\np90 1.48 s, P(<=T_max) 1.00" in line  # lossless links: the p90 is the mean
        assert "/1.96" not in line


def _reselected_events(topo, chain: list[str], new_chain: list[str]) -> list[dict]:
    """The orchestrator's order (relay/server.py): chain[0] fails stage 0, the run re-selects
    `new_chain` for every stage left (`reselected`, then `recovered`), which runs."""
    evs = relay_events(topo, chain)
    evs = evs[:3]  # run_started, stage_started, downloaded of chain[0]
    base = {"run": "tdemo", "steps": [0, 10], "stage": 0, "ts": 1001.0}
    evs += [{**base, "type": "device_offline", "device": chain[0]},
            {**base, "type": "reselected", "device": new_chain[0], "failed": chain[0], "reason": "offline",
             "chain": new_chain, "relay_order": new_chain, "charged_s": 0.4, "charged_j": 5.0, "t_left_s": 1.6,
             "e_left_j": 65.0, "predicted_latency_s": 1.1, "predicted_energy_j": 40.0},
            {**base, "type": "recovered", "device": new_chain[0], "failed": chain[0], "reason": "offline",
             "steps": [0, 5]}]
    return evs


async def test_chain_line_follows_the_reselected_chain(small):
    """After a kill the chain line still showed the selection's chain."""
    app = TestbedApp(small)
    async with app.run_test(size=(120, 24)) as pilot:
        await app.costs_ready.wait()
        await pilot.press("s")
        chain = app.cell.chain
        new_chain = [d for d in app.cell.devices if d not in chain][:2]
        assert len(chain) == 2 and len(new_chain) == 2
        app._new_run(small.budgets.t_max_s, small.budgets.e_max_j)
        app.running = True
        for ev in _reselected_events(small, chain, new_chain):
            app.feed_event(ev)
        await pilot.pause()
        line = str(app.query_one("#summary", Static).render())
        assert f"chain {' → '.join(new_chain)} (re-selected after {chain[0]} failed)" in line
        assert "T 1.50 s of 2 s (0.40 spent + 1.10 predicted)" in line
        assert "E 45.0 J of 70 J (5.0 spent + 40.0 predicted)" in line
        assert app.cell.chain == new_chain


class _FakeSession:
    """Stands in for RunSession (testbed.composition.session): the run returns at once, the
    teardown takes `teardown_s` and is shielded like the real one's."""

    teardown_s = 0.5
    closed: list[str] = []
    entered = asyncio.Event()
    release = asyncio.Event()  # the cell is up once the test sets it

    def __init__(self, topo, source, *, out_dir, on_event):
        self.run_id, self.out_dir = source.run_id, out_dir
        self.cell = type("Cell", (), {"on_update": lambda self, cb: None})()

    async def __aenter__(self):
        _FakeSession.entered.set()
        await _FakeSession.release.wait()  # the cell comes up
        return self

    async def __aexit__(self, *exc):
        await asyncio.shield(self._close())

    async def _close(self):
        await asyncio.sleep(self.teardown_s)
        _FakeSession.closed.append(self.run_id)

    async def run(self, method, **_kw):
        return {"run": self.run_id, "method": method, "ms_ssim": 0.9, "latency_s": 1.2, "energy_j": 30.0}


@pytest.fixture
def fake_session(monkeypatch):
    import types

    mod = types.ModuleType("testbed.composition.session")
    mod.RunSession = _FakeSession
    monkeypatch.setitem(sys.modules, "testbed.composition.session", mod)
    _FakeSession.closed = []
    _FakeSession.entered = asyncio.Event()
    _FakeSession.release = asyncio.Event()
    return _FakeSession


async def test_status_line_says_starting_and_where_the_run_writes(small, tmp_path, fake_session):
    """It kept "no run yet: press r" while the cell came up; runs wrote ./out/<run> unsaid."""
    app = TestbedApp(small, out_root=tmp_path / "runs")
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        await pilot.press("s", "r")
        await fake_session.entered.wait()
        await pilot.pause()
        status = str(app.query_one("#runstatus", Static).render())
        assert "no run yet" not in status and "starting: bringing up the emulation" in status, status
        rid = app.run_view.run_id
        assert rid and status.startswith(f"run {rid} ")
        where = f"{tmp_path / 'runs' / rid}/"
        assert app.run_view.out_dir == str(tmp_path / "runs" / rid)
        fake_session.release.set()
        while app.running:
            await pilot.pause(0.05)
        log = "".join(strip.text.strip() for strip in app.query_one("#log").lines)  # wrapped lines, no spaces
        assert f"writes{where}" in log.replace(" ", ""), log
        assert f"wrote {where}" in str(app.query_one("#imgcaption", Static).render())
        await pilot.press("question_mark")
        await pilot.pause()
        assert f"{tmp_path / 'runs'}/<run>/" in str(app.screen.query_one("#help-text", Static).render())


async def test_quit_right_after_a_run_waits_for_its_teardown(small, tmp_path, fake_session):
    """q pressed while a finished run's cell was being torn down cancelled the wait for it:
    the process ended first and left the run's namespaces (seen in the browser test)."""
    app = TestbedApp(small, out_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await app.costs_ready.wait()
        fake_session.release.set()
        await pilot.press("s", "r")
        while app.result is None:
            await pilot.pause(0.02)
        rid = app.result["run"]
        await pilot.press("q")
        while app.is_running:
            await asyncio.sleep(0.01)
        assert fake_session.closed == [rid]


async def test_leaving_any_other_way_waits_for_the_teardown(small):
    """textual-serve closes a browser tab's TUI (and SIGTERM a terminal's) with ExitApp,
    which only cancels workers: a run's teardown must still finish first."""
    from textual import messages

    app = TestbedApp(small)
    done = []

    async def run_with_teardown():
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.3)
            done.append(True)

    async with app.run_test(size=SIZE) as pilot:
        app.run_worker_handle = app.run_worker(run_with_teardown(), exclusive=True, group="run")
        await pilot.pause(0.1)
        app.post_message(messages.ExitApp())
        while app.is_running:
            await asyncio.sleep(0.01)
        assert done == [True]


def test_a_split_steps_prediction_counts_the_feature_handling():
    """Split's plan counts the feature messages' handling outside the links (t_handling_s);
    the stage table left it out (pred 1.075 s against the plan's 1.302 s)."""
    rv = RunView()
    rv.apply({"type": "split_step", "ts": 1.0, "run": "tsplit", "device": "dev17>dev09", "steps": [0, 1], "stage": 0,
              "t_down_s": 0.2, "t_cmp_s": 0.6, "t_up_s": 0.3, "energy_j": 9.0,
              "predicted": {"t_down_s": 0.15, "t_cmp_s": 0.6, "t_up_s": 0.325, "t_handling_s": 0.227,
                            "energy_j": 9.3}})
    assert rv.stages[0].predicted_latency_s == pytest.approx(1.302)
