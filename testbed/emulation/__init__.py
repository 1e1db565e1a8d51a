"""Emulation layer: the only code that touches the kernel (namespaces, tc, cgroups,
containers) and starts node processes. Everything above it sees a cell through the `Cell`
protocol (cell.py): `Emulation` (emulation.py; netns or docker/ backend), `AttachedCell`
(attached.py: a `testbed up` cell through its control socket), `ComposeCell` (compose.py).
"""

from testbed.emulation.backend import Backend, NetnsBackend, NodeSpec
from testbed.emulation.broker import BrokerHandle, start_broker
from testbed.emulation.cell import BrokerSettings, Cell, LinkUpdate, NodeJoin, NodeState
from testbed.emulation.cgroups import CgroupLimits, CgroupV1, CgroupV2, detect_cgroups
from testbed.emulation.emulation import Emulation

__all__ = [
    "Backend",
    "NetnsBackend",
    "NodeSpec",
    "Cell",
    "Emulation",
    "NodeState",
    "NodeJoin",
    "LinkUpdate",
    "BrokerHandle",
    "BrokerSettings",
    "start_broker",
    "CgroupLimits",
    "CgroupV1",
    "CgroupV2",
    "detect_cgroups",
]
