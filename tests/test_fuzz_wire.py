"""Structure-aware fuzzing of the relay decoder (tests/test_wire.py fuzzes raw bytes,
truncations and bit flips): a well-formed prefix around a mutated JSON header and a
forged safetensors index. The decoder answers RelayError or a message that satisfies
every check it promises — never another exception, never an oversized tensor."""

from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import RelayError
from testbed.relay.wire import ALLOWED_DTYPES, MAGIC, Message, TensorSpec, decode, encode
from fuzz_settings import examples

RUN = "tfz1"
LAT = TensorSpec("float32", (1, 1, 4, 4))
_MSG = Message(kind="result", run=RUN, device="dev01", stage=1, attempt=2, steps=(5, 10), total_steps=10,
               tensors={"latent": np.ones((1, 1, 4, 4), np.float32)}, meta={"t_recv": 1.0, "t_send": 2.0})
_VALID = encode(_MSG, pad_to_bytes=2048)
_HLEN = struct.unpack(">I", _VALID[4:8])[0]
_HEADER = json.loads(_VALID[8:8 + _HLEN])
_BODY = _VALID[8 + _HLEN:8 + _HLEN + _HEADER["body_bytes"]]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**66), max_value=2**66) | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _frame(header: dict, body: bytes, pad: int | None = None) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = header.get("pad_bytes", 0) if pad is None else pad
    pad = pad if isinstance(pad, int) and 0 <= pad < 4096 else 0
    return MAGIC + struct.pack(">I", len(raw)) + raw + body + bytes(pad)


def _check(data: bytes) -> None:
    try:
        m = decode(data, max_bytes=8192, run=RUN, kind="result", device="dev01", total_steps=10,
                   expect={"latent": LAT}, max_tensor_bytes=1024)
    except RelayError:
        return
    assert m.tensors["latent"].shape == LAT.shape and m.tensors["latent"].dtype == np.float32
    assert 0 <= m.steps[0] < m.steps[1] <= m.total_steps == 10 and m.wire_bytes == len(data) <= 8192
    assert all(a.nbytes <= 1024 and str(a.dtype) in ALLOWED_DTYPES for a in m.tensors.values())


@examples(400)
@given(st.sampled_from(sorted(_HEADER)), json_values)
def test_one_mutated_header_field(key, value):
    header = dict(_HEADER, **{key: value})
    _check(_frame(header, _BODY))


@examples(200)
@given(st.dictionaries(st.sampled_from([*_HEADER, "x"]), json_values, max_size=12))
def test_random_headers(header):
    _check(_frame(header, _BODY))


@examples(300)
@given(st.sampled_from(["float32", "float16", "int64", "int32", "F32", "BOOL", "object", ""]),
       st.lists(st.integers(min_value=0, max_value=2**40), max_size=7),
       st.lists(st.integers(min_value=0, max_value=2**40), min_size=2, max_size=2))
def test_forged_safetensors_index(dtype, shape, offsets):
    """The body's own JSON index lies (shape, dtype, offsets); the header agrees with it."""
    st_dtype = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32"}.get(dtype, dtype)
    index = json.dumps({"latent": {"dtype": st_dtype, "shape": shape, "data_offsets": offsets}}).encode()
    body = struct.pack("<Q", len(index)) + index + b"\x00" * 64
    header = dict(_HEADER, body_bytes=len(body), pad_bytes=0,
                  tensors={"latent": {"dtype": dtype, "shape": shape}})
    _check(_frame(header, body))


def test_a_tensor_larger_than_the_tensor_limit_is_rejected():
    big = Message(**{**_MSG.__dict__, "tensors": {"latent": np.ones((1, 1, 4, 4), np.float32),
                                                    "extra": np.zeros((64, 64), np.float32)}})
    data = encode(big)
    try:
        decode(data, max_bytes=1 << 20, run=RUN, kind="result", device="dev01", expect={"latent": LAT},
               max_tensor_bytes=1024)
    except RelayError as e:
        assert "extra" in str(e) and "1024" in str(e)
    else:
        raise AssertionError("a 16 KiB tensor passed a 1 KiB limit")
