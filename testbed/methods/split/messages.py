"""What a split device result carries in its meta, typed at the one door (relay/messages.py)."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.relay.messages import Fields, ordered

__all__ = ["SplitMeta", "split_meta"]


@dataclass(frozen=True)
class SplitMeta:
    """A split-diffusion step result's meta (methods/split/agent.py)."""

    role: str  # "head" | "tail"
    t_recv: float
    t_send: float
    t_cmp_start: float | None
    overrun_s: float
    cmp_real_s: float
    precision: str


def split_meta(f: Fields) -> SplitMeta:
    t_recv, t_send = f.epoch("t_recv", required=True), f.epoch("t_send", required=True)
    ordered(f, "t_recv", t_recv, "t_send", t_send)
    return SplitMeta(f.text("role", required=True, choices=("head", "tail")), t_recv, t_send, f.epoch("t_cmp_start"),
                     f.duration("overrun_s", default=0.0), f.duration("cmp_real_s", default=0.0),
                     f.text("precision") or "")
