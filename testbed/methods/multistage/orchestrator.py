"""The multi-stage orchestrator: relays the latent through the chain, recovers from failures.

On the orchestrator base (relay/orchestrator.py: connection, the one door for device
messages, who is online, deadlines, events) it sends each stage's task in relay order,
keeps the newest latent (plus scheduler state) as the checkpoint, and measures every
stage from timestamps around the real transfers:

    t_down = agent's receive time - server's publish time
    t_cmp  = agent's send time - agent's receive time   (compute + profile padding)
    t_up   = server's receive time - agent's send time

Energy: rx power x t_down + compute power x t_cmp + tx power x t_up (the device's profile).

Recovery: a device whose last will says "offline", or that misses its deadline, fails its
stage; the orchestrator charges what the run has spent so far (the time since the relay
started, the energy of the completed stages and of every failed attempt) and asks the
plan's `replan` for a new chain for the remaining stages among the remaining online
devices under what is left of T_max and E_max — the run's own device selector
(strategy.py). The new chain resumes from the checkpoint (`reselected` and `recovered`
events, `recovered[]` in the outcome); when no chain fits, the run fails
(RunFailedError, exit 5) with the reason. A lost broker is waited for (bounded) and the
stage resumed on the same device.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import InfeasibleError, RelayError, RunFailedError
from testbed.methods.multistage.messages import StageMeta, stage_meta
from testbed.relay.messages import DeviceResult
from testbed.relay.orchestrator import DevicePower, Job, Orchestrator, RelaySettings, Timing
from testbed.relay.stage import pack_task_tensors, unpack_task_tensors

__all__ = ["StageRecord", "Recovery", "RelayOutcome", "MultistageOrchestrator", "PointPredictions", "Replan"]

#: replan(pool, stages, t_left_s, e_left_j) -> the device ids of a new chain for the
#: remaining `stages` stages, in relay order, from `pool` (remaining online devices) under
#: the budgets left; raises InfeasibleError, saying why, when no chain fits. A
#: selection.recovery.Chain also says its modelled probability and whether it kept the
#: plan's confidence.
Replan = Callable[[list[str], int, float, float], list[str]]


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
    predicted_latency_s: float = 0.0  # the chain's predicted (mean) time and energy
    predicted_energy_j: float = 0.0
    p_within: float | None = None  # modelled P(the chain keeps the time left)
    confidence_kept: bool | None = None  # a plan with a confidence: whether the chain keeps it

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
            "predicted": {"latency_s": self.predicted_latency_s, "energy_j": self.predicted_energy_j,
                          "p_within": self.p_within, "confidence_kept": self.confidence_kept},
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


@dataclass
class PointPredictions:
    """Stage predictions from point costs alone (no distributions, no confidence)."""

    costs: list[Any]
    confidence: None = None

    def stage_predicted(self, device: str) -> dict[str, Any]:
        c = next(c for c in self.costs if c.id == device)
        return {"t_down_s": c.t_down_s, "t_cmp_s": c.t_cmp_s, "t_up_s": c.t_up_s, "energy_j": c.energy_j}

    def stage_tail_s(self, device: str) -> float | None:
        return None

    def chain_latency_s(self, chain: list[str]) -> float:
        return sum(c.latency_s for c in self.costs if c.id in chain)


class MultistageOrchestrator(Orchestrator):
    """One multi-stage generation over MQTT, on `plan` (methods/multistage/strategy.py
    MultistagePlan: the chain, every candidate's DeviceCost for recovery, and `replan`).

    `budgets` are T_max and E_max of the run (what recovery charges against);
    `steps_per_stage` the K of every stage.
    """

    method = "multistage"
    result_meta = stage_meta
    resumes = True

    def __init__(self, settings: RelaySettings, job: Job, power: dict[str, DevicePower], *, plan: Any,
                 steps_per_stage: int, t_max_s: float, e_max_j: float,
                 emit: Callable[[dict[str, Any]], None] | None = None, timing: Timing = Timing()):
        super().__init__(settings, job, power, emit=emit, timing=timing)
        self.costs = {c.id: c for c in plan.costs}
        # what each stage is predicted to take: the plan's distributions (MultistagePlan), or
        # the point costs of a plan that has none (a plug-in relaying with this orchestrator)
        self.plan = plan if hasattr(plan, "stage_predicted") else PointPredictions(list(plan.costs))
        self.replan: Replan = plan.replan(t_max_s, e_max_j)
        self.order = list(plan.selected)
        self.steps_per_stage = steps_per_stage
        self.t_max_s, self.e_max_j = t_max_s, e_max_j
        self.failed: set[str] = set()
        self._nonce = secrets.token_hex(6)  # task ids `<nonce>/<stage>/<attempt>`: unique to this generation
        self._last_result: DeviceResult | None = None

    async def _broker_lost_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.is_connected

    async def _broker_alive(self, timeout_s: float) -> bool:
        """A QoS-1 probe (on a topic only the server may use) acknowledged within timeout_s."""
        client = self.client
        if client is None or not self.is_connected:
            return False
        try:
            await asyncio.wait_for(client.publish(f"tb/{self.run_id}/server/probe", b"", qos=1), timeout_s)
        except Exception:  # noqa: BLE001 - MqttError, a timeout: the broker is not answering
            return False
        return True

    async def _rejoin(self, dev: str) -> bool:
        """After a broker loss: wait for the connection (RelayError when it is gone for
        good), then up to rejoin_timeout_s for `dev` to be online again."""
        await self.connected()
        return await self.wait_online([dev], timeout_s=self.timing.rejoin_timeout_s)

    # -- the relay -------------------------------------------------------------------------
    async def generate(self) -> RelayOutcome:
        await self.wait_online(self.order)
        k, job = self.steps_per_stage, self.job
        n_total = k * len(self.order)
        latent = await asyncio.to_thread(job.model.initial, job.seed)
        cond = await asyncio.to_thread(job.model.encode, job.prompt)
        state: dict[str, Any] | None = None
        stages: list[StageRecord] = []
        recovered: list[Recovery] = []
        t_start = time.time()
        energy = 0.0
        await self.emit("run_started", relay_order=self.order, total_steps=n_total, steps_per_stage=k)
        i = 0
        while i < len(self.order):
            dev = self.order[i]
            steps = (i * k, (i + 1) * k)
            attempt, broker_retries = 0, 0
            while True:
                attempt += 1
                rec, why, wasted_j = await self._stage(i, attempt, dev, steps, n_total, latent, cond, state)
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
            assert self._last_result is not None
            latent, state = rec_latent_state(self._last_result)
            i += 1
        latency = time.time() - t_start
        await self.emit("relay_finished", latency_s=latency, energy_j=energy)
        return RelayOutcome(stages=stages, recovered=recovered, latent=latent, latency_s=latency, energy_j=energy,
                            total_steps=n_total, events=self.events_emitted, rejected_results=self.rejected_results)

    def _charge(self, r: Recovery, chain: list[str], charged_s: float, energy_j: float) -> Recovery:
        """`r` with the chain from here on and the budgets charged: `charged_s` measured since
        the relay started, `energy_j` of the completed stages and the failed attempts so far."""
        r.chain = list(chain)
        r.charged_s, r.charged_j = charged_s, energy_j
        r.t_left_s, r.e_left_j = self.t_max_s - r.charged_s, self.e_max_j - energy_j
        r.predicted_latency_s = self.plan.chain_latency_s(list(chain))
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
            got = self.replan(pool, n_left, self.t_max_s - charged_s, self.e_max_j - energy_j)
        except InfeasibleError as e:  # (the run owner reports it as run_failed)
            raise RunFailedError(
                f"recovery impossible: {dev} failed stage {i} ({why}) after {charged_s:.3f} s and {energy_j:.1f} J "
                f"of T_max {self.t_max_s:g} s and E_max {self.e_max_j:g} J; among the {len(pool)} remaining online "
                f"devices {e}; raise --tmax/--emax") from None
        chain = list(got)
        if len(chain) != n_left or set(chain) - set(pool):
            raise RunFailedError(f"recovery: the re-planner returned {chain} for {n_left} stage(s) from {pool}")
        self.order[i:] = chain
        r = self._charge(Recovery(device=dev, steps=steps, stage=i, reason=why, took_over=chain[0],
                                  detected_after_s=charged_s, energy_j=wasted_j), chain, charged_s, energy_j)
        r.p_within = getattr(got, "p_within", None)
        r.confidence_kept = getattr(got, "confidence_kept", None) if self.plan.confidence is not None else None
        await self.emit("reselected", device=chain[0], steps=(steps[0], n_total), stage=i, failed=dev, reason=why,
                        chain=chain, relay_order=list(self.order), charged_s=r.charged_s, charged_j=r.charged_j,
                        t_left_s=r.t_left_s, e_left_j=r.e_left_j, predicted_latency_s=r.predicted_latency_s,
                        predicted_energy_j=r.predicted_energy_j, p_within=r.p_within,
                        confidence_kept=r.confidence_kept)
        await self.emit("recovered", device=chain[0], steps=steps, failed=dev, reason=why, stage=i,
                        checkpoint_step=steps[0])
        return r

    async def _stage(self, i: int, attempt: int, dev: str, steps: tuple[int, int], n_total: int,
                     latent: Any, cond: dict, state: dict | None) -> tuple[StageRecord | None, str, float]:
        """One attempt: (record, "", 0) on success, (None, reason, wasted energy) on failure."""
        cost = self.costs[dev]
        pw = self.power[dev]
        predicted = self.plan.stage_predicted(dev)
        if not self.is_connected:
            return None, "broker", 0.0
        if dev not in self.online:
            await self.emit("device_offline", device=dev, steps=steps, stage=i, before_start=True)
            return None, "offline", 0.0
        while not self.inbox.empty():  # stale statuses/results of earlier stages: the reader tracked them
            self.inbox.get_nowait()
        task_id = f"{self._nonce}/{i}/{attempt}"
        tensors, scalars = pack_task_tensors(latent, cond, state)
        data = self.task(dev, stage=i, attempt=attempt, steps=steps, total_steps=n_total, tensors=tensors,
                         meta={"scheduler": self.job.scheduler, "sched": scalars, "task": task_id},
                         pad_to_bytes=self.job.payload_bytes)
        await self.emit("stage_started", device=dev, steps=steps, stage=i, attempt=attempt, bytes=len(data),
                        predicted=predicted)
        t_pub = time.time()
        try:
            await self.publish_task(dev, data)
        except Exception as e:  # aiomqtt.MqttError, a timeout, a client torn down under us: the broker
            await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker", error=str(e))
            return None, "broker", 0.0  # resumed after a bounded wait for the broker (_rejoin)
        deadline_s = self.deadline_s(self.plan.chain_latency_s([dev]), self.plan.stage_tail_s(dev))
        deadline = time.monotonic() + deadline_s
        t_recv_dev: float | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.emit("deadline_missed", device=dev, steps=steps, stage=i, deadline_s=deadline_s)
                return None, "deadline", self._wasted(pw, t_pub, t_recv_dev)
            try:
                leaf, who, body, t_in = await asyncio.wait_for(self.inbox.get(), timeout=left)
            except TimeoutError:
                continue
            if leaf == "broker":
                await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker")
                return None, "broker", self._wasted(pw, t_pub, t_recv_dev)
            if who != dev:
                continue
            if leaf == "status":
                if body.state == "offline":
                    # a stopping broker publishes every client's will: tell that from a device's death
                    if await self._broker_lost_within(0.3) or not await self._broker_alive(1.0):
                        await self.emit("stage_interrupted", device=dev, steps=steps, stage=i, reason="broker")
                        return None, "broker", self._wasted(pw, t_pub, t_recv_dev)
                    await self.emit("device_offline", device=dev, steps=steps, stage=i)
                    return None, "offline", self._wasted(pw, t_pub, t_recv_dev)
                if body.state == "computing" and (body.stage, body.attempt) == (i, attempt):
                    t_recv_dev = body.t_recv if body.t_recv is not None else t_in
                    await self.emit("downloaded", device=dev, steps=steps, stage=i, t_down_s=t_recv_dev - t_pub,
                                    predicted_t_down_s=predicted["t_down_s"])
                continue
            try:
                res = self._check_result(dev, body, i, attempt, steps, n_total, task_id)
            except RelayError as e:
                await self.reject(dev, str(e), steps=steps, stage=i)
                continue
            m: StageMeta = res.meta
            t_down, t_cmp, t_up = m.t_recv - t_pub, m.t_send - m.t_recv, t_in - m.t_send
            overrun, real = m.overrun_s, m.cmp_real_s
            await self.emit("computed", device=dev, steps=steps, stage=i, t_cmp_s=t_cmp, overrun_s=overrun,
                            cmp_real_s=real, predicted_t_cmp_s=cost.t_cmp_s)
            e_j = pw.energy_j(t_down, t_cmp, t_up)
            rec = StageRecord(device=dev, steps=steps, stage=i, attempt=attempt, t_down_s=t_down, t_cmp_s=t_cmp,
                              t_up_s=t_up, energy_j=e_j, overrun_s=overrun, cmp_real_s=real, predicted=predicted,
                              wire_bytes_down=len(data), wire_bytes_up=len(body),
                              precision=m.precision, compute_dtype=m.compute_dtype)
            await self.emit("uploaded", device=dev, steps=steps, stage=i, t_up_s=t_up, energy_j=e_j,
                            predicted_t_up_s=predicted["t_up_s"])
            self._last_result = res
            return rec, "", 0.0

    def _check_result(self, dev: str, payload: bytes, i: int, attempt: int, steps: tuple[int, int], n_total: int,
                      task_id: str) -> DeviceResult:
        """The stage's result through the one door, then this stage's own checks."""
        res = self.decode_result(dev, payload, total_steps=n_total, expect={"latent": self.job.model.latent_spec})
        msg = res.message
        if res.meta.task != task_id:
            raise RelayError(f"result for task {res.meta.task!r}, not this generation's stage {i} "
                             f"attempt {attempt} (a late upload of an earlier one?)")
        if (msg.stage, msg.attempt, msg.steps) != (i, attempt, steps):
            raise RelayError(f"result for stage {msg.stage} attempt {msg.attempt} steps {list(msg.steps)}, "
                             f"expected stage {i} attempt {attempt} steps {list(steps)}")
        return res

    @staticmethod
    def _wasted(pw: DevicePower, t_pub: float, t_recv_dev: float | None) -> float:
        """Energy a failed attempt burnt: receiving, then computing until the failure."""
        now = time.time()
        if t_recv_dev is None:
            return pw.rx_w * (now - t_pub)
        return pw.rx_w * (t_recv_dev - t_pub) + pw.compute_w * (now - t_recv_dev)


def rec_latent_state(res: DeviceResult) -> tuple[Any, dict[str, Any]]:
    latent, _cond, state = unpack_task_tensors(res.message.tensors, res.meta.sched)
    return latent, state
