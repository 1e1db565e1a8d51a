"""What patch-parallel messages carry, beside the wire format (wire.py): the names of the
context tensors, who receives which, how far a message is padded, and the checks on a step
task's fields. Shared by the edge server (methods/patch/orchestrator.py) and the device (methods/patch/agent.py).

    step task    server -> device (task topic): meta.phase "step"; tensors x (the band with
                 its input halo), t, cond.*; padded to the band's share of payload_bytes
    context up   device -> server (result topic): meta.phase "context"; tensors
                 "<exchange point>|<part>" (part: top, bottom, all); padded x meta.ctx_scale
    context down server -> device (task topic): meta.phase "context", meta.from = the band
                 that made it; only the parts routed to this device; padded likewise
    noise        device -> server (result topic): meta.phase "noise", the timings; tensor
                 noise (the UNet's output on the band); padded to meta.pad_to

A synchronous step sends each exchange point as soon as it is reached and waits for the
others'; a displaced step sends the points of one UNet block together and reads the
previous step's context. Contexts are padded so that the link carries SD1.5's bytes
(`ctx_scale` = SD1.5's context bytes of the band / the model's own; methods/patch/plan.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from testbed.diffusion.patch import receivers
from testbed.errors import RelayError

__all__ = ["SEP", "MODES", "ctx_name", "parse_ctx_name", "group_of", "routed", "padded_size",
           "check_step_meta", "json_object"]

SEP = "|"
MODES = ("sync", "displaced")
_PARTS = ("top", "bottom", "all")


def ctx_name(key: str, part: str) -> str:
    return f"{key}{SEP}{part}"


def parse_ctx_name(name: str) -> tuple[str, str]:
    key, sep, part = name.rpartition(SEP)
    if not sep or not key or part not in _PARTS:
        raise RelayError(f"rejected relay message: context tensor {name!r} is not '<point>{SEP}<top|bottom|all>'")
    return key, part


def group_of(key: str) -> str:
    """The UNet block an exchange point belongs to (a displaced step sends a block's points
    together): `down_blocks.1`, `mid_block`, `up_blocks.0`, `conv_out`, ..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 else parts[0]


def routed(tensors: dict[str, np.ndarray], sender: int, receiver: int, n: int) -> dict[str, np.ndarray]:
    """The context tensors of band `sender` that band `receiver` needs."""
    return {name: arr for name, arr in tensors.items() if receiver in receivers(parse_ctx_name(name)[1], sender, n)}


def padded_size(tensors: dict[str, np.ndarray], scale: float, limit: int) -> int:
    """The wire size a context message is padded to: its tensors' bytes x `scale`, at most `limit`."""
    return min(limit, int(math.ceil(sum(a.nbytes for a in tensors.values()) * scale)))


def check_step_meta(meta: dict[str, Any], max_message_bytes: int) -> None:
    """A step task's fields, or RelayError naming the bad one."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RelayError(f"rejected relay message: {what}")

    def is_int(v: Any) -> bool:
        return type(v) is int

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    n, index, height = meta.get("n"), meta.get("index"), meta.get("height")
    need(isinstance(meta.get("gen"), str) and 0 < len(meta["gen"]) <= 64, "meta.gen must be a short string")
    need(meta.get("mode") in MODES, f"meta.mode {meta.get('mode')!r} must be one of {MODES}")
    need(is_int(n) and 1 <= n <= 64, f"meta.n {n!r} must be an integer in [1, 64]")
    need(is_int(index) and 0 <= index < n, f"meta.index {index!r} must be in [0, n)")
    need(is_int(height) and height >= n, f"meta.height {height!r} must be an integer >= n")
    halo = meta.get("halo")
    need(isinstance(halo, list) and len(halo) == 2 and all(is_int(h) and 0 <= h <= 8 for h in halo),
         f"meta.halo {halo!r} must be [above, below] rows")
    need(is_num(meta.get("share")) and 0 < meta["share"] <= 1, f"meta.share {meta.get('share')!r} must be in (0, 1]")
    need(is_num(meta.get("ctx_scale")) and 0 < meta["ctx_scale"] <= 1e6,
         f"meta.ctx_scale {meta.get('ctx_scale')!r} must be in (0, 1e6]")
    need(is_int(meta.get("pad_to")) and 0 <= meta["pad_to"] <= max_message_bytes,
         f"meta.pad_to {meta.get('pad_to')!r} out of range")
    need(isinstance(meta.get("publish_ctx"), bool), "meta.publish_ctx must be true or false")
    need(is_num(meta.get("wait_s")) and 0 < meta["wait_s"] <= 3600, f"meta.wait_s {meta.get('wait_s')!r} out of range")


def json_object(payload: bytes) -> dict[str, Any]:
    """A status message's JSON object ({} for anything else, deep nesting included)."""
    try:
        v = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}
