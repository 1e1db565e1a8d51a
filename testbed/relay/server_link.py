"""The edge server's MQTT side of one generation, for the orchestrators that drive devices
step by step (split.py, patch.py): one connection as `server`, the devices' status and
result topics read by the orchestrator's `_reader`, events published and handed to `emit`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from testbed.errors import RelayError
from testbed.relay import topics
from testbed.relay.events import make_event

__all__ = ["LinkOutcome", "ServerLink"]


@dataclass
class LinkOutcome:
    """What a step-by-step orchestrator's generation gives back: its per-step records (the
    method's own record type), the final latent, measured latency, energy, steps run."""

    records: list[Any]
    latent: Any
    latency_s: float
    energy_j: float
    total_steps: int
    meta: dict[str, Any] = field(default_factory=dict)


class ServerLink:
    """Base of an orchestrator: `run_connected(generate)` connects, subscribes, runs
    `self._reader()` beside `generate()` and returns what `generate` returns."""

    method: ClassVar[str]
    #: publishes in flight that are expected (patch relays context without waiting)
    pending_publishes: ClassVar[int] = 10

    def __init__(self, run: str, broker_host: str, broker_port: int, username: str, password: str,
                 emit: Callable[[dict[str, Any]], None] | None, socket_options: tuple = ()):
        self.run_id = run
        self.host, self.port = broker_host, broker_port
        self.username, self.password = username, password
        self._emit_cb = emit
        self._socket_options = socket_options
        self._client: Any = None
        self._seq = 0

    async def emit(self, etype: str, **data: Any) -> None:
        self._seq += 1
        ev = make_event(etype, self.run_id, seq=self._seq, method=self.method, **data)
        if self._client is not None:
            await self._client.publish(topics.events(self.run_id), json.dumps(ev).encode(), qos=1)
        if self._emit_cb is not None:
            self._emit_cb(ev)

    async def _reader(self) -> None:
        raise NotImplementedError

    async def _step(self, x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
        """One noise prediction, asked of the devices."""
        raise NotImplementedError

    async def denoise(self, model: Any, latent: Any, cond: dict[str, Any], n: int, scheduler: str,
                      timeout_s: float, records: list[Any]) -> LinkOutcome:
        """The server's own scheduler loop over `n` steps (`run_stage`, on a worker thread),
        each noise prediction asked of the devices through `self._step` on this loop; then
        `relay_finished` with the measured latency and the energy of `records`."""
        from testbed.diffusion.stages import run_stage

        loop = asyncio.get_running_loop()

        def predict(x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(self._step(x_in, t, kw), loop).result(timeout=timeout_s)

        t_start = time.time()
        out, _ = await asyncio.to_thread(run_stage, model, latent, cond, 0, n, n, scheduler, None, None, predict)
        latency = time.time() - t_start
        energy = sum(r.energy_j for r in records)
        await self.emit("relay_finished", latency_s=latency, energy_j=energy)
        return LinkOutcome(records=list(records), latent=out, latency_s=latency, energy_j=energy, total_steps=n)

    async def run_connected(self, generate: Callable[[], Awaitable[Any]],
                            background: Callable[[], list[Awaitable[Any]]] = list) -> Any:
        """`generate()` with the connection up; `background()` names what to await (its
        failures ignored) before the connection closes."""
        import aiomqtt

        try:
            async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                      identifier=f"tb-{self.run_id}-server", keepalive=10, timeout=10,
                                      clean_session=True, socket_options=self._socket_options) as client:
                client.pending_calls_threshold = self.pending_publishes  # (a warning above it)
                self._client = client
                await client.subscribe(f"tb/{self.run_id}/dev/+/status", qos=1)
                await client.subscribe(f"tb/{self.run_id}/dev/+/result", qos=1)
                reader = asyncio.create_task(self._reader())
                try:
                    return await generate()
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, *background(), return_exceptions=True)
                    self._client = None
        except aiomqtt.MqttError as e:
            raise RelayError(f"{self.method} orchestrator: MQTT connection to {self.host}:{self.port} failed ({e}); "
                             "is the broker up?") from None
