"""The run owner's side of a Swarm cell's control plane: `KeeperControl` (the cell's
`DeviceControl`: one MQTT connection to the control broker as `control`, commands to each
device's keeper and their replies, every keeper's state handed to the cell) and
`KeeperAgents` (the `Agents` of a Swarm cell: started, stopped and revived by keepers).

The control broker listens on the server container's address on the control network,
which only that container's namespace reaches: the connection lives on an event loop in
a thread that entered it (`NetnsLoop`); callers on the run owner's loop await its
futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from testbed.errors import ResourceError
from testbed.relay import topics
from testbed.relay.security import ControlCredentials

__all__ = ["NetnsLoop", "KeeperControl", "KeeperAgents"]

_CONNECT_S = 60.0
_PROBE_S = 3.0  # a clock probe travels at QoS 0: one lost in a busy moment is skipped


class NetnsLoop:
    """An event loop in a thread inside a network namespace, for long-lived clients."""

    def __init__(self, netns: str, name: str):
        self.netns, self.name = netns, name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from testbed.emulation.nsutil import netns_path, setns_fd

        ready = threading.Event()
        fd = os.open(netns_path(self.netns), os.O_RDONLY)
        err: list[BaseException] = []

        def body() -> None:
            try:
                setns_fd(fd)  # this thread only; its executor threads inherit it
            except BaseException as e:  # noqa: BLE001 - handed to start()
                err.append(e)
                ready.set()
                return
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

        self._thread = threading.Thread(target=body, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)
        if err:
            raise ResourceError(f"{self.name}: cannot enter {self.netns}: {err[0]}")

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)


class KeeperControl:
    """See the module docstring. `on_state(device, doc)` is called on the caller's loop for
    every keeper state message (retained ones first)."""

    def __init__(self, run_id: str, creds: ControlCredentials, host: str, port: int, netns: str,
                 on_state: Callable[[str, dict[str, Any]], None]):
        self.run, self.creds, self.host, self.port = run_id, creds, host, port
        self.on_state = on_state
        self.ns = NetnsLoop(netns, f"tb-{run_id}-control")
        self._outer: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Future | None = None
        self._connected: asyncio.Event | None = None

    async def start(self) -> None:
        self._outer = asyncio.get_running_loop()
        self.ns.start()
        assert self.ns.loop is not None
        self._reader = asyncio.run_coroutine_threadsafe(self._follow(), self.ns.loop)  # type: ignore[assignment]
        await self.ns.run(self._wait_connected())

    async def _wait_connected(self) -> None:
        self._connected = self._connected or asyncio.Event()
        async with asyncio.timeout(_CONNECT_S):
            await self._connected.wait()

    async def _follow(self) -> None:
        """Connect (again after a loss), subscribe to replies and states, dispatch them."""
        import aiomqtt

        self._connected = self._connected or asyncio.Event()
        cred = self.creds.control
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=cred.username, password=cred.password,
                                          identifier=f"tb-{self.run}-control", keepalive=5, timeout=10) as client:
                    await client.subscribe(topics.control_filter(self.run, "reply"), qos=1)
                    await client.subscribe(topics.control_filter(self.run, "state"), qos=1)
                    self._client = client
                    self._connected.set()
                    async for m in client.messages:
                        self._dispatch(str(m.topic), bytes(m.payload or b""))
            except aiomqtt.MqttError:
                self._client = None
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ResourceError("the control broker connection was lost"))
                await asyncio.sleep(0.5)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse_control_topic(self.run, topic)
        if parsed is None:
            return
        device, leaf = parsed
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if leaf == "reply":
            fut = self._pending.pop(doc.get("id"), None) if isinstance(doc.get("id"), int) else None
            if fut is not None and not fut.done():
                fut.set_result(doc | {"_t_recv": time.time()})  # read next to the wire (clock samples)
        elif leaf == "state" and self._outer is not None and device in self.creds.keepers:
            self._outer.call_soon_threadsafe(self.on_state, device, doc)

    async def _call(self, device: str, op: str, timeout_s: float, args: dict[str, Any], qos: int = 1) -> dict[str, Any]:
        if self._client is None:
            raise ResourceError(f"{op} {device}: the control broker is not connected")
        n = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        try:
            payload = json.dumps({"id": n, "op": op, **args}).encode()
            t_send = time.time()
            await self._client.publish(topics.control(self.run, device, "cmd"), payload, qos=qos)
            async with asyncio.timeout(timeout_s):
                return (await fut) | {"_t_send": t_send}
        except TimeoutError:
            raise ResourceError(f"{op} {device}: its keeper did not answer within {timeout_s:g} s "
                                "(its node down, or its task restarting)") from None
        finally:
            self._pending.pop(n, None)

    async def call(self, device: str, op: str, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]:
        """Send `op` to `device`'s keeper; its result (ResourceError naming its error)."""
        if device not in self.creds.keepers:
            raise ResourceError(f"{op}: unknown device {device!r}")
        reply = await self.ns.run(self._call(device, op, timeout_s, args))
        if not reply.get("ok"):
            raise ResourceError(f"{op} {device}: its keeper says {reply.get('error')}")
        return reply.get("result") or {}

    async def sample_clock(self, device: str) -> tuple[float, float, float]:
        """One NTP-style sample: (sent, the device's clock, received), the run owner's
        clock read on the connection's own loop, next to the wire."""
        reply = await self.ns.run(self._call(device, "clock", _PROBE_S, {}, qos=0))
        if not reply.get("ok"):
            raise ResourceError(f"clock {device}: its keeper says {reply.get('error')}")
        return float(reply["_t_send"]), float(reply["result"]["t"]), float(reply["_t_recv"])

    async def bury(self, devices: list[str], broker_host: str, broker_port: int) -> None:
        """Say "offline" (retained) for `devices` on the cell's broker, as their agents' last
        wills would once their keepalives ran out: their host is gone. The `control` account
        may write devices' status topics there and nothing else (security.grant_undertaker)."""
        await self.ns.run(self._bury(devices, broker_host, broker_port))

    async def _bury(self, devices: list[str], broker_host: str, broker_port: int) -> None:
        import aiomqtt

        from testbed.relay.agent import status_doc

        cred = self.creds.control
        async with aiomqtt.Client(broker_host, broker_port, username=cred.username, password=cred.password,
                                  identifier=cred.username, timeout=5) as client:
            for dev in devices:
                await client.publish(topics.status(self.run, dev), status_doc(dev, "offline", reason="host lost"),
                                     qos=1, retain=True)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()  # type: ignore[union-attr]
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self._reader)  # type: ignore[arg-type]
            self._reader = None
        await self.ns.stop()


class KeeperAgents:
    """The agents of a Swarm cell: each device's keeper starts, stops and revives its own."""

    def __init__(self, cell: Any):
        self.cell = cell  # a SwarmEmulation

    async def ensure(self, devices: list[str]) -> None:
        """A `start` to every listed device's keeper that can answer (not killed, its node up)."""
        todo = [d for d in devices if self.cell.nodes[d].state == "up"]
        await asyncio.gather(*(self.cell.ask(d, "start") for d in todo))

    async def revive(self, device: str) -> int:
        await self.cell.revive(device)
        return int((await self.cell.ask(device, "start")).get("pid") or 0)

    def pids(self) -> dict[str, int]:
        """None here: an agent's pid is its own host's (its keeper watches it)."""
        return {}

    async def close(self) -> None:
        """The agents go with their services (the cell's close)."""
