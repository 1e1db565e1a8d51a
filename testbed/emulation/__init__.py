"""Emulation layer: the only code that touches the kernel (namespaces, tc, cgroups) and
starts node processes. See backend.py (layout), shaping.py (tc plan/apply/read back),
cgroups.py, broker.py, emulation.py (the `Emulation` context manager), runs.py and
supervisor.py (run lifecycle behind `testbed up/status/down`).
"""

from testbed.emulation.backend import HOST_ADDRESS, SERVER_ADDRESS, Backend, NetnsBackend, NodeSpec
from testbed.emulation.broker import BrokerHandle, start_broker
from testbed.emulation.cgroups import CgroupLimits, CgroupV1, CgroupV2, detect_cgroups
from testbed.emulation.emulation import SERVER_ID, Emulation, LinkUpdate, NodeState

__all__ = [
    "Backend",
    "NetnsBackend",
    "NodeSpec",
    "SERVER_ADDRESS",
    "HOST_ADDRESS",
    "SERVER_ID",
    "Emulation",
    "NodeState",
    "LinkUpdate",
    "BrokerHandle",
    "start_broker",
    "CgroupLimits",
    "CgroupV1",
    "CgroupV2",
    "detect_cgroups",
]
