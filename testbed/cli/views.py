"""Tables and sentences the emulation commands print (status, validate, down, fault): pure
functions of their JSON documents, so they are tested without a cell.

Every table says in its caption what its numbers are: measured on this machine, emulated
(applied to the cell by the kernel: HTB rates, NFQUEUE delay and loss, cgroup quotas) or
modelled (a formula: the radio model, the cost model).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table

__all__ = [
    "STATUS_KINDS", "VALIDATE_KINDS", "describe_removed", "impairment_cells", "link_sentence", "runs_table",
    "status_table",
]

#: The caption of `testbed status`: what its numbers are.
STATUS_KINDS = ("numbers: up/down Mbit/s, delay and loss are emulated (the radio model's values, or a fault's, "
                "applied to each link by HTB and the delay path); CPU cores emulated (a cgroup quota)")
#: The caption of `testbed validate`: what its numbers are.
VALIDATE_KINDS = ("numbers: all modelled (placement, 3GPP path loss, SNR, Shannon rates; delay and loss from the "
                  "radio model or the topology's links:), nothing measured")


def _pair(up: float, down: float, fmt: str) -> str:
    """One value when both directions agree, else up/down."""
    a, b = format(up, fmt), format(down, fmt)
    return a if a == b else f"{a}/{b}"


def impairment_cells(imp: dict[str, Any] | None) -> tuple[str, str]:
    """(delay ms, loss %) of one link's impairments ({up: {delay_ms, jitter_ms, loss_pct},
    down: {...}}, LinkImpairment.to_json): 0.1 ms and 0.01 % resolution, up/down where they
    differ, ±jitter when there is any; "0" for an unimpaired link."""
    if not imp:
        return "0", "0"
    up, down = imp.get("up") or {}, imp.get("down") or {}
    delay = _pair(up.get("delay_ms", 0.0), down.get("delay_ms", 0.0), ".1f")
    jitter = max(up.get("jitter_ms", 0.0), down.get("jitter_ms", 0.0))
    if jitter:
        delay += f" ±{jitter:.1f}"
    return delay, _pair(up.get("loss_pct", 0.0), down.get("loss_pct", 0.0), ".2f")


def link_sentence(device: str, imp: dict[str, Any] | None, path: str | None = None) -> str:
    """`dev03's link now: delay 4.8 ms, loss 5 % (up/down where they differ; path ...)`."""
    delay, loss = impairment_cells(imp)
    where = f"; applied by {path}" if path else ""
    return f"{device}'s link now: delay {delay} ms, loss {loss} % (one way, up/down where they differ{where})"


def _agent_cell(node: dict[str, Any]) -> str:
    """online, DOWN (missed its heartbeats while its process runs: stopped, hung) or offline."""
    agent = node.get("agent") or ("online" if node.get("agent_online") else "offline")
    if agent == "down":
        heard = node.get("agent_heard_s_ago")
        return "DOWN" + (f" (silent {heard:.0f} s)" if heard is not None else "")
    return agent


def status_table(state: dict[str, Any]) -> Table:
    """The nodes of an up cell (the state.json document of `testbed up`)."""
    cell = state.get("cell") or {}
    impairments = state.get("impairments") or {}
    per_device = impairments.get("devices") or {}
    title = (f"run {state['run']} ({state['backend']}), netem: {'yes' if state.get('netem') else 'no'}, "
             f"delay/loss path: {impairments.get('path', 'none')}, "
             f"shared cell: {'on' if cell.get('shared_capacity') else 'off'}")
    if state.get("broker"):
        b = state["broker"]
        title += f", broker {b['kind']} {b['host']}:{b['port']}"
    elif state.get("broker_error"):
        title += f", broker DOWN ({state['broker_error']})"
    table = Table(title=title, caption=STATUS_KINDS)
    for col in ("id", "role", "state", "agent", "netns", "address", "up Mbit/s", "down Mbit/s", "delay ms",
                "loss %", "CPU cores"):
        table.add_column(col, justify="left" if col in ("id", "role", "state", "agent", "netns", "address")
                         else "right")
    for n in state["nodes"]:
        rate = (lambda v: "-" if v is None else f"{v:.1f}")
        agent = "-" if n["role"] != "device" else _agent_cell(n)
        delay, loss = impairment_cells(per_device.get(n["id"])) if n["role"] == "device" else ("-", "-")
        table.add_row(n["id"], n["role"], n.get("state", "up"), agent, str(n.get("netns") or "-"),
                      str(n.get("address") or "-"), rate(n.get("rate_up_mbps")), rate(n.get("rate_down_mbps")),
                      delay, loss, "-" if n.get("cpu_quota_cores") is None else f"{n['cpu_quota_cores']:g}")
    return table


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """Several runs at once: [{run, state, backend, devices, up_s, topology}] (missing: "-")."""
    table = Table(title=f"{len(runs)} runs on this host; `testbed status --run ID` shows one")
    for col in ("run", "state", "backend", "topology", "devices", "up in s"):
        table.add_column(col, justify="right" if col in ("devices", "up in s") else "left")
    for r in runs:
        up_s = r.get("up_s")
        table.add_row(r["run"], r["state"], str(r.get("backend") or "-"), str(r.get("topology") or "-"),
                      "-" if r.get("devices") is None else str(r["devices"]),
                      "-" if up_s is None else f"{up_s:.2f}")
    return table


# what cleanup_run's items start with -> (singular, plural) in words
_REMOVED_WORDS = {
    "supervisor": ("its supervisor (with it the agents and the broker)", "supervisors"),
    "process": ("a process", "processes"),
    "delayer": ("the delayer", "delayers"),
    "netns": ("a network namespace", "network namespaces"),
    "container": ("a container", "containers"),
    "link": ("the host link", "host links"),
    "route": ("the host's route to the cell", "host routes"),
    "network": ("a docker network", "docker networks"),
    "secret": ("a docker secret", "docker secrets"),
    "cgroup": ("its cgroup", "cgroups"),
    "state": ("its state directory", "state directories"),
}


def describe_removed(items: list[str]) -> str:
    """What a run's teardown removed, in words: "its supervisor, 21 network namespaces (with
    their shaped links and delay rules), the host link, its cgroup, its state directory".
    `items` are cleanup_run's and run_objects' strings ("netns tb-r1-dev01", "process 123",
    ...); a kind appears once, in a fixed order, each object counted once."""
    counts = Counter(item.split(" ", 1)[0] for item in dict.fromkeys(items))
    parts = []
    for kind in sorted(counts, key=lambda k: list(_REMOVED_WORDS).index(k) if k in _REMOVED_WORDS else 99):
        one, many = _REMOVED_WORDS.get(kind, (kind, f"{kind} objects"))
        part = one if counts[kind] == 1 else f"{counts[kind]} {many}"
        if kind in ("netns", "container"):
            part += " (with their shaped links and delay rules)"
        parts.append(part)
    return ", ".join(parts)
