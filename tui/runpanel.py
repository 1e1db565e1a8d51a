"""Live views of one run: a status line, stage progress (device, steps, download /
compute / upload, predicted mean and p90), the latency and energy plots, and the event
log. Renders a `RunView`.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, RichLog, Static

from tui.plots import EnergyPlot, LatencyPlot
from tui.state import RunView

__all__ = ["RunPanel", "STAGE_COLUMNS"]

STAGE_COLUMNS = (
    ("n", "#"), ("device", "device"), ("steps", "steps"), ("phase", "phase"), ("down", "down s"),
    ("cmp", "cmp s"), ("up", "up s"), ("energy", "E J"), ("pred", "pred s/J"), ("p90", "p90 s"),
)

_PHASE_STYLE = {"download": "cyan", "compute": "yellow", "upload": "magenta", "done": "green", "failed": "bold red"}


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "" if v is None else format(v, fmt)


class RunPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("no run yet: press r to run the selection in the emulation", id="runstatus")
        yield DataTable(id="stages", cursor_type="none", zebra_stripes=True)
        with Horizontal(id="plots"):
            yield LatencyPlot(id="latency")
            yield EnergyPlot(id="energy")
        yield RichLog(id="log", max_lines=2000, wrap=True, markup=False)

    def on_mount(self) -> None:
        table = self.query_one("#stages", DataTable)
        for key, label in STAGE_COLUMNS:
            table.add_column(label, key=key)

    def reset(self) -> None:
        self.query_one("#stages", DataTable).clear()
        self.query_one("#log", RichLog).clear()

    def log_line(self, line: str, style: str = "") -> None:
        self.query_one("#log", RichLog).write(Text(line, style=style))

    def show(self, run: RunView, t_max_s: float | None, e_max_j: float | None) -> None:
        table = self.query_one("#stages", DataTable)
        for s in run.stages:
            key = f"{s.index}.{s.attempt}"
            pl, pe = s.predicted_latency_s, s.predicted.get("energy_j")
            pred = f"{pl:.2f}/{pe:.0f}" if pl is not None and pe is not None else ""
            phase = s.phase + (" (recovery)" if s.recovered else "")
            row = {
                "n": str(s.index), "device": s.device, "steps": f"{s.steps[0]}-{s.steps[1]}",
                "phase": Text(phase, style=_PHASE_STYLE.get(s.phase, "")), "down": _f(s.t_down_s),
                "cmp": _f(s.t_cmp_s), "up": _f(s.t_up_s), "energy": _f(s.energy_j, ".1f"), "pred": pred,
                "p90": _f(s.predicted_p90_s),
            }
            if key not in table.rows:
                table.add_row(*row.values(), key=key)
            else:
                for col, v in row.items():
                    table.update_cell(key, col, v, update_width=True)
        self.query_one("#latency", LatencyPlot).update_from(run, t_max_s)
        self.query_one("#energy", EnergyPlot).update_from(run, e_max_j)
        self.query_one("#runstatus", Static).update(self.status_text(run, t_max_s, e_max_j))

    @staticmethod
    def status_text(run: RunView, t_max_s: float | None, e_max_j: float | None) -> Text:
        t = Text()
        t.append(f"run {run.run_id} " if run.run_id else "new run ", style="bold")
        if run.failed:
            t.append(f"FAILED: {run.failed}", style="bold red")
            return t
        cur = run.stages[-1] if run.stages else None
        if run.finished:
            t.append("finished ", style="bold green")
        elif cur is not None:
            t.append(f"stage {cur.index} {cur.device} {cur.phase} ")
        else:
            t.append("starting: bringing up the emulation, broker, agents... ", style="yellow")
        lat = run.result.get("latency_s") if run.finished and run.result else None
        lat = lat if isinstance(lat, (int, float)) else run.latency_s
        t.append(f"│ T {lat:.2f}", style="red" if t_max_s and lat > t_max_s else "")
        t.append(f"/{t_max_s:g} s " if t_max_s else " s ")
        e = run.result.get("energy_j") if run.finished and run.result else None
        e = e if isinstance(e, (int, float)) else run.energy_j
        t.append(f"│ E {e:.1f}", style="red" if e_max_j and e > e_max_j else "")
        t.append(f"/{e_max_j:g} J" if e_max_j else " J")
        if run.failed_devices:
            t.append(f" │ failed: {', '.join(sorted(run.failed_devices))}", style="red")
        return t
