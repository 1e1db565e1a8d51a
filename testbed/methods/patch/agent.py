"""The patch-parallel task handler of a device's agent (`meta.method` "patch").

The device's one agent (relay/agent.py) hands it every patch message on its task topic
(patch_wire.py): a step task starts the band's UNet call in a worker thread and returns at
once, so that the context messages of the other bands, which arrive while it computes, are
stored as they come. At every exchange point the band's own context goes up (a synchronous
step: at once, then it waits for the other bands' context of this step; a displaced step: a
UNet block's points together, and it reads the other bands' context of the previous step).
When the band is done, its noise prediction goes up, with the step's timings.

In `compute: profile` the band's computation takes `meta.share` of the profile's step
time, counted from the task's receipt with decoding inside (as the split agent does) and
spread evenly over the exchange points, so that the context leaves while the emulated
device computes; time spent waiting for other bands is not compute. Work slower than the
profile is recorded as overrun, never hidden.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.errors import RelayError
from testbed.relay import topics
from testbed.relay.agent import Agent, AgentConfig, status_doc
from testbed.methods.patch.wire import check_step_meta, ctx_name, group_of, padded_size, parse_ctx_name
from testbed.relay.stage import to_numpy
from testbed.relay.wire import Message, decode, encode

__all__ = ["PatchModel", "PatchHandler", "task_handler"]

log = logging.getLogger("testbed.patch_agent")
_HEADROOM = 64 * 1024  # a context message's padding stays this far below the size limit
_PUBLISH_TIMEOUT_S = 120.0  # a large context waits behind the others on a slow link


class PatchModel:
    """A device's local model variant with the patch layers (diffusion.patch.PatchUNet)."""

    def __init__(self, model: Any):
        from testbed.diffusion.patch import PatchUNet

        self.model = model
        self.punet = PatchUNet(model.unet)  # a copy: the patch layers replace modules, multi-stage keeps its own

    def forward(self, x: np.ndarray, t: np.ndarray, cond: dict[str, np.ndarray], index: int, height: int, n: int,
                exchange: Any) -> np.ndarray:
        import torch

        from testbed.diffusion.patch import PatchLayout

        dtype = self.model.compute_dtype
        layout = PatchLayout(height, n)
        layout.check(self.punet.unet)
        kw = {}
        for k, v in cond.items():
            c = torch.from_numpy(np.array(v, copy=True))
            kw[k] = c.to(dtype) if c.is_floating_point() else c
        x_t = torch.from_numpy(np.array(x, copy=True)).to(dtype)
        t_t = torch.from_numpy(np.array(t, copy=True)).reshape(())
        out = self.punet.forward(x_t, t_t, kw, index, layout, exchange)
        return out.float().numpy()


@dataclass
class _Step:
    """One band's step in flight: its exchange state and its clock."""

    gen: str  # the generation (the orchestrator's run of the method) the step belongs to
    stage: int
    index: int
    n: int
    mode: str
    publish: bool
    t_recv: float
    profile_s: float | None
    points: int
    scale: float
    wait_s: float
    total_steps: int
    waited_s: float = 0.0
    paced_s: float = 0.0
    k: int = 0
    group: str | None = None
    pending: dict[str, np.ndarray] = field(default_factory=dict)
    sent_wire: int = 0
    sent_body: int = 0
    publishes: list[concurrent.futures.Future] = field(default_factory=list)


class PatchHandler:
    """The state of the patch method on one device: contexts received, the step in flight."""

    def __init__(self, cfg: AgentConfig, model: Any, loop: asyncio.AbstractEventLoop | None = None):
        self.cfg = cfg
        self.model = model
        self.loop = loop
        self.rejected = 0
        self.served = 0
        # (generation, stage, point, band) -> parts: a cell's agents serve generation after generation
        self.store: dict[tuple[str, int, str, int], dict[str, np.ndarray]] = {}
        self.received: list[list[int | float]] = []  # [wire bytes, t_pub, t_recv] of contexts not yet reported
        self.arrived = asyncio.Event()
        self.steps: set[asyncio.Task] = set()  # steps not yet finished (the last one may be sending)
        self.computing: int | None = None  # the step whose band is being computed
        self._result = topics.result(cfg.run, cfg.device)
        self._status = topics.status(cfg.run, cfg.device)

    async def handle(self, client: Any, payload: bytes) -> None:
        t_recv = time.time()
        self.loop = asyncio.get_running_loop()
        try:
            msg = decode(payload, max_bytes=self.cfg.max_message_bytes, run=self.cfg.run, kind="task",
                         device=self.cfg.device, max_tensor_bytes=self.cfg.max_message_bytes)
            phase = msg.meta.get("phase")
            if phase == "context":
                self._store(msg, len(payload), t_recv)
                return
            if phase != "step":
                raise RelayError(f"rejected relay message: meta.phase {phase!r} (step or context)")
            check_step_meta(msg.meta, self.cfg.max_message_bytes)
            if not {"x", "t"} <= set(msg.tensors):
                raise RelayError("rejected relay message: a step task needs tensors 'x' and 't'")
            if self.computing is not None:
                raise RelayError(f"rejected relay message: step {msg.stage} while step {self.computing} computes")
        except RelayError as e:
            self.rejected += 1
            log.error("%s (%d bytes); dropped, still serving", e, len(payload))
            return
        self.computing = msg.stage
        task = asyncio.ensure_future(self._run_step(client, msg, t_recv))
        self.steps.add(task)
        task.add_done_callback(self.steps.discard)

    def _store(self, msg: Message, wire_bytes: int, t_recv: float) -> None:
        sender, t_pub, gen = msg.meta.get("from"), msg.meta.get("t_pub"), msg.meta.get("gen")
        if type(sender) is not int or not isinstance(t_pub, (int, float)) or not isinstance(gen, str):
            raise RelayError("rejected relay message: a context needs meta.from (band), meta.t_pub and meta.gen")
        by_point: dict[str, dict[str, np.ndarray]] = {}
        for name, arr in msg.tensors.items():
            key, part = parse_ctx_name(name)
            by_point.setdefault(key, {})[part] = np.array(arr, copy=True)  # not a view: the padding goes
        for key, parts in by_point.items():  # one assignment each: the worker thread reads the store
            k = (gen, msg.stage, key, sender)
            self.store[k] = self.store.get(k, {}) | parts
        self.received.append([int(wire_bytes), float(t_pub), t_recv])  # the server reads bytes as an integer
        self.arrived.set()

    async def wait_context(self, gen: str, stage: int, key: str, senders: list[int], timeout_s: float) -> list[dict]:
        """The context of `senders` at point `key` of step `stage`, when all of it is here."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [j for j in senders if (gen, stage, key, j) not in self.store]
            if not missing:
                return [self.store[(gen, stage, key, j)] for j in senders]
            left = deadline - time.monotonic()
            if left <= 0:
                raise RelayError(f"step {stage}: no context of bands {missing} at {key} within {timeout_s:g} s")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass

    async def _run_step(self, client: Any, task: Message, t_recv: float) -> None:
        meta = task.meta
        st = _Step(gen=meta["gen"], stage=task.stage, index=meta["index"], n=meta["n"], mode=meta["mode"],
                   publish=meta["publish_ctx"], t_recv=t_recv,
                   profile_s=self.cfg.step_time_s * float(meta["share"]) if self.cfg.compute == "profile" else None,
                   points=len(self.model.punet.points), scale=float(meta["ctx_scale"]), wait_s=float(meta["wait_s"]),
                   total_steps=task.total_steps)
        for old in [k for k in self.store if k[0] != st.gen or k[1] < task.stage - 1]:  # nobody reads those
            del self.store[old]
        status = asyncio.ensure_future(client.publish(self._status, status_doc(
            self.cfg.device, "computing", stage=task.stage, t_recv=t_recv), qos=1))
        cond = {k[5:]: v for k, v in task.tensors.items() if k.startswith("cond.")}
        exchange = _NetExchange(self, client, st)
        t0 = time.time()

        def compute() -> tuple[np.ndarray, float, float]:  # on a worker thread
            out = self.model.forward(task.tensors["x"], task.tensors["t"], cond, st.index, meta["height"], st.n,
                                     exchange)
            exchange.flush()
            real_s = time.time() - t0 - st.waited_s - st.paced_s  # the model's own work, encoding included
            return out, real_s, exchange.pace_to(1.0)  # the rest of the profile's time

        try:
            noise, real_s, overrun = await asyncio.to_thread(compute)
        except Exception as e:  # noqa: BLE001 - a failed step must not kill the agent; the server times out
            log.exception("step %d band %d failed: %s", task.stage, st.index, e)
            return
        finally:
            self.computing = None  # the next step may come as soon as the noise is out
            await status
        t_end = time.time()  # the context may still be on its way: the noise queues behind it
        rows = meta["height"] // st.n
        received, self.received = self.received, []
        out = {"noise": np.ascontiguousarray(noise, dtype=np.float32)}
        meta_out = {
            "phase": "noise", "index": st.index, "gen": st.gen, "mode": st.mode, "t_recv": t_recv, "t_cmp_start": t0,
            "t_cmp_end": t_end, "t_cmp_s": t_end - t_recv - st.waited_s, "wait_s": st.waited_s,
            "cmp_real_s": real_s, "cmp_profile_s": st.profile_s, "overrun_s": overrun,
            "ctx_sent_wire": st.sent_wire, "ctx_sent_body": st.sent_body, "ctx_received": received,
            "rows": [st.index * rows, (st.index + 1) * rows], "halo": meta["halo"], "precision": self.cfg.precision,
        }
        meta_out["t_send"] = time.time()
        msg = Message(kind="result", run=task.run, device=self.cfg.device, stage=task.stage, attempt=task.attempt,
                      steps=task.steps, total_steps=task.total_steps, tensors=out, meta=meta_out)
        await client.publish(self._result, encode(msg, pad_to_bytes=meta["pad_to"]), qos=1, timeout=_PUBLISH_TIMEOUT_S)
        for fut in st.publishes:
            try:
                await asyncio.wrap_future(fut)
            except Exception as e:  # noqa: BLE001 - the other bands will miss it and the server says so
                log.error("step %d band %d: a context message failed: %s", task.stage, st.index, e)
        self.served += 1
        log.info("step %d band %d (%s): compute %.3f s (real %.3f), waited %.3f s, context sent %d bytes",
                 task.stage, st.index, st.mode, meta_out["t_cmp_s"], meta_out["cmp_real_s"], st.waited_s, st.sent_wire)

    def publish_context(self, client: Any, st: _Step, tensors: dict[str, np.ndarray]) -> None:
        """(worker thread) Encode one context message and hand it to the event loop."""
        limit = self.cfg.max_message_bytes - _HEADROOM
        msg = Message(kind="result", run=self.cfg.run, device=self.cfg.device, stage=st.stage, attempt=1,
                      steps=(st.stage, st.stage + 1), total_steps=st.total_steps, tensors=tensors,
                      meta={"phase": "context", "index": st.index, "gen": st.gen, "t_send": time.time()})
        data = encode(msg, pad_to_bytes=padded_size(tensors, st.scale, limit))
        st.sent_wire += len(data)
        st.sent_body += msg.body_bytes
        assert self.loop is not None
        st.publishes.append(asyncio.run_coroutine_threadsafe(
            client.publish(self._result, data, qos=1, timeout=_PUBLISH_TIMEOUT_S), self.loop))


class _NetExchange:
    """diffusion.patch's Exchange over MQTT, called on the worker thread of one step."""

    def __init__(self, agent: PatchHandler, client: Any, st: _Step):
        self.agent, self.client, self.st = agent, client, st

    def pace_to(self, fraction: float) -> float:
        """(worker thread) Sleep until the band's compute clock reaches `fraction` of the
        profile's time; return how far past the whole profile's time the work already is."""
        st = self.st
        if st.profile_s is None:
            return 0.0
        clock = time.time() - st.t_recv - st.waited_s
        target = st.profile_s * fraction
        if clock < target:
            time.sleep(target - clock)
            st.paced_s += target - clock
            return 0.0
        return max(0.0, clock - st.profile_s) if fraction >= 1.0 else 0.0

    def flush(self) -> None:
        """(worker thread) Send the context gathered since the last message."""
        if self.st.pending:
            self.agent.publish_context(self.client, self.st, self.st.pending)
            self.st.pending = {}

    def exchange(self, key: str, mine: dict[str, Any]) -> list[dict[str, Any]]:
        import torch

        from testbed.diffusion.patch import receivers

        st = self.st
        st.k += 1
        self.pace_to(st.k / (st.points + 1))
        if st.publish:
            group = key if st.mode == "sync" else group_of(key)
            if st.group is not None and group != st.group:
                self.flush()
            st.group = group
            for part, t in mine.items():
                if receivers(part, st.index, st.n):
                    st.pending[ctx_name(key, part)] = to_numpy(t)
            if st.mode == "sync":
                self.flush()
        senders = sorted({j for j in range(st.n) if j != st.index
                          for part in mine if st.index in receivers(part, j, st.n)})
        stage = st.stage if st.mode == "sync" else st.stage - 1
        got: list[dict[str, Any]] = [{} for _ in range(st.n)]
        got[st.index] = mine
        if senders:
            store = self.agent.store  # filled on the event loop; a present entry is complete
            parts = [store.get((st.gen, stage, key, j)) for j in senders]
            if any(p is None for p in parts):  # not here yet: wait on the event loop
                assert self.agent.loop is not None
                t0 = time.time()
                fut = asyncio.run_coroutine_threadsafe(
                    self.agent.wait_context(st.gen, stage, key, senders, st.wait_s), self.agent.loop)
                parts = fut.result(timeout=st.wait_s + 5)
                st.waited_s += time.time() - t0
            for j, p in zip(senders, parts):
                got[j] = {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in p.items()}
        return got


def task_handler(agent: Agent) -> PatchHandler:
    """The patch method's handler inside a device's agent: the device's model with the
    patch layers on a copy of its UNet, made on the first patch message."""
    return PatchHandler(agent.cfg, PatchModel(agent.model.model))
