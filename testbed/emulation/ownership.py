"""Whose a run is, and whether a pid is still its supervisor.

Every command runs as root, so the owner of a run is the person behind the root: the uid
that sudo came from (SUDO_UID), else the kernel's login uid (/proc/self/loginuid, kept
across su and sudo), else the uid itself. `make_run_dir` records it (owner.json, with
the login session) when the run's directory is made; `testbed down --all` takes down
only the caller's runs unless --force (`split_by_owner`).

`supervisor.pid` names a process that may have exited long ago and whose pid was reused:
`is_supervisor` accepts a pid only when that process's command line is the supervisor's
of that run and it started before the pid file was written.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["OWNER_FILE", "caller_identity", "owner_key", "record_owner", "read_owner", "split_by_owner",
           "is_supervisor", "process_start_epoch"]

OWNER_FILE = "owner.json"
_UNSET_LOGINUID = 4294967295  # (uid_t)-1: no login session (a service, a container, CI)


def _read_int(path: str) -> int | None:
    try:
        v = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return None if v == _UNSET_LOGINUID else v


def caller_identity(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Who is running this command: uid, sudo's uid, login uid and session, and the key
    that `down --all` compares (`owner`)."""
    env = os.environ if environ is None else environ
    sudo = env.get("SUDO_UID")
    ident: dict[str, Any] = {
        "uid": os.getuid(),
        "sudo_uid": int(sudo) if sudo and sudo.isdigit() else None,
        "login_uid": _read_int("/proc/self/loginuid"),
        "session": _read_int("/proc/self/sessionid"),
    }
    ident["owner"] = owner_key(ident)
    try:
        ident["user"] = pwd.getpwuid(ident["owner"]).pw_name
    except KeyError:
        ident["user"] = str(ident["owner"])
    return ident


def owner_key(ident: dict[str, Any]) -> int:
    """The person behind the command: sudo's uid, else the login uid, else the uid."""
    for k in ("sudo_uid", "login_uid", "uid"):
        if ident.get(k) is not None:
            return int(ident[k])
    raise ValueError("an identity needs a uid")


def record_owner(run_dir: Path) -> None:
    """owner.json (0600, root's) in a run directory just made."""
    fd = os.open(Path(run_dir) / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(caller_identity(), f)


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    """The identity recorded for a run (None: no state directory, or made before owners were recorded)."""
    try:
        doc = json.loads((Path(run_dir) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("owner"), int) else None


def split_by_owner(runs: Iterable[str], owners: dict[str, dict[str, Any] | None],
                   caller: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(the caller's runs, the others': another person's or of unknown owner)."""
    mine, others = [], []
    for r in runs:
        o = owners.get(r)
        (mine if o is not None and o["owner"] == caller["owner"] else others).append(r)
    return mine, others


def process_start_epoch(pid: int) -> float | None:
    """When `pid` started (seconds since the epoch), from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime, in clock ticks


def is_supervisor(pid: int, run_id: str, pid_file: Path, slack_s: float = 2.0) -> bool:
    """Whether `pid` is the supervisor of `run_id` that wrote `pid_file`: its command line
    is `... -m testbed.composition.supervisor RUN ...` and it started before the file was
    written (a pid reused by a later process started after it). `slack_s` covers the
    boot time's whole-second rounding."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        written = os.stat(pid_file).st_mtime
    except OSError:
        return False
    if "testbed.composition.supervisor" not in args:
        return False
    after = args[args.index("testbed.composition.supervisor") + 1:]
    started = process_start_epoch(pid)
    return bool(after) and after[0] == run_id and started is not None and started <= written + slack_s
