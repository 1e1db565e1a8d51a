"""How many runs each device agent's connection has carried on a cell (`connections.json`).

A relay agent keeps one MQTT connection from its start; each run that gives it a stage
sends one latent down and one up on it, and Linux carries the connection's ssthresh from
message to message (docs/links.md): after a few lossy runs its messages take twice as long
as a fresh connection's. The plan predicts with that count (`PlanContext.messages_before`).

Kept in the cell's state directory next to energy.json, so that consecutive `testbed run
--run ID` calls on an up cell, and the runs of a sweep, share it; keyed by the agent's
pid: a revived agent is a new connection, and starts from 0. Not seen: an agent that
reconnects without dying (the broker restarted) — its count runs on, a little warmer than
the kernel's connection. Without a state directory nothing is kept (every count 0).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ConnectionLedger", "carried"]


def carried(stages: Iterable[dict], failed: Iterable[dict] = ()) -> dict[str, int]:
    """Per device, the messages each way its connection carried in one generation: its stage
    records, and the attempts that missed a deadline (their latent went down; a device that
    went offline starts a new connection when it is revived)."""
    n = Counter(str(s["device"]) for s in stages)
    n.update(str(r["device"]) for r in failed if r.get("reason") == "deadline")
    return dict(n)


class ConnectionLedger:
    def __init__(self, state_dir: Path | None):
        self.path = Path(state_dir) / "connections.json" if state_dir is not None else None

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def counts(self, pids: dict[str, int]) -> dict[str, int]:
        """Per device, the runs its agent's current connection has carried (0: a new agent)."""
        out = {}
        for dev, entry in self._read().items():
            if dev in pids and entry.get("pid") == pids[dev] and isinstance(entry.get("messages"), int):
                out[dev] = int(entry["messages"])
        return out

    def add(self, messages: dict[str, int], pids: dict[str, int]) -> None:
        """Count one generation's messages per device on its agent's connection (`pids`: the agents now)."""
        if self.path is None or not messages:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:  # clients of one cell may finish together
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            for dev, n in messages.items():
                pid = pids.get(dev)
                entry = data.get(dev) or {}
                same = pid is not None and entry.get("pid") == pid and isinstance(entry.get("messages"), int)
                data[dev] = {"pid": pid, "messages": (int(entry["messages"]) if same else 0) + int(n)}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
