"""`testbed sweep`: reproduce Fig. 4 — every budget point, seed and method run on the emulation —
and judge the paper's claims from it (claims.json); `--publish docs` regenerates the docs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from testbed import methods
from testbed.cli import signals
from testbed.cli.console import err, out, print_json
from testbed.errors import InputError

_METHOD_NAMES = ", ".join(m.name for m in methods.methods())


def sweep(
    file: Path | None = typer.Argument(None, help="topology YAML file (e.g. topologies/paper.yaml); "
                                                  "not with --from"),
    tmax: str | None = typer.Option(None, "--tmax", help="T_max values in seconds (default 1,2,3,4)"),
    emax: str | None = typer.Option(None, "--emax", help="E_max values in joules (default 25,50,100,200: from "
                                                         "binding at every T_max to binding at none)"),
    seeds: int | None = typer.Option(None, "--seeds", min=1, max=100,
                                     help="repeat each point with seeds 1..N (default 5; --quick 2)"),
    runs: str = typer.Option("multistage:dp,multistage:random,split", "--runs",
                             help="the compared runs: method:selector for a method that takes a device selector "
                                  f"(e.g. multistage:dp), the method alone otherwise; methods: {_METHOD_NAMES}"),
    quick: bool = typer.Option(False, "--quick", help="T_max {1,2,4} x E_max {50,200} x 2 seeds"),
    out_dir: Path | None = typer.Option(None, "--out", help="output folder (default out/sweep-<name>-<time>)"),
    backend: str = typer.Option("netns", "--backend", help="emulation backend"),
    no_figures: bool = typer.Option(False, "--no-figures", help="write results only"),
    from_dir: Path | None = typer.Option(None, "--from", help="judge and plot a finished sweep's folder "
                                                              "instead of running one"),
    publish_to: Path | None = typer.Option(None, "--publish", help="then regenerate DOCS/figures and the "
                                                                  "tables of DOCS/reproducing.md (e.g. docs)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON summary on stdout"),
    confidence: str | None = typer.Option(None, "--confidence", help="plan also with P(latency <= T_max) >= P: "
                                          "P values (0 < P < 1), 'none' = the mean-based plan, e.g. none,0.8,0.9; "
                                          "methods that take a confidence run once per value (confidence.csv, "
                                          "fig_confidence.png)"),
) -> None:
    """Run T_max x E_max x seeds x methods on the emulation; write results.csv, results.jsonl, claims.json and fig4a-d."""
    from testbed.experiments.claims import claims_table, write_claims
    from testbed.experiments.confidence import CSV_NAME, parse_confidences, write_confidence_csv
    from testbed.experiments.plots import write_figures
    from testbed.experiments.sweep import budget_summary, mean_based, read_rows

    if (file is None) == (from_dir is None):
        raise InputError("give a topology FILE to run a sweep, or --from DIR to judge a finished one (not both)")
    if confidence is not None and from_dir is not None:
        raise InputError("--confidence plans a sweep's runs; a finished one (--from) keeps the confidences it ran with")
    levels = parse_confidences(confidence) if confidence is not None else [None]
    if from_dir is not None:
        if not (from_dir / "results.csv").is_file():
            raise InputError(f"--from {from_dir}: no results.csv; give the folder of a finished `testbed sweep`")
        out_path, rows, summary = from_dir, read_rows(from_dir / "results.csv"), None
    else:
        out_path, summary = _run(file, tmax, emax, seeds, runs, quick, out_dir, backend, levels)
        rows = read_rows(out_path / "results.csv")
    figures = [] if no_figures else write_figures(out_path / "results.csv", out_path)
    sweep_doc = json.loads((out_path / "sweep.json").read_text()) if (out_path / "sweep.json").is_file() else {}
    by_confidence = write_confidence_csv(rows, out_path / CSV_NAME) if len(mean_based(rows)) < len(rows) else []
    claims = write_claims(mean_based(rows), out_path / "claims.json",
                          {k: sweep_doc.get(k) for k in ("topology", "commit", "seeds")})["claims"]
    published = []
    if publish_to is not None:
        from testbed.experiments.publish import publish

        published = publish(out_path, publish_to)
    budgets = budget_summary(rows)
    if as_json:
        print_json({"out_dir": str(out_path), "runs": len(rows), **(summary or {}),
                    "csv": str(out_path / "results.csv"), "claims_json": str(out_path / "claims.json"),
                    "figures": [str(p) for p in figures], "published": [str(p) for p in published],
                    "budgets": budgets, "claims": claims, "within_by_confidence": by_confidence})
        return
    if summary:
        out.print(f"{len(rows)} runs in {summary['elapsed_s']:.0f} s (emulation bring-up {summary['setup_s']:.0f} s)")
    out.print(f"results: {out_path / 'results.csv'} (columns.json says what each column is), "
              f"{out_path / 'claims.json'}")
    for key, b in budgets.items():
        ran = b["runs"] - b["infeasible"]
        out.print(f"{key}: {b['within_t_max']} of {ran} runs within T_max (measured), {b['within_e_max']} within "
                  f"E_max (modelled); {b['infeasible']} infeasible points", highlight=False)
    for c in by_confidence:
        label = "mean-based" if c["confidence"] is None else f"P {c['confidence']:g}"
        out.print(f"{c['run']} {label}: {c['within_t_max']} of {c['runs']} runs within T_max (measured, share "
                  f"{c['share_within']:.2f} [{c['share_low']:.2f}, {c['share_high']:.2f}]); modelled P(within) "
                  f"{c['p_within_mean']:.2f} on average", highlight=False)
    if by_confidence:
        out.print(f"wrote: {out_path / CSV_NAME}")
    for p in [*figures, *published]:
        out.print(f"wrote: {p}")
    out.print(claims_table(claims))  # every verdict with its reason, a table a terminal does not wrap


def _run(file: Path, tmax: str | None, emax: str | None, seeds: int | None, runs: str, quick: bool,
         out_dir: Path | None, backend: str, levels: list[float | None]) -> tuple[Path, dict]:
    """Run the sweep with a progress bar; (its folder, timings)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from testbed.experiments.confidence import expand
    from testbed.experiments.sweep import FULL, QUICK, SweepConfig, parse_floats, parse_runs, run_sweep
    from testbed.model.names import check_name
    from testbed.model.topology import load_topology

    grid = QUICK if quick else FULL
    topo = load_topology(file)
    t_list = parse_floats(tmax, "--tmax") if tmax else list(grid["t_max_s"])
    e_list = parse_floats(emax, "--emax") if emax else list(grid["e_max_j"])
    n_seeds = seeds if seeds is not None else grid["seeds"]
    specs = expand(parse_runs(runs), levels)
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
            planned = f" P {row['confidence']:g}" if row.get("confidence") not in (None, "") else ""
            progress.console.print(
                f"  seed {row['seed']} {row['method']}:{row['selector']}{planned} T_max {row['t_max_s']:g} E_max "
                f"{row['e_max_j']:g}: " + (f"MS-SSIM {q:.3f}, {row['total_steps']} steps, "
                                             f"{row['latency_s']:.2f} s, {row['energy_j']:.1f} J"
                                             if row["feasible"] else "infeasible"), highlight=False)
            progress.advance(task)

        outcome = signals.run(run_sweep(cfg, on_row=on_row,  # SIGTERM/SIGHUP tear down like Ctrl-C
                                          on_status=lambda s: progress.update(task, description=s)))
        progress.update(task, description="done")
    return out_path, {"elapsed_s": outcome.elapsed_s, "setup_s": outcome.setup_s}


def register(app: typer.Typer) -> None:
    app.command()(sweep)
