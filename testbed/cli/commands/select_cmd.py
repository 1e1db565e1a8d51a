"""`testbed select`: which devices the selection picks under a topology's budgets.

It makes the plan `testbed run` makes (the multi-stage method's, methods/multistage), on
the topology's links and impairments with fresh connections and no delayer (there is no
cell): every candidate's stage cost as a mean and a p90, the chain, and with `--confidence
P` the chance-constrained chain and its modelled probability of keeping T_max."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from testbed.cli.console import out, print_json
from testbed.model.radio import compute_links
from testbed.selection import SELECTORS
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
    confidence: float | None = typer.Option(None, "--confidence", help="keep P(latency <= T_max) >= P (0 < P < 1) "
                                            "under the modelled transfer distributions; default: the mean-based plan"),
) -> None:
    """Select devices: maximize total model size under T_max and E_max (paper section IV-A)."""
    from testbed.methods import method
    from testbed.methods.base import PlanContext

    if selector not in SELECTORS:
        raise TopologyError(f"--selector {selector!r} is unknown; valid: {', '.join(SELECTORS)}")
    spec = method("multistage")  # the method whose device selection `select` shows
    spec.check_confidence(confidence)
    topo = load_topology(file, seed=seed)
    links = compute_links(topo, place(topo))
    t_max_s = topo.budgets.t_max_s if tmax is None else tmax
    e_max_j = topo.budgets.e_max_j if emax is None else emax
    # the chain `testbed run` picks: the budgets less the topology's margin_pct
    plan = spec.make(selector).plan(PlanContext(topo, links, t_max_s, e_max_j, topo.seed, confidence=confidence))
    sel, costs = plan.selection, plan.costs
    stages = {s.id: s for s in plan.model.stages(c.id for c in costs)}  # every candidate's, for the table
    if as_json:
        doc = sel.to_json()
        for d in doc["devices"]:
            st = stages[d["id"]]
            d |= {"latency_mean_s": st.latency.mean(), "latency_quantiles_s": st.latency.quantiles(),
                  "quantiles_s": st.quantiles_record()}
        print_json(doc | {"confidence": confidence, "p_within": plan.p_within,
                          "predicted_latency_s": plan.predicted_latency_s,
                          "predicted_latency_quantiles_s": plan.predicted_latency_quantiles_s,
                          "point_latency_s": sel.latency_s})
        return
    order = {dev_id: n for n, dev_id in enumerate(sel.selected, start=1)}
    how = f"P >= {confidence:g} of keeping T_max" if confidence is not None else "mean-based"
    table = Table(title=f"{topo.name}: {len(costs)} candidates, selector {selector} ({how}), seed {topo.seed}",
                  caption="every number modelled (profiles x link rates), not measured: T, T_down, T_up are means, each with its p90 (fresh connections; no delayer)")
    for col in ("stage", "id", "profile", "prec", "size MB", "T s", "p90", "T_down", "p90", "T_cmp", "T_up", "p90",
                "E J"):
        table.add_column(col, justify="left" if col in ("id", "profile", "prec") else "right")
    for c in costs:
        stage, st = order.get(c.id), stages[c.id]
        table.add_row(
            str(stage) if stage else "",
            c.id, c.profile, c.precision, f"{c.size_mb:.0f}",
            *(f"{v:.3f}" for v in (st.latency.mean(), st.latency.quantile(0.9), st.t_down.mean(), st.t_down.quantile(0.9),
                                   c.t_cmp_s, st.t_up.mean(), st.t_up.quantile(0.9))),
            f"{c.energy_j:.2f}",
            style="bold green" if stage else "dim",
        )
    out.print(table)
    q = plan.predicted_latency_quantiles_s or {}
    out.print(
        f"selected {len(sel.selected)} of {len(costs)} in relay order: {' -> '.join(sel.selected)}; "
        f"total size {sel.objective_mb:.0f} MB; latency {plan.predicted_latency_s:.3f} (p90 {q.get('p90', 0):.3f}) "
        f"of {t_max_s:g} s, P(within) {plan.p_within:.3f} (modelled); "
        f"energy {sel.energy_j:.2f} of {e_max_j:g} J; solved in {sel.solve_ms:.2f} ms"
        + (f" (planned within {sel.t_max_s:.4g} s, {sel.e_max_j:.4g} J: margin {topo.budgets.margin_pct:g} %)"
           if topo.budgets.margin_pct else ""), highlight=False
    )


def register(app: typer.Typer) -> None:
    app.command(name="select")(select_command)
