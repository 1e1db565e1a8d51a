"""Relay wire format: round trips, padding accounting, and a decoder that rejects everything else."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.errors import RelayError
from testbed.relay.stage import pack_task_tensors, unpack_task_tensors
from testbed.relay.wire import MAGIC, Message, TensorSpec, decode, encode, split_state

RUN = "tw1"
LAT = TensorSpec("float32", (1, 1, 8, 8))


def _msg(**kw) -> Message:
    base = dict(kind="task", run=RUN, device="dev01", stage=0, attempt=1, steps=(0, 5), total_steps=10,
                tensors={"latent": np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8),
                         "cond.class_labels": np.array([7], dtype=np.int64)},
                meta={"scheduler": "ddim", "sched": {"next_step": 0}})
    base.update(kw)
    return Message(**base)


def _dec(data: bytes, **kw):
    args = dict(max_bytes=1 << 20, run=RUN, kind="task", device="dev01", total_steps=10, expect={"latent": LAT})
    args.update(kw)
    return decode(data, **args)


def test_round_trip_and_padding_to_payload_bytes():
    m = _msg()
    data = encode(m, pad_to_bytes=262144)
    assert len(data) == 262144 == m.wire_bytes
    assert m.pad_bytes > 0 and m.pad_bytes + m.body_bytes < 262144
    got = _dec(data)
    assert got.steps == (0, 5) and got.stage == 0 and got.attempt == 1 and got.device == "dev01"
    np.testing.assert_array_equal(got.tensors["latent"], m.tensors["latent"])
    assert got.tensors["cond.class_labels"].tolist() == [7]
    assert got.pad_bytes == m.pad_bytes and got.wire_bytes == 262144


@pytest.mark.parametrize("digits", [2, 3, 4, 5, 6])
def test_padding_hits_every_target_across_a_digit_boundary(digits):
    # pad_bytes lives in the header: one digit more can cross an 8-byte alignment step and
    # take the digit away again (a patch context of 13,509 bytes came out 8 bytes long)
    for meta_len in range(8):  # the header's length modulo 8
        m = _msg(meta={"scheduler": "ddim", "x": "y" * meta_len})
        base = len(encode(m))
        for target in range(base + 10**digits - 24, base + 10**digits + 24):
            data = encode(m, pad_to_bytes=target)
            assert len(data) == target == m.wire_bytes
            assert _dec(data).pad_bytes == m.pad_bytes


def test_message_larger_than_payload_is_not_truncated():
    m = _msg(tensors={"latent": np.zeros((1, 1, 8, 8), np.float32), "big": np.zeros(100_000, np.float32)})
    data = encode(m, pad_to_bytes=1000)
    assert m.pad_bytes == 0 and len(data) > 400_000
    assert _dec(data).tensors["big"].shape == (100_000,)


def test_scheduler_state_tensors_and_scalars_survive():
    state = {"scheduler": "dpm", "next_step": 5, "total_steps": 10, "lower_order_nums": 1,
             "model_outputs.0": np.ones((1, 1, 8, 8), np.float32)}
    tensors, scalars = pack_task_tensors(np.zeros((1, 1, 8, 8), np.float32), {"class_labels": np.array([3])}, state)
    m = _msg(tensors=tensors, meta={"sched": scalars})
    got = _dec(encode(m, pad_to_bytes=4096))
    latent, cond, state2 = unpack_task_tensors(got.tensors, got.meta["sched"])
    assert state2["next_step"] == 5 and state2["scheduler"] == "dpm"
    np.testing.assert_array_equal(state2["model_outputs.0"], state["model_outputs.0"])
    assert cond["class_labels"].tolist() == [3] and latent.shape == (1, 1, 8, 8)


def test_split_state_refuses_objects():
    with pytest.raises(RelayError, match="cannot be relayed"):
        split_state("sched", {"x": object()})
    with pytest.raises(RelayError, match="finite"):
        split_state("sched", {"x": float("nan")})


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m, "run", "other"), "run id"),
        (lambda m: setattr(m, "device", "dev02"), "device"),
        (lambda m: setattr(m, "steps", (5, 12)), "step range"),
        (lambda m: setattr(m, "steps", (5, 5)), "step range"),
        (lambda m: setattr(m, "kind", "result"), "kind"),
        (lambda m: m.tensors.__setitem__("latent", np.zeros((1, 1, 8, 9), np.float32)), "latent"),
        (lambda m: m.tensors.__setitem__("latent", np.zeros((1, 1, 8, 8), np.float16)), "latent"),
        (lambda m: m.tensors.pop("latent"), "missing"),
        (lambda m: m.tensors.__setitem__("latent", np.full((1, 1, 8, 8), np.nan, np.float32)), "NaN"),
    ],
)
def test_decoder_rejects_wrong_fields(mutate, match):
    m = _msg()
    mutate(m)
    with pytest.raises(RelayError, match=match):
        _dec(encode(m, pad_to_bytes=2048))


def test_decoder_rejects_size_padding_and_header_lies():
    data = encode(_msg(), pad_to_bytes=4096)
    with pytest.raises(RelayError, match="size limit"):
        _dec(data, max_bytes=4095)
    with pytest.raises(RelayError, match="padding"):
        _dec(data[:-1] + b"\x01")
    with pytest.raises(RelayError, match="message length"):
        _dec(data[:-1])
    with pytest.raises(RelayError, match="message length"):
        _dec(data + b"\x00")
    with pytest.raises(RelayError, match="magic"):
        _dec(b"PK\x03\x04" + data[4:])
    # a header that lies about a tensor's shape
    hlen = struct.unpack(">I", data[4:8])[0]
    header = json.loads(data[8 : 8 + hlen])
    header["tensors"]["latent"]["shape"] = [1, 1, 4, 16]
    raw = json.dumps(header, separators=(",", ":")).encode()
    header["pad_bytes"] -= len(raw) - hlen  # keep the total length consistent
    raw = json.dumps(header, separators=(",", ":")).encode()
    forged = MAGIC + struct.pack(">I", len(raw)) + raw + data[8 + hlen :][: header["body_bytes"] + header["pad_bytes"]]
    with pytest.raises(RelayError):
        _dec(forged)


def test_pickle_bytes_are_rejected_not_loaded():
    import pickle

    evil = pickle.dumps({"latent": np.zeros(3)})
    with pytest.raises(RelayError):
        _dec(evil)
    body = MAGIC + struct.pack(">I", 2) + b"{}" + evil
    with pytest.raises(RelayError):
        _dec(body)


_VALID = encode(_msg(), pad_to_bytes=1024)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    with pytest.raises(RelayError):
        _dec(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(_VALID) - 1))
def test_truncated_messages_are_rejected(n):
    with pytest.raises(RelayError):
        _dec(_VALID[:n])


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_flipped_bytes_are_rejected_or_decode_consistently(pos, xor):
    data = bytearray(_VALID)
    data[pos] ^= xor
    try:
        got = _dec(bytes(data))
    except RelayError:
        return
    # a flip may still leave a valid message (a float in the latent, a digit of the step
    # range): then everything the decoder promises holds
    assert got.tensors["latent"].shape == (1, 1, 8, 8) and got.tensors["latent"].dtype == np.float32
    assert np.isfinite(got.tensors["latent"]).all()
    assert 0 <= got.steps[0] < got.steps[1] <= got.total_steps == 10
    assert got.run == RUN and got.device == "dev01" and got.kind == "task" and got.wire_bytes == len(_VALID)


# -- decoding without copies (split diffusion moves 7-14 MB per message) -------------------------

def _offset_in(arr: np.ndarray, data) -> int:
    return arr.__array_interface__["data"][0] - np.frombuffer(data, np.uint8).__array_interface__["data"][0]


@pytest.mark.parametrize("frozen", [True, False])
def test_decoded_tensors_are_read_only_views_on_the_message(frozen):
    data = encode(_msg(), pad_to_bytes=262144)
    data = bytes(data) if frozen else data
    got = _dec(data)
    for arr in got.tensors.values():
        assert np.shares_memory(arr, np.frombuffer(data, np.uint8))  # no copy of the payload
        assert not arr.flags.writeable  # a bytearray's view too: the message is read-only
        assert _offset_in(arr, data) % 8 == 0  # the encoder aligns the body
    with pytest.raises(ValueError):
        got.tensors["latent"][0, 0, 0, 0] = 1.0


def _with_body(body: bytes) -> bytes:
    """A valid message around a hand-made safetensors body (the header agrees with it)."""
    m = _msg()
    good = bytes(encode(m, pad_to_bytes=0))
    hlen = struct.unpack(">I", good[4:8])[0]
    header = json.loads(good[8 : 8 + hlen])
    header.update(body_bytes=len(body), pad_bytes=0)
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def _body(index: dict, data: bytes) -> bytes:
    raw = json.dumps(index).encode()
    return struct.pack("<Q", len(raw)) + raw + data


LATENT = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
LABELS = np.array([7], dtype=np.int64)


def _index(**override):
    idx = {"latent": {"dtype": "F32", "shape": [1, 1, 8, 8], "data_offsets": [0, 256]},
           "cond.class_labels": {"dtype": "I64", "shape": [1], "data_offsets": [256, 264]}}
    for name, spec in override.items():
        idx[name.replace("__", ".")] = spec
    return idx


def test_a_hand_made_safetensors_body_decodes_like_the_librarys():
    from safetensors.numpy import save

    ours = _dec(_with_body(_body(_index(), LATENT.tobytes() + LABELS.tobytes())))
    lib = _dec(_with_body(save({"latent": LATENT, "cond.class_labels": LABELS}, metadata={"by": "safetensors"})))
    for got in (ours, lib):
        np.testing.assert_array_equal(got.tensors["latent"], LATENT)
        assert got.tensors["cond.class_labels"].tolist() == [7]


@pytest.mark.parametrize("index, data, match", [
    (_index(latent={"dtype": "F32", "shape": [1, 1, 8, 8], "data_offsets": [8, 264]}), None, "starts at"),  # hole
    (_index(cond__class_labels={"dtype": "I64", "shape": [1], "data_offsets": [248, 256]}), None, "starts at"),
    (_index(latent={"dtype": "F32", "shape": [1, 1, 8, 4], "data_offsets": [0, 256]}), None, "span"),
    (_index(latent={"dtype": "BF16", "shape": [1, 1, 8, 16], "data_offsets": [0, 256]}), None, "dtype"),
    (_index(latent={"dtype": "F32", "shape": [1, 1, 8, 8], "data_offsets": [0, 256], "x": 1}), None, "exactly"),
    (_index(latent={"dtype": "F32", "shape": [1, 1, 8, 8], "data_offsets": [0, 99999]}), None, "outside"),
    (_index(), LATENT.tobytes() + LABELS.tobytes() + b"\0" * 8, "fill"),  # bytes nobody owns
    ({**_index(), "__metadata__": {"k": 1}}, None, "__metadata__"),
])
def test_the_safetensors_index_is_checked_like_the_library_does(index, data, match):
    body = _body(index, data if data is not None else LATENT.tobytes() + LABELS.tobytes())
    with pytest.raises(RelayError, match="not valid safetensors") as e:
        _dec(_with_body(body))
    assert match in str(e.value)
