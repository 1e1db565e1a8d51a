"""Relay wire format: one MQTT payload = magic + length-prefixed JSON header + safetensors + padding.

    b"TBR1" | u32 big-endian header length | header (UTF-8 JSON object) | body | padding

The body is a safetensors blob (latent, scheduler state tensors, conditioning); the
padding is zero bytes that bring a multi-stage message up to the workload's
`payload_bytes` (the paper's 256 KB), so the link carries what the paper's link carries.
The header states `body_bytes` and `pad_bytes`; the decoder checks that they add up, that
the padding is zeros, and checks the size limit, run id, kind, step range and every
tensor's dtype and shape before anything uses it. Nothing is ever unpickled:
safetensors parses only a JSON index and raw little-endian arrays.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from testbed.errors import RelayError

__all__ = [
    "MAGIC",
    "WIRE_VERSION",
    "MAX_HEADER_BYTES",
    "KINDS",
    "ALLOWED_DTYPES",
    "TensorSpec",
    "Message",
    "encode",
    "decode",
    "split_state",
    "join_state",
    "peek_meta",
]

MAGIC = b"TBR1"
WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
KINDS = ("task", "result")
#: dtypes a relay message may carry (the latent and conditioning; int64 for timesteps).
#: bfloat16 travels as float32 (numpy has no bfloat16; the conversion is exact).
ALLOWED_DTYPES = ("float32", "float16", "int64", "int32")
_MAX_RANK = 6
_MAX_TENSORS = 64
_PREFIX = struct.Struct(">4sI")


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor: dtype name and exact shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class Message:
    """A decoded (or to-be-encoded) relay message."""

    kind: str
    run: str
    device: str
    stage: int
    attempt: int
    steps: tuple[int, int]
    total_steps: int
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    body_bytes: int = 0
    pad_bytes: int = 0
    wire_bytes: int = 0


def _dtype_name(a: np.ndarray) -> str:
    return str(a.dtype)


def encode(msg: Message, *, pad_to_bytes: int = 0) -> bytes:
    """Serialise a message; zero-pad it up to `pad_to_bytes` when it is shorter.

    A message longer than `pad_to_bytes` is sent as is (its `pad_bytes` is 0); the caller
    records `wire_bytes` to see that the payload target was exceeded.
    """
    if msg.kind not in KINDS:
        raise RelayError(f"message kind {msg.kind!r}: must be one of {KINDS}")
    for name, arr in msg.tensors.items():
        if _dtype_name(arr) not in ALLOWED_DTYPES:
            raise RelayError(f"tensor {name!r}: dtype {arr.dtype} cannot be relayed; use one of {ALLOWED_DTYPES}")
    body = _st_save({k: np.ascontiguousarray(v) for k, v in msg.tensors.items()}) if msg.tensors else b""
    header: dict[str, Any] = {
        "v": WIRE_VERSION,
        "kind": msg.kind,
        "run": msg.run,
        "device": msg.device,
        "stage": msg.stage,
        "attempt": msg.attempt,
        "steps": [int(msg.steps[0]), int(msg.steps[1])],
        "total_steps": int(msg.total_steps),
        "tensors": {k: {"dtype": _dtype_name(v), "shape": list(v.shape)} for k, v in msg.tensors.items()},
        "meta": msg.meta,
        "body_bytes": len(body),
        "pad_bytes": 0,
    }
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    base = _PREFIX.size + len(raw) + len(body)
    # pad_bytes is part of the header, so its digits change the header's length: iterate.
    pad = 0
    for _ in range(4):
        header["pad_bytes"] = pad
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        base = _PREFIX.size + len(raw) + len(body)
        want = max(0, pad_to_bytes - base)
        if want == pad:
            break
        pad = want
    if len(raw) > MAX_HEADER_BYTES:
        raise RelayError(f"message header is {len(raw)} bytes (limit {MAX_HEADER_BYTES}); meta is too large")
    out = _PREFIX.pack(MAGIC, len(raw)) + raw + body + bytes(pad)
    msg.body_bytes, msg.pad_bytes, msg.wire_bytes = len(body), pad, len(out)
    return out


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RelayError(f"rejected relay message: {what}")


def decode(
    data: bytes,
    *,
    max_bytes: int,
    run: str,
    kind: str | None = None,
    device: str | None = None,
    total_steps: int | None = None,
    expect: dict[str, TensorSpec] | None = None,
    max_tensor_bytes: int | None = None,
) -> Message:
    """Parse and validate a relay message; raise RelayError naming what is wrong.

    `expect` maps tensor names that must be present to their exact dtype and shape; other
    tensors are allowed only with an allowed dtype, rank <= 6 and (with `max_tensor_bytes`)
    bounded size.
    """
    n = len(data)
    _need(n <= max_bytes, f"{n} bytes exceeds the size limit of {max_bytes} bytes")
    _need(n >= _PREFIX.size, f"{n} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(data, 0)
    _need(magic == MAGIC, f"bad magic {magic!r} (expected {MAGIC!r}); not a testbed relay message")
    _need(hlen <= MAX_HEADER_BYTES, f"header length {hlen} exceeds {MAX_HEADER_BYTES} bytes")
    _need(_PREFIX.size + hlen <= n, f"header length {hlen} runs past the end of the {n}-byte message")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RelayError(f"rejected relay message: header is not UTF-8 JSON ({e.__class__.__name__})") from None
    _need(isinstance(header, dict), "header is not a JSON object")
    _need(header.get("v") == WIRE_VERSION, f"wire version {header.get('v')!r}, expected {WIRE_VERSION}")
    k = header.get("kind")
    _need(k in KINDS, f"kind {k!r} is not one of {KINDS}")
    _need(kind is None or k == kind, f"kind {k!r} where {kind!r} was expected")
    _need(header.get("run") == run, f"run id {header.get('run')!r} is not this run ({run!r})")
    dev = header.get("device")
    _need(isinstance(dev, str) and 0 < len(dev) <= 64, "device must be a non-empty string")
    _need(device is None or dev == device, f"device {dev!r} where {device!r} was expected")
    for key in ("stage", "attempt", "total_steps", "body_bytes", "pad_bytes"):
        v = header.get(key)
        _need(type(v) is int and v >= 0, f"{key} must be a non-negative integer, got {v!r}")
    total = header["total_steps"]
    _need(total >= 1, "total_steps must be >= 1")
    _need(total_steps is None or total == total_steps, f"total_steps {total} where {total_steps} was expected")
    steps = header.get("steps")
    _need(
        isinstance(steps, list) and len(steps) == 2 and all(type(s) is int for s in steps),
        f"steps must be [start, end] integers, got {steps!r}",
    )
    a, b = steps
    _need(0 <= a < b <= total, f"step range [{a}, {b}) is not inside [0, {total})")
    meta = header.get("meta", {})
    _need(isinstance(meta, dict), "meta must be a JSON object")
    body_bytes, pad_bytes = header["body_bytes"], header["pad_bytes"]
    _need(
        _PREFIX.size + hlen + body_bytes + pad_bytes == n,
        f"prefix + header {hlen} + body {body_bytes} + padding {pad_bytes} != message length {n}",
    )
    start = _PREFIX.size + hlen
    pad = data[start + body_bytes :]
    _need(pad.count(0) == len(pad), "padding holds non-zero bytes")  # 10x faster than any() on MBs
    specs = header.get("tensors")
    _need(isinstance(specs, dict) and len(specs) <= _MAX_TENSORS, f"tensors must be an object of <= {_MAX_TENSORS}")
    for name, spec in specs.items():
        _need(
            isinstance(spec, dict)
            and spec.get("dtype") in ALLOWED_DTYPES
            and isinstance(spec.get("shape"), list)
            and len(spec["shape"]) <= _MAX_RANK
            and all(type(d) is int and d >= 0 for d in spec["shape"]),
            f"tensor {name!r}: bad spec {spec!r} (dtype in {ALLOWED_DTYPES}, shape of <= {_MAX_RANK} ints)",
        )
    if body_bytes:
        try:
            tensors = _st_load(bytes(data[start : start + body_bytes]))
        except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes is a rejection
            raise RelayError(f"rejected relay message: body is not valid safetensors ({e})") from None
    else:
        tensors = {}
    _need(set(tensors) == set(specs), f"body tensors {sorted(tensors)} differ from the header's {sorted(specs)}")
    for name, arr in tensors.items():
        spec = specs[name]
        _need(
            _dtype_name(arr) == spec["dtype"] and list(arr.shape) == spec["shape"],
            f"tensor {name!r} is {arr.dtype}{list(arr.shape)}, header says {spec['dtype']}{spec['shape']}",
        )
        if max_tensor_bytes is not None:
            _need(arr.nbytes <= max_tensor_bytes, f"tensor {name!r} has {arr.nbytes} bytes > {max_tensor_bytes}")
        if arr.dtype.kind == "f":
            _need(bool(np.isfinite(arr.astype(np.float32)).all()), f"tensor {name!r} holds NaN or infinity")
    for name, want in (expect or {}).items():
        _need(name in tensors, f"tensor {name!r} is missing")
        got = tensors[name]
        _need(
            _dtype_name(got) == want.dtype and tuple(got.shape) == tuple(want.shape),
            f"tensor {name!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}",
        )
    return Message(
        kind=k,
        run=run,
        device=dev,
        stage=header["stage"],
        attempt=header["attempt"],
        steps=(a, b),
        total_steps=total,
        tensors=tensors,
        meta=meta,
        body_bytes=body_bytes,
        pad_bytes=pad_bytes,
        wire_bytes=n,
    )


def split_state(prefix: str, state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a state dict into tensors (named `prefix.key`) and JSON-able scalars.

    Tensors may be numpy arrays or torch tensors (converted without pickling).
    """
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = _torch_to_numpy(value)
        if isinstance(value, np.ndarray):
            tensors[f"{prefix}.{key}"] = value
        elif value is None or isinstance(value, (bool, int, str)):
            scalars[key] = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise RelayError(f"state {prefix}.{key} = {value}: not a finite number")
            scalars[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in value):
            scalars[key] = list(value)
        else:
            raise RelayError(f"state {prefix}.{key}: {type(value).__name__} cannot be relayed (tensor or JSON scalar)")
    return tensors, scalars


def join_state(prefix: str, tensors: dict[str, np.ndarray], scalars: dict[str, Any]) -> dict[str, Any]:
    """Inverse of split_state (tensors stay numpy; the caller converts)."""
    out: dict[str, Any] = dict(scalars)
    p = prefix + "."
    for name, arr in tensors.items():
        if name.startswith(p):
            out[name[len(p) :]] = arr
    return out


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch  # local: the server side can run without importing torch early

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16; relay as float32 (exact: bf16 is a truncated float32)
        return t.float().numpy()
    return t.numpy()


def peek_meta(payload: bytes) -> dict[str, Any]:
    """The `meta` object of a message's header, read without decoding its tensors (an
    agent picks the handler of a task by `meta.method`); {} for anything malformed —
    the handler's full `decode` reports what is wrong."""
    if len(payload) < _PREFIX.size:
        return {}
    magic, n = _PREFIX.unpack_from(payload)
    if magic != MAGIC or n > MAX_HEADER_BYTES or len(payload) < _PREFIX.size + n:
        return {}
    try:
        header = json.loads(payload[_PREFIX.size:_PREFIX.size + n])
    except ValueError:
        return {}
    meta = header.get("meta") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}
