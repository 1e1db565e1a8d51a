"""What a patch band's results carry in their meta, typed at the one door
(relay/messages.py): a band's noise (its timings, the contexts it received) or a context
for the server to relay."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.relay.messages import Fields, ordered

CROSS_CLOCK_SLACK_S = 0.05  # how far two devices' disciplined clocks may disagree (ms measured; 50 ms allowed)

__all__ = ["PatchNoiseMeta", "PatchContextMeta", "patch_meta"]


@dataclass(frozen=True)
class PatchNoiseMeta:
    """A patch band's noise result (methods/patch/agent.py)."""

    gen: str
    index: int
    mode: str
    t_recv: float
    t_send: float
    t_cmp_start: float
    t_cmp_end: float
    t_cmp_s: float
    wait_s: float
    overrun_s: float
    cmp_real_s: float
    rows: tuple[int, int]
    ctx_received: tuple[tuple[int, float, float], ...]  # (wire bytes, published, received) per context
    precision: str


@dataclass(frozen=True)
class PatchContextMeta:
    """A patch band's context, for the server to relay (methods/patch/agent.py)."""

    gen: str
    index: int
    t_send: float


def _ctx_received(f: Fields) -> tuple[tuple[int, float, float], ...]:
    out = []
    for i, item in enumerate(f.items("ctx_received")):
        g = Fields(f.device, f.what, dict(zip(("bytes", "published", "received"), item))
                   if isinstance(item, list) and len(item) == 3 else {}, f"{f.prefix}ctx_received[{i}].")
        wire = g.integer("bytes", hi=2**40, required=True)
        pub, recv = g.epoch("published", required=True), g.epoch("received", required=True)
        # two clocks: the publisher's and this device's. A Swarm cell disciplines each agent's
        # clock to the run owner's (device_clock.py), to within its offset measurement's half
        # round trip — milliseconds; a context that crossed the broker in less reads as
        # received before it was published. Within CROSS_CLOCK_SLACK_S: no air time, not a lie.
        ordered(g, "published", pub, "received", recv, slack_s=CROSS_CLOCK_SLACK_S)
        out.append((wire, pub, max(recv, pub)))
    return tuple(out)


def patch_meta(f: Fields) -> PatchNoiseMeta | PatchContextMeta:
    phase = f.text("phase", required=True, choices=("noise", "context"))
    gen, index = f.text("gen", required=True, max_len=64), f.integer("index", hi=63, required=True)
    if phase == "context":
        return PatchContextMeta(gen, index, f.epoch("t_send", required=True))
    t_recv, t_send = f.epoch("t_recv", required=True), f.epoch("t_send", required=True)
    start, end = f.epoch("t_cmp_start", required=True), f.epoch("t_cmp_end", required=True)
    ordered(f, "t_recv", t_recv, "t_send", t_send)
    ordered(f, "t_cmp_start", start, "t_cmp_end", end)
    return PatchNoiseMeta(gen, index, f.text("mode", required=True, choices=("sync", "displaced")), t_recv, t_send,
                          start, end, f.duration("t_cmp_s", required=True), f.duration("wait_s", default=0.0),
                          f.duration("overrun_s", default=0.0), f.duration("cmp_real_s", default=0.0),
                          f.pair("rows", required=True), _ctx_received(f), f.text("precision") or "")
