"""The split agent's timing (no broker): in `compute: profile` a segment takes its share of
the profile's step time from the task's receipt — decoding included, as the multi-stage
agent does — and work beyond it is recorded as overrun."""

from __future__ import annotations

import time

import numpy as np
import pytest

from testbed.methods.split import agent as split_agent
from testbed.relay.agent import AgentConfig
from testbed.methods.split.agent import SplitHandler
from testbed.relay.wire import Message, decode, encode

RUN = "tsa1"


class FakeModel:
    def __init__(self, compute_s: float):
        self.compute_s = compute_s

    def head(self, tensors):
        time.sleep(self.compute_s)
        return {"sample": np.ones((1, 4, 2, 2), np.float32), "emb": np.ones((1, 8), np.float32)}


class FakeClient:
    def __init__(self):
        self.sent: list[bytes] = []

    async def publish(self, topic, payload, qos=0):
        self.sent.append(bytes(payload))


def _task(share: float) -> bytearray:
    msg = Message(kind="task", run=RUN, device="dev01", stage=0, attempt=1, steps=(0, 1), total_steps=4,
                  tensors={"x_in": np.zeros((2, 1, 8, 8), np.float32), "t": np.array([999], np.int64)},
                  meta={"role": "head", "share": share, "pad_to": 4096})
    return encode(msg, pad_to_bytes=8192)


async def _serve_one(monkeypatch, decode_s: float, compute_s: float) -> dict:
    def slow_decode(*a, **kw):  # a large feature message takes its time to decode
        time.sleep(decode_s)
        return decode(*a, **kw)

    monkeypatch.setattr(split_agent, "decode", slow_decode)
    cfg = AgentConfig(run=RUN, device="dev01", broker_host="127.0.0.1", broker_port=1, username="u", password="p",
                      compute="profile", step_time_s=2.0, max_message_bytes=1 << 20)
    client = FakeClient()
    await SplitHandler(cfg, FakeModel(compute_s), roles=("head",)).handle(client, bytes(_task(share=0.3)))
    assert len(client.sent) == 1
    res = decode(client.sent[0], max_bytes=1 << 20, run=RUN, kind="result", device="dev01")
    assert len(client.sent[0]) == 4096 and set(res.tensors) == {"sample", "emb"}
    return res.meta


async def test_padding_counts_from_receipt_with_decoding_inside(monkeypatch):
    meta = await _serve_one(monkeypatch, decode_s=0.3, compute_s=0.05)
    took = meta["t_send"] - meta["t_recv"]
    assert meta["cmp_profile_s"] == pytest.approx(0.6)  # share 0.3 of a 2 s step
    assert meta["t_cmp_start"] - meta["t_recv"] >= 0.3  # the decode came first ...
    assert 0.6 <= took < 0.85  # ... inside the profile's 0.6 s, not on top of it (0.9 s)
    assert meta["overrun_s"] == 0.0 and 0.05 <= meta["cmp_real_s"] < 0.3


async def test_work_beyond_the_profile_is_overrun(monkeypatch):
    meta = await _serve_one(monkeypatch, decode_s=0.3, compute_s=0.45)
    took = meta["t_send"] - meta["t_recv"]
    assert took >= 0.75 and meta["overrun_s"] == pytest.approx(took - 0.6, abs=0.05)
