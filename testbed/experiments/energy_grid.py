"""Where the energy budget starts to bind: the energy each method's plan needs at each T_max
when E_max does not limit it — modelled (the selection's and the split plan's predictions),
not measured. Below that energy, E_max changes what runs; above it, only T_max matters.

This is how the sweep's E_max grid is chosen (sweep.FULL, sweep.QUICK) and what
docs/reproducing.md shows next to Fig. 4(b).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.errors import InfeasibleError

__all__ = ["energy_needs", "binding_markdown"]

UNLIMITED_J = 1e12
#: the compared runs whose plans need no model to be built (patch's sizes its bands from the UNet)
RUNS = "multistage:dp,multistage:random,split"


def energy_needs(file: Path, seeds: Sequence[int], t_values: Sequence[float],
                 runs: str = RUNS) -> list[dict[str, Any]]:
    """Per (seed, T_max): the predicted energy (J) of the plan each compared run makes with no
    energy limit, keyed by its label (None where not even one stage or step fits T_max)."""
    from testbed.experiments.sweep import parse_runs
    from testbed.methods import method
    from testbed.methods.base import PlanContext
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place

    specs = parse_runs(runs)
    out = []
    for seed in seeds:
        topo = load_topology(file, seed=seed)
        links = compute_links(topo, place(topo))
        for t in t_values:
            row: dict[str, Any] = {"seed": seed, "t_max_s": float(t)}
            for spec in specs:
                collab = method(spec.method).make(spec.selector)  # the plan `testbed run` makes (margin kept)
                try:
                    plan = collab.plan(PlanContext(topo, links, float(t), UNLIMITED_J, seed))
                    row[spec.label] = plan.predicted_energy_j
                except InfeasibleError:
                    row[spec.label] = None
            out.append(row)
    return out


def binding_markdown(needs: list[dict[str, Any]]) -> str:
    """Per T_max and method: the energy its plan needs without an energy limit, min-max over
    seeds — E_max below the max binds at least one seed, below the min binds every seed."""
    t_values = sorted({r["t_max_s"] for r in needs})
    seeds = sorted({r["seed"] for r in needs})
    labels = [k for k in (needs[0] if needs else {}) if k not in ("seed", "t_max_s")]
    lines = [f"| T_max (s) | {' | '.join(f'{lbl}: energy needed (J)' for lbl in labels)} |",
             "| --- |" + " --- |" * len(labels)]
    for t in t_values:
        cells = []
        for key in labels:
            vals = [r[key] for r in needs if r["t_max_s"] == t and r[key] is not None]
            cell = f"{min(vals):.0f}-{max(vals):.0f}" if vals else "infeasible"
            if vals and len(vals) < len(seeds):
                cell += f" ({len(vals)} of {len(seeds)} seeds fit T_max)"
            cells.append(cell)
        lines.append(f"| {t:g} | {' | '.join(cells)} |")
    spread = f"seeds {seeds[0]}-{seeds[-1]}" if seeds else "no seeds"
    lines.append("")
    lines.append(f"Modelled (the plans' predicted energy with E_max unlimited), min-max over {spread}.")
    return "\n".join(lines)

