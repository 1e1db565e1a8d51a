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
_METHODS = {"dp": "w/ DS", "random": "w/o DS", "split": "split"}


def energy_needs(file: Path, seeds: Sequence[int], t_values: Sequence[float]) -> list[dict[str, Any]]:
    """Per (seed, T_max): the predicted energy (J) of the plan each method makes with no
    energy limit (None where not even one stage or step fits T_max)."""
    from testbed.diffusion.split import sd15_split_bytes_per_step
    from testbed.model.radio import compute_links
    from testbed.model.topology import load_topology, place
    from testbed.selection import device_costs, select
    from testbed.selection.split_plan import activation_bytes, plan_split

    out = []
    for seed in seeds:
        topo = load_topology(file, seed=seed)
        links = compute_links(topo, place(topo))
        costs = device_costs(topo, links)
        res = topo.workload.resolution_px
        fbytes = lambda p, res=res: sd15_split_bytes_per_step(res, activation_bytes(p), 2)  # noqa: E731
        for t in t_values:
            row: dict[str, Any] = {"seed": seed, "t_max_s": float(t)}
            for strategy in ("dp", "random"):
                try:
                    row[strategy] = select(costs, t, UNLIMITED_J, strategy=strategy, seed=seed).energy_j
                except InfeasibleError:
                    row[strategy] = None
            try:
                row["split"] = plan_split(topo, links, t, UNLIMITED_J, fbytes).predicted_energy_j
            except InfeasibleError:
                row["split"] = None
            out.append(row)
    return out


def binding_markdown(needs: list[dict[str, Any]]) -> str:
    """Per T_max and method: the energy its plan needs without an energy limit, min-max over
    seeds — E_max below the max binds at least one seed, below the min binds every seed."""
    t_values = sorted({r["t_max_s"] for r in needs})
    seeds = sorted({r["seed"] for r in needs})
    lines = [f"| T_max (s) | {' | '.join(f'{lbl}: energy needed (J)' for lbl in _METHODS.values())} |",
             "| --- |" + " --- |" * len(_METHODS)]
    for t in t_values:
        cells = []
        for key in _METHODS:
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

