"""Runs and their events in the TUI: start a run (through the run owner, `RunSession`),
follow one started elsewhere (attach), kill a device or cut its link, render every
telemetry event and the final result. Mixed into `TestbedApp`.

The library does the work; this module only calls it and renders what it emits. The run
owner (torch, relay, emulation) is imported when the first run starts, off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.widgets import Static

from testbed.errors import TestbedError
from testbed.methods import method
from tui.attach import follow_events, follow_events_in_netns, read_observer, server_netns
from tui.imageview import ImageView
from tui.results import load_image
from tui.runpanel import RunPanel
from tui.state import RunView

__all__ = ["LiveMixin", "OUT_ROOT"]

#: How long quitting waits for a cancelled run's teardown.
QUIT_TEARDOWN_S = 90.0

#: Where runs started from the TUI write OUT_ROOT/<run>/ (result.json, events.jsonl, image.png,
#: logs/), like `testbed run`'s default out/<run>; `testbed tui --out DIR` changes it.
OUT_ROOT = Path("out")

_LOG_STYLE = {"device_offline": "bold red", "recovered": "bold yellow", "run_finished": "bold green",
              "run_failed": "bold red", "deadline_missed": "red", "fault_injected": "bold red",
              "selection": "bold blue"}


class LiveMixin:
    """Run, attach, kill and event rendering (needs the TestbedApp's widgets and state)."""

    # ---- actions -------------------------------------------------------------------------
    def action_run(self) -> None:
        if self.attach:
            self.notify("attached to a run: it was started elsewhere", severity="warning")
            return
        if self.running:
            self.notify("a run is in progress; k kills the highlighted device", severity="warning")
            return
        try:
            p = self.params()
            method(p["method"]).check_confidence(p["confidence"], "P")
        except (ValueError, TestbedError) as e:
            self._show_summary(str(e))
            return
        self.apply_seed(p["seed"])
        self.running = True
        self._new_run(p["t_max_s"], p["e_max_j"])
        self.action_tab("run")
        self.run_worker_handle = self._run(p)

    async def action_quit(self) -> None:
        """Quit; a run in progress is cancelled first and its teardown (namespaces, links,
        cgroups, broker, agents) awaited, bounded, so nothing is left behind."""
        await self._stop_run()
        self.exit()

    async def on_exit_app(self, _message: Any) -> None:
        """Any other way out (SIGTERM, a served TUI's browser tab closed: textual-serve asks
        the app to exit) waits for a run's teardown too; Textual only cancels workers."""
        await self._stop_run()

    #: True while a finished run's cell is being torn down (not to be cancelled)
    tearing_down = False

    async def _stop_run(self) -> None:
        worker = getattr(self, "run_worker_handle", None)
        if worker is not None and worker.is_running:
            self.notify("stopping the run: tearing down the emulation...", timeout=30)
            if not self.tearing_down:
                worker.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(worker.wait(), QUIT_TEARDOWN_S)

    async def action_kill(self) -> None:
        dev = self.query_one("#devices").highlighted_id
        if not self.running or self.runner is None or dev is None:
            self.notify("no run in progress: k kills the highlighted device during a run", severity="warning")
            return
        self.query_one("#runpanel", RunPanel).log_line(f"kill {dev} (from the TUI)", "bold red")
        try:
            await self.runner.kill(dev)
        except TestbedError as e:
            self.notify(str(e), severity="error")

    async def action_cut(self) -> None:
        """Cut (or restore) the highlighted device's link: the device is up but unreachable,
        so the orchestrator's deadline (or the broker's keepalive) triggers the recovery."""
        dev = self.query_one("#devices").highlighted_id
        emu = self.runner.cell if self.runner is not None else None
        if not self.running or emu is None or dev is None:
            self.notify("no run in progress: c cuts the highlighted device's link during a run", severity="warning")
            return
        panel = self.query_one("#runpanel", RunPanel)
        try:
            if dev in self.cut_links:
                await emu.restore_link(dev)
                self.cut_links.discard(dev)
                panel.log_line(f"link of {dev} restored (from the TUI)", "bold yellow")
            else:
                await emu.cut_link(dev)
                self.cut_links.add(dev)
                panel.log_line(f"link of {dev} cut (from the TUI)", "bold red")
        except TestbedError as e:
            self.notify(str(e), severity="error")

    # ---- a run started here ----------------------------------------------------------------
    def _new_run(self, t_max_s: float | None, e_max_j: float | None) -> None:
        self.run_view = RunView(t_max_s=t_max_s, e_max_j=e_max_j)
        self.cut_links: set[str] = set()
        self.result = None
        panel = self.query_one("#runpanel", RunPanel)
        panel.reset()
        panel.show(self.run_view, t_max_s, e_max_j)  # "starting", not the last run's (or "no run yet")

    def out_root_text(self) -> str:
        """The folder runs go to, as given (relative to where the TUI was started, or not)."""
        return str(self.out_root or OUT_ROOT)

    def out_dir_of(self, run_id: str) -> Path:
        """Where a run started here writes (absolute, so that the TUI can say it)."""
        return ((self.out_root or OUT_ROOT) / run_id).absolute()

    @work(exclusive=True, group="run")
    async def _run(self, p: dict[str, Any]) -> None:
        panel = self.query_one("#runpanel", RunPanel)
        panel.log_line(f"starting a {p['method']} run: loading the runner (model, relay, emulation)...", "dim")
        try:
            runs = await asyncio.to_thread(importlib.import_module, "testbed.emulation.runs")
            session_mod = await asyncio.to_thread(importlib.import_module, "testbed.composition.session")
            rid = runs.new_run_id()
            out_dir = self.out_dir_of(rid)
            self.run_view.run_id, self.run_view.out_dir = rid, str(out_dir)
            panel.show(self.run_view, p["t_max_s"], p["e_max_j"])
            own = method(p["method"]).own_selector
            if own is not None:
                panel.log_line(f"{p['method']}: the run picks its own devices ({own}); the selector applies to "
                               "methods that take one", "dim")
            panel.log_line(f"run {rid}: bringing up the emulation ({self.backend}), broker and agents...", "dim")
            panel.log_line(f"run {rid} writes {out_dir}/ (result.json, events.jsonl, image.png, logs/)", "dim")
            cells = await asyncio.to_thread(importlib.import_module, "testbed.composition.cells")
            async with session_mod.RunSession(self.topo, cells.MadeCell(rid, backend=self.backend), out_dir=out_dir,
                                              on_event=self.event_from_any_thread) as session:
                self.runner = session
                session.cell.on_update(lambda u: self.event_from_any_thread(
                    {"type": "positions", "positions": {d["id"]: d for d in u.devices}}))
                result = await session.run(p["method"], selector=p["selector"], t_max_s=p["t_max_s"],
                                           e_max_j=p["e_max_j"], confidence=p["confidence"])
                self.show_result(result)
                # leaving the block tears the cell down (shielded): a cancel now would only stop
                # the wait for it, and the process could end before the teardown does
                self.tearing_down = True
                panel.log_line(f"run {rid}: tearing down the emulation...", "dim")
        except TestbedError as e:
            self._run_failed(str(e), p)
        except Exception as e:  # noqa: BLE001 - keep the TUI up; the message says what broke
            self._run_failed(f"{type(e).__name__}: {e}", p)
        finally:
            self.runner = None
            self.running = False
            self.tearing_down = False
            self._refresh_cell()

    def _run_failed(self, msg: str, p: dict[str, Any]) -> None:
        panel = self.query_one("#runpanel", RunPanel)
        panel.log_line(f"error: {msg}", "bold red")
        self.run_view.failed = msg
        panel.show(self.run_view, p["t_max_s"], p["e_max_j"])
        self.notify(msg, title="run failed", severity="error", timeout=10)

    # ---- a run started elsewhere -----------------------------------------------------------
    @work(exclusive=True, group="attach")
    async def _follow(self, run: str) -> None:
        panel = self.query_one("#runpanel", RunPanel)
        try:
            info = await asyncio.to_thread(read_observer, run, self.state_root)
            netns = await asyncio.to_thread(server_netns, run, self.state_root)
            self.running = True
            self._new_run(self.topo.budgets.t_max_s, self.topo.budgets.e_max_j)
            self.action_tab("run")
            for attempt in (1, 2):
                where = f" (from {netns}: another run holds the host's route)" if netns else ""
                panel.log_line(f"attached to {info['topic']} at {info['host']}:{info['port']}{where}", "dim")
                try:
                    await self._consume(follow_events_in_netns(info, netns) if netns else follow_events(info))
                    break
                except TestbedError:
                    # the run may have written state.json (host_route) only after we looked
                    for _ in range(150):  # written once the agents are spawned: wait up to 15 s
                        if (self.state_root / run / "state.json").exists():
                            break
                        await asyncio.sleep(0.1)
                    later = await asyncio.to_thread(server_netns, run, self.state_root)
                    if attempt == 2 or later is None or later == netns or self.run_view.events:
                        raise
                    netns = later
        except TestbedError as e:
            panel.log_line(f"error: {e}", "bold red")
            self.notify(str(e), title="attach failed", severity="error", timeout=10)
        finally:
            self.running = False
            self._refresh_cell()

    async def _consume(self, source: Any) -> None:
        async with contextlib.aclosing(source) as events:
            async for ev in events:
                self.feed_event(ev)
                if ev.get("type") in ("run_finished", "run_failed"):
                    break

    # ---- events ------------------------------------------------------------------------------
    def event_from_any_thread(self, ev: dict[str, Any]) -> None:
        """The runners' on_event: safe from the event loop and from other threads."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.feed_event, ev)

    def feed_event(self, ev: dict[str, Any]) -> None:
        """Render one telemetry event (the JSON of tb/<run>/events)."""
        kind = ev.get("type")
        dev = ev.get("device")
        if self._moved(ev) and kind in ("moved", "positions", "mobility"):
            self._refresh_cell()
            return
        chain = ev.get("relay_order") or ev.get("selected")
        chain_changed = isinstance(chain, list) and all(isinstance(c, str) for c in chain)
        if chain_changed:
            self.cell.set_chain(chain)
        if kind == "recovered" and dev in self.cell.devices:
            failed = ev.get("failed")
            chain = self.cell.chain
            if failed in chain:
                chain[chain.index(failed)] = dev
            elif dev not in chain:
                chain.append(dev)
            self.cell.set_chain(chain)
        line = self.run_view.apply(ev)
        if chain_changed or kind in ("recovered", "reselected"):
            self._show_summary()  # the chain line follows the run's chain, re-selections included
        panel = self.query_one("#runpanel", RunPanel)
        panel.log_line(line, _LOG_STYLE.get(str(kind), ""))
        panel.show(self.run_view, self.run_view.t_max_s, self.run_view.e_max_j)
        if kind == "run_finished" and self.result is None:
            self.show_result(ev)
        self._refresh_cell()

    def _moved(self, ev: dict[str, Any]) -> bool:
        """Apply position updates: one device (device, x_m, y_m) or many ({id: [x, y] | {x_m, y_m, rates}})."""
        moves: dict[str, Any] = {}
        if ev.get("device") in self.cell.devices and "x_m" in ev and "y_m" in ev:
            moves[ev["device"]] = ev
        if isinstance(ev.get("positions"), dict):
            moves.update(ev["positions"])
        for dev_id, pos in moves.items():
            if dev_id not in self.cell.devices:
                continue
            if isinstance(pos, dict):
                x, y, up, down = pos.get("x_m"), pos.get("y_m"), pos.get("rate_up_mbps"), pos.get("rate_down_mbps")
            elif isinstance(pos, (list, tuple)) and len(pos) >= 2:
                x, y, up, down = pos[0], pos[1], None, None
            else:
                continue
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                self.cell.move(dev_id, float(x), float(y), up, down)
        if moves and self.costs_ready.is_set():  # predicted T_j / E_j follow the new rates
            try:
                self.cell.compute_costs()
            except TestbedError:
                pass  # a device out of range keeps its last prediction; the table shows its rate
        return bool(moves)

    # ---- the result ----------------------------------------------------------------------------
    def show_result(self, result: Any) -> None:
        """The final result: latency/energy line, MS-SSIM and the two images."""
        doc = result.to_json() if hasattr(result, "to_json") else dict(result)
        self.result = doc
        self.run_view.finished = True
        self.run_view.result = doc
        for rec in doc.get("recovered") or []:  # the energy each failed attempt wasted
            failed = [st for st in self.run_view.stages if st.device == rec.get("device") and st.phase == "failed"]
            if failed and isinstance(rec.get("energy_j"), (int, float)):
                failed[0].energy_j = float(rec["energy_j"])
        gen = load_image(result, doc)
        self.query_one("#generated", ImageView).set_image(gen)
        if gen is not None:
            self._load_reference(doc)
        ms = doc.get("ms_ssim")
        t = Text()
        t.append(f"run {doc.get('run', '?')} ", style="bold")
        if doc.get("method"):
            t.append(f"{doc['method']}: ")
        t.append(f"MS-SSIM {ms:.3f}" if isinstance(ms, (int, float)) else "MS-SSIM n/a", style="bold green")
        lat, en = doc.get("latency_s"), doc.get("energy_j")
        if isinstance(lat, (int, float)):
            t.append(f"  latency {lat:.2f} s")
        if isinstance(en, (int, float)):
            t.append(f"  energy {en:.1f} J")
        if doc.get("recovered"):
            t.append(f"  recovered: {len(doc['recovered'])}", style="yellow")
        if self.run_view.out_dir and doc.get("run") == self.run_view.run_id:
            t.append(f"\nwrote {self.run_view.out_dir}/", style="dim")
        self.query_one("#imgcaption", Static).update(t)
        panel = self.query_one("#runpanel", RunPanel)
        if doc.get("run") != self._last_result_run:  # run_finished, then the session's result: log once
            panel.log_line(t.plain.replace("\n", "; "), "bold green")
            self._last_result_run = doc.get("run")
        panel.show(self.run_view, self.run_view.t_max_s, self.run_view.e_max_j)

    _last_result_run: str | None = None

    @work(exclusive=True, group="reference")
    async def _load_reference(self, doc: dict[str, Any]) -> None:
        """The reference image (fp32, full steps, same seed and prompt; cached on disk by
        testbed.diffusion) when the result does not carry it."""
        wl = self.topo.workload
        try:
            q = await asyncio.to_thread(importlib.import_module, "testbed.diffusion.quality")
            ref = await asyncio.to_thread(q.reference_image, wl.model, wl.prompt, int(next(v for v in (doc.get("seed"), (doc.get("meta") or {}).get("seed"), self.topo.seed) if v is not None)),
                                          wl.reference_steps, wl.scheduler)
        except Exception as e:  # noqa: BLE001 - the generated image is still shown
            self.query_one("#runpanel", RunPanel).log_line(f"reference image unavailable: {e}", "yellow")
            return
        self.query_one("#reference", ImageView).set_image(ref)
