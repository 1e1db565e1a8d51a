"""Sweeps for Fig. 4 of the paper: every (T_max, E_max, seed, method) point run on the emulation.

`run_sweep(SweepConfig)` brings up one cell per seed and runs every method and budget
point on it (link rates do not depend on the budgets), each for real through the run
owner (`testbed.composition.session.RunSession`), and writes, as it goes, `results.csv` (one row per run), `results.jsonl` (each run's
full result document), the images, `columns.json` (what every CSV column is: a setting,
a record of the run, or a number measured, emulated or modelled) and `sweep.json` (the
configuration, the commit, the machine's load, and how many runs met their budgets).
Nothing here computes a result from formulas: every row is a run's own numbers. A point
whose budgets admit not even one stage (or one split step) is a row with `feasible` 0
and no MS-SSIM.

A sweep may also plan with confidences (`--confidence none,0.9`, experiments/confidence.py):
each method that takes one runs once per value — a compared run of its own
(`multistage:dp@0.9`), which the paper's claims and Fig. 4 leave out — and
confidence.csv / fig_confidence.png say how many runs kept T_max at each P.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.composition.meta import KINDS, MODELLED, git_commit, number_labels
from testbed.errors import InfeasibleError, TopologyError
from testbed.experiments.expectations import derived_metrics
from testbed.methods import METHODS, line_for, method, run_key
from testbed.model.names import SELECTORS
from testbed.model.topology import Topology, load_topology

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_RUNS",
    "FULL",
    "QUICK",
    "column_labels",
    "budget_summary",
    "RunSpec",
    "SweepConfig",
    "SweepOutcome",
    "parse_runs",
    "parse_floats",
    "result_row",
    "read_rows",
    "mean_based",
    "planned_confidence",
    "row_key",
    "run_sweep",
]

SETTING, RECORD = "setting", "record"
#: results.csv, in order: (column, kind, what). A kind of None is the result's own label
#: (testbed.composition.meta.number_labels), which depends on the compute mode.
_COLUMNS: tuple[tuple[str, str | None, str], ...] = (
    ("method", SETTING, "the collaboration method (testbed.methods: multistage, split, patch, ...)"),
    ("strategy", SETTING, "the device selector (dp = w/ DS, random = w/o DS; a method's own choice such as split's "
                          "best-pair); the older name of `selector`"),
    ("t_max_s", SETTING, "latency budget T_max (s)"),
    ("e_max_j", SETTING, "energy budget E_max (J)"),
    ("seed", SETTING, "placement, precision draw, LOS draw and initial noise"),
    ("compute", SETTING, "profile: compute times are the profiles' (emulated); real: measured"),
    ("selected_count", RECORD, "devices selected"),
    ("total_steps", RECORD, "denoising steps done"),
    ("latency_s", None, "end-to-end latency (s)"),
    ("energy_j", None, "energy of the run (J)"),
    ("t_tran_s", None, "transmission time, sum of t_down + t_up over stages (s)"),
    ("t_cmp_s", None, "computation time, sum over stages (s)"),
    ("cmp_real_s", None, "the local model's real compute on this CPU, sum over stages (s)"),
    ("ms_ssim", None, "MS-SSIM against the fp32 50-step reference (empty: no image within the budgets)"),
    ("feasible", RECORD, "1: the run produced an image within the plan; 0: not even one stage/step fits"),
    ("predicted_latency_s", None, "latency the plan predicted (s)"),
    ("overrun_s", None, "real work beyond the profile's time, summed over stages (s)"),
    ("selected", RECORD, "the devices in relay order (split: head, tail; patch: band 0 first)"),
    ("run", RECORD, "the emulation's run id"),
    ("image", RECORD, "the image, relative to the sweep folder"),
    ("error", RECORD, "why an infeasible point is infeasible"),
    ("selector", SETTING, "the device selector (same as `strategy`, its older name)"),
    ("confidence", SETTING, "the P of P(latency <= T_max) the plan kept under the modelled distributions "
                            "(empty: the mean-based plan)"),
    ("p_within", MODELLED, "modelled probability that the plan's latency keeps T_max (transfer-time "
                           "distributions, selection/stochastic.py; empty: a plan on point values)"),
    ("predicted_latency_p90_s", MODELLED, "p90 of the plan's modelled latency (s; empty: a plan on point values)"),
)
CSV_COLUMNS = [name for name, _, _ in _COLUMNS]
DEFAULT_RUNS = "multistage:dp,multistage:random,split"
#: `--quick`: T_max {1, 2, 4} s x E_max {50, 200} J x the three runs x seeds 1..2. At 50 J
#: the energy budget binds multi-stage from T_max 2 s on (docs/reproducing.md).
QUICK = {"t_max_s": (1.0, 2.0, 4.0), "e_max_j": (50.0, 200.0), "seeds": 2}
#: the default sweep: E_max from where energy binds at every T_max (25 J) to where it binds
#: at none (200 J, the paper's default); 5 seeds, enough for a sign test and a bootstrap.
FULL = {"t_max_s": (1.0, 2.0, 3.0, 4.0), "e_max_j": (25.0, 50.0, 100.0, 200.0), "seeds": 5}


@dataclass(frozen=True)
class RunSpec:
    """One compared run: a method with a device selector (`multistage:dp`), or a method that
    picks its own devices (`split`)."""

    method: str
    selector: str
    confidence: float | None = None  # plan with P(latency <= T_max) >= it (None: mean-based)

    @property
    def key(self) -> str:
        base = run_key(self.method, self.selector)
        return base if self.confidence is None else f"{base}@{self.confidence:g}"

    @property
    def label(self) -> str:
        base = line_for(self.method, self.selector).label
        return base if self.confidence is None else f"{base} (P {self.confidence:g})"


def parse_runs(text: str) -> list[RunSpec]:
    """`multistage:dp,multistage:random,split,patch` -> RunSpecs (checked against the registries)."""
    specs: list[RunSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, selector = part.partition(":")
        if name not in METHODS:
            raise TopologyError(f"--runs {part!r}: method must be one of {', '.join(METHODS)} (e.g. multistage:dp)")
        own = method(name).own_selector
        if own is not None:
            if selector and selector != own:
                raise TopologyError(f"--runs {part!r}: {name} takes no selector (it picks its own devices, "
                                    f"{own}); write '{name}'")
            selector = own
        elif selector not in SELECTORS:
            raise TopologyError(f"--runs {part!r}: the selector must be one of {', '.join(SELECTORS)}")
        spec = RunSpec(name, selector)
        if spec in specs:
            raise TopologyError(f"--runs lists {spec.key} twice")
        specs.append(spec)
    if not specs:
        raise TopologyError("--runs is empty; e.g. --runs multistage:dp,multistage:random,split")
    return specs


def parse_floats(text: str, option: str) -> list[float]:
    """`1,2,4` -> [1.0, 2.0, 4.0]; each value finite and > 0, no duplicates."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise TopologyError(f"{option} {text!r}: {part!r} is not a number; write e.g. {option} 1,2,4") from None
        if not (math.isfinite(v) and v > 0):
            raise TopologyError(f"{option} {text!r}: {part!r} must be a positive number")
        if v not in out:
            out.append(v)
    if not out:
        raise TopologyError(f"{option} is empty; write e.g. {option} 1,2,4")
    return sorted(out)


@dataclass
class SweepConfig:
    file: Path
    t_max_s: Sequence[float]
    e_max_j: Sequence[float]
    seeds: Sequence[int]
    runs: Sequence[RunSpec]  # with their confidences (confidence.expand)
    out_dir: Path
    backend: str = "netns"

    def points(self) -> list[tuple[float, float]]:
        return [(t, e) for t in self.t_max_s for e in self.e_max_j]

    @property
    def total(self) -> int:
        return len(self.points()) * len(self.seeds) * len(self.runs)


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    csv_path: Path
    jsonl_path: Path
    elapsed_s: float
    setup_s: float = 0.0
    figures: list[Path] = field(default_factory=list)


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def column_labels(compute: str) -> dict[str, Any]:
    """columns.json: what every results.csv column is, for this compute mode."""
    labels = number_labels(compute)
    kinds = {SETTING: "what the sweep asked for", RECORD: "what the run did (counted, not timed)", **KINDS}
    return {
        "compute": compute,
        "columns": [{"name": name, "kind": kind or labels[name]["kind"],
                     "what": what if kind else f"{what}; {labels[name]['how']}"} for name, kind, what in _COLUMNS],
        "kinds": kinds,
    }


def result_row(doc: dict[str, Any], spec: RunSpec, t_max_s: float, e_max_j: float, seed: int,
               image: str = "") -> dict[str, Any]:
    """One CSV row from a run's result document (its own numbers; columns.json says what each is)."""
    d = derived_metrics(doc)
    q = doc.get("ms_ssim")
    row = {
        "method": spec.method, "strategy": spec.selector, "selector": spec.selector, "t_max_s": t_max_s,
        "e_max_j": e_max_j, "seed": seed,
        "compute": (doc.get("meta") or {}).get("compute", ""),
        "selected_count": int(d["selected_count"]), "total_steps": int(d["steps_total"]),
        "latency_s": float(doc.get("latency_s") or 0.0), "energy_j": float(doc.get("energy_j") or 0.0),
        "t_tran_s": d["t_tran_s"], "t_cmp_s": d["t_cmp_s"], "cmp_real_s": d["cmp_real_s"],
        "ms_ssim": float(q) if isinstance(q, (int, float)) else "", "feasible": 1,
        "predicted_latency_s": doc.get("predicted_latency_s", ""), "overrun_s": d["overrun_s"],
        "selected": " ".join(doc.get("selected") or []), "run": doc.get("run", ""), "image": image, "error": "",
        "confidence": spec.confidence if spec.confidence is not None else "",
        "p_within": _or_empty(((doc.get("meta") or {}).get("plan") or {}).get("p_within")),
        "predicted_latency_p90_s": _or_empty((doc.get("predicted_latency_quantiles_s") or {}).get("p90")),
    }
    return {k: row[k] for k in CSV_COLUMNS}


def _or_empty(v: Any) -> Any:
    return v if isinstance(v, (int, float)) else ""


def _infeasible_row(spec: RunSpec, t_max_s: float, e_max_j: float, seed: int, compute: str,
                    why: str) -> dict[str, Any]:
    row = {k: "" for k in CSV_COLUMNS}
    row.update(method=spec.method, strategy=spec.selector, selector=spec.selector, t_max_s=t_max_s, e_max_j=e_max_j,
               seed=seed, compute=compute, selected_count=0, total_steps=0, feasible=0, error=why,
               confidence=spec.confidence if spec.confidence is not None else "")
    return row


def budget_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per method: runs, infeasible points, and runs whose measured latency / modelled
    energy stayed within their budgets (the issue's acceptance counts these)."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        s = out.setdefault(row_key(r),
                           {"runs": 0, "infeasible": 0, "within_t_max": 0, "within_e_max": 0})
        s["runs"] += 1
        if not r.get("feasible"):
            s["infeasible"] += 1
            continue
        s["within_t_max"] += int(float(r["latency_s"]) <= float(r["t_max_s"]))
        s["within_e_max"] += int(float(r["energy_j"]) <= float(r["e_max_j"]))
    return out


_FLOATS = ("t_max_s", "e_max_j", "confidence", "p_within", "predicted_latency_p90_s")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """results.csv back as dicts with numbers parsed (empty cells -> None)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v == "":
                    row[k] = None
                elif k in ("method", "strategy", "selector", "compute", "selected", "run", "image", "error"):
                    row[k] = v
                else:
                    row[k] = float(v) if any(c in v for c in ".eE") or k in _FLOATS else int(v)
            row.setdefault("selector", row.get("strategy"))  # a sweep from before `selector` was written
            rows.append(row)
    return rows


def row_key(row: dict[str, Any]) -> str:
    """The compared run a CSV row belongs to (`multistage:dp`, `split`, `multistage:dp@0.9`)."""
    return RunSpec(row["method"], row.get("selector") or row["strategy"], planned_confidence(row)).key


def planned_confidence(row: dict[str, Any]) -> float | None:
    """The P a row's plan kept (None: mean-based; a row read back or made in memory alike)."""
    v = row.get("confidence")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def mean_based(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of mean-based plans (what the paper's claims and Fig. 4 compare)."""
    return [r for r in rows if planned_confidence(r) is None]


# -- running -------------------------------------------------------------------------------

SessionFactory = Callable[[Topology, str, Path], AbstractAsyncContextManager[Any]]


def default_factory(backend: str = "netns") -> SessionFactory:
    """(topology, run id, output folder) -> a run owner (`RunSession`) on a fresh cell."""

    def make(topo: Topology, run_id: str, out_dir: Path) -> AbstractAsyncContextManager[Any]:
        from testbed.composition.cells import MadeCell
        from testbed.composition.session import RunSession

        return RunSession(topo, MadeCell(run_id, backend=backend), out_dir=out_dir)

    return make


def _image_array(res: Any, doc: dict[str, Any]) -> np.ndarray | None:
    arr = getattr(res, "image_array", None)
    if arr is not None:
        return np.asarray(arr)
    img = doc.get("image")
    if isinstance(img, str) and img:
        p = Path(img)
        if p.suffix == ".png" and p.is_file():
            from PIL import Image

            return np.asarray(Image.open(p))
        import base64
        import io

        try:
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(base64.b64decode(img.split(",")[-1], validate=True))))
        except Exception:  # noqa: BLE001 - not an image we can read: the row keeps no picture
            return None
    if isinstance(img, list):
        return np.asarray(img, dtype=np.uint8)
    return None


def _run_id(seed: int) -> str:
    """A fresh cell's run id (1-7 lowercase letters/digits) for one seed."""
    import uuid

    return f"s{uuid.uuid4().hex[:4]}{seed % 10}"


async def run_sweep(
    cfg: SweepConfig,
    *,
    factory: SessionFactory | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> SweepOutcome:
    """Run every point; rows are appended to results.csv as they come (a crash keeps them).
    One cell per seed serves every method and budget point (rates do not depend on them)."""
    factory = factory or default_factory(cfg.backend)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "images").mkdir(exist_ok=True)
    csv_path, jsonl_path = cfg.out_dir / "results.csv", cfg.out_dir / "results.jsonl"
    compute = load_topology(cfg.file).workload.compute
    (cfg.out_dir / "columns.json").write_text(json.dumps(column_labels(compute), indent=2) + "\n")
    started = time.time()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    setup_s = 0.0
    with open(csv_path, "w", newline="") as fc, open(jsonl_path, "w") as fj:
        writer = csv.DictWriter(fc, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for seed in cfg.seeds:
            topo = load_topology(cfg.file, seed=seed)
            if on_status:
                on_status(f"seed {seed}: bringing up the emulation")
            ts = time.perf_counter()
            async with factory(topo, _run_id(seed), cfg.out_dir / "runs" / f"seed{seed}") as session:
                setup_s += time.perf_counter() - ts
                for (t_max, e_max), spec in itertools.product(cfg.points(), cfg.runs):
                    if on_status:
                        on_status(f"seed {seed} {spec.label}: T_max {t_max:g} s, E_max {e_max:g} J")
                    row, doc = await _one(session, spec, t_max, e_max, seed, cfg.out_dir, compute)
                    writer.writerow({k: _fmt_num(v) for k, v in row.items()})
                    fc.flush()
                    fj.write(json.dumps(doc, default=_json_default) + "\n")
                    fj.flush()
                    rows.append(row)
                    if on_row:
                        on_row(row)
    outcome = SweepOutcome(rows=rows, csv_path=csv_path, jsonl_path=jsonl_path,
                           elapsed_s=time.perf_counter() - t0, setup_s=setup_s)
    write_sweep_record(cfg, outcome, started)
    return outcome


def write_sweep_record(cfg: SweepConfig, outcome: SweepOutcome, started: float) -> dict[str, Any]:
    """sweep.json: what was swept, from which commit, on what machine and load, and how
    many runs met their budgets (figure captions and the docs quote it)."""
    doc = {
        "topology": str(cfg.file), "t_max_s": list(cfg.t_max_s), "e_max_j": list(cfg.e_max_j),
        "seeds": list(cfg.seeds), "runs": [s.key for s in cfg.runs], "backend": cfg.backend,
        "confidences": sorted({s.confidence for s in cfg.runs if s.confidence is not None}),
        "commit": git_commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "elapsed_s": round(outcome.elapsed_s, 1), "setup_s": round(outcome.setup_s, 1),
        "cores": os.cpu_count(), "load_average_at_end": round(os.getloadavg()[0], 1),
        "budgets": budget_summary(outcome.rows),
    }
    (cfg.out_dir / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


async def _one(session: Any, spec: RunSpec, t_max: float, e_max: float, seed: int,
               out_dir: Path, compute: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One point: (CSV row, JSONL document); the image saved under images/."""
    from PIL import Image

    try:
        planned = {"confidence": spec.confidence} if spec.confidence is not None else {}
        res = await session.run(spec.method, selector=spec.selector, t_max_s=t_max, e_max_j=e_max, **planned)
    except InfeasibleError as e:
        return (_infeasible_row(spec, t_max, e_max, seed, compute, str(e)),
                {"method": spec.method, "selector": spec.selector, "strategy": spec.selector, "t_max_s": t_max,
                 "e_max_j": e_max, "seed": seed, "confidence": spec.confidence, "infeasible": str(e)})
    doc = res.to_json()
    img = _image_array(res, doc)
    name = ""
    if img is not None:
        name = f"images/{spec.key.replace(':', '-')}_t{t_max:g}_e{e_max:g}_s{seed}.png"
        Image.fromarray(img).save(out_dir / name)
    return result_row(doc, spec, t_max, e_max, seed, name), {**doc, "seed": seed, "t_max_s": t_max, "e_max_j": e_max}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "model_dump"):
        return o.model_dump()
    return str(o)

