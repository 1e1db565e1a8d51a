"""Run state under /run/testbed/<run>/ and the cleanup of a run, alive or crashed.

A run's directory (mode 0711, with the owned-directory marker) holds owner.json (whose run
it is, ownership.py), state.json (the status document, written by the supervisor),
supervisor.pid, logs/ and secrets/ (0700), agents/
(0711: each agent reaches its own 0400 config and lists nothing) and node-uids.json (the
agents' uids, node_uids.py) and, on a GPU host, mps/ (its CUDA MPS daemon's pipes and logs,
gpu.py); docs/security.md has every mode. `cleanup_run` removes everything a run can leave — processes in its cgroups or namespaces, the MPS daemon, the host link,
containers and networks, namespaces, cgroups, the directory — whether or not its supervisor
is still alive; a step that fails does not stop the others, and the failures are raised
together at the end (CleanupFailed). `known_runs` finds runs by their state directories and
kernel object names (tb-<run>-*, tb<run>h, testbed/<run>, docker label testbed.run, the
host firewall's chain TB-<run>-IN) and delayer processes (`testbed-delayer <run>`, which keep the namespaces they serve alive).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.emulation import host_firewall
from testbed.model.names import check_run_id
from testbed.emulation.cgroups import Cgroups, detect_cgroups
from testbed.emulation.node_uids import pids_running_as, read_uids
from testbed.emulation.nsutil import NETNS_DIR, list_netns, pids_in_netns, remove_netns
from testbed.emulation.owned_dirs import make_owned_dir, remove_owned_dir
from testbed.emulation.ownership import is_supervisor, record_owner
from testbed.emulation.procs import pid_alive, stop_pid_sync
from testbed.errors import ResourceError
from testbed.model.names import RUN_ID_CHARS, RUN_ID_RE, STATE_ROOT

__all__ = [
    "RUN_ROOT",
    "new_run_id",
    "run_dir",
    "make_run_dir",
    "ensure_run_dir",
    "read_state",
    "write_state",
    "write_topology",
    "known_runs",
    "run_objects",
    "resolve_run",
    "cleanup_run",
    "CleanupFailed",
    "supervisor_pid",
]

RUN_ROOT = STATE_ROOT
_NS_RE = re.compile(rf"^tb-({RUN_ID_CHARS})-")
_LINK_RE = re.compile(rf"^tb({RUN_ID_CHARS})h$")


class CleanupFailed(ResourceError):
    """Some of a run's objects could not be removed; `removed` lists what was."""

    def __init__(self, run_id: str, failures: list[str], removed: list[str]):
        super().__init__(f"run {run_id}: could not remove {'; '.join(failures)}")
        self.run_id = run_id
        self.failures = failures
        self.removed = removed


def new_run_id() -> str:
    return "r" + uuid.uuid4().hex[:5]


def run_dir(run_id: str) -> Path:
    return RUN_ROOT / check_run_id(run_id)


def make_run_dir(run_id: str) -> Path:
    RUN_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    d = run_dir(run_id)
    try:
        # 0711: others may traverse (the broker, dropped to its own user, reaches its own
        # directory) but not list; state.json, secrets/ and logs/ stay root-only
        make_owned_dir(d, mode=0o711)
    except FileExistsError:
        raise ResourceError(f"run {run_id!r} already exists ({d}); pick another --run or `testbed down --run {run_id}`") from None
    record_owner(d)  # whose it is: `testbed down --all` takes down only the caller's runs
    (d / "secrets").mkdir(mode=0o700)
    (d / "logs").mkdir(mode=0o700)
    return d


def ensure_run_dir(run_id: str) -> Path:
    """The run's directory, made (marked ours) when nobody has made it yet: for cells used
    without `testbed up` / a runner, which still keep broker files there."""
    d = run_dir(run_id)
    if not d.is_dir():
        try:
            make_run_dir(run_id)
        except ResourceError:  # made meanwhile by another process of the run
            pass
    return d


def write_state(run_id: str, doc: dict[str, Any], name: str = "state.json") -> None:
    path = run_dir(run_id) / name
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def write_topology(run_id: str, topo: Any) -> Path:
    """The run's resolved topology (seed applied) as <run dir>/topology.yaml: what
    `testbed tui --attach RUN` loads when it is given no FILE. It holds no secret."""
    import yaml

    path = run_dir(run_id) / "topology.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # root's, like the rest of the run's state
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def read_state(run_id: str, name: str = "state.json") -> dict[str, Any] | None:
    try:
        return json.loads((run_dir(run_id) / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def supervisor_pid(run_id: str) -> int | None:
    """The pid of the run's supervisor while it runs; None when it is gone — also when
    supervisor.pid names a pid that another process took since (ownership.is_supervisor)."""
    path = run_dir(run_id) / "supervisor.pid"
    try:
        pid = int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) and is_supervisor(pid, run_id, path) else None


def _root_link_names() -> list[str]:
    try:
        return os.listdir("/sys/class/net")
    except FileNotFoundError:
        return []


def run_objects(cg: Cgroups | None = None) -> dict[str, list[str]]:
    """Run id -> what of it exists on this host: its state directory, namespaces
    (tb-<run>-*), host link (tb<run>h), cgroups (testbed/<run>), docker containers and
    networks (label testbed.run). What `testbed down --all` removes, and what the test
    suite refuses to start over."""
    found: dict[str, list[str]] = {}

    def add(run: str, what: str) -> None:
        if RUN_ID_RE.fullmatch(run):
            found.setdefault(run, []).append(what)

    if RUN_ROOT.is_dir():
        for p in RUN_ROOT.iterdir():
            if p.is_dir():
                add(p.name, f"state {p}")
    for n in list_netns("tb-"):
        if m := _NS_RE.match(n):
            add(m.group(1), f"netns {n}")
    for n in _root_link_names():
        if m := _LINK_RE.match(n):
            add(m.group(1), f"link {n}")
    try:
        cg = cg or detect_cgroups()
        for r in cg.runs():
            add(r, f"cgroup testbed/{r}")
    except ResourceError:
        pass
    for r, objects in [*_docker_runs().items(), *_swarm_runs().items()]:
        for what in objects:
            add(r, what)
    for pid, r in delayer_pids().items():  # it keeps the namespaces it serves alive
        add(r, f"delayer {pid}")
    for r in _firewall_runs():
        add(r, f"host firewall {host_firewall.chain_name(r)}")
    return found


def _firewall_runs() -> set[str]:
    try:
        return host_firewall.installed_runs()
    except (OSError, subprocess.SubprocessError):  # no iptables here: no chain either
        return set()


def known_runs(cg: Cgroups | None = None) -> list[str]:
    """The ids of every run that left something on this host (see run_objects)."""
    return sorted(run_objects(cg))


def resolve_run(run_id: str | None) -> str:
    """The given run, or the only one there is."""
    if run_id is not None:
        return check_run_id(run_id)
    runs = [r for r in known_runs() if (RUN_ROOT / r).is_dir()]
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise ResourceError("no run is up; start one with `testbed up FILE`")
    raise ResourceError(f"{len(runs)} runs are up ({', '.join(runs)}); choose one with --run ID")


def _pids_naming(text: str) -> set[int]:
    """Processes whose command line contains `text` (a run's state directory)."""
    needle = text.encode()
    pids: set[int] = set()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.add(int(p))
        except OSError:
            continue
    return pids


def delayer_pids(run_id: str | None = None) -> dict[int, str]:
    """Delayer processes (pid -> run) by their title `testbed-delayer <run>`, or by their
    command line while they start (`python -m testbed.emulation.delayer <run>`)."""
    from testbed.emulation.delayer import PROCESS_TITLE

    found: dict[int, str] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            args = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        words = " ".join(args).split()
        run = None
        if words[:1] == [PROCESS_TITLE] and len(words) > 1:
            run = words[1]
        elif "testbed.emulation.delayer" in words and words.index("testbed.emulation.delayer") + 1 < len(words):
            run = words[words.index("testbed.emulation.delayer") + 1]
        if run is not None and (run_id is None or run == run_id):
            found[int(p)] = run
    return found


def _docker_runs() -> dict[str, list[str]]:
    """Run id -> its containers and networks labelled testbed.run (none without docker)."""
    try:
        from testbed.emulation.docker.cleanup import docker_runs
        from testbed.emulation.docker.image import docker_client

        return docker_runs(docker_client(timeout_s=10))
    except (ImportError, ResourceError):
        return {}


def _swarm_runs() -> dict[str, list[str]]:
    """Run id -> its objects on the clusters of this machine (Swarm cells; docs/cluster.md)."""
    from testbed.emulation.cluster.cluster import known_clusters, load_plan
    from testbed.emulation.cluster.swarm_run import swarm_runs

    out: dict[str, list[str]] = {}
    for name in known_clusters():
        try:
            for r, objects in swarm_runs(load_plan(name)[0]).items():
                out.setdefault(r, []).extend(f"{o} (cluster {name})" for o in objects)
        except Exception:  # noqa: BLE001 - a half-made or busy cluster: its own `cluster down` cleans it
            continue
    return out


def _remove_swarm(run_id: str) -> list[str]:
    """What a Swarm cell of `run_id` left on the clusters of this machine."""
    from testbed.emulation.cluster.cluster import known_clusters, load_plan
    from testbed.emulation.cluster.swarm_run import remove_swarm_run, swarm_runs

    removed: list[str] = []
    for name in known_clusters():
        try:
            plan = load_plan(name)[0]
            if run_id not in swarm_runs(plan):
                continue
        except ResourceError:
            continue
        removed += remove_swarm_run(plan, run_id)
    return removed


async def _remove_docker(run_id: str) -> list[str]:
    try:
        from testbed.emulation.docker.cleanup import remove_docker_run
    except ImportError:
        return []
    return await remove_docker_run(run_id)


def _run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running event loop; its
    exception is raised here (not printed by the thread and lost)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    t = threading.Thread(target=body, name="tb-cleanup")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result", [])


def _attempt(what: str, step: Callable[[], list[str]], removed: list[str], failures: list[str]) -> None:
    """One cleanup step: what it removed goes to `removed`, its error to `failures`."""
    try:
        removed += step()
    except Exception as e:  # noqa: BLE001 - every other step must still run; reported together
        failures.append(f"{what} ({e})")


def cleanup_run(run_id: str, supervisor_timeout_s: float = 30.0) -> list[str]:
    """Tear a run down completely; returns what was removed (empty when nothing was left).

    Every step runs even when an earlier one failed; CleanupFailed (exit 4) then names
    every failure and carries what was removed.
    """
    check_run_id(run_id)
    removed: list[str] = []
    failures: list[str] = []
    _attempt("supervisor", lambda: _stop_supervisor(run_id, supervisor_timeout_s), removed, failures)
    try:
        cg: Cgroups | None = detect_cgroups()
    except ResourceError:
        cg = None
    _attempt("processes", lambda: _stop_processes(run_id, cg), removed, failures)
    if (RUN_ROOT / run_id / "mps").is_dir():  # the cell's CUDA MPS daemon, after its clients (gpu.py)
        from testbed.emulation.gpu import mps_dirs, stop_mps

        _attempt("MPS daemon", lambda: stop_mps(mps_dirs(RUN_ROOT / run_id)), removed, failures)
    from testbed.emulation.backend import remove_host_links  # (pyroute2: only where a cell is torn down)

    _attempt("host links", lambda: _run_sync(remove_host_links(run_id)), removed, failures)
    _attempt("host firewall", lambda: _run_sync(host_firewall.remove(run_id)), removed, failures)
    _attempt("docker containers and networks", lambda: _run_sync(_remove_docker(run_id)), removed, failures)
    _attempt("swarm services", lambda: _remove_swarm(run_id), removed, failures)
    for name in list_netns(f"tb-{run_id}-"):
        _attempt(f"netns {name}", lambda name=name: [f"netns {name}"] if remove_netns(name) else [], removed, failures)
    if cg is not None and run_id in cg.runs():
        _attempt(f"cgroup testbed/{run_id}", lambda: _remove_cgroup(cg, run_id), removed, failures)
    d = RUN_ROOT / run_id
    _attempt(f"state {d}", lambda: [f"state {d}"] if remove_owned_dir(d, RUN_ROOT) else [], removed, failures)
    if failures:
        raise CleanupFailed(run_id, failures, removed)
    return removed


def _stop_supervisor(run_id: str, timeout_s: float) -> list[str]:
    pid = supervisor_pid(run_id)
    if pid is None:
        return []
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return []
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        stop_pid_sync(pid, timeout_s=1.0)
    return [f"supervisor {pid}"]


def _remove_cgroup(cg: Cgroups, run_id: str) -> list[str]:
    cg.remove(run_id)
    return [f"cgroup testbed/{run_id}"]


def _stop_processes(run_id: str, cg: Cgroups | None) -> list[str]:
    """Processes in the run's cgroups and namespaces, running as its node uids, and
    host-side helpers naming its state."""
    victims = set(cg.pids(run_id)) if cg is not None else set()
    victims |= pids_in_netns([NETNS_DIR / n for n in list_netns(f"tb-{run_id}-")])
    victims |= _pids_naming(f"{RUN_ROOT / run_id}/")  # host-side helpers (the agent template) of a crashed run
    victims |= set(delayer_pids(run_id))  # it exits with its owner; one that did not would keep the namespaces
    victims |= pids_running_as(set(read_uids(RUN_ROOT / run_id).values()))  # the run's agents, wherever they are
    for p in sorted(victims):
        stop_pid_sync(p, timeout_s=2.0)
    return [f"process {p}" for p in sorted(victims)]
