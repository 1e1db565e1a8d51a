"""`testbed up`, `testbed status`, `testbed down`: the run lifecycle of an emulated cell."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import typer
from testbed.cli.console import err, out, print_json
from testbed.cli.views import describe_removed, runs_table, status_table
from testbed.errors import InputError, ResourceError, RunFailedError, TestbedError
from testbed.model.topology import load_topology


def require_root() -> None:
    if os.geteuid() != 0:
        raise ResourceError("this command needs root (network namespaces, tc, cgroups); run it with sudo")


def up(
    file: Path = typer.Argument(..., help="topology YAML file"),
    backend: str = typer.Option("netns", "--backend", help="how nodes are isolated: netns, docker, or swarm "
                                "(a cluster's nodes: --cluster)"),
    cluster: str | None = typer.Option(None, "--cluster", help="--backend swarm: the cluster (`testbed cluster up`)"),
    run: str | None = typer.Option(None, "--run", help="run id (1-7 lowercase letters/digits); made up when omitted"),
    seed: int | None = typer.Option(None, "--seed", help="override the file's seed"),
    broker: bool = typer.Option(True, "--broker/--no-broker", help="start the MQTT broker on the edge server"),
    timeout_s: float = typer.Option(120.0, "--timeout", help="seconds to wait for the emulation to be ready"),
    warm: str = typer.Option("auto", "--warm", help="agents kept warm: auto (every device of a cell of up to 32), "
                                                    "all, none, a number, or device ids dev01,dev02; the others "
                                                    "start when a plan selects them"),
    wait: bool = typer.Option(False, "--wait", help="return only once the warm agents are online (for scripts)"),
    as_json: bool = typer.Option(False, "--json", help="print only the status JSON document"),
) -> None:
    """Bring a topology up; returns once the cell is usable (namespaces, links, shaping,
    broker) while a detached supervisor keeps it alive and its agents warm in the
    background (`testbed status` shows them; --wait waits for them)."""
    from testbed.model.names import check_run_id
    from testbed.emulation.environ import clean_environ
    from testbed.emulation.runs import cleanup_run, make_run_dir, new_run_id, read_state, run_dir

    if backend not in ("netns", "docker", "swarm"):
        raise ResourceError(f"backend {backend!r} is not available; use --backend netns, docker or swarm")
    from testbed.composition.online import warm_set
    from testbed.model.radio import compute_links
    from testbed.model.topology import place

    topo = load_topology(file, seed=seed)  # bad input fails here, before anything is made
    warm_set(warm, [lk.id for lk in compute_links(topo, place(topo))])  # (a bad --warm, too)
    if backend == "swarm" or cluster is not None:
        _check_cluster(backend, cluster, topo)
    run_id = check_run_id(run, "--run") if run else new_run_id()
    require_root()
    d = make_run_dir(run_id)
    argv = [sys.executable, "-m", "testbed.composition.supervisor", run_id, str(file.resolve()), "--backend", backend]
    if seed is not None:
        argv += ["--seed", str(seed)]
    argv += ["--warm", warm] if broker else ["--no-broker"]
    if cluster is not None:
        argv += ["--cluster", cluster]
    log = open(d / "logs" / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=clean_environ(home=None))
    finally:
        log.close()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            state = read_state(run_id)
            if state is not None and state.get("ready"):
                break
            failure = read_state(run_id, "error.json")
            if failure is not None or proc.poll() is not None:
                proc.wait(timeout=30)
                msg = (failure or {}).get("error") or f"supervisor exited with code {proc.returncode}; see {d}/logs"
                code = (failure or {}).get("exit_code", 5)
                cleanup_run(run_id)
                e = TestbedError(f"run {run_id}: {msg}")
                e.exit_code = code
                raise e
            if time.monotonic() > deadline:
                cleanup_run(run_id)
                raise RunFailedError(f"run {run_id} was not ready within {timeout_s:g} s; removed it (see --timeout)")
            time.sleep(0.02)
        if wait and broker:
            state = _wait_warm(run_id, deadline)
    except KeyboardInterrupt:
        cleanup_run(run_id)
        raise
    if as_json:
        print_json(state)
        return
    for w in state.get("warnings", []):
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    _print_status(state)
    out.print(f"run [bold]{run_id}[/] is up in {state.get('up_s', 0):.2f} s; state in {run_dir(run_id)}; "
              f"stop it with `testbed down --run {run_id}`", highlight=False)


def _wait_warm(run_id: str, deadline: float) -> dict:
    """`up --wait`: until the worker has every warm agent online (state.json then); the cell
    stays up when it fails (exit 5, `testbed down` removes it)."""
    from testbed.emulation.runs import read_state

    while True:
        state = read_state(run_id) or {}
        worker = read_state(run_id, "worker.json") or {}
        failed = worker.get("error") or (str(state.get("worker") or "").startswith("failed") and state["worker"])
        if failed:
            raise RunFailedError(f"run {run_id} is up but its agents did not warm: {failed}; "
                                 f"`testbed down --run {run_id}` removes it")
        online, want = _agents_online(state)
        if worker.get("warm_done") and state.get("worker") == "ready" and online >= want:
            return state
        if time.monotonic() > deadline:
            raise RunFailedError(f"run {run_id} is up but {want - online} of its {want} warm agents were not online "
                                 f"in time (see --timeout); `testbed status --run {run_id}` shows them")
        time.sleep(0.05)


def _agents_online(state: dict) -> tuple[int, int]:
    """(warm agents online, warm agents) from state.json."""
    warm = set(state.get("warm") or [])
    online = sum(1 for n in state.get("nodes", []) if n.get("id") in warm and n.get("agent_online"))
    return online, len(warm)


def _agents_line(state: dict) -> str | None:
    """`agents: 12/20 online (warming)`: the warm agents of an up cell, coming online."""
    if state.get("worker") is None:
        return None
    online, want = _agents_online(state)
    devices = sum(1 for n in state.get("nodes", []) if n.get("role") == "device")
    worker = str(state.get("worker"))
    if worker.startswith("failed"):
        how = f"; the worker {worker}"
    else:
        how = " (warming)" if online < want or worker != "ready" else ""
    rest = f"; the other {devices - want} start when a plan selects them" if want < devices else ""
    return f"agents: {online}/{want} online{how}{rest}"


def _check_cluster(backend: str, cluster: str | None, topo) -> None:
    """--backend swarm needs an up cluster whose nodes the topology's placements name."""
    from testbed.emulation.cluster.cluster import load_plan
    from testbed.emulation.cluster.swarm_backend import spread

    if backend != "swarm":
        raise InputError(f"--cluster {cluster}: a cluster goes with --backend swarm (not {backend})")
    if not cluster:
        raise InputError("--backend swarm needs --cluster NAME (`testbed cluster up --nodes N --name NAME`)")
    plan, _ = load_plan(cluster)
    spread([], [n.name for n in plan.nodes], topo.placements())  # a placement naming no node: exit 2 now


def _print_status(state: dict) -> None:
    out.print(status_table(state))
    gpu = state.get("gpu")
    if gpu:
        out.print(f"GPU limits {'applied' if gpu.get('limits_applied') else 'not applied'}: {gpu.get('why')}",
                  highlight=False, soft_wrap=True)
    if (line := _agents_line(state)) is not None:
        out.print(line, highlight=False)


def status(
    run: str | None = typer.Option(None, "--run", help="run id (default: the only run that is up)"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Show a run: nodes, namespaces, addresses, rates, delay and loss, CPU quotas. Without
    --run: the only run there is; with none, says so (exit 0); with several, lists them."""
    from testbed.emulation.runs import known_runs, read_state, run_dir, supervisor_pid
    from testbed.model.names import check_run_id

    if run is not None:
        check_run_id(run, "--run")
    require_root()  # the state is root's (0600)
    runs = known_runs()
    if run is None and len(runs) != 1:
        # a query: "nothing is up" and "these are up" are answers, not errors
        listing = [_run_entry(r, read_state(r), supervisor_pid(r) is not None) for r in runs]
        if as_json:
            print_json({"runs": listing})
        elif not listing:
            out.print("no run is up on this host; start one with `testbed up FILE`")
        else:
            out.print(runs_table(listing))
        return
    run_id = run or runs[0]
    if run_id not in runs:
        raise InputError(f"--run {run_id}: no such run on this host; "
                         + (f"runs here: {', '.join(runs)}" if runs else "no run is up (`testbed up FILE` starts one)"))
    state = read_state(run_id)
    if state is None:
        raise RunFailedError(f"run {run_id!r} has no state (still starting, or its start failed); "
                             f"`testbed down --run {run_id}` cleans it up")
    if supervisor_pid(run_id) is None:
        raise RunFailedError(f"run {run_id}: its supervisor is gone; `testbed down --run {run_id}` removes what it left")
    # The observer account (read-only on tb/<run>/events) exists when the cell has a
    # broker; the TUI's attach mode uses it.
    observer = read_state(run_id, "observer.json")
    if as_json:
        print_json({k: state[k] for k in ("run", "backend", "netem", "nodes")} | {
            k: state[k] for k in ("warnings", "impairments", "cell", "broker", "broker_error", "host_route", "mobility",
                                  "gpu", "topology", "seed", "up_s", "timings_s", "warm", "worker", "cluster",
                                  "clocks") if k in state}
            | ({"agents": dict(zip(("online", "warm"), _agents_online(state)))} if state.get("worker") else {})
            | ({"observer": {k: v for k, v in observer.items() if k != "password"}
                             | {"credentials": str(run_dir(run_id) / "observer.json")}} if observer else {}))
        return
    _print_status(state)
    if observer:
        # the password stays in the 0600 file: never printed, never on a command line
        out.print(
            f"observer (read-only events on {observer['topic']}, {observer['host']}:{observer['port']}): "
            f"`testbed tui --attach {run_id}`; credentials in {run_dir(run_id) / 'observer.json'} (root only)",
            highlight=False, soft_wrap=True,
        )
    else:
        out.print("this cell has no broker (brought up with --no-broker)")


def down(
    run: str | None = typer.Option(None, "--run", help="run id (default: the only run that is up)"),
    all_runs: bool = typer.Option(False, "--all", help="remove every run of yours, also what your crashed runs left"),
    force: bool = typer.Option(False, "--force", help="with --all: also other users' runs and leftovers of "
                                                      "unknown owner"),
    as_json: bool = typer.Option(False, "--json", help="print only a JSON document on stdout"),
) -> None:
    """Tear a run down (idempotent): processes, namespaces, links, qdiscs, cgroups, containers,
    networks, secrets. Exits 4 naming what could not be removed (after removing the rest)."""
    from testbed.emulation.ownership import caller_identity, read_owner, split_by_owner
    from testbed.emulation.runs import RUN_ROOT, CleanupFailed, cleanup_run, known_runs, resolve_run, run_objects
    from testbed.model.names import check_run_id

    if run is not None:
        check_run_id(run, "--run")
    if all_runs and run:
        raise InputError("give either --run ID or --all, not both")
    if force and not all_runs:
        raise InputError("--force goes with --all (it also takes down other users' runs)")
    require_root()
    left: list[str] = []
    if all_runs:
        found = known_runs()
        runs, left = split_by_owner(found, {r: read_owner(RUN_ROOT / r) for r in found}, caller_identity())
        if force:
            runs, left = found, []
    else:
        try:
            runs = [resolve_run(run)]
        except ResourceError:
            if run is None and not known_runs():
                runs = []
            elif run is None:
                raise
            else:
                runs = [run]
    removed: dict[str, list[str]] = {}
    failed: dict[str, list[str]] = {}
    # a live run's supervisor takes its cell down itself: what existed before is what went
    present = run_objects() if runs and not as_json else {}
    for r in runs:
        try:
            removed[r] = cleanup_run(r)
        except CleanupFailed as e:  # the other runs are still removed; all failures reported below
            removed[r], failed[r] = e.removed, e.failures
    if as_json:
        print_json({"removed": removed} | ({"failed": failed} if failed else {}) | ({"left": left} if left else {}))
    else:
        if not any(removed.values()) and not failed:
            out.print("nothing to remove")
        for r, items in removed.items():
            if items:
                gone = items if r in failed else [*items, *present.get(r, [])]
                out.print(f"run {r}: removed {describe_removed(gone)}", highlight=False)
        if left:
            err.print(f"left {len(left)} run(s) of other users or of unknown owner: {', '.join(left)}; "
                      "`testbed down --run ID` takes one down, `testbed down --all --force` all", highlight=False)
    if failed:
        raise ResourceError("; ".join(f"run {r}: could not remove {'; '.join(f)}" for r, f in failed.items())
                            + "; fix the cause and run `testbed down` again (`--all` also clears stale docker networks)")


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(status)
    app.command()(down)


def _run_entry(run_id: str, state: dict | None, supervised: bool) -> dict:
    """One line of the runs listing (state.json's fields where the run wrote one)."""
    if state is None:
        what = "starting" if supervised else "leftovers: `testbed down --run " + run_id + "` removes them"
    else:
        what = "up" if supervised else "supervisor gone: `testbed down --run " + run_id + "`"
    state = state or {}
    nodes = state.get("nodes")
    return {"run": run_id, "state": what, "backend": state.get("backend"), "topology": state.get("topology"),
            "devices": None if nodes is None else sum(1 for n in nodes if n.get("role") == "device"),
            "up_s": state.get("up_s")}
