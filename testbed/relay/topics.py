"""MQTT topic names of one run (docs/design.md) — the only place they are spelled.

    tb/<run>/dev/<id>/task     server -> device: stage header + latent (wire.py)
    tb/<run>/dev/<id>/result   device -> server: latent + timings (wire.py)
    tb/<run>/dev/<id>/status   device: "online" (retained) / "offline" (retained last will)
    tb/<run>/events            server: telemetry JSON for the TUI, logs, tests, observers

A Swarm cell's control plane (its own broker, on its own network; docs/cluster.md):

    tb/<run>/ctl/<id>/cmd      run owner -> the device's keeper: {"id", "op", ...}
    tb/<run>/ctl/<id>/reply    keeper -> run owner: {"id", "ok", "result" | "error"}
    tb/<run>/ctl/<id>/state    keeper: its state (retained; last will: "offline")
"""

from __future__ import annotations

from testbed.model.names import RUN_ID_RE, check_run_id

__all__ = ["RUN_ID_RE", "check_run_id", "task", "result", "status", "events", "device_leaf_filter", "device_root",
           "parse_device_topic", "CONTROL_LEAVES", "control", "control_filter", "parse_control_topic"]

#: The leaves of a device's control topics (a Swarm cell's keepers).
CONTROL_LEAVES = ("cmd", "reply", "state")



def device_root(run: str, device: str) -> str:
    return f"tb/{run}/dev/{device}"


def task(run: str, device: str) -> str:
    return f"{device_root(run, device)}/task"


def result(run: str, device: str) -> str:
    return f"{device_root(run, device)}/result"


def status(run: str, device: str) -> str:
    return f"{device_root(run, device)}/status"


def device_leaf_filter(run: str, leaf: str) -> str:
    """The subscription filter for one leaf of every device: `tb/<run>/dev/+/<leaf>`."""
    return f"tb/{run}/dev/+/{leaf}"


def events(run: str) -> str:
    return f"tb/{run}/events"


def parse_device_topic(run: str, topic: str) -> tuple[str, str] | None:
    """(device, leaf) of a `tb/<run>/dev/<id>/<leaf>` topic, None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[0] == "tb" and parts[1] == run and parts[2] == "dev":
        return parts[3], parts[4]
    return None


def control(run: str, device: str, leaf: str) -> str:
    """`tb/<run>/ctl/<device>/<leaf>`, leaf one of CONTROL_LEAVES."""
    if leaf not in CONTROL_LEAVES:
        raise ValueError(f"control leaf {leaf!r}: one of {', '.join(CONTROL_LEAVES)}")
    return f"tb/{run}/ctl/{device}/{leaf}"


def control_filter(run: str, leaf: str) -> str:
    """The filter for one control leaf of every device: `tb/<run>/ctl/+/<leaf>`."""
    return f"tb/{run}/ctl/+/{leaf}"


def parse_control_topic(run: str, topic: str) -> tuple[str, str] | None:
    """(device, leaf) of a `tb/<run>/ctl/<id>/<leaf>` topic, None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[0] == "tb" and parts[1] == run and parts[2] == "ctl" and parts[4] in CONTROL_LEAVES:
        return parts[3], parts[4]
    return None
