"""MQTT topic names of one run (docs/design.md) — the only place they are spelled.

    tb/<run>/dev/<id>/task     server -> device: stage header + latent (wire.py)
    tb/<run>/dev/<id>/result   device -> server: latent + timings (wire.py)
    tb/<run>/dev/<id>/status   device: "online" (retained) / "offline" (retained last will)
    tb/<run>/events            server: telemetry JSON for the TUI, logs, tests, observers
"""

from __future__ import annotations

from testbed.model.names import RUN_ID_RE, check_run_id

__all__ = ["RUN_ID_RE", "check_run_id", "task", "result", "status", "events", "device_leaf_filter", "device_root", "parse_device_topic"]



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
