"""Run state under /run/testbed/<run>/ and the cleanup of a run, alive or crashed.

A run's directory (mode 0700) holds state.json (the status document, written by the
supervisor), supervisor.pid, logs and secrets/. `cleanup_run` removes everything a run
can leave — processes in its cgroups or namespaces, the host link, namespaces, cgroups,
the directory — whether or not its supervisor is still alive; `known_runs` finds runs by
their state directories, kernel object names (tb-<run>-*, tb<run>h, testbed/<run>) and
delayer processes (`testbed-delayer <run>`, which keep the namespaces they serve alive).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from testbed.emulation.backend import check_run_id, remove_host_links
from testbed.emulation.cgroups import Cgroups, detect_cgroups
from testbed.emulation.nsutil import NETNS_DIR, list_netns, remove_netns
from testbed.emulation.procs import pid_alive, stop_pid_sync
from testbed.errors import ResourceError
from testbed.model.names import STATE_ROOT

__all__ = [
    "RUN_ROOT",
    "new_run_id",
    "run_dir",
    "make_run_dir",
    "read_state",
    "write_state",
    "write_topology",
    "known_runs",
    "resolve_run",
    "cleanup_run",
    "supervisor_pid",
]

RUN_ROOT = STATE_ROOT
_NS_RE = re.compile(r"^tb-([a-z0-9]{1,7})-")
_LINK_RE = re.compile(r"^tb([a-z0-9]{1,7})h$")


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
        d.mkdir(mode=0o711)
    except FileExistsError:
        raise ResourceError(f"run {run_id!r} already exists ({d}); pick another --run or `testbed down --run {run_id}`") from None
    (d / "secrets").mkdir(mode=0o700)
    (d / "logs").mkdir(mode=0o700)
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
    path.write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def read_state(run_id: str, name: str = "state.json") -> dict[str, Any] | None:
    try:
        return json.loads((run_dir(run_id) / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def supervisor_pid(run_id: str) -> int | None:
    try:
        pid = int((run_dir(run_id) / "supervisor.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _root_link_names() -> list[str]:
    try:
        return os.listdir("/sys/class/net")
    except FileNotFoundError:
        return []


def known_runs(cg: Cgroups | None = None) -> list[str]:
    runs: set[str] = set()
    if RUN_ROOT.is_dir():
        runs |= {p.name for p in RUN_ROOT.iterdir() if p.is_dir()}
    runs |= {m.group(1) for n in list_netns("tb-") if (m := _NS_RE.match(n))}
    runs |= {m.group(1) for n in _root_link_names() if (m := _LINK_RE.match(n))}
    try:
        cg = cg or detect_cgroups()
        runs |= set(cg.runs())
    except ResourceError:
        pass
    runs |= set(_docker_runs())
    runs |= set(delayer_pids().values())
    return sorted(r for r in runs if re.fullmatch(r"[a-z0-9]{1,7}", r))


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


def _pids_in_netns(ns_files: list[Path]) -> set[int]:
    inodes = set()
    for f in ns_files:
        try:
            inodes.add(os.stat(f).st_ino)
        except OSError:
            pass
    pids: set[int] = set()
    if not inodes:
        return pids
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.stat(f"/proc/{p}/ns/net").st_ino in inodes:
                pids.add(int(p))
        except OSError:
            continue
    pids.discard(os.getpid())
    return pids


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


def _docker_runs() -> list[str]:
    """Runs that have containers or networks labelled testbed.run (none without docker)."""
    try:
        from testbed.emulation.docker.cleanup import docker_runs
        from testbed.emulation.docker.image import docker_client

        return list(docker_runs(docker_client(timeout_s=10)))
    except (ImportError, ResourceError):
        return []


async def _remove_docker(run_id: str) -> list[str]:
    try:
        from testbed.emulation.docker.cleanup import remove_docker_run
    except ImportError:
        return []
    return await remove_docker_run(run_id)


def _run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(asyncio.run(coro)))
    t.start()
    t.join()
    return box[0] if box else []


def cleanup_run(run_id: str, supervisor_timeout_s: float = 30.0) -> list[str]:
    """Tear a run down completely; returns what was removed (empty when nothing was left)."""
    check_run_id(run_id)
    removed: list[str] = []
    pid = supervisor_pid(run_id)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + supervisor_timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            stop_pid_sync(pid, timeout_s=1.0)
        removed.append(f"supervisor {pid}")
    # processes: in the run's cgroups and namespaces
    try:
        cg: Cgroups | None = detect_cgroups()
    except ResourceError:
        cg = None
    victims = set(cg.pids(run_id)) if cg is not None else set()
    victims |= _pids_in_netns([NETNS_DIR / n for n in list_netns(f"tb-{run_id}-")])
    victims |= _pids_naming(f"{RUN_ROOT / run_id}/")  # host-side helpers (the agent template) of a crashed run
    victims |= set(delayer_pids(run_id))  # it exits with its owner; one that did not would keep the namespaces
    for p in sorted(victims):
        stop_pid_sync(p, timeout_s=2.0)
        removed.append(f"process {p}")
    removed += _run_sync(remove_host_links(run_id))
    removed += _run_sync(_remove_docker(run_id))
    for name in list_netns(f"tb-{run_id}-"):
        if remove_netns(name):
            removed.append(f"netns {name}")
    if cg is not None and run_id in cg.runs():
        cg.remove(run_id)
        removed.append(f"cgroup testbed/{run_id}")
    d = RUN_ROOT / run_id
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"state {d}")
    return removed
