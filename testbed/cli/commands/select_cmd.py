"""`testbed select`: which devices the selection picks under a topology's budgets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from testbed.cli.console import out, print_json
from testbed.model.radio import compute_links
from testbed.selection import SELECTORS, device_costs, select
from testbed.selection.costs import planning_budgets
from testbed.errors import TopologyError
from testbed.model.topology import load_topology, place


def select_command(
    file: Path = typer.Argument(..., help="topology YAML file"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed (placement; random baseline)"),
    tmax: float | None = typer.Option(None, "--tmax", help="latency budget T_max in seconds (default: the file's)"),
    emax: float | None = typer.Option(None, "--emax", help="energy budget E_max in joules (default: the file's)"),
    selector: str = typer.Option("dp", "--selector", "--strategy",
                                 help=f"device selector: one of {', '.join(SELECTORS)} (--strategy: its older name)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Select devices: maximize total model size under T_max and E_max (paper section IV-A)."""
    if selector not in SELECTORS:
        raise TopologyError(f"--selector {selector!r} is unknown; valid: {', '.join(SELECTORS)}")
    topo = load_topology(file, seed=seed)
    costs = device_costs(topo, compute_links(topo, place(topo)))
    t_max_s = topo.budgets.t_max_s if tmax is None else tmax
    e_max_j = topo.budgets.e_max_j if emax is None else emax
    # the chain `testbed run` picks: the budgets less the topology's margin_pct
    sel = select(costs, *planning_budgets(topo, t_max_s, e_max_j), selector=selector, seed=topo.seed)
    if as_json:
        print_json(sel.to_json())
        return
    order = {dev_id: n for n, dev_id in enumerate(sel.selected, start=1)}
    table = Table(title=f"{topo.name}: {len(costs)} candidates, selector {selector}, seed {topo.seed}",
                  caption="every number modelled (profiles x link rates), not measured")
    for col in ("stage", "id", "profile", "prec", "size MB", "T s", "T_down", "T_cmp", "T_up", "E J"):
        table.add_column(col, justify="left" if col in ("id", "profile", "prec") else "right")
    for c in costs:
        stage = order.get(c.id)
        table.add_row(
            str(stage) if stage else "",
            c.id, c.profile, c.precision, f"{c.size_mb:.0f}", f"{c.latency_s:.3f}", f"{c.t_down_s:.3f}",
            f"{c.t_cmp_s:.3f}", f"{c.t_up_s:.3f}", f"{c.energy_j:.2f}",
            style="bold green" if stage else "dim",
        )
    out.print(table)
    out.print(
        f"selected {len(sel.selected)} of {len(costs)} in relay order: {' -> '.join(sel.selected)}; "
        f"total size {sel.objective_mb:.0f} MB; latency {sel.latency_s:.3f} of {t_max_s:g} s; "
        f"energy {sel.energy_j:.2f} of {e_max_j:g} J; solved in {sel.solve_ms:.2f} ms"
        + (f" (planned within {sel.t_max_s:.4g} s, {sel.e_max_j:.4g} J: margin {topo.budgets.margin_pct:g} %)"
           if topo.budgets.margin_pct else "")
    )


def register(app: typer.Typer) -> None:
    app.command(name="select")(select_command)
