"""The edge server's side of one generation: the base every method's orchestrator is built on.

An orchestrator (methods/<name>/orchestrator.py) decides what to send whom and when; this
base owns everything they share:

- the broker connection, as the server's own account: subscribe to the devices' status and
  result topics, read them, reconnect with backoff when the broker goes away (a method that
  can resume — multi-stage — goes on from its checkpoint; the others fail the run);
- **the one door for device messages**: every status and result a device sends passes
  relay/messages.py (`parse_status`; `decode_result`: the wire format's checks and the
  method's typed meta — size, JSON depth, types, ranges) before a method sees it; what
  fails is a `status_rejected` / `result_rejected` event naming the device and the
  reason, never an exception in the reader;
- who is online (the devices' retained status, refreshed by their heartbeats), and
  `wait_online` with a bound; a device silent for SILENT_AFTER_S (three missed heartbeats:
  stopped, hung) leaves `online` with a `device_silent` event and reaches the method as
  "offline" — it fails over as if its will had said so, within seconds, not at a deadline;
- deadlines (`Timing`: a factor of the predicted time plus slack, by compute mode);
- task encoding (`task`: every task carries `meta.method`, which picks the device's handler);
- telemetry: `emit` numbers an event, hands it to the run owner's callback and publishes it
  on `tb/<run>/events` in the background (a publish waits for the broker's PUBACK; the
  generation must not);
- `denoise`: the server's own scheduler loop for methods that ask devices for every step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from testbed.errors import RelayError, TestbedError
from testbed.relay import topics
from testbed.relay.agent import SILENT_AFTER_S
from testbed.relay.events import make_event
from testbed.relay.messages import BadMessage, DeviceResult, MetaParser, Status, parse_result, parse_status
from testbed.relay.wire import Message, encode

__all__ = ["RelaySettings", "DevicePower", "Timing", "Job", "Orchestrator"]

log = logging.getLogger(__name__)
#: how long a finished generation waits for its connection, publisher and watchdog to end
_TEARDOWN_S = 10.0
_STOP: Any = object()  # the event publisher's queue: no more events
#: Events that say a device failed its part: they name what it sent that failed the checks.
_FAILURE_EVENTS = ("deadline_missed", "device_offline", "device_silent")


@dataclass(frozen=True)
class RelaySettings:
    """How the edge server's orchestrator reaches the broker, and the run's size limit."""

    run: str
    broker_host: str
    broker_port: int
    username: str
    password: str
    max_message_bytes: int


@dataclass(frozen=True)
class DevicePower:
    """A device's profile powers (W): energy = rx x t_down + compute x t_cmp + tx x t_up."""

    compute_w: float
    tx_w: float
    rx_w: float

    def energy_j(self, t_down_s: float, t_cmp_s: float, t_up_s: float) -> float:
        return self.rx_w * t_down_s + self.compute_w * t_cmp_s + self.tx_w * t_up_s


@dataclass(frozen=True)
class Timing:
    """Bounds of every wait: agents coming online, a device's deadline (factor x predicted
    + slack), a lost broker coming back, a device rejoining after it."""

    online_timeout_s: float = 120.0
    deadline_factor: float = 2.0
    deadline_slack_s: float = 2.0
    reconnect_timeout_s: float = 30.0
    rejoin_timeout_s: float = 15.0

    @classmethod
    def for_compute(cls, compute: str, devices: int) -> Timing:
        """`compute: profile` keeps the profile's time, so a deadline can be tight; `real`
        runs at this CPU's speed (many times slower than a Jetson), so it cannot. Agents
        come online within a minute per 2 cores plus a few seconds per device."""
        profile = compute == "profile"
        return cls(online_timeout_s=60.0 + 4.0 * devices, deadline_factor=2.0 if profile else 20.0,
                   deadline_slack_s=2.0 if profile else 60.0)

    def deadline_s(self, predicted_s: float, tail_s: float | None = None) -> float:
        """factor x the predicted (mean) time + slack, or, where the prediction is a
        distribution whose high quantile `tail_s` lies further out (a warm lossy link: the
        tail reaches several times the mean), that quantile + slack."""
        point = self.deadline_factor * predicted_s + self.deadline_slack_s
        return point if tail_s is None else max(point, tail_s + self.deadline_slack_s)


@dataclass(frozen=True)
class Job:
    """What one generation makes: the server's model (relay/stage.py StageModel), the prompt,
    the seed of the initial noise, the scheduler, and the latent message's padded size."""

    model: Any
    prompt: str
    seed: int
    scheduler: str
    payload_bytes: int


class Orchestrator:
    """Base of a method's orchestrator (see the module docstring). A method implements
    `generate()` and, where it needs them, the hooks `on_status`, `on_result`,
    `on_broker_lost` and `pending()`; `run()` connects, generates and cleans up."""

    method: ClassVar[str]
    #: the method's typed reading of a result's meta (methods/<name>/messages.py)
    result_meta: ClassVar[MetaParser]
    #: resumes after a lost broker (from its checkpoint); the others fail the run
    resumes: ClassVar[bool] = False
    #: publishes in flight that are expected (patch relays context without waiting)
    pending_publishes: ClassVar[int] = 10
    socket_options: ClassVar[tuple] = ()

    def __init__(self, settings: RelaySettings, job: Job, power: dict[str, DevicePower], *,
                 emit: Callable[[dict[str, Any]], None] | None = None, timing: Timing = Timing()):
        self.settings, self.job, self.power, self.timing = settings, job, power, timing
        self.run_id = settings.run
        self.online: set[str] = set()
        self.heard: dict[str, float] = {}  # device -> when its last status arrived (monotonic)
        self.rejected_results = 0
        self.rejections: dict[str, tuple[int, str]] = {}  # device -> (rejected messages, the last reason)
        self.inbox: asyncio.Queue[tuple[str, str, Any, float]] = asyncio.Queue()
        self._status_seen = asyncio.Event()
        self._emit_cb = emit
        self._events_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._seq = 0
        self._client: Any = None
        self._connected = asyncio.Event()
        self._conn_error: str | None = None

    # -- what a method implements ------------------------------------------------------
    async def generate(self) -> Any:
        raise NotImplementedError

    async def on_status(self, dev: str, status: Status, t_in: float) -> None:
        await self.inbox.put(("status", dev, status, t_in))

    async def on_result(self, dev: str, payload: bytes, t_in: float) -> None:
        await self.inbox.put(("result", dev, payload, t_in))

    async def on_broker_lost(self, error: str) -> None:
        await self.inbox.put(("broker", "", error, time.time()))

    def pending(self) -> list[Awaitable[Any]]:
        """Publishes to await (their failures ignored) before the connection closes."""
        return []

    # -- the one door for device messages -----------------------------------------------
    def decode_result(self, dev: str, payload: bytes, **checks: Any) -> DeviceResult:
        """A device's result through the wire format's checks (size, header, tensors, run,
        device; `checks`: total_steps, expect) and the method's typed meta; BadMessage (a
        RelayError) naming the device and what is wrong."""
        return parse_result(dev, payload, meta=type(self).result_meta, run=self.run_id,
                            max_bytes=self.settings.max_message_bytes,
                            max_tensor_bytes=self.settings.max_message_bytes, **checks)

    async def reject(self, dev: str, error: str, **data: Any) -> None:
        """A device message that failed its checks: counted, reported, dropped."""
        self.rejected_results += 1
        self._note_rejection(dev, error)
        await self.emit("result_rejected", device=dev, error=error, **data)

    def _note_rejection(self, dev: str, error: str) -> None:
        n, _ = self.rejections.get(dev, (0, ""))
        self.rejections[dev] = (n + 1, error)

    def rejection_note(self, dev: str) -> str:
        """Why a device that failed may have failed: its rejected messages ("" when none)."""
        if dev not in self.rejections:
            return ""
        n, last = self.rejections[dev]
        return f"{dev} sent {n} message(s) that failed the checks (the last: {last})"

    # -- telemetry ---------------------------------------------------------------------
    async def emit(self, etype: str, device: str | None = None, steps: Any = None, **data: Any) -> None:
        if etype in _FAILURE_EVENTS and device in self.rejections and "rejected" not in data:
            data["rejected"] = self.rejection_note(device)  # why it missed its deadline: what it sent instead
        self._seq += 1
        ev = make_event(etype, self.run_id, device=device, steps=steps, seq=self._seq, method=self.method, **data)
        self._events_out.put_nowait(ev)
        if self._emit_cb is not None:
            self._emit_cb(ev)

    @property
    def events_emitted(self) -> int:
        return self._seq

    async def _publish_events(self) -> None:
        import aiomqtt

        await self._connected.wait()  # what was queued before the first connection goes out first
        while True:
            ev = await self._events_out.get()
            if ev is _STOP:
                return
            try:
                if self._client is not None and self._connected.is_set():
                    try:
                        await self._client.publish(topics.events(self.run_id), json.dumps(ev).encode(), qos=1)
                    except aiomqtt.MqttError:
                        pass  # the broker went away: the connection task reports it; the callback ran
            finally:
                self._events_out.task_done()

    async def _flush_events(self, timeout_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._events_out.join(), timeout=timeout_s)
        except TimeoutError:
            pass

    # -- tasks ---------------------------------------------------------------------------
    def task(self, dev: str, *, stage: int, steps: tuple[int, int], total_steps: int, tensors: dict[str, Any],
             meta: dict[str, Any], pad_to_bytes: int, attempt: int = 1) -> bytearray:
        """A task message for `dev`, encoded and padded; `meta.method` names this method."""
        msg = Message(kind="task", run=self.run_id, device=dev, stage=stage, attempt=attempt, steps=steps,
                      total_steps=total_steps, tensors=tensors, meta={"method": self.method, **meta})
        return encode(msg, pad_to_bytes=pad_to_bytes)

    async def publish_task(self, dev: str, data: bytes | bytearray, **kw: Any) -> None:
        await self._client.publish(topics.task(self.run_id, dev), data, qos=1, **kw)

    def deadline_s(self, predicted_s: float, tail_s: float | None = None) -> float:
        return self.timing.deadline_s(predicted_s, tail_s)

    # -- the connection ------------------------------------------------------------------
    async def run(self) -> Any:
        """The whole generation, its events flushed to the broker before it returns."""
        conn = asyncio.create_task(self._connection())
        publisher = asyncio.create_task(self._publish_events())
        watchdog = asyncio.create_task(self._watch_silence())
        try:
            await self.connected()
            out = await self.generate()
            await asyncio.gather(*self.pending(), return_exceptions=True)
            await self._flush_events()
            return out
        except TestbedError as e:
            named = [d for d in sorted(self.rejections) if re.search(rf"\b{re.escape(d)}\b", str(e))]
            notes = [self.rejection_note(d) for d in named]
            if notes:  # a run that fails over a device says what that device sent
                e.args = (f"{e}; {'; '.join(notes)}", *e.args[1:])
            raise
        finally:
            # Python 3.11's asyncio.wait_for (inside aiomqtt's publish) can swallow a cancel
            # that lands as its PUBACK arrives: the publisher then parked on its queue for
            # good and the generation hung (1 run in 3 of a patch run whose device was killed).
            # So the publisher is also told to stop in its queue, and the wait is bounded.
            self._events_out.put_nowait(_STOP)
            publisher.cancel()
            conn.cancel()
            watchdog.cancel()
            _done, stuck = await asyncio.wait({publisher, conn, watchdog}, timeout=_TEARDOWN_S)
            if stuck:
                log.warning("%s orchestrator: %d of its tasks did not end within %g s of being cancelled",
                            self.method, len(stuck), _TEARDOWN_S)
            self._client = None

    async def _watch_silence(self, every_s: float = 0.5) -> None:
        """Devices that fell silent (no status for SILENT_AFTER_S: their heartbeats stopped)
        leave `online` and reach the method as "offline"; only while the broker is
        connected (a lost broker silences everyone, and `broker_lost` says so)."""
        while True:
            await asyncio.sleep(every_s)
            if not self.is_connected:
                continue
            now = time.monotonic()
            for dev in sorted(self.online):
                silent_s = now - self.heard.get(dev, now)
                if silent_s > SILENT_AFTER_S:
                    self.online.discard(dev)
                    await self.emit("device_silent", device=dev, silent_s=round(silent_s, 3),
                                    reason=f"no status for {silent_s:.1f} s (heartbeats every "
                                           f"{SILENT_AFTER_S / 3:g} s): stopped or hung")
                    await self.on_status(dev, Status(dev, "offline"), time.time())

    async def _connection(self) -> None:
        """Hold the broker connection; when it drops, report `broker_lost` and reconnect with
        backoff (0.2 s .. 2 s) for up to `timing.reconnect_timeout_s` (resuming methods) or
        give up at once (the others)."""
        import aiomqtt

        backoff, lost_at, ever = 0.2, None, False
        s = self.settings
        while True:
            try:
                async with aiomqtt.Client(s.broker_host, s.broker_port, username=s.username, password=s.password,
                                          identifier=f"tb-{self.run_id}-server", keepalive=10, timeout=10,
                                          clean_session=True, socket_options=self.socket_options) as client:
                    client.pending_calls_threshold = self.pending_publishes  # (a warning above it)
                    await client.subscribe(topics.device_leaf_filter(self.run_id, "status"), qos=1)
                    await client.subscribe(topics.device_leaf_filter(self.run_id, "result"), qos=1)
                    self._client = client
                    self._connected.set()
                    if lost_at is not None:
                        await self.emit("broker_back", down_s=time.monotonic() - lost_at)
                    lost_at, backoff, ever = None, 0.2, True
                    await self._read(client)
            except aiomqtt.MqttError as e:
                self._client = None
                self._connected.clear()
                where = f"{s.broker_host}:{s.broker_port}"
                if not ever:
                    self._conn_error = (f"{self.method} orchestrator: MQTT connection to {where} failed ({e}); "
                                        "is the broker up (testbed status)?")
                    return
                if lost_at is None:
                    lost_at = time.monotonic()
                    self.online.clear()  # a restarted broker has no retained statuses: rebuilt as agents return
                    await self.emit("broker_lost", error=str(e))
                    await self.on_broker_lost(f"the broker at {where} went away ({e})")
                if not self.resumes or time.monotonic() - lost_at > self.timing.reconnect_timeout_s:
                    self._conn_error = (f"the broker at {where} stayed unreachable"
                                        + (f" for {self.timing.reconnect_timeout_s:g} s" if self.resumes else "")
                                        + f" ({e}); the run cannot go on — see the broker log (OUT/logs/broker.log)")
                    await self.on_broker_lost(self._conn_error)
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read(self, client: Any) -> None:
        """Every device message, through the one door, to the method's hooks."""
        async for msg in client.messages:
            parsed = topics.parse_device_topic(self.run_id, str(msg.topic))
            if parsed is None:
                continue
            dev, leaf = parsed
            payload = bytes(msg.payload) if msg.payload is not None else b""
            t_in = time.time()
            if leaf == "status":
                try:
                    status = parse_status(dev, payload)
                except BadMessage as e:
                    self._note_rejection(dev, str(e))
                    await self.emit("status_rejected", device=dev, error=str(e))
                    continue
                if status.state == "offline":
                    self.online.discard(dev)
                elif msg.retain and status.ts is not None and t_in - status.ts > SILENT_AFTER_S:
                    # the retained status of an agent whose heartbeats stopped: hung or gone
                    self.online.discard(dev)
                    await self.emit("device_silent", device=dev, silent_s=round(t_in - status.ts, 3),
                                    reason="its last heartbeat is older than "
                                           f"{SILENT_AFTER_S:g} s: stopped or hung")
                    continue
                else:
                    self.online.add(dev)
                    self.heard[dev] = time.monotonic()
                self._status_seen.set()
                await self.on_status(dev, status, t_in)
            elif leaf == "result":
                await self.on_result(dev, payload, t_in)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def client(self) -> Any:
        return self._client

    async def connected(self) -> None:
        """Until connected (bounded by the client's connect timeout plus the reconnect bound)."""
        bound_s = self.timing.reconnect_timeout_s + 15.0
        deadline = time.monotonic() + bound_s
        while not self._connected.is_set():
            if self._conn_error is not None:
                raise RelayError(self._conn_error)
            if time.monotonic() > deadline:
                raise RelayError(f"{self.method} orchestrator: no MQTT connection to {self.settings.broker_host}:"
                                 f"{self.settings.broker_port} within {bound_s:g} s; is the broker up?")
            try:
                await asyncio.wait_for(self._connected.wait(), timeout=0.1)
            except TimeoutError:
                pass

    def connection_error(self) -> str | None:
        return self._conn_error

    async def wait_online(self, devices: list[str], timeout_s: float | None = None) -> bool:
        """Until every device in `devices` says it is online; RelayError after the bound
        (`timing.online_timeout_s`), or False after an explicit `timeout_s`."""
        bound_s = self.timing.online_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + bound_s
        want = set(devices)
        while not want <= self.online:
            if self._conn_error is not None:
                raise RelayError(self._conn_error)
            left = deadline - time.monotonic()
            if left <= 0:
                if timeout_s is not None:
                    return False
                raise RelayError(f"{self.method}: devices {sorted(want - self.online)} did not come online within "
                                 f"{bound_s:g} s; see their agent logs")
            self._status_seen.clear()
            try:
                await asyncio.wait_for(self._status_seen.wait(), timeout=min(left, 0.5))
            except TimeoutError:
                pass
        return True

    # -- methods that ask the devices for every step ------------------------------------
    async def step(self, x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
        """One noise prediction, asked of the devices (step-by-step methods)."""
        raise NotImplementedError

    async def denoise(self, latent: Any, cond: dict[str, Any], n: int, timeout_s: float,
                      records: list[Any]) -> tuple[Any, float, float]:
        """The server's own scheduler loop over `n` steps (`run_stage`, on a worker thread),
        each noise prediction asked of the devices through `step` on this loop; then
        `relay_finished`. Returns (latent, measured latency, energy of `records`)."""
        from testbed.diffusion.stages import run_stage

        loop = asyncio.get_running_loop()

        def predict(x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(self.step(x_in, t, kw), loop).result(timeout=timeout_s)

        job = self.job
        t_start = time.time()
        out, _ = await asyncio.to_thread(run_stage, job.model.model, latent, cond, 0, n, n, job.scheduler, None,
                                         None, predict)
        latency = time.time() - t_start
        energy = sum(r.energy_j for r in records)
        await self.emit("relay_finished", latency_s=latency, energy_j=energy)
        return out, latency, energy
