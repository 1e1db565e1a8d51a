"""Attach mode: follow a run started elsewhere (e.g. `testbed run`) by subscribing to its
telemetry topic `tb/<run>/events` with the read-only observer credentials that the run
writes to `<state root>/<run>/observer.json` ({"run", "host", "port", "username",
"password", "topic"}; testbed/relay/security.py).

Sockets only (aiomqtt); no kernel access. Each message is one JSON event (a dict).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from testbed.errors import RelayError, ResourceError

__all__ = ["DEFAULT_STATE_ROOT", "read_observer", "follow_events"]

#: Where runs keep their state (testbed/emulation/runs.py: RUN_ROOT, same variable).
DEFAULT_STATE_ROOT = Path(os.environ.get("TESTBED_RUN_ROOT", "/run/testbed"))


def read_observer(run: str, state_root: Path = DEFAULT_STATE_ROOT) -> dict[str, Any]:
    """The observer credentials of `run`; errors say what to check."""
    path = Path(state_root) / run / "observer.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResourceError(
            f"run {run!r}: no {path}; is the run active on this machine? (`testbed status` lists runs)"
        ) from None
    except PermissionError:
        raise ResourceError(f"run {run!r}: cannot read {path} (0600, root's); attach as root") from None
    except (OSError, ValueError) as e:
        raise ResourceError(f"run {run!r}: {path} is unreadable ({e})") from None
    missing = [k for k in ("host", "port", "username", "password", "topic") if k not in info]
    if missing:
        raise ResourceError(f"run {run!r}: {path} lacks {', '.join(missing)}")
    return info


async def follow_events(info: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Yield the run's events as they arrive (until the caller stops iterating)."""
    import aiomqtt

    try:
        async with aiomqtt.Client(
            hostname=info["host"], port=int(info["port"]), username=info["username"],
            password=info["password"], identifier=f"tui-{info.get('run', 'x')}-{id(info) & 0xFFFF:x}",
        ) as client:
            await client.subscribe(info["topic"], qos=1)
            async for msg in client.messages:
                try:
                    ev = json.loads(bytes(msg.payload))
                except (TypeError, ValueError):
                    continue
                if isinstance(ev, dict):
                    yield ev
    except aiomqtt.MqttError as e:
        raise RelayError(
            f"run {info.get('run')!r}: MQTT broker {info['host']}:{info['port']}: {e}; has the run ended?"
        ) from None
