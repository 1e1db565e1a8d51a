"""`testbed sweep`: reproduce Fig. 4 — every budget point, seed and method run on the emulation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer

from testbed.cli.console import err, out, print_json


def sweep(
    file: Path = typer.Argument(..., help="topology YAML file (e.g. topologies/paper.yaml)"),
    tmax: str | None = typer.Option(None, "--tmax", help="T_max values in seconds, e.g. 1,2,3,4"),
    emax: str | None = typer.Option(None, "--emax", help="E_max values in joules, e.g. 50,100,200"),
    seeds: int | None = typer.Option(None, "--seeds", min=1, max=100,
                                     help="repeat each point with seeds 1..N (placement, precisions, noise)"),
    runs: str = typer.Option("multistage:dp,multistage:random,split", "--runs",
                             help="method:strategy pairs; method is multistage or split"),
    quick: bool = typer.Option(False, "--quick", help="T_max {1,2,4} x E_max {100,200} x 2 seeds"),
    out_dir: Path | None = typer.Option(None, "--out", help="output folder (default out/sweep-<name>-<time>)"),
    backend: str = typer.Option("netns", "--backend", help="emulation backend"),
    no_figures: bool = typer.Option(False, "--no-figures", help="write results only"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON summary on stdout"),
) -> None:
    """Run T_max x E_max x seeds x methods on the emulation; write results.csv, results.jsonl and fig4a-d."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from testbed.experiments.sweep import QUICK, SweepConfig, parse_floats, parse_runs, run_sweep
    from testbed.experiments.claims import claims_markdown, evaluate_claims
    from testbed.experiments.plots import write_figures
    from testbed.model.names import check_name
    from testbed.model.topology import load_topology

    topo = load_topology(file)
    t_list = parse_floats(tmax, "--tmax") if tmax else list(QUICK["t_max_s"] if quick else (1.0, 2.0, 3.0, 4.0))
    e_list = parse_floats(emax, "--emax") if emax else list(QUICK["e_max_j"] if quick else (50.0, 100.0, 150.0, 200.0))
    n_seeds = seeds if seeds is not None else (QUICK["seeds"] if quick else 3)
    specs = parse_runs(runs)
    name = check_name(topo.name, "topology name")  # it names the default output folder
    out_path = out_dir or Path("out") / f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = SweepConfig(file=file, t_max_s=t_list, e_max_j=e_list, seeds=list(range(1, n_seeds + 1)), runs=specs,
                      out_dir=out_path, backend=backend)
    err.print(f"sweep {topo.name}: T_max {t_list} s x E_max {e_list} J x {n_seeds} seeds x "
              f"{', '.join(s.key for s in specs)} = {cfg.total} runs -> {out_path}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task("starting", total=cfg.total)

        def on_row(row: dict) -> None:
            q = row["ms_ssim"]
            progress.console.print(
                f"  seed {row['seed']} {row['method']}:{row['strategy']} T_max {row['t_max_s']:g} E_max "
                f"{row['e_max_j']:g}: " + (f"MS-SSIM {q:.3f}, {row['total_steps']} steps, "
                                             f"{row['latency_s']:.2f} s, {row['energy_j']:.1f} J"
                                             if row["feasible"] else "infeasible"), highlight=False)
            progress.advance(task)

        outcome = asyncio.run(run_sweep(cfg, on_row=on_row,
                                        on_status=lambda s: progress.update(task, description=s)))
        progress.update(task, description="done")
    figures = [] if no_figures else write_figures(outcome.csv_path, out_path)
    claims = evaluate_claims(outcome.rows)
    if as_json:
        print_json({"out_dir": str(out_path), "runs": len(outcome.rows), "elapsed_s": outcome.elapsed_s,
                    "setup_s": outcome.setup_s, "csv": str(outcome.csv_path), "jsonl": str(outcome.jsonl_path),
                    "figures": [str(p) for p in figures],
                    "claims": [{"number": c.number, "claim": c.claim, "holds": c.holds, "measured": c.measured}
                               for c in claims]})
        return
    out.print(f"{len(outcome.rows)} runs in {outcome.elapsed_s:.0f} s (emulation bring-up {outcome.setup_s:.0f} s)")
    out.print(f"results: {outcome.csv_path}, {outcome.jsonl_path}")
    for p in figures:
        out.print(f"figure: {p}")
    out.print(claims_markdown(claims), highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command()(sweep)
