"""`testbed validate` and `testbed schema`: check a topology and show every device's link."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from testbed.cli.console import out, print_json
from testbed.cli.views import VALIDATE_KINDS, impairment_cells
from testbed.model.impairments import link_impairments
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, place, topology_json_schema


def validate(
    file: Path = typer.Argument(..., help="topology YAML file"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Load and validate a topology, place its devices and compute every device's link."""
    topo = load_topology(file, seed=seed)
    placement = place(topo)
    links = compute_links(topo, placement)
    impairments = {dev: imp.to_json() for dev, imp in link_impairments(topo, links).items()}
    if as_json:
        print_json(
            {
                "seed": topo.seed,
                "radio": topo.radio.model_dump(),
                "server": {"x_m": placement.server.x_m, "y_m": placement.server.y_m},
                "devices": [link.model_dump() for link in links],
                # one-way delay, jitter and loss per direction (modelled: radio model or links:)
                "impairments": impairments,
                "kind": "modelled",
            }
        )
        return
    r = topo.radio
    table = Table(
        title=f"{topo.name}: {len(links)} devices, seed {topo.seed}, {r.model} ({r.los}), "
        f"{r.carrier_ghz:g} GHz, {r.bandwidth_mhz:g} MHz",
        caption=VALIDATE_KINDS,
    )
    for col in ("id", "profile", "prec", "x m", "y m", "dist m", "LOS", "PL dB", "SNR up", "SNR dn",
                "up Mbit/s", "down Mbit/s", "delay ms", "loss %"):
        table.add_column(col, justify="left" if col in ("id", "profile", "prec") else "right")
    for link in links:
        table.add_row(
            link.id, link.profile, link.precision, f"{link.x_m:.0f}", f"{link.y_m:.0f}",
            f"{link.distance_m:.0f}", "yes" if link.los else "no", f"{link.pathloss_db:.1f}",
            f"{link.snr_up_db:.1f}", f"{link.snr_down_db:.1f}", f"{link.rate_up_mbps:.1f}",
            f"{link.rate_down_mbps:.1f}", *impairment_cells(impairments.get(link.id)),
        )
    out.print(table)
    b = topo.budgets
    out.print(
        f"server at ({placement.server.x_m:g}, {placement.server.y_m:g}) m; budgets T_max {b.t_max_s:g} s, "
        f"E_max {b.e_max_j:g} J; K = {topo.workload.steps_per_stage}, payload {topo.workload.payload_bytes} bytes"
    )


def schema() -> None:
    """Print the JSON Schema of the topology format (for editor completion)."""
    print(json.dumps(topology_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)
