"""`testbed run FILE`: one generation over the emulated cell, with a live display.

Cold (`testbed run FILE`): this process is the run owner (`RunSession`): it makes the cell,
the broker, the agent template and the agents, runs the generation and tears it all down.
Warm (`--run ID`): the up cell's supervisor runs it (`run_on_up_cell`); this process only
sends the scenario and shows the events, and never imports torch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from testbed import methods
from testbed.cli.console import err, out, print_json
from testbed.errors import InputError
from testbed.experiments.expectations import enforce_expectations
from testbed.model.names import SELECTORS
from testbed.model.topology import load_topology

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in methods.methods())

_PHASE = {"stage_started": "downloading", "downloaded": "computing", "computed": "uploading", "uploaded": "done",
          "device_offline": "offline", "deadline_missed": "missed deadline", "recovered": "took over",
          "patch_step": "done"}


class _Progress:
    """A rich table of the relay's stages, folded from the telemetry events."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], dict[str, Any]] = {}
        self.lines: list[str] = []

    def feed(self, ev: dict[str, Any]) -> None:
        t, dev = ev["type"], ev.get("device")
        if t == "selection":
            self.lines.append(f"selected {', '.join(ev['selected'])}: predicted {ev['predicted_latency_s']:.3f} s, "
                              f"{ev['predicted_energy_j']:.1f} J")
        elif t == "reselected":
            self.lines.append(f"reselected after {ev.get('failed')} failed: {' -> '.join(ev['chain'])} for steps "
                              f"{ev.get('steps')}, predicted {ev['predicted_latency_s']:.3f} s, "
                              f"{ev['predicted_energy_j']:.1f} J; charged {ev['charged_s']:.3f} s, "
                              f"{ev['charged_j']:.1f} J; left {ev['t_left_s']:.3f} s, {ev['e_left_j']:.1f} J")
        elif t in ("device_offline", "deadline_missed", "recovered", "fault_injected"):
            extra = f" (from {ev.get('failed')}, steps {ev.get('steps')})" if t == "recovered" else ""
            self.lines.append(f"{t.replace('_', ' ')}: {dev}{extra}")
        if dev is None or ev.get("stage") is None:
            return
        row = self.rows.setdefault((ev["stage"], dev), {"steps": ev.get("steps"), "phase": ""})
        row["phase"] = _PHASE.get(t, row["phase"])
        for k in ("t_down_s", "t_cmp_s", "t_up_s", "energy_j", "overrun_s"):
            if k in ev:
                row[k] = ev[k]
        if "predicted" in ev:
            row["predicted"] = ev["predicted"]

    def render(self) -> Table:
        table = Table(title="relay", caption="\n".join(self.lines[-4:]) or None)
        for col in ("stage", "device", "steps", "phase", "T_down s", "T_cmp s", "T_up s", "E J", "pred T s"):
            table.add_column(col, justify="left" if col in ("device", "phase", "steps") else "right")
        for (stage, dev), r in sorted(self.rows.items()):
            pred = r.get("predicted") or {}
            pred_t = sum(pred.get(k, 0.0) for k in ("t_down_s", "t_cmp_s", "t_up_s")) if pred else None
            table.add_row(str(stage), dev, str(r.get("steps")), r["phase"],
                          *(f"{r[k]:.3f}" if k in r else "" for k in ("t_down_s", "t_cmp_s", "t_up_s")),
                          f"{r['energy_j']:.2f}" if "energy_j" in r else "",
                          f"{pred_t:.3f}" if pred_t is not None else "")
        return table


def run(
    file: Path = typer.Argument(..., help="topology YAML file"),
    backend: str = typer.Option("netns", "--backend", help="netns or docker (containers; see README \"Docker and Swarm\")"),
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
) -> None:
    """Run one generation: bring the cell up, relay the latent through the selected devices
    (or, with --method split, cut the UNet over two devices; with --method patch, cut the
    latent into bands computed on N devices at once), write result.json,
    events.jsonl, logs and the image, tear down. With --run ID, on a cell that is up."""
    from testbed.composition.startup import command_started_at
    from testbed.emulation.runs import new_run_id
    from testbed.model.names import check_run_id

    started_at = command_started_at()
    spec = methods.method(method)
    spec.make(selector)  # bad --method/--selector fail here, before anything starts
    if fail and not spec.recovers:
        raise InputError(f"--fail applies to methods that recover from a lost device "
                         f"({', '.join(m.name for m in methods.methods() if m.recovers)}); "
                         f"{method}: {spec.notes.get('recovery', 'no recovery')}")
    topo = load_topology(file, seed=seed)
    if run_id is not None:  # it names out/<run> below, before anything else checks it
        check_run_id(run_id, "--run")
    rid = run_id or new_run_id()
    out_path = out_dir or Path("out") / rid
    progress = _Progress()
    console = err if as_json else out

    async def cold(on_event: Any) -> dict[str, Any]:
        from testbed.composition.cells import MadeCell
        from testbed.composition.session import RunSession

        # the cell here; torch, the template, the server's model and the generation in its worker
        async with RunSession(topo, MadeCell(rid, backend=backend, worker=True, warm="none"), out_dir=out_path,
                              on_event=on_event, started_at=started_at) as session:
            console.print(f"run {rid}: cell up, {len(session.cell.links)} devices (broker {session.cell.broker.kind})")
            res = await session.run(method, selector=selector, t_max_s=tmax, e_max_j=emax, fail=fail)
        return res.to_json()

    async def warm(on_event: Any) -> dict[str, Any]:
        from testbed.composition.remote_run import run_on_up_cell

        console.print(f"run {rid}: on the up cell (its supervisor and warm agents run the generation)")
        return await run_on_up_cell(rid, topo, method=method, selector=selector, t_max_s=tmax, e_max_j=emax,
                                    fail=fail, out_dir=out_path, on_event=on_event, started_at=started_at)

    async def go() -> dict[str, Any]:
        with Live(progress.render(), console=console, refresh_per_second=8, transient=as_json) as live:
            def on_event(ev: dict[str, Any]) -> None:
                progress.feed(ev)
                live.update(progress.render())

            doc = await (warm(on_event) if run_id is not None else cold(on_event))
        if not console.is_terminal and not as_json:
            console.line()  # rich leaves a piped Live's last frame without its newline
        return doc

    doc = asyncio.run(go())
    if as_json:
        print_json(doc)
        enforce_expectations(topo.expect, doc, topo.name, console=err)
        return
    rec = "; ".join(f"{x['device']} {x['steps']} -> {' -> '.join(x['chain'])} ({x['reason']}, charged "
                    f"{x['charged']['latency_s']:.3f} s, {x['charged']['energy_j']:.1f} J)" for x in doc["recovered"])
    out.print(
        f"[bold]{doc['run']}[/]: {' -> '.join(doc['relay_order'])}, {doc['total_steps']} steps, "
        f"latency {doc['latency_s']:.3f} s (predicted {doc['predicted_latency_s']:.3f} s), "
        f"energy {doc['energy_j']:.1f} J, MS-SSIM {doc['ms_ssim']:.3f}"
        + (f"; recovered: {rec}" if rec else "")
    )
    out.print(f"wrote {out_path}/result.json, events.jsonl, image.png, logs/")
    enforce_expectations(topo.expect, doc, topo.name, console=out)


def register(app: typer.Typer) -> None:
    app.command()(run)
