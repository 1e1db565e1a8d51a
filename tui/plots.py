"""Run plots (textual-plotext): latency breakdown per stage (download / compute / upload,
measured next to predicted) and cumulative energy against E_max (measured and predicted).

The data a plot shows is kept on the widget (`bars`, `measured`, `predicted`) so that
tests can check what is drawn without reading pixels.
"""

from __future__ import annotations

from textual_plotext import PlotextPlot

from tui.state import RunView

__all__ = ["LatencyPlot", "EnergyPlot"]


class _DataPlot(PlotextPlot):
    """A plot drawn from data kept on the widget: `replot()` after changing the data."""

    def on_mount(self) -> None:
        self.replot()

    def replot(self) -> None:
        raise NotImplementedError


class LatencyPlot(_DataPlot):
    """Stacked bars per stage: 'N' measured, 'Np' predicted; segments down / cmp / up."""

    MAX_BARS = 12  # the last 6 stages (a split run has one record per denoising step)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.bars: list[tuple[str, float, float, float]] = []  # (label, down_s, cmp_s, up_s)
        self.t_max_s: float | None = None

    def update_from(self, run: RunView, t_max_s: float | None) -> None:
        bars = []
        for s in run.stages:
            if s.phase == "failed":
                continue
            bars.append((f"{s.index}", s.t_down_s or 0.0, s.t_cmp_s or 0.0, s.t_up_s or 0.0))
            p = s.predicted
            if p:
                bars.append((f"{s.index}p", p.get("t_down_s", 0.0), p.get("t_cmp_s", 0.0), p.get("t_up_s", 0.0)))
        self.bars, self.t_max_s = bars[-self.MAX_BARS:], t_max_s  # split runs have a record per step
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("latency/stage s (Np: predicted)")
        if self.bars:
            labels = [b[0] for b in self.bars]
            plt.stacked_bar(labels, [[b[1] for b in self.bars], [b[2] for b in self.bars], [b[3] for b in self.bars]],
                            labels=["down", "cmp", "up"], orientation="horizontal", width=0.6)
        self.refresh()


class EnergyPlot(_DataPlot):
    """Cumulative energy after each stage, measured and predicted, with the E_max line."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.measured: list[float] = []
        self.predicted: list[float] = []
        self.e_max_j: float | None = None

    def update_from(self, run: RunView, e_max_j: float | None) -> None:
        """One point per finished attempt: a failed attempt adds the energy it wasted (once the
        result says how much) to the measured curve and nothing to the predicted one."""
        meas, pred, m, p = [], [], 0.0, 0.0
        for s in run.stages:
            if s.phase not in ("done", "failed"):
                continue
            m += s.energy_j or 0.0
            meas.append(m)
            if s.phase == "done":
                p += s.predicted.get("energy_j", 0.0)
            pred.append(p)
        self.measured, self.e_max_j = meas, e_max_j
        self.predicted = pred if any(pred) else []
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("energy J, E_max red")
        n = max(len(self.measured), len(self.predicted), 1)
        xs = list(range(0, n + 1))
        if self.predicted:
            plt.plot(xs[: len(self.predicted) + 1], [0.0] + self.predicted, label="pred", marker="braille")
        if self.measured:
            plt.plot(xs[: len(self.measured) + 1], [0.0] + self.measured, label="meas", marker="braille")
        if self.e_max_j:
            plt.hline(self.e_max_j, "red")
            plt.ylim(0, self.e_max_j * 1.1)
        plt.xticks(xs)
        plt.xlabel("after attempt")
        self.refresh()
