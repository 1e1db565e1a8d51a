"""The names every layer shares, each rule defined once: run ids, topology names and
device ids, the state root, the broker port, the edge server's id and the address plan.

Run ids go into 15-character interface names (`tb<run>h`), hence 1-7 characters.
Topology names and device ids go into file, directory, namespace, container and topic
names, hence letters, digits and `-` only, never a leading `-`, `.` or `/`.
Everything that builds a path, an interface, a cgroup, a topic or a container name from
user text checks it against these patterns first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from testbed.errors import InputError

__all__ = [
    "RUN_ID_CHARS",
    "RUN_ID_RE",
    "check_run_id",
    "NAME_RE",
    "NAME_RULE",
    "check_name",
    "STATE_ROOT",
    "MQTT_PORT",
    "SELECTORS",
    "SERVER_ID",
    "RESERVED_IDS",
    "SERVER_ADDRESS",
    "HOST_ADDRESS",
    "CELL_NET",
]

#: 1-7 lowercase letters or digits: run ids go into interface names of at most 15 characters.
#: RUN_ID_CHARS is the unanchored form, for patterns that find run ids inside object names.
RUN_ID_CHARS = r"[a-z0-9]{1,7}"
RUN_ID_RE = re.compile(rf"^{RUN_ID_CHARS}$")

#: Topology names and device ids: 1-32 ASCII letters, digits or '-', not starting with '-'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
NAME_RULE = "use 1-32 ASCII letters, digits or '-', starting with a letter or digit"

#: Where every run keeps its state (/run/testbed/<run>/); TESTBED_RUN_ROOT moves it (tests).
STATE_ROOT = Path(os.environ.get("TESTBED_RUN_ROOT", "/run/testbed"))

#: The broker's port on the edge server.
MQTT_PORT = 1883

#: The device selectors (selection/__init__.py `select`): the paper's DP, the MILP
#: reference, "w/o DS" (random), a greedy density order, and the DP discounted by spent energy.
SELECTORS = ("dp", "exact", "random", "greedy", "fair")

#: The edge server's node id; it and the other MQTT role accounts (relay/security.py) are not device ids.
SERVER_ID = "server"
RESERVED_IDS = (SERVER_ID, "observer", "events", "monitor")

#: The address plan (docs/design.md): the testbed's own cell network is 198.18.0.0/16.
CELL_NET = "198.18.0.0/16"
SERVER_ADDRESS = "198.18.0.1"
HOST_ADDRESS = "198.18.255.254"


def check_run_id(run_id: str, option: str | None = None) -> str:
    """`run_id` when it matches RUN_ID_RE, else InputError (exit 2) naming the rule (and the
    command-line `option` it came from, when given)."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        where = f"{option}: " if option else ""
        raise InputError(
            f"{where}run id {run_id!r}: use 1-7 lowercase letters or digits (it goes into 15-character interface names)"
        )
    return run_id


def check_name(name: object, what: str) -> str:
    """`name` when it matches NAME_RE, else InputError (exit 2) naming `what` and the rule.

    The one check for topology names and device ids: they become file and directory names
    (compose/<name>.yml, out/sweep-<name>-...), namespaces, containers and MQTT topics.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(f"{what} {name!r}: {NAME_RULE} (it names files, namespaces and containers)")
    return name
