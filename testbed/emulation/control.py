"""A small control socket: one JSON request, one JSON reply, per connection.

The process that owns a cell kept alive by `testbed up` (its supervisor) serves it at
`/run/testbed/<run>/control.sock` (mode 0600: root only); `AttachedCell` and the other
clients (`testbed fault`, `testbed run --run ID`, the TUI) ask it instead of rebuilding
kernel state themselves. Errors of the `TestbedError` tree cross the socket with their
class and exit code and are raised again on the client's side.

    request:  {"op": "kill", "args": {"node_id": "dev01"}}\n
    reply:    {"ok": true, "result": null}\n   |   {"ok": false, "error": "...", "type": "ResourceError"}\n

A *streaming* op (`ControlServer(streams=...)`, `call_stream`) sends `{"event": {...}}\n`
lines while it works, then its reply: the supervisor streams a generation's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from testbed import errors
from testbed.errors import ResourceError, TestbedError
from testbed.model.names import STATE_ROOT, check_run_id

__all__ = ["ControlServer", "call", "call_stream", "call_sync", "control_path", "Handler", "StreamHandler"]

Handler = Callable[..., Awaitable[Any]]
#: A streaming op: `handler(emit, **args)`; `emit(event)` sends one event line to the caller.
StreamHandler = Callable[..., Awaitable[Any]]
_MAX_LINE = 1 << 20
_MAX_STREAM_LINE = 64 << 20  # a generation's result document, with every stage
_DEFAULT_TIMEOUT_S = 120.0


def control_path(run_id: str) -> Path:
    """Where the supervisor of an up cell serves its control socket."""
    return STATE_ROOT / check_run_id(run_id) / "control.sock"


class ControlServer:
    """Serve `handlers` (op name -> async function of keyword arguments) on a unix socket."""

    def __init__(self, path: Path, handlers: dict[str, Handler], streams: dict[str, StreamHandler] | None = None):
        self.path = Path(path)
        self.handlers = dict(handlers)
        self.streams = dict(streams or {})
        self._server: asyncio.AbstractServer | None = None

    def add(self, handlers: dict[str, Handler]) -> None:
        self.handlers.update(handlers)

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: only root may drive the cell
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=_MAX_LINE)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def emit(event: dict[str, Any]) -> None:
            if not writer.is_closing():  # a caller that went away stops receiving; the op goes on
                writer.write(json.dumps({"event": event}, default=str).encode() + b"\n")

        try:
            line = await reader.readline()
            reply = await self._dispatch(line, emit)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op, args = req["op"], req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad control request: {e}", "type": "InputError"}
        handler = self.handlers.get(op)
        if handler is None and op in self.streams:
            handler = functools.partial(self.streams[op], emit)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, *self.streams]))
            return {"ok": False, "error": f"unknown control op {op!r}; known: {known}", "type": "InputError"}
        try:
            return {"ok": True, "result": await handler(**args)}
        except TestbedError as e:
            return {"ok": False, "error": str(e), "type": type(e).__name__, "exit_code": e.exit_code}
        except TypeError as e:  # wrong arguments for the op
            return {"ok": False, "error": f"control op {op!r}: {e}", "type": "InputError"}
        except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps serving
            return {"ok": False, "error": f"control op {op!r} failed: {type(e).__name__}: {e}", "type": "ResourceError"}


def _raise(reply: dict[str, Any], path: Path) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, TestbedError)):
        cls = ResourceError
    err = cls(str(reply.get("error") or f"control socket {path}: failed"))
    if "exit_code" in reply:
        err.exit_code = int(reply["exit_code"])
    raise err


def call_sync(path: Path, op: str, timeout_s: float = _DEFAULT_TIMEOUT_S, **args: Any) -> Any:
    """One request to the control socket at `path`; returns the result or raises its error."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ResourceError(f"no cell answers at {path}; is it up (`testbed status`)?") from None
    except OSError as e:
        raise ResourceError(f"control socket {path}: {e}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ResourceError(f"control socket {path}: no reply to {op!r} (the supervisor exited?)") from None
    return _raise(reply, path)


async def call(path: Path, op: str, timeout_s: float = _DEFAULT_TIMEOUT_S, **args: Any) -> Any:
    """`call_sync` without blocking the event loop."""
    return await asyncio.to_thread(call_sync, path, op, timeout_s, **args)


async def call_stream(path: Path, op: str, on_event: Callable[[dict[str, Any]], None],
                      idle_timeout_s: float = 600.0, **args: Any) -> Any:
    """A streaming op: `on_event` gets each event as it comes; returns the result or raises
    its error. Fails when nothing arrives for `idle_timeout_s` (the supervisor hangs)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_STREAM_LINE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ResourceError(f"no cell answers at {path}; is it up (`testbed status`)?") from None
    except OSError as e:
        raise ResourceError(f"control socket {path}: {e}") from None
    try:
        writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        await writer.drain()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=idle_timeout_s)
            except TimeoutError:
                raise ResourceError(f"control socket {path}: nothing from {op!r} for {idle_timeout_s:g} s") from None
            except (OSError, ValueError) as e:  # ValueError: a line over the limit
                raise ResourceError(f"control socket {path}: {e}") from None
            try:
                msg = json.loads(line)
            except ValueError:
                raise ResourceError(f"control socket {path}: no reply to {op!r} (the supervisor exited?)") from None
            if isinstance(msg, dict) and "event" in msg:
                on_event(msg["event"])
                continue
            return _raise(msg, path)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
