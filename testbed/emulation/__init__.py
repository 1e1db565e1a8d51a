"""Emulation layer: the only code that touches the kernel (namespaces, tc, cgroups,
containers) and starts node processes. Everything above it sees a cell through the `Cell`
protocol (cell.py): `Emulation` (emulation.py; netns or docker/ backend), `AttachedCell`
(attached.py: a `testbed up` cell through its control socket), `DeployedCell` (compose.py).

The names below are imported on first use: a client of the control socket (a warm
`testbed run --run ID`, the agent template) does not pay for pyroute2.
"""

import importlib
from typing import Any

_WHERE = {
    "Backend": "backend", "NetnsBackend": "backend", "NodeSpec": "backend",
    "BrokerHandle": "broker", "start_broker": "broker",
    "BrokerSettings": "cell", "Cell": "cell", "LinkUpdate": "cell", "NodeJoin": "cell", "NodeState": "cell",
    "CgroupLimits": "cgroups", "CgroupV1": "cgroups", "CgroupV2": "cgroups", "detect_cgroups": "cgroups",
    "Emulation": "emulation",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
