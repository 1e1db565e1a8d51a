"""The edge-server orchestrator: relays the latent through the selected devices, recovers from failures.

It connects to the broker as `server`, waits (bounded) for the devices' retained
"online" status, sends each stage's task in relay order, keeps the newest latent (plus
scheduler state) as the checkpoint, and measures every stage from timestamps around the
real transfers:

    t_down = agent's receive time - server's publish time
    t_cmp  = agent's send time - agent's receive time   (compute + profile padding)
    t_up   = server's receive time - agent's send time

Energy: rx power x t_down + compute power x t_cmp + tx power x t_up (the device's profile).

Recovery: a device whose last will says "offline", or that misses its deadline, fails its
stage; the orchestrator charges what the run has spent so far (the time since the relay
started, the energy of the completed stages and of every failed attempt) and asks
`replan` for a new chain for the remaining stages among the remaining online devices
under what is left of T_max and E_max — the run's own selection strategy, handed in by
the collaboration strategy (composition/strategies/multistage.py). The new chain resumes
from the checkpoint (`reselected` and `recovered` events, `recovered[]` in the outcome);
when no chain fits, the run fails (RunFailedError, exit 5) with the reason. Telemetry
goes to `tb/<run>/events` and `emit`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import InfeasibleError, RelayError, RunFailedError
from testbed.relay import topics
from testbed.relay.events import make_event
from testbed.relay.stage import pack_task_tensors, unpack_task_tensors
from testbed.relay.wire import Message, decode, encode

__all__ = ["DevicePower", "StageRecord", "Recovery", "RelayOutcome", "Orchestrator", "Replan", "default_replan"]

#: replan(pool, stages, t_left_s, e_left_j) -> the device ids of a new chain for the
#: remaining `stages` stages, in relay order, from `pool` (remaining online devices) under
#: the budgets left; raises InfeasibleError, saying why, when no chain fits.
Replan = Callable[[list[str], int, float, float], list[str]]


@dataclass(frozen=True)
class DevicePower:
    compute_w: float
    tx_w: float
    rx_w: float


@dataclass
class StageRecord:
    device: str
    steps: tuple[int, int]
    stage: int
    attempt: int
    t_down_s: float
    t_cmp_s: float
    t_up_s: float
    energy_j: float
    overrun_s: float
    cmp_real_s: float
    predicted: dict[str, float]
    wire_bytes_down: int
    wire_bytes_up: int
    precision: str = ""
    compute_dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "steps": list(self.steps),
            "t_down_s": self.t_down_s,
            "t_cmp_s": self.t_cmp_s,
            "t_up_s": self.t_up_s,
            "energy_j": self.energy_j,
            "overrun_s": self.overrun_s,
            "cmp_real_s": self.cmp_real_s,
            "precision": self.precision,
            "compute_dtype": self.compute_dtype,
            "bytes_down": self.wire_bytes_down,
            "bytes_up": self.wire_bytes_up,
            "predicted": self.predicted,
        }


@dataclass
class Recovery:
    """One failed attempt and how the run went on: a re-selected chain, or (broker) the same device."""

    device: str
    steps: tuple[int, int]
    stage: int
    reason: str  # "offline" | "deadline" | "broker" (resumed on the same device)
    took_over: str
    detected_after_s: float
    energy_j: float  # what the failed attempt spent (modelled: power x measured time)
    chain: list[str] = field(default_factory=list)  # the remaining stages' devices from here on
    charged_s: float = 0.0  # measured time of the run when the chain was chosen
    charged_j: float = 0.0  # energy of the completed stages and the failed attempts by then
    t_left_s: float = 0.0  # T_max - charged_s: what the chain was chosen under
    e_left_j: float = 0.0  # E_max - charged_j
    predicted_latency_s: float = 0.0  # the chain's predicted time and energy
    predicted_energy_j: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "steps": list(self.steps),
            "stage": self.stage,
            "reason": self.reason,
            "took_over": self.took_over,
            "detected_after_s": self.detected_after_s,
            "energy_j": self.energy_j,
            "chain": list(self.chain),
            "charged": {"latency_s": self.charged_s, "energy_j": self.charged_j},
            "left": {"latency_s": self.t_left_s, "energy_j": self.e_left_j},
            "predicted": {"latency_s": self.predicted_latency_s, "energy_j": self.predicted_energy_j},
        }


@dataclass
class RelayOutcome:
    stages: list[StageRecord]
    recovered: list[Recovery]
    latent: Any
    latency_s: float
    energy_j: float
    total_steps: int
    events: int = 0
    rejected_results: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Orchestrator:
    """One multi-stage generation over MQTT.

    `costs` are the selection's DeviceCost records of every device (the candidates for
    recovery), `relay_order` the selected ids, `model` a `stage.StageModel` used for the
    initial latent and the conditioning, `emit(event)` receives every telemetry event,
    `replan` chooses the chain after a failure (default: `default_replan(costs)`, the DP's
    objective on the full budgets).
    """

    def __init__(
        self,
        *,
        run: str,
        broker_host: str,
        broker_port: int,
        username: str,
        password: str,
        costs: list[Any],
        relay_order: list[str],
        power: dict[str, DevicePower],
        model: Any,
        steps_per_stage: int,
        prompt: str,
        seed: int,
        scheduler: str,
        payload_bytes: int,
        t_max_s: float,
        e_max_j: float,
        emit: Callable[[dict[str, Any]], None] | None = None,
        online_timeout_s: float = 120.0,
        deadline_factor: float = 2.0,
        deadline_slack_s: float = 2.0,
        max_message_bytes: int | None = None,
        reconnect_timeout_s: float = 30.0,
        rejoin_timeout_s: float = 15.0,
        replan: Replan | None = None,
    ):
        self.run_id = run
        self.host, self.port = broker_host, broker_port
        self.username, self.password = username, password
        self.costs = {c.id: c for c in costs}
        self.replan = replan or default_replan(costs)
        self.order = list(relay_order)
        self.power = power
        self.model = model
        self.k = steps_per_stage
        self.prompt, self.seed, self.scheduler = prompt, seed, scheduler
        self.payload_bytes = payload_bytes
        self.t_max_s, self.e_max_j = t_max_s, e_max_j
        self._emit_cb = emit
        self.online_timeout_s = online_timeout_s
        self.deadline_factor, self.deadline_slack_s = deadline_factor, deadline_slack_s
        self.max_message_bytes = max_message_bytes or payload_bytes + 4 * 2**20
        self.online: set[str] = set()
        self.failed: set[str] = set()
        self._inbox: asyncio.Queue[tuple[str, str, bytes, float]] = asyncio.Queue()
        self._client: Any = None
        self._seq = 0
        self._events_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.rejected_results = 0
        self._nonce = secrets.token_hex(6)  # task ids `<nonce>/<stage>/<attempt>`: unique to this generation
        # broker loss: reconnect with backoff for up to reconnect_timeout_s, then wait up to
        # rejoin_timeout_s for the stage's device to be back online before resuming it
        self.reconnect_timeout_s, self.rejoin_timeout_s = reconnect_timeout_s, rejoin_timeout_s
        self._connected = asyncio.Event()
        self._conn_error: str | None = None

    # -- telemetry -------------------------------------------------------------------------
    async def emit(self, etype: str, device: str | None = None, steps: tuple[int, int] | None = None, **data: Any) -> None:
        """Record one telemetry event: the callback now, MQTT (tb/<run>/events) in the
        background, in order — a publish waits for the broker's PUBACK, the relay must not."""
        self._seq += 1
        ev = make_event(etype, self.run_id, device=device, steps=steps, seq=self._seq, **data)
        self._events_out.put_nowait(ev)
        if self._emit_cb is not None:
            self._emit_cb(ev)

    async def _publish_events(self) -> None:
        import aiomqtt

        await self._connected.wait()  # what was queued before the first connection goes out first
        while True:
            ev = await self._events_out.get()
            try:
                if self._client is not None and self._connected.is_set():
                    try:
                        await self._client.publish(topics.events(self.run_id), json.dumps(ev).encode(), qos=1)
                    except aiomqtt.MqttError:
                        pass  # the broker went away: the connection task reports it; local emit still ran
            finally:
                self._events_out.task_done()

    async def _flush_events(self, timeout_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._events_out.join(), timeout=timeout_s)
        except TimeoutError:
            pass

    # -- transport -------------------------------------------------------------------------
    async def _reader(self, client: Any) -> None:
        async for msg in client.messages:
            parsed = topics.parse_device_topic(self.run_id, str(msg.topic))
            if parsed is None:
                continue
            dev, leaf = parsed
            payload = bytes(msg.payload) if msg.payload is not None else b""
            if leaf == "status":
                self._on_status(dev, payload)
            await self._inbox.put((leaf, dev, payload, time.time()))

    def _on_status(self, dev: str, payload: bytes) -> None:
        try:
            state = json.loads(payload).get("state")
        except (ValueError, AttributeError):
            return
        if state in ("online", "computing"):
            self.online.add(dev)
        elif state == "offline":
            self.online.discard(dev)

    async def run(self) -> RelayOutcome:
        """Relay the whole generation (its events flushed to the broker before it returns)."""
        conn = asyncio.create_task(self._connection())
        publisher = asyncio.create_task(self._publish_events())
        try:
            await self._await_connection()
            outcome = await self._relay()
            outcome.events = self._seq
            await self._flush_events()
            return outcome
        finally:
            publisher.cancel()
            conn.cancel()
            await asyncio.gather(publisher, conn, return_exceptions=True)
            self._client = None

    async def _connection(self) -> None:
        """Hold the broker connection: subscribe and read; when it drops, report
        `broker_lost`, reconnect with backoff (0.2 s .. 2 s) for up to reconnect_timeout_s."""
        import aiomqtt

        backoff, lost_at, ever = 0.2, None, False
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, username=self.username, password=self.password,
                    identifier=f"tb-{self.run_id}-server", keepalive=10, timeout=10, clean_session=True,
                ) as client:
                    await client.subscribe(f"tb/{self.run_id}/dev/+/status", qos=1)
                    await client.subscribe(f"tb/{self.run_id}/dev/+/result", qos=1)
                    self._client = client
                    self._connected.set()
                    if lost_at is not None:
                        await self.emit("broker_back", down_s=time.monotonic() - lost_at)
                    lost_at, backoff, ever = None, 0.2, True
                    await self._reader(client)
            except aiomqtt.MqttError as e:
                self._client = None
                self._connected.clear()
                if not ever:
                    self._conn_error = (f"orchestrator: MQTT connection to {self.host}:{self.port} failed ({e}); "
                                        "is the broker up (testbed status)?")
                    return
                if lost_at is None:
                    lost_at = time.monotonic()
                    self.online.clear()  # a restarted broker has no retained statuses: rebuilt as agents return
                    await self.emit("broker_lost", error=str(e))
                    await self._inbox.put(("broker", "", b"lost", time.time()))
                if time.monotonic() - lost_at > self.reconnect_timeout_s:
                    self._conn_error = (f"the broker at {self.host}:{self.port} stayed unreachable for "
                                        f"{self.reconnect_timeout_s:g} s ({e}); the run cannot go on — see the "
                                        "broker log (OUT/logs/broker.log)")
                    await self._inbox.put(("broker", "", b"gone", time.time()))
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _await_connection(self) -> None:
        """Until connected (bounded by the client's connect timeout plus reconnect_timeout_s)."""
        deadline = time.monotonic() + self.reconnect_timeout_s + 15.0
        while not self._connected.is_set():
            if self._conn_error is not None:
                raise RelayError(self._conn_error)
            if time.monotonic() > deadline:
                raise RelayError(f"orchestrator: no MQTT connection to {self.host}:{self.port} within "
                                 f"{self.reconnect_timeout_s + 15.0:g} s; is the broker up (testbed status)?")
            try:
                await asyncio.wait_for(self._connected.wait(), timeout=0.1)
            except TimeoutError:
                pass

    async def _broker_lost_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._connected.is_set()

    async def _broker_alive(self, timeout_s: float) -> bool:
        """A QoS-1 probe (on a topic only the server may use) acknowledged within timeout_s."""
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        try:
            await asyncio.wait_for(client.publish(f"tb/{self.run_id}/server/probe", b"", qos=1), timeout_s)
        except Exception:  # noqa: BLE001 - MqttError, a timeout: the broker is not answering
            return False
        return True

    async def _rejoin(self, dev: str) -> bool:
        """After a broker loss: wait for the connection (RelayError when it is gone for
        good), then up to rejoin_timeout_s for `dev` to be online again."""
        await self._await_connection()
        deadline = time.monotonic() + self.rejoin_timeout_s
        while dev not in self.online and time.monotonic() < deadline:
            if self._conn_error is not None:
                raise RelayError(self._conn_error)
            try:
                await asyncio.wait_for(self._inbox.get(), timeout=0.2)
            except TimeoutError:
                pass
        return dev in self.online

    async def wait_online(self, devices: list[str]) -> None:
        deadline = time.monotonic() + self.online_timeout_s
        want = set(devices)
        while not want <= self.online:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(want - self.online)
                raise RelayError(f"devices {missing} did not come online within {self.online_timeout_s:g} s; "
                                 "see their agent logs")
            try:
                await asyncio.wait_for(self._inbox.get(), timeout=min(left, 0.5))
            except TimeoutError:
                pass

    # -- the relay -------------------------------------------------------------------------
    async def _relay(self) -> RelayOutcome:
        await self.wait_online(self.order)
        n_total = self.k * len(self.order)
        latent = await asyncio.to_thread(self.model.initial, self.seed)
        cond = await asyncio.to_thread(self.model.encode, self.prompt)
        state: dict[str, Any] | None = None
        spec = self.model.latent_spec
        stages: list[StageRecord] = []
        recovered: list[Recovery] = []
        t_start = time.time()
        energy = 0.0
        await self.emit("run_started", relay_order=self.order, total_steps=n_total, steps_per_stage=self.k)
        i = 0
        while i < len(self.order):
            dev = self.order[i]
            steps = (i * self.k, (i + 1) * self.k)
            attempt, broker_retries = 0, 0
            while True:
                attempt += 1
                rec, why, wasted_j = await self._stage(i, attempt, dev, steps, n_total, latent, cond, state, spec)
                energy += wasted_j if rec is None else rec.energy_j
                if rec is not None:
                    break
                if why == "broker":  # nobody failed: resume the same device from the checkpoint
                    broker_retries += 1
                    if broker_retries > 5:
                        raise RelayError(f"stage {i} on {dev}: the broker failed it {broker_retries} times; "
                                         "see the broker log (OUT/logs/broker.log)")
                    if await self._rejoin(dev):
                        now_s = time.time() - t_start
                        recovered.append(self._charge(Recovery(device=dev, steps=steps, stage=i, reason=why,
                                                               took_over=dev, detected_after_s=now_s,
                                                               energy_j=wasted_j), self.order[i:], now_s, energy))
                        await self.emit("recovered", device=dev, steps=steps, failed=dev, reason=why, stage=i,
                                        checkpoint_step=steps[0])
                        continue
                    why = "offline"  # it did not come back: re-select below
                self.failed.add(dev)
                r = await self._reselect(i, dev, steps, why, wasted_j, stages, t_start, energy, n_total)
                recovered.append(r)
                dev = r.took_over
            stages.append(rec)
            latent, state = rec_latent_state(self._last_result)
            i += 1
        latency = time.time() - t_start
        await self.emit("relay_finished", latency_s=latency, energy_j=energy)
        return RelayOutcome(stages=stages, recovered=recovered, latent=latent, latency_s=latency, energy_j=energy,
                            total_steps=n_total, events=self._seq, rejected_results=self.rejected_results)

    def _charge(self, r: Recovery, chain: list[str], charged_s: float, energy_j: float) -> Recovery:
        """`r` with the chain from here on and the budgets charged: `charged_s` measured since
        the relay started, `energy_j` of the completed stages and the failed attempts so far."""
        r.chain = list(chain)
        r.charged_s, r.charged_j = charged_s, energy_j
        r.t_left_s, r.e_left_j = self.t_max_s - r.charged_s, self.e_max_j - energy_j
        r.predicted_latency_s = sum(self.costs[d].latency_s for d in chain)
        r.predicted_energy_j = sum(self.costs[d].energy_j for d in chain)
        return r

    async def _reselect(self, i: int, dev: str, steps: tuple[int, int], why: str, wasted_j: float,
                        done: list[StageRecord], t_start: float, energy_j: float, n_total: int) -> Recovery:
        """A new chain for stages i.. after `dev` failed stage i, chosen by `replan` among the
        online devices that have neither run a stage nor failed, under the budgets left."""
        used = {r.device for r in done} | self.failed
        pool = [d for d in self.costs if d not in used and d in self.online]
        n_left = len(self.order) - i
        charged_s = time.time() - t_start
        try:
            chain = list(self.replan(pool, n_left, self.t_max_s - charged_s, self.e_max_j - energy_j))
        except InfeasibleError as e:  # (the run owner reports it as run_failed)
            raise RunFailedError(
                f"recovery impossible: {dev} failed stage {i} ({why}) after {charged_s:.3f} s and {energy_j:.1f} J "
                f"of T_max {self.t_max_s:g} s and E_max {self.e_max_j:g} J; among the {len(pool)} remaining online "
                f"devices {e}; raise --tmax/--emax") from None
        if len(chain) != n_left or set(chain) - set(pool):
            raise RunFailedError(f"recovery: the re-planner returned {chain} for {n_left} stage(s) from {pool}")
        self.order[i:] = chain
        r = self._charge(Recovery(device=dev, steps=steps, stage=i, reason=why, took_over=chain[0],
                                  detected_after_s=charged_s, energy_j=wasted_j), chain, charged_s, energy_j)
        await self.emit("reselected", device=chain[0], steps=(steps[0], n_total), stage=i, failed=dev, reason=why,
                        chain=chain, relay_order=list(self.order), charged_s=r.charged_s, charged_j=r.charged_j,
                        t_left_s=r.t_left_s, e_left_j=r.e_left_j, predicted_latency_s=r.predicted_latency_s,
                        predicted_energy_j=r.predicted_energy_j)
        await self.emit("recovered", device=chain[0], steps=steps, failed=dev, reason=why, stage=i,
                        checkpoint_step=steps[0])
        return r

    def _deadline_s(self, dev: str) -> float:
        c = self.costs[dev]
        return self.deadline_factor * c.latency_s + self.deadline_slack_s

    async def _stage(self, i: int, attempt: int, dev: str, steps: tuple[int, int], n_total: int,
                     latent: Any, cond: dict, state: dict | None, spec: Any) -> tuple[StageRecord | None, str, float]:
        """One attempt: (record, "", 0) on success, (None, reason, wasted energy) on failure."""
        cost = self.costs[dev]
        pw = self.power[dev]
        predicted = {"t_down_s": cost.t_down_s, "t_cmp_s": cost.t_cmp_s, "t_up_s": cost.t_up_s,
                     "energy_j": cost.energy_j}
        if not self._connected.is_set():
            return None, "broker", 0.0
        if dev not in self.online:
            await self.emit("device_offline", device=dev, steps=steps, stage=i, before_start=True)
            return None, "offline", 0.0
        while not self._inbox.empty():  # stale statuses/results of earlier stages: the reader tracked them
            self._inbox.get_nowait()
        tensors, scalars = pack_task_tensors(latent, cond, state)
        msg = Message(kind="task", run=self.run_id, device=dev, stage=i, attempt=attempt, steps=steps,
                      total_steps=n_total, tensors=tensors, meta={"scheduler": self.scheduler, "sched": scalars,
                            "task": f"{self._nonce}/{i}/{attempt}"})
        data = encode(msg, pad_to_bytes=self.payload_bytes)
        await self.emit("stage_started", device=dev, steps=steps, stage=i, attempt=attempt, bytes=len(data),
                        predicted=predicted)
        t_pub = time.time()
        try:
            await self._client.publish(topics.task(self.run_id, dev), data, qos=1)
        except Exception as e:  # aiomqtt.MqttError, a timeout, a client torn down under us: the broker
            await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker", error=str(e))
            return None, "broker", 0.0  # resumed after a bounded wait for the broker (_rejoin)
        deadline = time.monotonic() + self._deadline_s(dev)
        t_recv_dev: float | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.emit("deadline_missed", device=dev, steps=steps, stage=i,
                                deadline_s=self._deadline_s(dev))
                return None, "deadline", self._wasted(pw, t_pub, t_recv_dev)
            try:
                leaf, who, payload, t_in = await asyncio.wait_for(self._inbox.get(), timeout=left)
            except TimeoutError:
                continue
            if leaf == "broker":
                await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker")
                return None, "broker", self._wasted(pw, t_pub, t_recv_dev)
            if who != dev:
                continue
            if leaf == "status":
                st = _json(payload)
                if st.get("state") == "offline":
                    # a stopping broker publishes every client's will: tell that from a device's death
                    if await self._broker_lost_within(0.3) or not await self._broker_alive(1.0):
                        await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker")
                        return None, "broker", self._wasted(pw, t_pub, t_recv_dev)
                    await self.emit("device_offline", device=dev, steps=steps, stage=i)
                    return None, "offline", self._wasted(pw, t_pub, t_recv_dev)
                if st.get("state") == "computing" and st.get("stage") == i and st.get("attempt") == attempt:
                    t_recv_dev = float(st.get("t_recv", t_in))
                    await self.emit("downloaded", device=dev, steps=steps, stage=i, t_down_s=t_recv_dev - t_pub,
                                    predicted_t_down_s=cost.t_down_s)
                continue
            if leaf != "result":
                continue
            try:
                res = decode(payload, max_bytes=self.max_message_bytes, run=self.run_id, kind="result", device=dev,
                             total_steps=n_total, expect={"latent": spec})
                if res.meta.get("task") != f"{self._nonce}/{i}/{attempt}":
                    raise RelayError(f"result for task {res.meta.get('task')!r}, not this generation's stage {i} "
                                     f"attempt {attempt} (a late upload of an earlier one?)")
                if (res.stage, res.attempt, res.steps) != (i, attempt, steps):
                    raise RelayError(f"result for stage {res.stage} attempt {res.attempt} steps {list(res.steps)}, "
                                     f"expected stage {i} attempt {attempt} steps {list(steps)}")
                m = res.meta
                t_recv, t_send = float(m["t_recv"]), float(m["t_send"])
                overrun, real = float(m.get("overrun_s") or 0.0), float(m.get("cmp_real_s") or 0.0)
            except (RelayError, KeyError, TypeError, ValueError) as e:
                self.rejected_results += 1
                await self.emit("result_rejected", device=dev, steps=steps, stage=i, error=str(e))
                continue
            t_down, t_cmp, t_up = t_recv - t_pub, t_send - t_recv, t_in - t_send
            await self.emit("computed", device=dev, steps=steps, stage=i, t_cmp_s=t_cmp, overrun_s=overrun,
                            cmp_real_s=real, predicted_t_cmp_s=cost.t_cmp_s)
            e_j = pw.rx_w * t_down + pw.compute_w * t_cmp + pw.tx_w * t_up
            rec = StageRecord(device=dev, steps=steps, stage=i, attempt=attempt, t_down_s=t_down, t_cmp_s=t_cmp,
                              t_up_s=t_up, energy_j=e_j, overrun_s=overrun, cmp_real_s=real, predicted=predicted,
                              wire_bytes_down=len(data), wire_bytes_up=len(payload),
                              precision=str(m.get("precision", "")), compute_dtype=m.get("compute_dtype"))
            await self.emit("uploaded", device=dev, steps=steps, stage=i, t_up_s=t_up, energy_j=e_j,
                            predicted_t_up_s=cost.t_up_s)
            self._last_result = res
            return rec, "", 0.0

    @staticmethod
    def _wasted(pw: DevicePower, t_pub: float, t_recv_dev: float | None) -> float:
        """Energy a failed attempt burnt: receiving, then computing until the failure."""
        now = time.time()
        if t_recv_dev is None:
            return pw.rx_w * (now - t_pub)
        return pw.rx_w * (t_recv_dev - t_pub) + pw.compute_w * (now - t_recv_dev)


def rec_latent_state(res: Message) -> tuple[Any, dict[str, Any]]:
    sched = res.meta.get("sched", {}) if isinstance(res.meta.get("sched"), dict) else {}
    latent, _cond, state = unpack_task_tensors(res.tensors, sched)
    return latent, state


def _json(payload: bytes) -> dict[str, Any]:
    try:
        v = json.loads(payload)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def default_replan(costs: list[Any]) -> Replan:
    """Re-selection by the DP's objective (the largest total model size) on the given costs
    and the budgets left; what an Orchestrator uses when its owner hands it no re-planner."""
    from testbed.selection.recovery import reselect

    by_id = {c.id: c for c in costs}

    def replan(pool: list[str], stages: int, t_left_s: float, e_left_j: float) -> list[str]:
        return reselect([by_id[d] for d in pool], stages, t_left_s, e_left_j, strategy="dp").selected

    return replan
