"""The edge server's side of patch-parallel diffusion: N devices, one band of rows each.

The scheduler loop is the diffusion workload's own (`run_stage`) in a worker thread, its
UNet call replaced by one step of every band over the network (messages: patch_wire.py):

    server --step task{band + input halo, t, cond}--> every device at once
    device --context--> server --context (the parts each band needs)--> the other devices
    device --noise{its band of the UNet output}--> server: the bands, stacked, are the UNet's
                                                    output; CFG mix and scheduler step here

The server keeps the latent (it assembles the bands every step) and relays the context the
moment it arrives, so that a displaced step's context crosses while the bands compute. The
first `plan.warmup_steps` steps are synchronous (each band waits at every exchange point
for the others' context of the same step); the rest displaced (the previous step's).

Every step of every band is a record (`stages[]`, with `device` and `band`), timed like the
other methods: t_down = the task's transit (agent receipt - server publish) plus the air
time of the context the device received since its previous result; t_cmp = the band's
compute (emulated in `compute: profile`: the profile's step time x the band's FLOP share),
waits for other bands excluded (`t_wait_s`); t_up = the noise's transit plus the air time of
the context the device sent (each message: server receipt - the later of its send and the
previous message's receipt). Energy: rx power x t_down + compute power x t_cmp + tx power x
t_up. Bytes are wire bytes (padding included; `bytes_context_real_*`: the model's own).
No takeover: a device that goes offline or misses its deadline ends the run with
RunFailedError (exit 5) naming it (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.errors import RelayError, RunFailedError
from testbed.methods.patch.plan import PatchPlan
from testbed.methods.patch.wire import padded_size, parse_ctx_name, routed
from testbed.relay.agent import SOCKET_OPTIONS
from testbed.methods.patch.messages import PatchContextMeta, PatchNoiseMeta, patch_meta
from testbed.relay.messages import Status
from testbed.relay.orchestrator import DevicePower, Job, Orchestrator, RelaySettings, Timing
from testbed.relay.stage import to_numpy
from testbed.relay.wire import Message

__all__ = ["PatchStepRecord", "PatchOutcome", "PatchOrchestrator"]

_HEADROOM = 64 * 1024
_PUBLISH_TIMEOUT_S = 120.0  # a large context waits behind the others on a slow link


@dataclass
class PatchStepRecord:
    """One band's step: measured hops (seconds, joules, wire bytes)."""

    step: int
    device: str
    band: int
    mode: str
    rows: list[int]
    halo_rows: list[int]
    t_down_s: float
    t_cmp_s: float
    t_up_s: float
    t_wait_s: float
    energy_j: float
    overrun_s: float
    cmp_real_s: float
    t_cmp_start: float
    t_cmp_end: float
    bytes_down: int
    bytes_up: int
    bytes_context_down: int
    bytes_context_up: int
    bytes_context_real_up: int
    precision: str
    predicted: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["steps"] = [doc.pop("step"), self.step + 1]
        return doc


@dataclass
class _Noise:
    msg: Message
    meta: PatchNoiseMeta
    wire_bytes: int
    t_in: float


@dataclass
class PatchOutcome:
    records: list[PatchStepRecord]
    latent: Any
    latency_s: float
    energy_j: float
    total_steps: int
    meta: dict[str, Any]


class PatchOrchestrator(Orchestrator):
    """One patch-parallel generation over MQTT on `plan` (bands, devices, steps). The job's
    model is the server's fp32 model: its scheduler config, initial latent, conditioning and
    decoder; its UNet runs once on zeros to size each band's context."""

    method = "patch"
    result_meta = patch_meta
    pending_publishes = 1000  # context is relayed without waiting for the broker's acknowledgement
    socket_options = SOCKET_OPTIONS

    def __init__(self, settings: RelaySettings, job: Job, power: dict[str, DevicePower], *, plan: PatchPlan,
                 emit: Callable[[dict[str, Any]], None] | None = None, timing: Timing = Timing()):
        super().__init__(settings, job, power, emit=emit, timing=timing)
        self.plan = plan
        self.index_of = {dev: i for i, dev in enumerate(plan.selected)}
        self.gen = secrets.token_hex(4)  # this generation: the agents ignore older ones' context
        self.records: list[PatchStepRecord] = []
        self.steps = _StepClock()
        self.context = _ContextTally()
        self.layout: Any = None
        self.halo = (0, 0)
        self._failure: BaseException | None = None
        self._arrived = asyncio.Event()
        self._noise: dict[tuple[str, int], _Noise] = {}
        self._publishes: list[asyncio.Future] = []

    # -- connection and messages -------------------------------------------------------
    def pending(self) -> list[Any]:
        return list(self._publishes)

    async def on_result(self, dev: str, payload: bytes, t_in: float) -> None:
        if dev not in self.index_of:
            return
        try:
            res = self.decode_result(dev, payload)
            if res.meta.gen != self.gen:
                raise RelayError(f"a result of another generation ({res.meta.gen!r})")
            if isinstance(res.meta, PatchContextMeta):
                self._relay(dev, res.message, res.meta, len(payload), t_in)
            else:
                self._noise[(dev, res.message.stage)] = _Noise(res.message, res.meta, len(payload), t_in)
                self._arrived.set()
        except RelayError as e:
            await self.reject(dev, str(e))

    async def on_status(self, dev: str, status: Status, t_in: float) -> None:
        if dev not in self.index_of:
            return
        if status.state == "computing" and status.stage is not None and status.t_recv is not None:
            t_pub = self.steps.t_pub.get((dev, status.stage))
            if t_pub is not None:
                await self.emit("downloaded", device=dev, stage=status.stage, steps=[status.stage, status.stage + 1],
                                t_down_s=status.t_recv - t_pub)
        elif status.state == "offline" and self.steps.calls and self._failure is None:
            self._fail(RunFailedError(
                f"patch step {self.steps.calls - 1}: {dev} (band {self.index_of[dev]}) went offline; its band has no "
                "other owner (no takeover, docs/reliability.md)"))
            await self.emit("device_offline", device=dev, stage=self.steps.calls - 1)

    async def on_broker_lost(self, error: str) -> None:
        if self._failure is None:
            self._fail(RunFailedError(f"patch: {error}; a band cannot resume without the others' context"))

    def _fail(self, e: BaseException) -> None:
        self._failure = e
        self._arrived.set()

    def _relay(self, dev: str, msg: Message, meta: PatchContextMeta, wire_bytes: int, t_in: float) -> None:
        """Pass band `dev`'s context on to the bands that need it, at once."""
        i, n = self.index_of[dev], self.plan.n
        for name in msg.tensors:
            parse_ctx_name(name)
        self.context.arrived(dev, msg.stage, wire_bytes, msg.body_bytes, meta.t_send, t_in)
        limit = self.settings.max_message_bytes - _HEADROOM
        for j, to in enumerate(self.plan.selected):
            parts = routed(msg.tensors, i, j, n) if j != i else {}
            if not parts:
                continue
            data = self.task(to, stage=msg.stage, steps=msg.steps, total_steps=msg.total_steps, tensors=parts,
                             meta={"phase": "context", "from": i, "gen": self.gen, "t_pub": time.time()},
                             pad_to_bytes=padded_size(parts, self.context.scale_down[j], limit))
            self._publish(to, data)

    def _publish(self, dev: str, data: bytearray) -> None:
        """Publish in call order (paho queues at the call), without waiting for the broker."""
        self._publishes = [f for f in self._publishes if not f.done() or f.exception() is not None]
        for f in self._publishes:
            if f.done() and f.exception() is not None:
                raise RelayError(f"patch orchestrator: a publish failed ({f.exception()})")
        self._publishes.append(asyncio.ensure_future(self.publish_task(dev, data, timeout=_PUBLISH_TIMEOUT_S)))

    # -- the generation ----------------------------------------------------------------
    def _size_context(self, cond: dict[str, Any], cfg_batch: int) -> dict[str, Any]:
        """The model's own context bytes per band (a run on zeros) and the padding factors
        that make each band's context SD1.5's (plan.bands)."""
        import torch

        from testbed.diffusion.patch import PatchLayout, band_profile
        from testbed.diffusion.stages import unet_conditioning

        m = self.job.model.model
        kw = unet_conditioning(cond, 1, cfg_batch == 2)
        full = torch.zeros(cfg_batch, *m.latent_shape)
        prof = band_profile(copy.deepcopy(m.unet), full, torch.tensor(999), kw, self.plan.n)
        self.layout = PatchLayout(m.latent_shape[1], self.plan.n)
        self.halo = tuple(prof["halo"])
        self.context.scale_up = [b.ctx_up_bytes / max(1, u) for b, u in zip(self.plan.bands, prof["up_bytes"])]
        self.context.scale_down = [b.ctx_down_bytes / max(1, d) for b, d in zip(self.plan.bands, prof["down_bytes"])]
        return prof

    async def generate(self) -> PatchOutcome:
        from testbed.diffusion.models import encode_prompt, initial_latent
        from testbed.diffusion.stages import num_schedule_steps

        plan, model = self.plan, self.job.model.model
        await self.wait_online(list(plan.selected))
        n = plan.steps
        self.steps.n_calls = num_schedule_steps(self.job.scheduler, n, model)
        latent = initial_latent(model, self.job.seed)
        cond = encode_prompt(model, self.job.prompt)
        cfg_batch = 2 if model.has_cfg and model.default_guidance_scale > 1.0 else 1
        prof = await asyncio.to_thread(self._size_context, cond, cfg_batch)
        await self.emit("run_started", relay_order=list(plan.selected), total_steps=n, plan=plan.to_json(),
                        bands=plan.n, halo_rows=list(self.halo), exchange_points=prof["points"])
        timeout_s = self.deadline_s(max(plan.t_sync_s, plan.t_displaced_s)) * 2 + 10
        out, latency, energy = await self.denoise(latent, cond, n, timeout_s, self.records)
        meta = {"bands": plan.n, "halo_rows": list(self.halo), "exchange_points": prof["points"],
                "context_real_bytes": {"up": prof["up_bytes"], "down": prof["down_bytes"]},
                "context_scale": {"up": self.context.scale_up, "down": self.context.scale_down}}
        return PatchOutcome(list(self.records), out, latency, energy, n, meta)

    async def step(self, x_in: Any, t: Any, kw: dict[str, Any]) -> Any:
        """One UNet evaluation, band by band over the network; the bands' outputs stacked."""
        import torch

        plan, s = self.plan, self.steps.calls
        self.steps.calls += 1
        mode = "sync" if s < plan.warmup_steps else "displaced"
        predicted_s = plan.t_sync_s if mode == "sync" else plan.t_displaced_s
        wait_s = self.deadline_s(predicted_s)
        x = x_in.detach().float()
        cond = {f"cond.{k}": to_numpy(v) for k, v in kw.items()}
        t_arr = np.asarray(t.detach().cpu().reshape(1).numpy(), dtype=np.int64)
        for i, dev in enumerate(plan.selected):
            band = plan.bands[i]
            meta = {"phase": "step", "mode": mode, "index": i, "n": plan.n,
                    "height": self.layout.height, "halo": list(self.halo), "share": plan.flop_share,
                    "ctx_scale": self.context.scale_up[i], "pad_to": band.noise_bytes,
                    "publish_ctx": mode == "sync" or s < self.steps.n_calls - 1, "wait_s": wait_s, "gen": self.gen}
            data = self.task(dev, stage=s, steps=(s, s + 1), total_steps=self.steps.n_calls, meta=meta,
                             tensors={"x": to_numpy(self.layout.extend(x, i, self.halo)), "t": t_arr, **cond},
                             pad_to_bytes=band.task_bytes)
            self.steps.sent(dev, s, len(data))
            self._publish(dev, data)
            await self.emit("stage_started", device=dev, stage=s, steps=[s, s + 1], band=i, mode=mode,
                            predicted=self._predicted(i))
        bands = await self._collect(s, wait_s)
        return torch.cat(bands, dim=-2)

    async def _collect(self, s: int, wait_s: float) -> list[Any]:
        """Every band's noise of step `s` (bounded), turned into records."""
        import torch

        plan = self.plan
        deadline = time.monotonic() + wait_s
        want = [(dev, s) for dev in plan.selected]
        while not all(k in self._noise for k in want):
            if self._failure is not None:
                raise self._failure
            left = deadline - time.monotonic()
            if left <= 0:
                late = [dev for dev, _ in want if (dev, s) not in self._noise]
                await self.emit("deadline_missed", device=late[0], stage=s)
                raise RunFailedError(f"patch step {s}: {', '.join(late)} missed the deadline ({wait_s:.1f} s); "
                                     "a band has no other owner (no takeover, docs/reliability.md); see the agent logs")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=min(left, 0.5))
            except TimeoutError:
                pass
        out = []
        for i, dev in enumerate(plan.selected):
            got = self._noise.pop((dev, s))
            rec = self._record(s, i, dev, got)
            self.records.append(rec)
            noise = got.msg.tensors.get("noise")
            rows = self.layout.band_rows
            if noise is None or noise.ndim != 4 or noise.shape[-2] != rows:
                raise RunFailedError(f"patch step {s}: {dev} sent a noise band of shape "
                                     f"{None if noise is None else list(noise.shape)}, expected {rows} rows")
            out.append(torch.from_numpy(np.array(noise, copy=True)))
            doc = rec.to_json()
            await self.emit("patch_step", device=dev, steps=doc["steps"], stage=s, band=i, mode=rec.mode,
                            t_down_s=rec.t_down_s, t_cmp_s=rec.t_cmp_s, t_up_s=rec.t_up_s, t_wait_s=rec.t_wait_s,
                            energy_j=rec.energy_j, bytes_up=rec.bytes_up, bytes_down=rec.bytes_down,
                            predicted=rec.predicted, record=doc)
        return out

    def _record(self, s: int, i: int, dev: str, got: _Noise) -> PatchStepRecord:
        meta = got.meta
        t_pub, task_wire = self.steps.t_pub.pop((dev, s)), self.steps.task_wire.pop((dev, s))
        ctx_down_wire, ctx_down_air = self.steps.context_received(dev, meta.ctx_received)
        wire_up, body_up, air_up = self.context.sent_by(dev, s)
        # the task queued behind the context relayed to this band before it: likewise
        before = [recv for _, _, recv in meta.ctx_received if recv <= meta.t_recv]
        t_down = (meta.t_recv - max([t_pub, *before])) + ctx_down_air
        # the noise queued behind the band's context: its own air time starts when that arrived
        t_up = (got.t_in - max(meta.t_send, self.context.last_in.get(dev, 0.0))) + air_up
        return PatchStepRecord(
            step=s, device=dev, band=i, mode=meta.mode, rows=list(meta.rows), halo_rows=list(self.halo),
            t_down_s=t_down, t_cmp_s=meta.t_cmp_s, t_up_s=t_up, t_wait_s=meta.wait_s,
            energy_j=self.power[dev].energy_j(t_down, meta.t_cmp_s, t_up), overrun_s=meta.overrun_s,
            cmp_real_s=meta.cmp_real_s, t_cmp_start=meta.t_cmp_start, t_cmp_end=meta.t_cmp_end,
            bytes_down=task_wire + ctx_down_wire, bytes_up=got.wire_bytes + int(wire_up),
            bytes_context_down=ctx_down_wire, bytes_context_up=int(wire_up), bytes_context_real_up=int(body_up),
            precision=meta.precision, predicted=self._predicted(i))

    def _predicted(self, i: int) -> dict[str, float]:
        """The plan's displaced-step terms for band i (modelled)."""
        b, band = self.plan.breakdown, self.plan.bands[i]
        t_down = b.get("t_task_down_s", 0.0) + b.get("t_ctx_down_s", 0.0)
        t_up = b.get("t_noise_up_s", 0.0) + b.get("t_ctx_up_s", 0.0)
        return {"t_down_s": t_down, "t_cmp_s": band.t_cmp_s, "t_up_s": t_up,
                "energy_j": self.power[band.device].energy_j(t_down, band.t_cmp_s, t_up)}


class _StepClock:
    """Each band's step tasks: when each went out and its wire size, and the context it
    has received (what its records are timed from)."""

    def __init__(self) -> None:
        self.calls = 0
        self.n_calls = 0
        self.t_pub: dict[tuple[str, int], float] = {}
        self.task_wire: dict[tuple[str, int], int] = {}
        self.last_recv: dict[str, float] = {}

    def sent(self, dev: str, s: int, wire_bytes: int) -> None:
        self.t_pub[(dev, s)] = time.time()
        self.task_wire[(dev, s)] = wire_bytes

    def context_received(self, dev: str, received: tuple[tuple[int, float, float], ...]) -> tuple[int, float]:
        """(wire bytes, air seconds) of the context `dev` received since its previous result:
        each message's air time starts at the later of its publish and the previous receipt."""
        wire_total, air = 0, 0.0
        prev = self.last_recv.get(dev, 0.0)
        for wire, pub, recv in received:
            wire_total += wire
            air += max(0.0, recv - max(pub, prev))
            prev = recv
        self.last_recv[dev] = prev
        return wire_total, air


class _ContextTally:
    """The context each band sent the server, per step (wire and real bytes, air time), and
    the padding factors that make each band's context SD1.5's."""

    def __init__(self) -> None:
        self.up: dict[tuple[str, int], list[float]] = {}
        self.last_in: dict[str, float] = {}
        self.scale_up: list[float] = []
        self.scale_down: list[float] = []

    def arrived(self, dev: str, stage: int, wire_bytes: int, body_bytes: int, t_send: float, t_in: float) -> None:
        acc = self.up.setdefault((dev, stage), [0.0, 0.0, 0.0])
        acc[0] += wire_bytes
        acc[1] += body_bytes
        acc[2] += max(0.0, t_in - max(t_send, self.last_in.get(dev, 0.0)))
        self.last_in[dev] = t_in

    def sent_by(self, dev: str, stage: int) -> tuple[float, float, float]:
        wire, body, air = self.up.pop((dev, stage), [0.0, 0.0, 0.0])
        return wire, body, air
