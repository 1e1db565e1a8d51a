"""Unprivileged uids for the processes the testbed runs in a run's nodes (the device
agents): one per device, allocated for the run, recorded in its state directory.

A node uid needs no /etc/passwd entry; its gid is the same number and it has no
supplementary group. Uids come from `NODE_UIDS`, a range above systemd-nspawn's container
range (which ends at 1879048191) and below 2^31 (tools that read uids as signed numbers):
runs on this host take theirs from `RUN_UIDS`, compose/Swarm deployments (whose devices
are containers on other hosts) from `DEPLOYMENT_UIDS`, by device position.
A run's uid is free when no run's record (`/run/testbed/*/node-uids.json`) holds it, no
passwd or group entry names it and no process runs with it; the allocation holds a lock,
so two runs started at once never share a uid. `testbed down` stops every process that
still runs as one of the run's uids (runs.py). `drop_privileges` is how a process started
as root becomes its node's uid for good.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
from pathlib import Path

from testbed.errors import ResourceError
from testbed.model.names import STATE_ROOT

__all__ = ["NODE_UIDS", "RUN_UIDS", "DEPLOYMENT_UIDS", "RECORD", "allocate_uids", "deployment_uids", "read_uids",
           "uids_in_use", "pids_running_as", "hand_to", "drop_privileges"]

#: Where node uids come from: 1M uids from 2_000_000_000 (no passwd entries needed).
NODE_UIDS = range(2_000_000_000, 2_001_000_000)
RUN_UIDS = range(NODE_UIDS.start, NODE_UIDS.start + 900_000)
DEPLOYMENT_UIDS = range(RUN_UIDS.stop, NODE_UIDS.stop)
#: The run's allocation, in its state directory: {"uids": {node: uid}}.
RECORD = "node-uids.json"
_LOCK = ".node-uids.lock"


def read_uids(state_dir: Path) -> dict[str, int]:
    """The run's allocation ({} when it has none)."""
    try:
        doc = json.loads((Path(state_dir) / RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): int(v) for k, v in (doc.get("uids") or {}).items() if int(v) in NODE_UIDS}


def _process_uids() -> dict[int, tuple[int, ...]]:
    """pid -> (real, effective, saved, filesystem) uid of every process on this host."""
    found: dict[int, tuple[int, ...]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Uid:"):
                    found[int(p)] = tuple(int(x) for x in line.split()[1:])
                    break
        except (OSError, ValueError):
            continue
    return found


def uids_in_use() -> set[int]:
    """Every uid a process on this host runs with (real, effective, saved or filesystem)."""
    return {u for ids in _process_uids().values() for u in ids}


def pids_running_as(uids: set[int]) -> set[int]:
    """Processes whose real or effective uid is one of `uids`."""
    return {pid for pid, ids in _process_uids().items() if uids & set(ids[:2])} if uids else set()


def _named() -> set[int]:
    """Uids and gids that passwd or group entries name (read once: a lookup per candidate
    costs 0.5 ms)."""
    return {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


def _recorded(root: Path, except_dir: Path) -> set[int]:
    """Uids that other runs' records hold."""
    taken: set[int] = set()
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.resolve() != except_dir.resolve():
                taken.update(read_uids(d).values())
    return taken


def allocate_uids(state_dir: Path, nodes: list[str], root: Path | None = None) -> dict[str, int]:
    """A distinct free uid for each of `nodes`, recorded in `state_dir`; nodes the record
    already holds keep theirs (a reopened or revived run)."""
    root = Path(root) if root is not None else STATE_ROOT
    state_dir = Path(state_dir)
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(root / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        have = read_uids(state_dir)
        missing = [n for n in nodes if n not in have]
        if missing:
            taken = _recorded(root, state_dir) | uids_in_use() | set(have.values()) | _named()
            free = (u for u in RUN_UIDS if u not in taken)
            for node in missing:
                uid = next(free, None)
                if uid is None:
                    raise ResourceError(f"no free node uid left in {RUN_UIDS.start}-{RUN_UIDS.stop - 1}; "
                                        "`testbed down` runs that are no longer needed")
                have[node] = uid
            tmp = state_dir / f".{RECORD}.tmp"
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(wfd, "w") as f:
                json.dump({"uids": have}, f, indent=2)
            os.replace(tmp, state_dir / RECORD)
        return {n: have[n] for n in nodes}
    finally:
        os.close(fd)


def hand_to(path: Path, uid: int) -> None:
    """Make `path` its node's alone: owned by uid (and gid) `uid`, mode 0400."""
    if uid not in NODE_UIDS:
        raise ResourceError(f"{path}: uid {uid} is not a node uid ({NODE_UIDS.start}-{NODE_UIDS.stop - 1})")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # never through a symlink
    try:
        os.fchown(fd, uid, uid)
        os.fchmod(fd, 0o400)
    finally:
        os.close(fd)


def deployment_uids(nodes: list[str]) -> dict[str, int]:
    """Uids of a compose/Swarm deployment's devices, by position (each is alone in its container)."""
    if len(nodes) > len(DEPLOYMENT_UIDS):
        raise ResourceError(f"{len(nodes)} devices: a deployment has at most {len(DEPLOYMENT_UIDS)}")
    return {n: DEPLOYMENT_UIDS[i] for i, n in enumerate(nodes)}


_PR_SET_NO_NEW_PRIVS = 38


def drop_privileges(uid: int) -> None:
    """Become node uid `uid` (gid the same) for good: no supplementary groups; real,
    effective and saved ids all changed (as root, setgid/setuid set all three), so no
    capability is left; and no_new_privs, so no later exec (a setuid binary, file
    capabilities) can gain any. Refuses root and anything outside NODE_UIDS."""
    import ctypes

    if uid not in NODE_UIDS:
        raise PermissionError(f"refusing to become uid {uid}: not a node uid ({NODE_UIDS.start}-{NODE_UIDS.stop - 1})")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise PermissionError(f"privileges were not dropped to uid {uid}")
