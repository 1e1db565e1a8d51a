"""Property-based fuzzing of every message a device can send (relay/messages.py) and of the
JSON readers beside the wire decoder (tests/test_fuzz_wire.py fuzzes wire.decode itself).

Each case is a status document, a result's meta for each method, a whole result message or
arbitrary bytes; the property: the parser returns a typed record whose every field is in
range, or raises BadMessage (a RelayError) — never another exception. The counts per test
are `examples(n)` (tests/fuzz_settings.py): n by default, n x TESTBED_FUZZ_SCALE in the
long run (docs/security.md, "Fuzzing")."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import RelayError
from testbed.relay import messages
from testbed.methods.multistage.messages import StageMeta, stage_meta
from testbed.methods.patch.messages import PatchContextMeta, PatchNoiseMeta, patch_meta
from testbed.methods.patch.wire import check_step_meta, json_object
from testbed.methods.split.messages import SplitMeta, split_meta
from testbed.relay.messages import BadMessage, Status, parse_result, parse_result_meta, parse_status
from testbed.relay.wire import MAGIC, Message, TensorSpec, encode, peek_meta
from fuzz_settings import examples

DEV = "dev01"
#: each method's meta parser (its folder's messages.py)
PARSERS = {"multistage": stage_meta, "split": split_meta, "patch": patch_meta}
RUN = "tfz2"
T0 = 1_796_554_339.25  # an epoch time of this decade

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)

VALID_STATUS = {"state": "computing", "device": DEV, "pid": 4242, "ts": T0, "stage": 1, "attempt": 1, "steps": [5, 10],
                "t_recv": T0 - 0.2}
VALID_META = {
    "multistage": {"sched": {"next_step": 10, "kind": "ddim", "sigmas": [0.1, 0.2]}, "scheduler": "ddim",
                   "t_recv": T0, "t_cmp_start": T0 + 0.01, "t_cmp_end": T0 + 0.5, "cmp_real_s": 0.05,
                   "cmp_profile_s": 0.5, "overrun_s": 0.0, "compute": "profile", "model": "tiny", "precision": "fp32",
                   "compute_dtype": "float32", "threads": 1, "task": "n1/1/1", "t_send": T0 + 0.51},
    "split": {"role": "head", "t_recv": T0, "t_cmp_start": T0 + 0.01, "cmp_real_s": 0.02, "cmp_profile_s": 0.1,
              "overrun_s": 0.0, "precision": "fp16", "t_send": T0 + 0.1},
    "patch": {"phase": "noise", "index": 1, "gen": "g1", "mode": "sync", "t_recv": T0, "t_cmp_start": T0 + 0.01,
              "t_cmp_end": T0 + 0.3, "t_cmp_s": 0.29, "wait_s": 0.01, "cmp_real_s": 0.05, "cmp_profile_s": 0.3,
              "overrun_s": 0.0, "ctx_sent_wire": 1000, "ctx_sent_body": 800, "ctx_received": [[900, T0 + 0.1, T0 + 0.12]],
              "rows": [8, 16], "halo": [1, 1], "precision": "int8", "t_send": T0 + 0.31},
}


def _finite_fields(record) -> None:
    for k, v in record.__dict__.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)


def _check_status(payload: bytes) -> None:
    try:
        s = parse_status(DEV, payload)
    except BadMessage as e:
        assert e.device == DEV and e.what == "status" and e.reason
        return
    assert isinstance(s, Status) and s.state in messages.STATES and s.device == DEV
    _finite_fields(s)
    assert s.state != "computing" or s.stage is not None
    assert s.t_recv is None or 1e9 <= s.t_recv <= 1e10


def _check_meta(method: str, meta) -> None:
    try:
        m = parse_result_meta(DEV, PARSERS[method], meta)
    except BadMessage as e:
        assert e.device == DEV and e.what == "result"
        return
    _finite_fields(m)
    if isinstance(m, (StageMeta, SplitMeta, PatchNoiseMeta)):
        assert 1e9 <= m.t_recv <= m.t_send <= 1e10 and 0 <= m.overrun_s <= 86_400 and 0 <= m.cmp_real_s <= 86_400
    if isinstance(m, PatchNoiseMeta):
        assert m.t_cmp_start <= m.t_cmp_end and m.rows[0] <= m.rows[1] and 0 <= m.index <= 63
        assert all(w >= 0 and pub <= recv for w, pub, recv in m.ctx_received)
    if isinstance(m, StageMeta):
        assert isinstance(m.sched, dict) and len(m.sched) <= 64
    if isinstance(m, PatchContextMeta):
        assert 1e9 <= m.t_send <= 1e10


# -- statuses ------------------------------------------------------------------------------
@examples(100)
@given(st.binary(max_size=5000))
def test_status_from_arbitrary_bytes(payload):
    _check_status(payload)


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
@examples(200)
@given(st.dictionaries(st.sampled_from([*VALID_STATUS, "x"]), json_values, max_size=10))
def test_status_from_arbitrary_documents(doc):
    _check_status(json.dumps(doc).encode())


@examples(200)
@given(st.sampled_from(sorted(VALID_STATUS)), json_values)
def test_status_with_one_field_changed(key, value):
    _check_status(json.dumps(dict(VALID_STATUS, **{key: value})).encode())


@examples(50)
@given(st.integers(min_value=1, max_value=300_000), st.sampled_from(["[", '{"a":', '{"state":"online","x":[']))
def test_deeply_nested_json_is_refused_without_recursion(depth, opener):
    payload = (opener * depth).encode()
    _check_status(payload)
    assert json_object(payload) == {} or depth == 1
    assert peek_meta(MAGIC + struct.pack(">I", len(payload[:60000])) + payload[:60000]) == {}


def test_the_issues_two_payloads_are_clean_rejections():
    with pytest.raises(BadMessage, match=r"rejected status of dev01: t_recv must be a number"):
        parse_status(DEV, b'{"state": "computing", "stage": 1, "attempt": 1, "t_recv": "abc"}')
    with pytest.raises(BadMessage, match="100000 bytes"):
        parse_status(DEV, b"[" * 100_000)
    with pytest.raises(BadMessage, match="nested deeper than 8"):
        parse_status(DEV, b"[" * 4000)
    with pytest.raises(BadMessage, match="not JSON"):
        parse_status(DEV, b'{"state": "online", "ts": NaN}')
    assert parse_status(DEV, json.dumps(VALID_STATUS).encode()).t_recv == T0 - 0.2


# -- result metas, each method ------------------------------------------------------------
@examples(400)
@given(st.sampled_from(sorted(VALID_META)), st.data())
def test_result_meta_with_one_field_changed(method, data):
    meta = dict(VALID_META[method])
    key = data.draw(st.sampled_from([*sorted(meta), "phase", "role", "extra"]))
    meta[key] = data.draw(json_values)
    _check_meta(method, meta)


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
@examples(200)
@given(st.sampled_from(sorted(VALID_META)), st.dictionaries(st.text(max_size=12), json_values, max_size=12))
def test_result_meta_arbitrary(method, meta):
    _check_meta(method, meta)


@examples(100)
@given(st.lists(st.lists(json_values, max_size=4) | json_values, max_size=6))
def test_patch_context_lists(received):
    _check_meta("patch", dict(VALID_META["patch"], ctx_received=received))


def test_valid_metas_parse_and_keep_their_values():
    m = parse_result_meta(DEV, PARSERS["multistage"], VALID_META["multistage"])
    assert isinstance(m, StageMeta) and m.task == "n1/1/1" and m.t_send - m.t_recv == pytest.approx(0.51)
    p = parse_result_meta(DEV, PARSERS["patch"], VALID_META["patch"])
    assert isinstance(p, PatchNoiseMeta) and p.ctx_received == ((900, T0 + 0.1, T0 + 0.12),) and p.rows == (8, 16)
    c = parse_result_meta(DEV, PARSERS["patch"], {"phase": "context", "index": 0, "gen": "g1", "t_send": T0})
    assert isinstance(c, PatchContextMeta)
    with pytest.raises(BadMessage, match="t_send .* is before t_recv"):
        parse_result_meta(DEV, PARSERS["split"], dict(VALID_META["split"], t_send=T0 - 1))


def test_a_context_received_a_clock_error_before_it_was_published_counts_no_air_time_and_no_more():
    """Publisher and receiver are two devices: on a Swarm cell two hosts' clocks, disciplined
    to within milliseconds (a transfer through the broker can be shorter). 1 ms early is that;
    1 s early is a lie about the timestamps."""
    from testbed.methods.patch.messages import CROSS_CLOCK_SLACK_S

    early = dict(VALID_META["patch"], ctx_received=[[900, T0 + 0.1, T0 + 0.099]])
    p = parse_result_meta(DEV, PARSERS["patch"], early)
    assert p.ctx_received == ((900, T0 + 0.1, T0 + 0.1),)  # received = published: no air time
    lie = dict(VALID_META["patch"], ctx_received=[[900, T0 + 0.1, T0 + 0.1 - 1.0]])
    with pytest.raises(BadMessage, match=rf"received .* is before published .* by more than {CROSS_CLOCK_SLACK_S:g} s"):
        parse_result_meta(DEV, PARSERS["patch"], lie)


# -- whole results through the wire decoder -----------------------------------------------
LAT = TensorSpec("float32", (1, 1, 4, 4))


def _result(method: str, meta: dict) -> bytes:
    msg = Message(kind="result", run=RUN, device=DEV, stage=1, attempt=1, steps=(5, 10), total_steps=10,
                  tensors={"latent": np.ones((1, 1, 4, 4), np.float32)}, meta={})
    raw = encode(msg, pad_to_bytes=1024)
    hlen = struct.unpack(">I", raw[4:8])[0]
    header = json.loads(raw[8:8 + hlen])
    header["meta"] = meta
    body = raw[8 + hlen:8 + hlen + header["body_bytes"]]
    header["pad_bytes"] = 0  # the padding dropped: the lengths still add up
    new = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(new)) + new + bytes(body)


@examples(200)
@given(st.sampled_from(sorted(VALID_META)), st.sampled_from(["t_recv", "t_send", "sched", "ctx_received", "rows",
                                                              "role", "phase", "task", "index"]), json_values)
def test_results_end_to_end(method, key, value):
    payload = _result(method, dict(VALID_META[method], **{key: value}))
    try:
        r = parse_result(DEV, payload, meta=PARSERS[method], run=RUN, max_bytes=8192, total_steps=10, expect={"latent": LAT},
                         max_tensor_bytes=1024)
    except BadMessage as e:
        assert e.device == DEV
        return
    assert r.message.device == DEV and r.message.tensors["latent"].shape == (1, 1, 4, 4)
    _finite_fields(r.meta)


@examples(100)
@given(st.binary(max_size=3000))
def test_results_from_arbitrary_bytes(payload):
    with pytest.raises(BadMessage):
        parse_result(DEV, MAGIC + payload, meta=stage_meta, run=RUN, max_bytes=8192)


# -- the server's step task as a patch device reads it (patch_wire) -----------------------
STEP = {"gen": "g1", "mode": "sync", "n": 2, "index": 1, "height": 8, "halo": [1, 1], "share": 0.5, "ctx_scale": 3.0,
        "pad_to": 1000, "publish_ctx": True, "wait_s": 5.0}


@examples(150)
@given(st.sampled_from(sorted(STEP)), json_values)
def test_patch_step_task_fields(key, value):
    meta = dict(STEP, **{key: value})
    try:
        check_step_meta(meta, 1 << 20)
    except RelayError:
        return
    assert 0 <= meta["index"] < meta["n"] <= 64 and 0 < meta["share"] <= 1 and 0 < meta["wait_s"] <= 3600
