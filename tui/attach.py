"""Attach mode: follow a run started elsewhere (e.g. `testbed run`) by subscribing to its
telemetry topic `tb/<run>/events` with the read-only observer credentials that the run
writes to `<state root>/<run>/observer.json` ({"run", "host", "port", "username",
"password", "topic"}; testbed/relay/security.py).

Every run's server is 198.18.0.1, and only one run at a time holds the host's route to
198.18.0.0/16 (its state.json says `host_route`). For that run, aiomqtt connects from the
host. For another, `mosquitto_sub` is started inside the run's server namespace by the
emulation library (`testbed.emulation.procs.spawn_in`) and its output is read line by
line; the TUI itself never enters a namespace. Each message is one JSON event (a dict).
The observer's password never goes on mosquitto_sub's command line (where `ps` shows it):
mosquitto_sub reads it from its options file `$XDG_CONFIG_HOME/mosquitto_sub`, written
0600 in a private temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from testbed.emulation.owned_dirs import mark_owned, remove_owned_dir
from testbed.errors import RelayError, ResourceError
from testbed.model.names import STATE_ROOT, check_run_id

__all__ = ["DEFAULT_STATE_ROOT", "read_observer", "server_netns", "follow_events", "follow_events_in_netns"]

#: Where runs keep their state (testbed/emulation/runs.py: RUN_ROOT, same variable).
DEFAULT_STATE_ROOT = STATE_ROOT


def read_observer(run: str, state_root: Path = DEFAULT_STATE_ROOT) -> dict[str, Any]:
    """The observer credentials of `run`; errors say what to check."""
    path = Path(state_root) / check_run_id(run) / "observer.json"
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
            password=info["password"],
            identifier=f"tui-{info.get('run', 'x')}-{secrets.token_hex(4)}",  # each watcher its own client id
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


def server_netns(run: str, state_root: Path = DEFAULT_STATE_ROOT) -> str | None:
    """The run's server namespace when the host cannot reach its broker (another run holds
    the host's route), else None (connect from the host)."""
    try:
        state = json.loads((Path(state_root) / check_run_id(run) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("host_route", True):
        return None
    for node in state.get("nodes") or []:
        if node.get("id") == "server" and node.get("netns"):
            return str(node["netns"])
    return None


async def follow_events_in_netns(info: dict[str, Any], netns: str | None, *,
                                 poll_s: float = 0.1) -> AsyncIterator[dict[str, Any]]:
    """Like follow_events, through `mosquitto_sub` started in `netns` (None: this namespace)."""
    from testbed.emulation.procs import spawn_in

    if shutil.which("mosquitto_sub") is None:
        raise ResourceError("attach: mosquitto_sub is missing (apt-get install mosquitto-clients)")
    tmp = mark_owned(Path(tempfile.mkdtemp(prefix="tb-attach-")))  # 0700, ours
    out = tmp / "events.jsonl"
    argv = ["mosquitto_sub", "-h", str(info["host"]), "-p", str(info["port"]), "-t", info["topic"], "-q", "1"]
    proc = None
    try:
        _write_options_file(tmp / "mosquitto_sub", info)
        proc = await asyncio.to_thread(spawn_in, netns, argv, {"XDG_CONFIG_HOME": str(tmp)}, out)
        with open(out, "rb") as f:
            buf = b""
            while True:
                chunk = f.read()
                if not chunk:
                    if proc.poll() is not None:
                        tail = (buf or out.read_bytes()[-300:]).decode(errors="replace").strip()
                        raise RelayError(f"run {info.get('run')!r}: mosquitto_sub in {netns or 'this namespace'} "
                                         f"exited ({proc.returncode}): {tail}; has the run ended?")
                    await asyncio.sleep(poll_s)
                    continue
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(ev, dict):
                        yield ev
    finally:
        if proc is not None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except Exception:  # noqa: BLE001 - it is ours; end it for sure
                proc.kill()
        remove_owned_dir(tmp, tmp.parent)


def _write_options_file(path: Path, info: dict[str, Any]) -> None:
    """mosquitto_sub's options file (one option per line), 0600: the credentials' only copy
    outside observer.json."""
    user, password = str(info["username"]), str(info["password"])
    if any(c in "\r\n" for c in user + password):
        raise ResourceError(f"run {info.get('run')!r}: the observer's user name or password spans lines; "
                            "observer.json is damaged (rerun the generation to rewrite it)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"-u {user}\n-P {password}\n")
