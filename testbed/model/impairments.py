"""Link impairments (delay, jitter, loss per direction) of every device link: from the
topology's `links:` block and per-device `link:` overrides, or derived from each link's
SNR by the radio model (data and sources in data/radio_links.yaml). Pure.

Radio model, per direction and transport block: Rayleigh block fading around the mean SNR
(linear s), a decoding threshold t chosen by link adaptation so that the first
transmission fails with probability `bler_target`, t = -ln(1 - bler_target) s, but never
below the lowest MCS's threshold `min_snr_db`; chase combining of k transmissions fails
when the sum of k exponential fades stays below a = t / s:

    P_k = 1 - exp(-a) * sum_{j<k} a^j / j!                  (Erlang CDF)
    loss  = P_N                                              (N = max_transmissions)
    delay = base_delay + harq_rtt * sum_{k=1}^{N-1} P_k      (expected retransmissions)

Where link adaptation holds the target (SNR above ~2.9 dB with the default data) every
link gets the same ~0.8 ms of retransmissions; below it the lowest MCS fails more often:
cell-edge links get more delay and some loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


from testbed.model.radio import DeviceLink
from testbed.model.radio_links import RadioLinkParams, load_radio_link_params
from testbed.model.topology import Topology

__all__ = [
    "Impairment",
    "LinkImpairment",
    "NO_IMPAIRMENT",
    "RadioLinkParams",
    "load_radio_link_params",
    "harq_failure_probability",
    "radio_impairment",
    "device_impairment",
    "link_impairments",
]


@dataclass(frozen=True)
class Impairment:
    """What one direction of a link adds: one-way delay, jitter (a uniform draw in
    [-jitter, +jitter] around the delay, flows kept in order) and random packet loss."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def is_zero(self) -> bool:
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.loss_pct == 0

    def rounded(self) -> Impairment:
        """To the resolution worth applying (10 us, 0.001 %): tiny mobility steps change nothing."""
        return Impairment(round(self.delay_ms, 2), round(self.jitter_ms, 2), round(self.loss_pct, 3))


@dataclass(frozen=True)
class LinkImpairment:
    """Both directions of one device's link: `down` server -> device, `up` device -> server."""

    up: Impairment = Impairment()
    down: Impairment = Impairment()

    @staticmethod
    def symmetric(delay_ms: float = 0.0, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> LinkImpairment:
        one = Impairment(delay_ms, jitter_ms, loss_pct)
        return LinkImpairment(one, one)

    @property
    def is_zero(self) -> bool:
        return self.up.is_zero and self.down.is_zero

    @property
    def rtt_ms(self) -> float:
        """Added round-trip time: both one-way delays."""
        return self.up.delay_ms + self.down.delay_ms

    def to_json(self) -> dict[str, dict[str, float]]:
        return {d: {"delay_ms": i.delay_ms, "jitter_ms": i.jitter_ms, "loss_pct": i.loss_pct}
                for d, i in (("up", self.up), ("down", self.down))}

    @classmethod
    def from_json(cls, d: dict[str, dict[str, float]]) -> LinkImpairment:
        return cls(Impairment(**d.get("up", {})), Impairment(**d.get("down", {})))


NO_IMPAIRMENT = LinkImpairment()


def harq_failure_probability(a: float, k: int) -> float:
    """P(k chase-combined Rayleigh-faded transmissions all fail) with threshold/mean SNR = a."""
    term, total = 1.0, 0.0
    for j in range(k):
        total += term
        term *= a / (j + 1)
    return max(0.0, 1.0 - math.exp(-a) * total)


def radio_impairment(snr_db: float, direction: Literal["up", "down"],
                     params: RadioLinkParams | None = None) -> Impairment:
    """Delay and loss of one direction of a link at mean SNR `snr_db` (module docstring)."""
    p = params or load_radio_link_params()
    mean = 10 ** (snr_db / 10)
    a = max(-math.log1p(-p.bler_target), 10 ** (p.min_snr_db / 10) / mean)
    fails = [harq_failure_probability(a, k) for k in range(1, p.max_transmissions + 1)]
    retransmissions = sum(fails[:-1])
    return Impairment(delay_ms=p.base_delay_ms[direction] + p.harq_rtt_ms * retransmissions,
                      jitter_ms=0.0, loss_pct=100.0 * fails[-1])


def device_impairment(topo: Topology, device_id: str, snr_up_db: float, snr_down_db: float) -> LinkImpairment:
    """One device's impairments: the cell-wide `links:` values (or the radio model at these
    SNRs), then the device's own `link:` fields on top."""
    cell = topo.links
    if cell is not None and cell.impairments == "radio":
        base = LinkImpairment(radio_impairment(snr_up_db, "up"), radio_impairment(snr_down_db, "down"))
    elif cell is not None:
        base = LinkImpairment.symmetric(cell.delay_ms, cell.jitter_ms, cell.loss_pct)
    else:
        base = NO_IMPAIRMENT
    override = topo.link_override(device_id)
    if override is None:
        return base

    def apply(one: Impairment) -> Impairment:
        return Impairment(
            one.delay_ms if override.delay_ms is None else override.delay_ms,
            one.jitter_ms if override.jitter_ms is None else override.jitter_ms,
            one.loss_pct if override.loss_pct is None else override.loss_pct,
        )

    return LinkImpairment(apply(base.up), apply(base.down))


def link_impairments(topo: Topology, links: list[DeviceLink]) -> dict[str, LinkImpairment]:
    """Every device's impairments, from its link's SNR at placement."""
    return {link.id: device_impairment(topo, link.id, link.snr_up_db, link.snr_down_db) for link in links}
