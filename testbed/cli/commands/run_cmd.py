"""`testbed run FILE`: one generation over the emulated cell, with a live display.

Cold (`testbed run FILE`): this process is the run owner (`RunSession`): it makes the cell,
the broker, the agent template and the agents, runs the generation and tears it all down.
Warm (`--run ID`): the up cell's supervisor runs it (`run_on_up_cell`); this process only
sends the scenario and shows the events, and never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from testbed import methods
from testbed.cli import signals
from testbed.cli.console import err, out, print_json
from testbed.errors import InputError, ResourceError
from testbed.experiments.expectations import enforce_expectations
from testbed.model.names import SELECTORS
from testbed.model.topology import load_topology

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in methods.methods())

_PHASE = {"stage_started": "downloading", "downloaded": "computing", "computed": "uploading", "uploaded": "done",
          "device_offline": "offline", "deadline_missed": "missed deadline", "recovered": "took over",
          "patch_step": "done"}

#: The live table's number columns and the result field whose kind (measured, emulated,
#: modelled: composition/meta.py number_labels) each shows.
_COLUMNS = {"T_down s": "t_down_s", "T_cmp s": "t_cmp_s", "T_up s": "t_up_s", "E J": "energy_j",
            "pred T s": "predicted_latency_s", "p90 s": "predicted_latency_s"}


def kinds_caption(compute: str) -> str:
    """Which of the live table's numbers are measured, emulated or modelled, for this compute mode."""
    from testbed.composition.meta import number_labels

    labels, by_kind = number_labels(compute), {}
    for column, field in _COLUMNS.items():
        by_kind.setdefault(labels[field]["kind"], []).append(column.split()[0])
    return "; ".join(f"{', '.join(cols)} {kind}" for kind, cols in by_kind.items())


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Progress:
    """A rich table of the relay's stages, folded from the telemetry events."""

    def __init__(self, compute: str = "profile") -> None:
        self.rows: dict[tuple[int, str], dict[str, Any]] = {}
        self.lines: list[str] = []
        self.kinds = kinds_caption(compute)

    def feed(self, ev: dict[str, Any]) -> None:
        t, dev = ev["type"], ev.get("device")
        if t == "selection":
            q = (ev.get("plan") or {}).get("predicted_latency_quantiles_s") or {}
            p90 = f" (p90 {q['p90']:.3f} s)" if "p90" in q else ""
            self.lines.append(f"selected {', '.join(ev['selected'])}: predicted {ev['predicted_latency_s']:.3f} s{p90}, "
                              f"{ev['predicted_energy_j']:.1f} J")
        elif t == "reselected":  # the new chain from the failed stage on; its stages get rows as they start
            self.lines.append(f"reselected after {ev.get('failed')} failed: {' -> '.join(ev['chain'])} for steps "
                              f"{ev.get('steps')}, predicted {ev['predicted_latency_s']:.3f} s, "
                              f"{ev['predicted_energy_j']:.1f} J; charged {ev['charged_s']:.3f} s, "
                              f"{ev['charged_j']:.1f} J; left {ev['t_left_s']:.3f} s, {ev['e_left_j']:.1f} J")
            return
        elif t in ("device_offline", "deadline_missed", "recovered", "fault_injected"):
            extra = f" (from {ev.get('failed')}, steps {ev.get('steps')})" if t == "recovered" else ""
            self.lines.append(f"{t.replace('_', ' ')}: {dev}{extra}")
        if dev is None or ev.get("stage") is None:
            return
        row = self.rows.setdefault((ev["stage"], dev), {"steps": ev.get("steps"), "phase": ""})
        if t == "stage_started":  # the steps this attempt computes
            row["steps"] = ev.get("steps")
        row["phase"] = _PHASE.get(t, row["phase"])
        for k in ("t_down_s", "t_cmp_s", "t_up_s", "energy_j", "overrun_s"):
            if k in ev:
                row[k] = ev[k]
        if "predicted" in ev:
            row["predicted"] = ev["predicted"]

    def render(self) -> Table:
        table = Table(title="relay", caption="\n".join([self.kinds, *self.lines[-4:]]))
        for col in ("stage", "device", "steps", "phase", *_COLUMNS):
            table.add_column(col, justify="left" if col in ("device", "phase", "steps") else "right")
        for (stage, dev), r in sorted(self.rows.items()):
            pred = r.get("predicted") or {}
            # every time the method predicts for the stage (split: its handling too)
            pred_t = sum(v for k, v in pred.items() if k.startswith("t_") and k.endswith("_s")) if pred else None
            table.add_row(str(stage), dev, str(r.get("steps")), r["phase"],
                          *(f"{r[k]:.3f}" if k in r else "" for k in ("t_down_s", "t_cmp_s", "t_up_s")),
                          f"{r['energy_j']:.2f}" if "energy_j" in r else "",
                          f"{pred_t:.3f}" if pred_t is not None else "",
                          f"{pred['latency_quantiles_s']['p90']:.3f}" if pred.get("latency_quantiles_s") else "")
        return table


def run(
    file: Path = typer.Argument(..., help="topology YAML file"),
    backend: str = typer.Option("netns", "--backend",
                                help="netns or docker (containers; see docs/emulation.md, \"Docker and Swarm\")"),
    method: str = typer.Option("multistage", "--method", help=METHOD_HELP),
    selector: str | None = typer.Option(None, "--selector", "--strategy",
                                        help=f"device selector: {', '.join(SELECTORS)} (default dp; --strategy is "
                                             "its older name); methods that pick their own devices take none"),
    tmax: float | None = typer.Option(None, "--tmax", help="latency budget T_max in s (default: the topology's)"),
    emax: float | None = typer.Option(None, "--emax", help="energy budget E_max in J (default: the topology's)"),
    seed: int | None = typer.Option(None, "--seed", help="override the topology's seed"),
    out_dir: Path | None = typer.Option(None, "--out", help="output directory (default: out/<run id>)"),
    as_json: bool = typer.Option(False, "--json", help="print only the result JSON on stdout"),
    fail: str | None = typer.Option(None, "--fail", help="kill this selected device's agent mid-computation"),
    run_id: str | None = typer.Option(None, "--run", help="run on this up cell (testbed up): its supervisor, "
                                                          "template and warm agents do the work"),
    cold_id: str | None = typer.Option(None, "--run-id", help="the id of this cold run's cell (default: a new "
                                                              "one; 1-7 lowercase letters or digits); it names "
                                                              "out/<id> and what `testbed status` shows"),
    confidence: float | None = typer.Option(None, "--confidence", help="keep P(latency <= T_max) >= P (0 < P < 1) "
                                            "under the modelled transfer distributions; default: the mean-based plan"),
) -> None:
    """Run one generation: bring the cell up, relay the latent through the selected devices
    (or, with --method split, cut the UNet over two devices; with --method patch, cut the
    latent into bands computed on N devices at once), write result.json,
    events.jsonl, logs and the image, tear down. With --run ID, on a cell that is up.
    Options, and a cold run's plan, are checked before the cell comes up: bad input exits 2,
    budgets that admit no run exit 3."""
    from testbed.composition.preflight import check_budgets, check_fail_device, check_method, plan_cold_run
    from testbed.composition.startup import command_started_at
    from testbed.emulation.runs import new_run_id, run_dir
    from testbed.model.names import check_run_id
    from testbed.model.topology import place

    started_at = command_started_at()
    check_budgets(tmax, emax)  # bad input exits 2 here, before anything starts
    spec = check_method(method, selector, fail, confidence)
    topo = load_topology(file, seed=seed)
    if run_id is not None and cold_id is not None:
        raise InputError(f"--run-id {cold_id} names a cold run's new cell; --run {run_id} runs on an up cell, "
                         "whose id it is: give one of them")
    for option, value in (("--run", run_id), ("--run-id", cold_id)):
        if value is not None:  # it names out/<run> below, before anything else checks it
            check_run_id(value, option)
    if run_id is None:  # a cold run: its cell is the topology's, so its plan can be made now
        if cold_id is not None and run_dir(cold_id).exists():
            raise ResourceError(f"--run-id {cold_id}: a run {cold_id!r} exists already ({run_dir(cold_id)}); "
                                f"pick another id or `testbed down --run {cold_id}`")
        first = plan_cold_run(topo, method, selector, tmax, emax, fail, confidence).selected
    else:
        check_fail_device(topo, [d.id for d in place(topo).devices], fail)
        first = []
    rid = run_id or cold_id or new_run_id()
    out_path = out_dir or Path("out") / rid
    progress = _Progress(topo.workload.compute)
    console = err if as_json else out

    async def cold(on_event: Any) -> dict[str, Any]:
        from testbed.composition.cells import MadeCell
        from testbed.composition.session import RunSession

        # the cell here; torch, the template, the server's model and the generation in its worker
        # (its agent template makes the model variants of the plan's devices: a spare's loads its own)
        cell = MadeCell(rid, backend=backend, worker=True, warm="none", preload_for=first)
        async with RunSession(topo, cell, out_dir=out_path,
                              on_event=on_event, started_at=started_at) as session:
            console.print(f"run {rid}: cell up, {len(session.cell.links)} devices (broker {session.cell.broker.kind})")
            res = await session.run(method, selector=selector, t_max_s=tmax, e_max_j=emax, fail=fail,
                                    confidence=confidence)
        return res.to_json()

    async def warm(on_event: Any) -> dict[str, Any]:
        from testbed.composition.remote_run import run_on_up_cell

        console.print(f"run {rid}: on the up cell (its supervisor and warm agents run the generation)")
        return await run_on_up_cell(rid, topo, method=method, selector=selector, t_max_s=tmax, e_max_j=emax,
                                    fail=fail, out_dir=out_path, on_event=on_event, started_at=started_at,
                                    confidence=confidence)

    async def go() -> dict[str, Any]:
        try:
            with Live(progress.render(), console=console, refresh_per_second=8, transient=as_json) as live:
                def on_event(ev: dict[str, Any]) -> None:
                    progress.feed(ev)
                    live.update(progress.render())

                return await (warm(on_event) if run_id is not None else cold(on_event))
        finally:  # (an error's message too starts on a line of its own)
            if not console.is_terminal and not as_json:
                console.line()  # rich leaves a piped Live's last frame without its newline

    doc = signals.run(go())  # SIGTERM/SIGHUP tear down like Ctrl-C, exit 128+N
    if as_json:
        print_json(doc)
        enforce_expectations(topo.expect, doc, topo.name, console=err)
        return
    out.print(summary(doc, spec))
    out.print(f"wrote {out_path}/result.json, events.jsonl, image.png ({image_note(doc.get('meta') or {})}), logs/")
    enforce_expectations(topo.expect, doc, topo.name, console=out)


def summary(doc: dict[str, Any], spec: methods.MethodSpec) -> str:
    """A run's result in one line: its devices as its method uses them, what was measured
    against what was modelled."""
    rec = "; ".join(f"{x['device']} {x['steps']} -> {' -> '.join(x['chain'])} ({x['reason']}, charged "
                    f"{x['charged']['latency_s']:.3f} s, {x['charged']['energy_j']:.1f} J)" for x in doc["recovered"])
    return (f"[bold]{doc['run']}[/] ({spec.name}): {spec.describe_devices(doc['relay_order'])}, "
            f"{plural(doc['total_steps'], 'step')}, latency {doc['latency_s']:.3f} s measured "
            f"(predicted {doc['predicted_latency_s']:.3f} s"
            + (f", p90 {q['p90']:.3f} s" if (q := doc.get("predicted_latency_quantiles_s")) else "")
            + f"), energy {doc['energy_j']:.1f} J modelled (predicted {doc['predicted_energy_j']:.1f} J), "
            f"MS-SSIM {doc['ms_ssim']:.3f}" + (f"; recovered: {rec}" if rec else ""))


def image_note(meta: dict[str, Any]) -> str:
    """The image's own size, and the resolution the timings assume when it differs."""
    w, h = meta.get("image_width_px"), meta.get("image_height_px")
    if w is None:
        return "image"
    res = meta.get("resolution_px")
    return f"{w} x {h} px" + (f"; times and sizes are SD1.5's at {res} px" if res and res != w else "")


def register(app: typer.Typer) -> None:
    app.command()(run)
