"""The patch handler of a device's agent, without a broker: what it accepts, what it sends,
how it keeps time (`compute: profile`), and that contexts of another generation are not used."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from testbed.relay.agent import AgentConfig
from testbed.methods.patch.agent import PatchHandler
from testbed.methods.patch.messages import patch_meta
from testbed.relay.messages import Fields
from testbed.relay.wire import Message, decode, encode

RUN = "tpa1"
MAX = 1 << 22


class FakeModel:
    """One exchange point, "p"; the band's output is its input plus what the other band gave."""

    class punet:  # noqa: N801 - what the agent reads: the exchange points
        points = ["p"]

    def __init__(self, compute_s: float = 0.0):
        self.compute_s = compute_s

    def forward(self, x, t, cond, index, height, n, exchange):
        time.sleep(self.compute_s)
        got = exchange.exchange("p", {"all": torch.full((2, 3), float(index))})
        other = got[1 - index]["all"] if n == 2 else torch.zeros(2, 3)
        return np.asarray(x, dtype=np.float32) + float(other.sum())


class FakeClient:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic, payload, qos=0, timeout=None):
        self.sent.append((topic, bytes(payload)))


def _cfg(**kw) -> AgentConfig:
    return AgentConfig(run=RUN, device="dev01", broker_host="127.0.0.1", broker_port=1, username="u", password="p",
                       max_message_bytes=MAX, **kw)


def _step(gen: str = "g1", stage: int = 0, mode: str = "sync", **meta) -> bytes:
    m = {"method": "patch", "phase": "step", "mode": mode, "index": 0, "n": 2, "height": 8, "halo": [1, 1],
         "share": 0.3, "ctx_scale": 10.0, "pad_to": 4096, "publish_ctx": True, "wait_s": 5.0, "gen": gen} | meta
    msg = Message(kind="task", run=RUN, device="dev01", stage=stage, attempt=1, steps=(stage, stage + 1),
                  total_steps=4, tensors={"x": np.zeros((2, 1, 6, 8), np.float32), "t": np.array([9], np.int64)},
                  meta=m)
    return bytes(encode(msg))


def _context(gen: str, stage: int, value: float) -> bytes:
    msg = Message(kind="task", run=RUN, device="dev01", stage=stage, attempt=1, steps=(stage, stage + 1),
                  total_steps=4, tensors={"p|all": np.full((2, 3), value, np.float32)},
                  meta={"method": "patch", "phase": "context", "from": 1, "gen": gen, "t_pub": time.time()})
    return bytes(encode(msg))


async def _finish(agent: PatchHandler) -> None:
    await asyncio.wait_for(asyncio.gather(*agent.steps), timeout=30)


def _sent(client: FakeClient) -> list[Message]:
    return [decode(p, max_bytes=MAX, run=RUN, kind="result", device="dev01") for _, p in client.sent
            if p[:4] == b"TBR1"]


async def test_a_step_sends_its_context_then_its_band_on_the_profiles_time():
    agent, client = PatchHandler(_cfg(compute="profile", step_time_s=1.0), FakeModel(0.05)), FakeClient()
    await agent.handle(client, _context("g1", 0, 2.0))  # the other band was faster
    t0 = time.time()
    await agent.handle(client, _step())
    await _finish(agent)
    ctx, noise = _sent(client)
    assert ctx.meta["phase"] == "context" and set(ctx.tensors) == {"p|all"} and ctx.meta["gen"] == "g1"
    assert ctx.wire_bytes >= 10 * 24  # padded by ctx_scale (SD1.5's bytes over the model's)
    assert noise.meta["phase"] == "noise" and noise.wire_bytes == 4096
    assert float(noise.tensors["noise"].max()) == pytest.approx(12.0)  # its input + the other band's context
    assert noise.meta["t_cmp_s"] == pytest.approx(0.3, abs=0.08)  # share 0.3 of a 1 s step, from receipt
    assert noise.meta["wait_s"] == 0.0 and noise.meta["cmp_real_s"] < 0.3 and noise.meta["overrun_s"] == 0.0
    assert time.time() - t0 >= 0.3 and noise.meta["rows"] == [0, 4]
    # what the server reads of it (its typed door): the context received, bytes as an integer
    parsed = patch_meta(Fields("dev01", "result", noise.meta))
    assert [wire for wire, _, _ in parsed.ctx_received] == [len(_context("g1", 0, 2.0))]


async def test_context_of_another_generation_is_not_used():
    agent, client = PatchHandler(_cfg(compute="real"), FakeModel()), FakeClient()
    await agent.handle(client, _context("old", 0, 5.0))  # a previous generation on the same agent
    await agent.handle(client, _step(gen="new", wait_s=0.3))
    await _finish(agent)
    assert [m.meta["phase"] for m in _sent(client)] == ["context"]  # it waited for "new", then gave up
    await agent.handle(client, _context("new", 0, 1.0))
    await agent.handle(client, _step(gen="new"))
    await _finish(agent)
    noise = _sent(client)[-1]
    assert float(noise.tensors["noise"].max()) == pytest.approx(6.0)  # 6 x 1.0, not 6 x 5.0
    assert not any(k[0] == "old" for k in agent.store)


async def test_bad_messages_are_dropped_and_counted():
    agent, client = PatchHandler(_cfg(compute="real"), FakeModel(0.3)), FakeClient()
    for bad in (_step(mode="bogus"), _step(share=2), _step(gen=""), b"junk"):
        await agent.handle(client, bad)
    ctx = Message(kind="task", run=RUN, device="dev01", stage=0, attempt=1, steps=(0, 1), total_steps=4,
                  tensors={"p|left": np.zeros(2, np.float32)}, meta={"phase": "context", "from": 1, "gen": "g",
                                                                     "t_pub": 0.0})
    await agent.handle(client, bytes(encode(ctx)))
    assert agent.rejected == 5 and client.sent == []
    await agent.handle(client, _context("g1", 0, 1.0))
    await agent.handle(client, _step())
    await agent.handle(client, _step(stage=1))  # while step 0 computes
    assert agent.rejected == 6
    await _finish(agent)
