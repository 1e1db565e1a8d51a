"""The Textual app: controls, the Cell / Run / Image tabs, key bindings.

It calls the library (selection, the run owner) and renders the events they emit; it never
touches the kernel. Heavy imports (the run owner pulls in torch) happen only when a run
starts, so the first screen appears fast.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Input, Label, Select, Static, TabbedContent, TabPane, Tabs

from testbed.errors import TestbedError
from testbed.methods import method, methods
from testbed.model.names import SELECTORS
from testbed.model.topology import Topology
from tui.attach import DEFAULT_STATE_ROOT
from tui.cellmap import CellMap
from tui.devices import DeviceDetails, DevicesTable
from tui.help import HelpScreen
from tui.imageview import ImageView
from tui.live import LiveMixin
from tui.runpanel import RunPanel
from tui.state import CellModel, RunView, budget_line

__all__ = ["TestbedApp"]


#: What each tab focuses when it is shown (None: nothing, so every key reaches the app).
TAB_FOCUS = {"cell": "#devices", "run": "#log", "image": None}


class TestbedApp(LiveMixin, App[None]):
    __test__ = False  # not a pytest class despite the name
    CSS_PATH = "app.tcss"
    TITLE = "testbed"
    # When a screen comes back (a pop-up closed) with nothing focused, Textual would focus
    # the first focusable widget: the T_max field, where q, 1, 2, 3 are typed in instead.
    # Focus is set explicitly (on_mount, _focus_tab); pop-ups set their own AUTO_FOCUS.
    AUTO_FOCUS = None
    BINDINGS = [
        Binding("s", "select", "Select", priority=True),
        Binding("r", "run", "Run", priority=True),
        Binding("k", "kill", "Kill", priority=True),
        Binding("c", "cut", "Cut link", priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit", priority=True),
        # shown: in a control field the footer hides the letter keys (they are typed in)
        Binding("escape", "focus_devices", "Table"),
        Binding("1", "tab('cell')", "Cell", show=False),
        Binding("2", "tab('run')", "Run", show=False),
        Binding("3", "tab('image')", "Image", show=False),
    ]

    def __init__(self, topo: Topology, *, source: str | None = None, attach: str | None = None,
                 backend: str = "netns", state_root: Path = DEFAULT_STATE_ROOT, out_root: Path | None = None) -> None:
        super().__init__()
        self.topo = topo
        self.out_root = out_root  # runs write OUT_ROOT/<run>/ (tui.live.OUT_ROOT when None)
        self.source = source
        self.attach = attach
        self.backend = backend
        self.state_root = Path(state_root)
        self.cell = CellModel(topo)
        self.run_view = RunView(t_max_s=topo.budgets.t_max_s, e_max_j=topo.budgets.e_max_j)
        self.runner: Any = None
        self.cut_links: set[str] = set()
        self.result: dict[str, Any] | None = None
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.costs_ready = asyncio.Event()  # set once predicted T_j / E_j are in the table

    # ---- layout ------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        b = self.topo.budgets
        with Horizontal(id="controls"):
            yield Label("T_max s")
            yield Input(f"{b.t_max_s:g}", id="tmax", compact=True, restrict=r"[0-9.]*", max_length=8)
            yield Label("E_max J")
            yield Input(f"{b.e_max_j:g}", id="emax", compact=True, restrict=r"[0-9.]*", max_length=8)
            # the full list arrives with testbed.selection (scipy), imported after the first screen
            yield Select([(s, s) for s in SELECTORS], value="dp", id="selector", compact=True, allow_blank=False)
            yield Select([(m.name, m.name) for m in methods()], value="multistage", id="method", compact=True,
                         allow_blank=False)
            yield Label("seed")
            yield Input(str(self.topo.seed), id="seed", compact=True, restrict=r"[0-9]*", max_length=10)
            yield Label("P")  # --confidence: empty = the mean-based plan
            yield Input("", id="confidence", compact=True, restrict=r"[0-9.]*", max_length=5, placeholder="mean")
        yield Static(id="summary")
        with TabbedContent(id="tabs", initial="cell"):
            with TabPane("Cell", id="cell"):
                yield DevicesTable(id="devices")
                with Horizontal(id="cellrow"):
                    yield CellMap(self.cell, id="map")
                    yield DeviceDetails(id="details")
            with TabPane("Run", id="run"):
                yield RunPanel(id="runpanel")
            with TabPane("Image", id="image"):
                yield Static("no image yet: the final image of a run appears here", id="imgcaption")
                with Horizontal(id="images"):
                    with Vertical():
                        yield Static("generated", classes="imgtitle")
                        yield ImageView(id="generated")
                    with Vertical():
                        yield Static("reference", classes="imgtitle")
                        yield ImageView(id="reference")
        yield Footer()

    def on_mount(self) -> None:
        self._loop = asyncio.get_running_loop()
        name = f"{self.topo.name} ({self.source})" if self.source else self.topo.name
        self.sub_title = f"{name}, {len(self.cell.devices)} devices" + (f", attached to {self.attach}" if self.attach else "")
        self.query_one("#map", CellMap).border_title = f"cell {self.topo.area.width_m:g} x {self.topo.area.height_m:g} m"
        self._refresh_cell()
        self._show_summary()
        self.query_one("#devices", DevicesTable).focus()
        for tabs in self.query(Tabs):  # tabs switch with 1 2 3; Tab goes controls <-> table
            tabs.can_focus = False
        self._load_costs()
        if self.attach:
            self._follow(self.attach)

    @work(exclusive=True, group="costs")
    async def _load_costs(self) -> None:
        """Import the selection library off the event loop (scipy takes ~1 s), then fill in
        the predicted costs: the first screen does not wait for it."""
        await asyncio.to_thread(importlib.import_module, "testbed.selection")
        try:
            self.cell.compute_costs()
            self._refresh_cell()
            await asyncio.to_thread(self.cell.compute_distributions)  # lossy links: a simulation each
        except TestbedError as e:
            self.notify(str(e), severity="error", timeout=10)
        self._refresh_cell()
        self.costs_ready.set()

    # ---- reading the controls ----------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The control values; ValueError naming the field when one is not a number."""
        out: dict[str, Any] = {}
        for wid, key, conv in (("tmax", "t_max_s", float), ("emax", "e_max_j", float), ("seed", "seed", int)):
            raw = self.query_one(f"#{wid}", Input).value.strip()
            try:
                val = conv(raw)
            except ValueError:
                raise ValueError(f"{key.replace('_s', '').replace('_j', '')}: {raw!r} is not a number") from None
            if key != "seed" and not val > 0:
                raise ValueError(f"{key}: must be positive, got {raw!r}")
            out[key] = val
        out["selector"] = self.query_one("#selector", Select).value
        out["method"] = self.query_one("#method", Select).value
        raw = self.query_one("#confidence", Input).value.strip()
        try:
            out["confidence"] = float(raw) if raw else None
        except ValueError:
            raise ValueError(f"P: {raw!r} is not a number (empty: the mean-based plan)") from None
        if out["confidence"] is not None and not 0 < out["confidence"] < 1:
            raise ValueError(f"P: a probability strictly between 0 and 1, got {raw!r} (empty: the mean-based plan)")
        return out

    def _show_summary(self, note: str | None = None) -> None:
        """The chain line: the chain (as selected, then as the run re-selects it) and its
        predicted latency and energy against the budgets."""
        t = Text()
        sel = self.cell.selection
        try:
            p = self.params()
        except ValueError as e:
            self.query_one("#summary", Static).update(Text(str(e), style="bold red"))
            return
        chain = self.cell.chain or (list(sel.selected) if sel is not None else [])
        resel = self.run_view.reselections[-1] if self.run_view.reselections else None
        if resel is not None and resel.get("relay_order") != chain:
            resel = None  # selected again since
        if note:
            t.append(note, style="bold red")
        elif sel is None and not chain:
            t.append(f"{len(self.cell.devices)} devices; s selects under T_max {p['t_max_s']:g} s, "
                     f"E_max {p['e_max_j']:g} J ({p['selector']}); r runs")
        else:
            t.append("chain ", style="bold")
            t.append(" → ".join(chain) or "(empty)", style="bold blue")
            margin = self.topo.budgets.margin_pct
            pieces: list[tuple[str, str]] = []
            second: list[tuple[str, str]] = []  # under the chain: the modelled p90 and P(within)
            if resel is not None and self.run_view.t_max_s and self.run_view.e_max_j:
                t.append(f" (re-selected after {resel.get('failed')} failed)", style="yellow")
                spent = (float(resel.get("charged_s") or 0.0), float(resel.get("charged_j") or 0.0))
                pieces = budget_line(spent[0] + float(resel.get("predicted_latency_s") or 0.0),
                                     spent[1] + float(resel.get("predicted_energy_j") or 0.0),
                                     self.run_view.t_max_s, self.run_view.e_max_j, margin, spent)
            elif sel is not None:
                t_max_s, e_max_j = self.cell.budgets or (sel.t_max_s, sel.e_max_j)
                mean_p90 = self.cell.chain_mean_p90_s  # the chain's modelled mean and p90
                pieces = budget_line(mean_p90[0] if mean_p90 else sel.latency_s, sel.energy_j, t_max_s, e_max_j,
                                     margin)
                if mean_p90 is not None and self.cell.p_within is not None:
                    short = self.cell.confidence is not None and self.cell.p_within < self.cell.confidence
                    second.append((f"p90 {mean_p90[1]:.2f} s, P(<=T_max) {self.cell.p_within:.2f}",
                                   "red" if short else "dim"))
            t.append("  ")
            for text, style in pieces[:2]:
                t.append(text, style=style)
            if sel is not None:
                kept = f", P>={self.cell.confidence:g}" if self.cell.confidence is not None else ""
                t.append(f"  {sel.objective_mb / 1000:.2f} GB ({sel.selector}{kept})")
            second += pieces[2:]  # the planning margin
            for n, (text, style) in enumerate(second):  # on a line of their own
                t.append(("\n" if n == 0 else "; ") + text, style=style)
        own = method(p["method"]).own_selector
        if own is not None:
            t.append(f"  {p['method']}: the run picks its own devices ({own})", style="yellow")
        self.query_one("#summary", Static).update(t)

    def _refresh_cell(self) -> None:
        table = self.query_one("#devices", DevicesTable)
        table.show(self.cell, self.run_view.offline)
        cmap = self.query_one("#map", CellMap)
        cmap.offline = set(self.run_view.offline)
        cur = self.run_view.stages[-1] if self.running and self.run_view.stages else None
        cmap.active = cur.device if cur else None
        cmap.refresh()
        self.query_one("#details", DeviceDetails).show(self.cell, table.highlighted_id)

    @on(DataTable.RowHighlighted, "#devices")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.query_one("#details", DeviceDetails).show(self.cell, event.row_key.value)

    @on(Input.Changed)
    @on(Select.Changed)
    def _control_changed(self) -> None:
        self._show_summary()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_select()
        self.action_focus_devices()

    def action_focus_devices(self) -> None:
        """Back to the devices table (whose highlighted row k and c act on)."""
        self.action_tab("cell")
        self.query_one("#devices", DevicesTable).focus()

    def apply_seed(self, seed: int) -> None:
        """The seed control is the scenario seed (like `--seed`): a new one re-places drawn
        devices and redraws LOS, exactly as the run will."""
        if seed == self.topo.seed:
            return
        self.topo = self.topo.model_copy(update={"seed": seed})
        self.cell = CellModel(self.topo)
        self.query_one("#map", CellMap).cell = self.cell
        if self.costs_ready.is_set():
            self.cell.compute_costs()
        self._refresh_cell()

    # ---- actions -----------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        self._focus_tab(tab)

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._focus_tab(event.pane.id or "cell")

    def _focus_tab(self, tab: str) -> None:
        """Focus the shown tab's own widget (or nothing): never leave focus on a hidden one,
        which would hand it to the first control field."""
        target = TAB_FOCUS.get(tab)
        self.set_focus(self.query_one(target) if target else None)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.out_root_text()))

    def action_select(self) -> None:
        if self.attach:
            self.notify("attached to a run: selection is the run's", severity="warning")
            return
        if self.running:
            self.notify("a run is in progress: select again when it has ended", severity="warning")
            return
        try:
            p = self.params()
            self.apply_seed(p["seed"])
            self.cell.select(p["t_max_s"], p["e_max_j"], p["selector"], p["seed"], p["confidence"])
        except ValueError as e:
            self._show_summary(str(e))
            return
        except TestbedError as e:
            self._refresh_cell()
            self._show_summary(f"infeasible: {e}")
            self.notify(str(e), title="no selection", severity="error", timeout=8)
            return
        table = self.query_one("#devices", DevicesTable)
        if self.cell.chain:  # bring the chain's first device into view (and into the details)
            table.move_cursor(row=table.get_row_index(self.cell.chain[0]))
        self._refresh_cell()
        self._show_summary()
