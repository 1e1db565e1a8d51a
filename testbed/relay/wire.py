"""Relay wire format: one MQTT payload = magic + length-prefixed JSON header + safetensors + padding.

    b"TBR1" | u32 big-endian header length | header (UTF-8 JSON object) | body | padding

The body is a safetensors blob (latent, scheduler state tensors, conditioning); the
padding is zero bytes that bring a multi-stage message up to the workload's
`payload_bytes` (the paper's 256 KB), so the link carries what the paper's link carries.
The header states `body_bytes` and `pad_bytes`; the decoder checks that they add up, that
the padding is zeros, and checks the size limit, run id, kind, step range and every
tensor's dtype and shape before anything uses it. Nothing is ever unpickled: the body is
a JSON index and raw little-endian arrays.

Split diffusion moves 7-14 MB per message, so neither side copies the payload: `encode`
builds the message in one zero-filled buffer (the padding costs no writes) and `decode`
returns read-only numpy views on the received bytes (`_safetensors_views` parses the
safetensors index itself, with the library's rules: contiguous, complete, exact sizes).
The encoder pads the JSON header with spaces so that the body starts 8-byte aligned.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
_ST_LEN = struct.Struct("<Q")
#: safetensors dtype tags of the relayable dtypes (little-endian on the wire)
_ST_DTYPES = {"F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32"}


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


def encode(msg: Message, *, pad_to_bytes: int = 0) -> bytearray:
    """Serialise a message; zero-pad it up to `pad_to_bytes` when it is shorter.

    Returns a bytes-like buffer (publish it as is). A message longer than `pad_to_bytes`
    is sent as is (its `pad_bytes` is 0); the caller records `wire_bytes` to see that the
    payload target was exceeded.
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
    # pad_bytes is part of the header, so its digits change the header's length: iterate.
    # Near a power of ten it can alternate (one digit more crosses an 8-byte alignment step,
    # which takes the digit away again): then settle on the longer header, space-filled.
    pad, longest = 0, 0
    for _ in range(4):
        header["pad_bytes"] = pad
        raw = _aligned_header(header)
        longest = max(longest, len(raw))
        want = max(0, pad_to_bytes - (_PREFIX.size + len(raw) + len(body)))
        if want == pad:
            break
        pad = want
    else:
        pad = max(0, pad_to_bytes - (_PREFIX.size + longest + len(body)))
        header["pad_bytes"] = pad
        raw = _aligned_header(header)
        raw += b" " * (longest - len(raw))
    if len(raw) > MAX_HEADER_BYTES:
        raise RelayError(f"message header is {len(raw)} bytes (limit {MAX_HEADER_BYTES}); meta is too large")
    start = _PREFIX.size + len(raw)
    out = bytearray(start + len(body) + pad)  # zero-filled: the padding is already in place
    _PREFIX.pack_into(out, 0, MAGIC, len(raw))
    out[_PREFIX.size:start] = raw
    out[start:start + len(body)] = body
    msg.body_bytes, msg.pad_bytes, msg.wire_bytes = len(body), pad, len(out)
    return out


def _aligned_header(header: dict[str, Any]) -> bytes:
    """The header's JSON, space-padded so that prefix + header ends on an 8-byte boundary."""
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return raw + b" " * (-(_PREFIX.size + len(raw)) % 8)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RelayError(f"rejected relay message: {what}")


def decode(
    data: bytes | bytearray | memoryview,
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

    The tensors are read-only views on `data` (copy one before writing to it). `expect`
    maps tensor names that must be present to their exact dtype and shape; other tensors
    are allowed only with an allowed dtype, rank <= 6 and (with `max_tensor_bytes`)
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
    _need(not np.frombuffer(data, np.uint8, count=pad_bytes, offset=start + body_bytes).any(),
          "padding holds non-zero bytes")
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
    tensors = _safetensors_views(data, start, body_bytes, max_tensor_bytes) if body_bytes else {}
    _need(set(tensors) == set(specs), f"body tensors {sorted(tensors)} differ from the header's {sorted(specs)}")
    for name, arr in tensors.items():
        spec = specs[name]
        _need(
            _dtype_name(arr) == spec["dtype"] and list(arr.shape) == spec["shape"],
            f"tensor {name!r} is {arr.dtype}{list(arr.shape)}, header says {spec['dtype']}{spec['shape']}",
        )
        if arr.dtype.kind == "f":
            _need(bool(np.isfinite(arr).all()), f"tensor {name!r} holds NaN or infinity")
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


def _safetensors_views(data: Any, start: int, length: int, max_tensor_bytes: int | None) -> dict[str, np.ndarray]:
    """The tensors of the safetensors blob `data[start:start+length]` as read-only views.

    The format: u64 little-endian index length, a JSON index {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__"?: {str: str}}, then the arrays. Like the
    safetensors library, the arrays must fill the data section exactly, back to back.
    """

    def bad(what: str) -> RelayError:
        return RelayError(f"rejected relay message: body is not valid safetensors ({what})")

    if length < _ST_LEN.size:
        raise bad(f"{length} bytes is shorter than its 8-byte index length")
    (n,) = _ST_LEN.unpack_from(data, start)
    if n > min(length - _ST_LEN.size, MAX_HEADER_BYTES):
        raise bad(f"index length {n} does not fit the {length}-byte body")
    try:
        index = json.loads(bytes(data[start + _ST_LEN.size : start + _ST_LEN.size + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"index is not UTF-8 JSON: {e.__class__.__name__}") from None
    if not isinstance(index, dict):
        raise bad("index is not a JSON object")
    meta = index.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")
    base, size = start + _ST_LEN.size + n, length - _ST_LEN.size - n
    entries = []
    for name, spec in index.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(_ST_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_RANK and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r}: shape {shape!r} must be <= {_MAX_RANK} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r} outside the {size}-byte data section")
        dt = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise bad(f"tensor {name!r}: {dtype}{shape} is {nbytes} bytes, its data_offsets span "
                      f"{offsets[1] - offsets[0]}")
        if max_tensor_bytes is not None and nbytes > max_tensor_bytes:
            raise RelayError(f"rejected relay message: tensor {name!r} has {nbytes} bytes > {max_tensor_bytes}")
        entries.append((offsets[0], offsets[1], name, dt, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise bad(f"tensor {name!r} starts at {begin}, not where the previous one ends ({end})")
        end = stop
    if end != size:
        raise bad(f"the tensors fill {end} of the {size}-byte data section")
    out: dict[str, np.ndarray] = {}
    for begin, _, name, dt, shape in entries:
        arr = np.frombuffer(data, dt, count=math.prod(shape), offset=base + begin).reshape(shape)
        arr.flags.writeable = False  # a bytearray's view would be writable: the message is read-only
        out[name] = arr
    return out


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
    except (ValueError, RecursionError):
        return {}
    meta = header.get("meta") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}
