"""What the TUI shows, as plain data: the cell (devices, links, costs, selection) and a run
(stages, energy, log) folded from the runner's telemetry events.

Pure: no Textual, no kernel. The widgets render these objects; tests
check them directly. Units are in the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from testbed.model.radio import DeviceLink, compute_links, link_for_position
from testbed.model.topology import Topology, place

__all__ = ["DeviceRow", "CellModel", "StageView", "RunView", "PHASES", "budget_line", "short_profile"]

#: Phases of one stage, in order (the paper's T_down, T_cmp, T_up).
PHASES = ("waiting", "download", "compute", "upload", "done")


def short_profile(name: str) -> str:
    """'jetson-agx-orin' -> 'orin' (the table and the map are narrow)."""
    return name.removeprefix("jetson-agx-").removeprefix("jetson-")


@dataclass
class DeviceRow:
    """A device as shown: its current link (moved by mobility) and what the TUI adds."""

    link: DeviceLink
    t_j_s: float | None = None  # predicted stage latency (down + cmp + up), its mean
    t_j_p90_s: float | None = None  # its p90 (the modelled distribution; None until computed)
    e_j_j: float | None = None  # predicted stage energy
    size_mb: float | None = None
    order: int | None = None  # 1-based position in the selected relay chain
    online: bool = True

    def __getattr__(self, name: str) -> Any:  # id, profile, precision, x_m, y_m, distance_m, rates...
        if name == "link":
            raise AttributeError(name)
        return getattr(self.link, name)


class CellModel:
    """Devices of a topology with their links, predicted costs and the current selection."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.placement = place(topo)
        self.server_x_m = self.placement.server.x_m
        self.server_y_m = self.placement.server.y_m
        self.devices: dict[str, DeviceRow] = {
            link.id: DeviceRow(link) for link in compute_links(topo, self.placement)}
        self.selection: Any = None  # testbed.selection.Selection
        self.budgets: tuple[float, float] | None = None  # the T_max, E_max it was selected under
        self.costs: list[Any] = []
        self.model: Any = None  # testbed.selection.predictions.StageModel of the current links
        self.confidence: float | None = None  # the P the selection keeps (None: mean-based)
        self.p_within: float | None = None  # the selection's modelled P(latency <= T_max)

    @property
    def chain(self) -> list[str]:
        """Device ids of the relay chain in stage order (selection, then run updates)."""
        return [d.id for d in sorted(self.devices.values(), key=lambda r: r.order or 0) if d.order]

    def compute_costs(self) -> list[Any]:
        """Predicted T_j, E_j and model size of every device (testbed.selection's cost model)
        on the devices' current links."""
        from testbed.selection import device_costs

        self.costs = device_costs(self.topo, [row.link for row in self.devices.values()])
        self.model = None  # the links may have moved: distributions again on demand
        for c in self.costs:
            row = self.devices[c.id]
            row.t_j_s, row.t_j_p90_s, row.e_j_j, row.size_mb = c.latency_s, None, c.energy_j, c.size_mb
        return self.costs

    def compute_distributions(self) -> Any:
        """Every device's stage as a distribution (fresh connections, no delayer: what a new
        cell's first run predicts); T_j becomes its mean and T_j p90 its p90. The StageModel."""
        from testbed.selection.predictions import StageModel

        if not self.costs:
            self.compute_costs()
        model = StageModel(self.topo, [row.link for row in self.devices.values()], self.costs, seed=self.topo.seed)
        for st in model.stages(c.id for c in self.costs):
            row = self.devices[st.id]
            row.t_j_s, row.t_j_p90_s = st.latency.mean(), float(st.latency.quantile(0.9))
        self.model = model
        return model

    def select(self, t_max_s: float, e_max_j: float, selector: str, seed: int, confidence: float | None = None) -> Any:
        """Run the selection (with a confidence: P(latency <= T_max) >= it under the modelled
        distributions); raises testbed.errors.InfeasibleError when nothing fits."""
        from testbed.selection import select
        from testbed.selection.chance import select_chance
        from testbed.selection.costs import planning_budgets

        self.compute_costs()
        model = self.compute_distributions()
        online = [c for c in self.costs if self.devices[c.id].online]
        budgets = planning_budgets(self.topo, t_max_s, e_max_j)  # the chain a run picks: less the margin
        try:
            if confidence is None:
                sel = select(online, *budgets, selector=selector, seed=seed)
            else:
                sel = select_chance(online, model.stages(c.id for c in online), *budgets, confidence,
                                    selector=selector, seed=seed).selection
        except Exception:
            self.set_chain([])
            self.selection = self.p_within = None
            raise
        self.selection, self.confidence = sel, confidence
        self.budgets = (t_max_s, e_max_j)
        self.p_within = model.run(sel.selected).share_within(t_max_s)
        self.set_chain(list(sel.selected))
        return sel

    @property
    def chain_mean_p90_s(self) -> tuple[float, float] | None:
        """The selected chain's modelled mean and p90 latency (draws summed)."""
        if self.selection is None or self.model is None:
            return None
        run = self.model.run(self.selection.selected)
        return run.mean(), float(run.quantile(0.9))

    def set_chain(self, chain: list[str]) -> None:
        for row in self.devices.values():
            row.order = None
        for i, dev_id in enumerate(chain, 1):
            if dev_id in self.devices:
                self.devices[dev_id].order = i

    def move(self, dev_id: str, x_m: float, y_m: float, rate_up_mbps: float | None = None,
             rate_down_mbps: float | None = None) -> None:
        """A mobility update: new position; rates from the event or from the radio model."""
        row = self.devices[dev_id]
        d = math.hypot(x_m - self.server_x_m, y_m - self.server_y_m)
        update: dict[str, Any] = {"x_m": x_m, "y_m": y_m, "distance_m": d}
        if rate_up_mbps is None or rate_down_mbps is None:
            pl, snr_up, snr_down, rate_up_mbps, rate_down_mbps = link_for_position(
                self.topo.radio, d, row.los, row.shadowing_db)
            update |= {"pathloss_db": pl, "snr_up_db": snr_up, "snr_down_db": snr_down}
        update |= {"rate_up_mbps": float(rate_up_mbps), "rate_down_mbps": float(rate_down_mbps)}
        row.link = row.link.model_copy(update=update)


@dataclass
class StageView:
    index: int  # 1-based
    device: str
    steps: tuple[int, int]
    phase: str = "download"
    t_down_s: float | None = None
    t_cmp_s: float | None = None
    t_up_s: float | None = None
    energy_j: float | None = None
    overrun_s: float | None = None
    predicted: dict[str, float] = field(default_factory=dict)
    attempt: int = 1
    recovered: bool = False

    @property
    def predicted_p90_s(self) -> float | None:
        """The p90 of the stage's modelled latency (multi-stage plans; None otherwise)."""
        q = self.predicted.get("latency_quantiles_s")
        return float(q["p90"]) if isinstance(q, dict) and isinstance(q.get("p90"), (int, float)) else None

    @property
    def predicted_latency_s(self) -> float | None:
        """Every predicted time of the stage: down, compute, up and whatever else the plan
        counts (split's `t_handling_s`, the feature messages outside the links: without it
        a split step's prediction fell short of the plan's)."""
        p = self.predicted
        if not all(k in p for k in ("t_down_s", "t_cmp_s", "t_up_s")):
            return None
        return sum(float(v) for k, v in p.items() if k.startswith("t_") and k.endswith("_s"))


@dataclass
class RunView:
    """Folds telemetry events (dicts, the JSON of `tb/<run>/events`) into what is shown."""

    run_id: str | None = None
    e_max_j: float | None = None
    t_max_s: float | None = None
    stages: list[StageView] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    energy_points: list[tuple[float, float]] = field(default_factory=list)  # (t_s, cumulative J)
    offline: set[str] = field(default_factory=set)
    failed_devices: set[str] = field(default_factory=set)  # offline or missed a deadline
    finished: bool = False
    failed: str | None = None
    result: dict[str, Any] | None = None
    t0: float | None = None
    events: int = 0
    #: `reselected` events: a failed stage's new chain for the rest, with the budgets charged
    reselections: list[dict[str, Any]] = field(default_factory=list)
    #: where the run writes result.json, events.jsonl, image.png, logs/
    out_dir: str | None = None

    @property
    def energy_j(self) -> float:
        return sum(s.energy_j or 0.0 for s in self.stages)

    @property
    def predicted_energy_j(self) -> float:
        """Predicted energy of the stages that did not fail."""
        return sum(s.predicted.get("energy_j", 0.0) for s in self.stages if s.phase != "failed")

    @property
    def latency_s(self) -> float:
        """Stages of the same steps ran in parallel (a patch run's bands): the slowest counts."""
        by_steps: dict[tuple[int, int], float] = {}
        for s in self.stages:
            t = (s.t_down_s or 0) + (s.t_cmp_s or 0) + (s.t_up_s or 0)
            by_steps[s.steps] = max(t, by_steps.get(s.steps, 0.0))
        return sum(by_steps.values())

    def current(self, device: str | None) -> StageView | None:
        for s in reversed(self.stages):
            if device is None or s.device == device:
                return s
        return None

    def apply(self, ev: dict[str, Any]) -> str:
        """Fold one event in; returns the log line it produced (also appended to `log`).

        Event types are the orchestrator's (testbed/methods/multistage/orchestrator.py): run_started,
        stage_started (with `predicted`), downloaded, computed, uploaded, device_offline,
        deadline_missed, recovered, relay_finished, run_finished / run_failed; split's
        split_step and patch's patch_step (methods/split/orchestrator.py, methods/patch/orchestrator.py).
        """
        self.events += 1
        kind = str(ev.get("type", "?"))
        ts = ev.get("ts")
        if isinstance(ts, (int, float)):
            if self.t0 is None:
                self.t0 = float(ts)
            rel = float(ts) - self.t0
        else:
            rel = None
        self.run_id = ev.get("run") or self.run_id
        dev = ev.get("device")
        steps = ev.get("steps")
        stage = self.current(dev) if dev else None
        if kind == "stage_started" and dev:
            a, b = (steps or (0, 0))[:2]
            idx = int(ev["stage"]) + 1 if isinstance(ev.get("stage"), int) else len(self.stages) + 1
            stage = StageView(index=idx, device=dev, steps=(int(a), int(b)),
                              predicted=dict(ev.get("predicted") or {}), attempt=int(ev.get("attempt") or 1))
            stage.recovered = stage.attempt > 1
            self.stages.append(stage)
        elif kind == "split_step" and dev:  # split diffusion: one finished record per denoising step
            a, b = (steps or (0, 0))[:2]
            idx = int(ev["stage"]) + 1 if isinstance(ev.get("stage"), int) else len(self.stages) + 1
            stage = StageView(index=idx, device=str(dev), steps=(int(a), int(b)), phase="done",
                              t_down_s=_num(ev, "t_down_s"), t_cmp_s=_num(ev, "t_cmp_s"), t_up_s=_num(ev, "t_up_s"),
                              energy_j=_num(ev, "energy_j"), predicted=dict(ev.get("predicted") or {}))
            self.stages.append(stage)
            self.energy_points.append((rel if rel is not None else float(len(self.energy_points)), self.energy_j))
        elif kind == "patch_step" and stage:  # patch diffusion: a band's step is done (stage_started made it)
            stage.t_down_s, stage.t_cmp_s = _num(ev, "t_down_s"), _num(ev, "t_cmp_s")
            stage.t_up_s, stage.energy_j = _num(ev, "t_up_s"), _num(ev, "energy_j")
            stage.overrun_s = _num(ev.get("record") or {}, "overrun_s")
            stage.phase = "done"
            self.energy_points.append((rel if rel is not None else float(len(self.energy_points)), self.energy_j))
        elif kind == "downloaded" and stage:
            stage.t_down_s = _num(ev, "t_down_s")
            stage.phase = "compute"
        elif kind == "computed" and stage:
            stage.t_cmp_s = _num(ev, "t_cmp_s")
            stage.overrun_s = _num(ev, "overrun_s")
            stage.phase = "upload"
        elif kind == "uploaded" and stage:
            stage.t_up_s = _num(ev, "t_up_s")
            stage.energy_j = _num(ev, "energy_j")
            stage.phase = "done"
            self.energy_points.append((rel if rel is not None else float(len(self.energy_points)), self.energy_j))
        elif kind in ("device_offline", "deadline_missed") and dev:
            if kind == "device_offline":
                self.offline.add(dev)
            self.failed_devices.add(dev)
            if stage and stage.phase != "done":
                stage.phase = "failed"
        elif kind == "reselected":
            self.reselections.append(dict(ev))
        elif kind == "run_finished":
            self.finished = True
            self.result = dict(ev)
        elif kind == "run_failed":
            self.finished = True
            self.failed = str(ev.get("error") or kind)
        line = _log_line(rel, kind, ev)
        self.log.append(line)
        return line


def _num(ev: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = ev.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


_SKIP = {"type", "ts", "run", "device", "steps", "predicted", "seq", "record", "plan"}


def _log_line(rel: float | None, kind: str, ev: dict[str, Any]) -> str:
    parts = [f"{rel:7.2f}s" if rel is not None else "       -", kind]
    if ev.get("device"):
        parts.append(str(ev["device"]))
    steps = ev.get("steps")
    if isinstance(steps, (list, tuple)) and len(steps) >= 2:
        parts.append(f"steps {steps[0]}-{steps[1]}")
    for k, v in ev.items():
        if k in _SKIP or k.startswith("predicted_") or isinstance(v, (dict, list)):
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def budget_line(latency_s: float, energy_j: float, t_max_s: float, e_max_j: float, margin_pct: float,
                spent: tuple[float, float] | None = None) -> list[tuple[str, str]]:
    """The predicted latency and energy against the budgets the user set, as (text, style)
    pieces: "T 1.48 s of 2 s", "  E 61.2 J of 200 J", then, with a margin, "planned within
    1.96 s, 196 J: 2 % margin" (the caller puts it on a line of its own).
    A plan fills the budgets less the topology's margin_pct (selection.costs.planning_budgets);
    said so, or the planned budget reads like a typo of T_max. `spent` (s, J): a re-selected
    run's charged part, included in the totals and named."""
    keep = 1.0 - margin_pct / 100.0
    parts: list[tuple[str, str]] = []
    how = f" ({spent[0]:.2f} spent + {latency_s - spent[0]:.2f} predicted)" if spent else ""
    parts.append((f"T {latency_s:.2f} s of {t_max_s:g} s{how}", "red" if latency_s > t_max_s else ""))
    how = f" ({spent[1]:.1f} spent + {energy_j - spent[1]:.1f} predicted)" if spent else ""
    parts.append((f"  E {energy_j:.1f} J of {e_max_j:g} J{how}", "red" if energy_j > e_max_j else ""))
    if margin_pct:
        parts.append((f"planned within {t_max_s * keep:.3g} s, {e_max_j * keep:.3g} J: {margin_pct:g} % margin", "dim"))
    return parts
