"""Every message a device can send, parsed at one door: size, depth, types and ranges ->
a typed record, or `BadMessage` naming the device, the message and the reason.

A device sends two kinds of message (relay/topics.py):

    status   tb/<run>/dev/<id>/status   JSON object: state online | computing | offline,
                                        and, computing, the stage/attempt/steps it took
                                        and t_recv (when the task arrived)
    result   tb/<run>/dev/<id>/result   a relay message (wire.py) whose header's `meta`
                                        carries the timings and what the method needs;
                                        each method's folder types its meta
                                        (methods/<name>/messages.py, with `Fields`)

`parse_status(device, payload)` and `parse_result(device, payload, meta=<the method's
parser>, ...)` are what the orchestrator base (relay/orchestrator.py) calls on each;
nothing past them reads the raw JSON. They never raise
anything but BadMessage (a RelayError: a bad message fails that device's stage, the run
goes on by recovery): JSON nested deeper than `MAX_JSON_DEPTH` is refused before it is
parsed (no RecursionError), `NaN`/`Infinity` and numbers outside their ranges are refused
(no ValueError, no infinite latency), strings and lists are bounded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.errors import RelayError
from testbed.relay.wire import Message, TensorSpec, decode

__all__ = [
    "BadMessage",
    "MAX_STATUS_BYTES",
    "MAX_JSON_DEPTH",
    "STATES",
    "Status",
    "DeviceResult",
    "Fields",
    "MetaParser",
    "ordered",
    "sched_scalars",
    "json_depth_ok",
    "load_json_object",
    "parse_status",
    "parse_result_meta",
    "parse_result",
]

#: A status document is a few hundred bytes; anything past this is not one.
MAX_STATUS_BYTES = 4096
#: Nesting of any JSON a device sends (a status, a result's meta: at most 3 levels used).
MAX_JSON_DEPTH = 8
STATES = ("online", "computing", "offline")
#: Timestamps are this host's wall clock (devices share it): seconds since the epoch in
#: [2001-09-09, 2286-11-20]; durations are in [0, 1 day].
_EPOCH_RANGE = (1e9, 1e10)
_MAX_DURATION_S = 86_400.0
_MAX_INT = 10**9
_MAX_TEXT = 128
_MAX_LIST = 4096


class BadMessage(RelayError):
    """A device's message that fails a check: `device`, `what` (status, result) and `reason`."""

    def __init__(self, device: str, what: str, reason: str):
        super().__init__(f"rejected {what} of {device}: {reason}")
        self.device, self.what, self.reason = device, what, reason


@dataclass(frozen=True)
class Status:
    device: str
    state: str  # one of STATES
    stage: int | None = None
    attempt: int | None = None
    steps: tuple[int, int] | None = None
    t_recv: float | None = None  # computing: when the task arrived (epoch s)
    ts: float | None = None


@dataclass(frozen=True)
class DeviceResult:
    """A result that passed every check: the decoded message and its typed meta."""

    message: Message
    meta: Any  # the method's typed meta (methods/<name>/messages.py)


# -- JSON at the door -----------------------------------------------------------------------
def json_depth_ok(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text's arrays and objects nest at most `max_depth` deep (a scan of
    the bytes, outside strings; no recursion, so 100 000 `[` cost one pass)."""
    depth, in_str, esc = 0, False, False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def _depth_ok(value: Any, max_depth: int) -> bool:
    """Whether decoded JSON nests at most `max_depth` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > max_depth:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def load_json_object(device: str, what: str, payload: bytes, max_bytes: int,
                     max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object of at most `max_bytes` and `max_depth`, NaN and Infinity refused."""
    if len(payload) > max_bytes:
        raise BadMessage(device, what, f"{len(payload)} bytes (at most {max_bytes})")
    if not json_depth_ok(payload, max_depth):
        raise BadMessage(device, what, f"JSON nested deeper than {max_depth}")
    try:
        doc = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadMessage(device, what, f"not JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise BadMessage(device, what, f"a JSON {type(doc).__name__}, not an object")
    return doc


# -- typed fields ---------------------------------------------------------------------------
class Fields:
    """Typed reads of one JSON object, each failure a BadMessage naming the field (what a
    method's meta parser reads its fields with)."""

    def __init__(self, device: str, what: str, doc: dict[str, Any], prefix: str = ""):
        self.device, self.what, self.doc, self.prefix = device, what, doc, prefix

    def bad(self, key: str, why: str) -> BadMessage:
        return BadMessage(self.device, self.what, f"{self.prefix}{key} {why}")

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.doc or self.doc[key] is None:
            if required:
                raise self.bad(key, "is missing")
            return None
        return self.doc[key]

    def integer(self, key: str, lo: int = 0, hi: int = _MAX_INT, required: bool = False) -> int | None:
        v = self._get(key, required)
        if v is not None and not (type(v) is int and lo <= v <= hi):
            raise self.bad(key, f"must be an integer in [{lo}, {hi}], got {_short(v)}")
        return v

    def number(self, key: str, lo: float, hi: float, required: bool = False) -> float | None:
        v = self._get(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.bad(key, f"must be a number in [{lo:g}, {hi:g}], got {_short(v)}")
        return float(v)

    def items(self, key: str, max_items: int = _MAX_LIST) -> list[Any]:
        """A list field of at most `max_items` (empty when missing)."""
        v = self._get(key, False) or []
        if not isinstance(v, list) or len(v) > max_items:
            raise self.bad(key, f"must be a list of at most {max_items}")
        return v

    def epoch(self, key: str, required: bool = False) -> float | None:
        return self.number(key, *_EPOCH_RANGE, required=required)

    def duration(self, key: str, required: bool = False, default: float | None = None) -> float | None:
        v = self.number(key, 0.0, _MAX_DURATION_S, required=required)
        return default if v is None else v

    def text(self, key: str, required: bool = False, choices: tuple[str, ...] | None = None,
             max_len: int = _MAX_TEXT) -> str | None:
        v = self._get(key, required)
        if v is None:
            return None
        if not isinstance(v, str) or len(v) > max_len or (choices is not None and v not in choices):
            want = f"one of {choices}" if choices else f"a string of at most {max_len} characters"
            raise self.bad(key, f"must be {want}, got {_short(v)}")
        return v

    def pair(self, key: str, required: bool = False) -> tuple[int, int] | None:
        v = self._get(key, required)
        if v is None:
            return None
        if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int and 0 <= x <= _MAX_INT for x in v)
                and v[0] <= v[1]):
            raise self.bad(key, f"must be [start, end] integers with start <= end, got {_short(v)}")
        return v[0], v[1]


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def ordered(f: Fields, earlier: str, a: float | None, later: str, b: float | None, slack_s: float = 0.0) -> None:
    """`later` must not precede `earlier` (by more than `slack_s`: two clocks' disagreement)."""
    if a is not None and b is not None and b < a - slack_s:
        by = f" by more than {slack_s:g} s" if slack_s else ""
        raise f.bad(later, f"({b:.6f}) is before {earlier} ({a:.6f}){by}")


# -- status ---------------------------------------------------------------------------------
def parse_status(device: str, payload: bytes) -> Status:
    """A device's status document (its retained online/offline, its will, computing)."""
    doc = load_json_object(device, "status", payload, MAX_STATUS_BYTES)
    f = Fields(device, "status", doc)
    state = f.text("state", required=True, choices=STATES)
    speaker = f.text("device")
    if speaker is not None and speaker != device:
        raise f.bad("device", f"{speaker!r} is not the topic's device: a device speaks only for itself")
    stage, attempt = f.integer("stage"), f.integer("attempt")
    steps, t_recv = f.pair("steps"), f.epoch("t_recv")
    if state == "computing" and stage is None:
        raise f.bad("stage", "is required while computing")
    return Status(device, state, stage, attempt, steps, t_recv, f.epoch("ts"))


# -- results --------------------------------------------------------------------------------
def sched_scalars(f: Fields) -> dict[str, Any]:
    v = f.doc.get("sched", {})
    if not isinstance(v, dict) or len(v) > 64:
        raise f.bad("sched", "must be an object of at most 64 scalars")
    for k, x in v.items():
        scalars = x if isinstance(x, list) else [x]
        if len(k) > 64 or (isinstance(x, list) and len(x) > _MAX_LIST) or not all(_scalar(s) for s in scalars):
            raise f.bad(f"sched.{k[:64]}", f"must be a JSON scalar or a list of at most {_MAX_LIST}, got {_short(x)}")
    return v


def _scalar(x: Any) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    return x is None or isinstance(x, (bool, int)) or (isinstance(x, str) and len(x) <= 256)


#: A method's meta parser: the typed meta from its fields, or BadMessage (Fields.bad)
MetaParser = Callable[[Fields], Any]


def parse_result_meta(device: str, parser: MetaParser, meta: Any) -> Any:
    """The typed meta of a decoded result, read by the method's `parser`."""
    if not isinstance(meta, dict):
        raise BadMessage(device, "result", "meta must be a JSON object")
    if not _depth_ok(meta, MAX_JSON_DEPTH):
        raise BadMessage(device, "result", f"meta nested deeper than {MAX_JSON_DEPTH}")
    return parser(Fields(device, "result", meta, "meta."))


def parse_result(device: str, payload: bytes | bytearray | memoryview, *, meta: MetaParser, run: str, max_bytes: int,
                 total_steps: int | None = None, expect: dict[str, TensorSpec] | None = None,
                 max_tensor_bytes: int | None = None) -> DeviceResult:
    """A device's result: the wire format's checks (wire.decode: size, header, tensors, run,
    device) and then its meta's; BadMessage naming what failed."""
    try:
        msg = decode(payload, max_bytes=max_bytes, run=run, kind="result", device=device, total_steps=total_steps,
                     expect=expect, max_tensor_bytes=max_tensor_bytes)
    except BadMessage:
        raise
    except RelayError as e:
        raise BadMessage(device, "result", str(e).removeprefix("rejected relay message: ")) from None
    return DeviceResult(msg, parse_result_meta(device, meta, msg.meta))
