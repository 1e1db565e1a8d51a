"""Split diffusion under a budget: which two devices, and how many denoising steps fit.

Pure (no I/O). The baseline of the paper (section IV-B): the UNet is cut in
two segments — head = conv_in + time embedding + down blocks, tail = mid block + up
blocks + conv_out — on two devices, and every denoising step crosses the network:

    server --latent (payload_bytes)--> head --features--> server --features--> tail
    tail --noise prediction (payload_bytes)--> server (scheduler step, checkpoint)

Devices only talk to the edge server (per-device MQTT ACLs), so the head's features go up
the head's uplink and down the tail's downlink. The features are padded on the wire to the
size of SD1.5's cut tensors (the 12 skip connections + the bottleneck) at the workload's
resolution, in the head's activation dtype (fp32 for fp32 models, fp16 otherwise) with
classifier-free guidance's batch of 2 — the tiny model computes, SD1.5's traffic crosses.

Per-step cost of a pair (head h, tail t), with eta = link efficiency (selection.costs);
on impaired links (topology `links:`) each X*8/(r*eta) is the TCP transfer time of
selection/transfer.py instead (slow start at the RTT, loss):

    t_step = L*8/(r_down_h*eta) + s*T_h + F_h*8/(r_up_h*eta)      (head: latent in, compute, features out)
           + F_h*8/(r_down_t*eta) + (1-s)*T_t + L*8/(r_up_t*eta)  (tail: features in, compute, noise out)
           + H(F_h, q_h) + H(F_h, q_t)                            (handling the features outside the links)
    e_step = P_rx,h*. + P_cmp,h*s*T_h + P_tx,h*. + P_rx,t*. + P_cmp,t*(1-s)*T_t + P_tx,t*.

with L = payload_bytes, F_h the feature bytes, T the profile's SD1.5 step time at the
device's precision and s = HEAD_FLOP_SHARE (the head's share of the UNet's FLOPs, counted
with torch's FlopCounterMode on SD1.5 on the meta device: bench/sweep_split_flops.py);
every transfer also pays the cost model's fixed per-message time. H(F, q) =
HANDLING_S_PER_MB x F x (1/2 + 1/(2 min(1, q))) is what a feature message costs outside
the link (encode, decode, MQTT clients, broker) with the device's half under its CPU
quota q, calibrated by bench/split_codec.py. The run does
N = floor(min(T_max / t_step, E_max / e_step)) steps, an N-step schedule. All of these
are modelled numbers; the run measures its own.

The pair: every ordered pair of distinct devices is scored; the chosen one does the most
steps, then has the largest total model size (the paper's quality proxy), then the
shortest step — the best the baseline can do in this cell, so the comparison is fair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Callable, Mapping
from typing import Any

from testbed.errors import InfeasibleError, TopologyError
from testbed.model.impairments import LinkImpairment, device_impairment
from testbed.model.profiles import load_profiles, step_time_s
from testbed.model.radio import DeviceLink
from testbed.selection.costs import (DEFAULT_LINK_EFFICIENCY, DEFAULT_MESSAGE_OVERHEAD_S, activation_bytes,
                                     handling_s, model_size_mb)
from testbed.selection.transfer import tcp_transfer_time_s
from testbed.model.topology import Topology

__all__ = ["HEAD_FLOP_SHARE", "SplitStepCost", "SplitPlan", "pair_cost", "plan_split"]

#: Share of SD1.5's UNet FLOPs (CFG batch 2) in the head segment, by image resolution.
HEAD_FLOP_SHARE: dict[int, float] = {256: 0.300, 512: 0.310}

@dataclass(frozen=True)
class SplitStepCost:
    """Predicted cost of one split step on a (head, tail) pair; seconds and joules."""

    head: str
    tail: str
    feature_bytes: int
    latent_bytes: int
    t_lat_down_s: float
    t_head_cmp_s: float
    t_feat_up_s: float
    t_feat_down_s: float
    t_tail_cmp_s: float
    t_noise_up_s: float
    e_head_j: float
    e_tail_j: float
    size_mb: float
    t_handling_s: float = 0.0  # the two feature messages outside the link (handling_s)

    @property
    def latency_s(self) -> float:
        return (self.t_lat_down_s + self.t_head_cmp_s + self.t_feat_up_s
                + self.t_feat_down_s + self.t_tail_cmp_s + self.t_noise_up_s + self.t_handling_s)

    @property
    def energy_j(self) -> float:
        return self.e_head_j + self.e_tail_j

    @property
    def t_tran_s(self) -> float:
        return self.t_lat_down_s + self.t_feat_up_s + self.t_feat_down_s + self.t_noise_up_s

    def steps_within(self, t_max_s: float, e_max_j: float) -> int:
        # a hair of slack so that a budget of exactly N steps admits N (float rounding)
        return int(math.floor(min(t_max_s / self.latency_s, e_max_j / self.energy_j) + 1e-9))


@dataclass(frozen=True)
class SplitPlan:
    """The chosen pair, the step count and the predicted totals."""

    head: str
    tail: str
    steps: int
    t_max_s: float
    e_max_j: float
    step: SplitStepCost
    pairs_considered: int
    head_flop_share: float

    @property
    def selected(self) -> list[str]:
        return [self.head, self.tail]

    @property
    def predicted_latency_s(self) -> float:
        return self.steps * self.step.latency_s

    @property
    def costs(self) -> list[Any]:
        """No per-device stage costs: a split step is one pair's."""
        return []

    @property
    def can_recover(self) -> bool:
        """Split inference has no checkpoint a third device could continue from."""
        return False

    @property
    def predicted_energy_j(self) -> float:
        return self.steps * self.step.energy_j

    def to_json(self) -> dict[str, Any]:
        step = asdict(self.step)
        step.update(latency_s=self.step.latency_s, energy_j=self.step.energy_j, t_tran_s=self.step.t_tran_s)
        return {
            "head": self.head, "tail": self.tail, "steps": self.steps, "t_max_s": self.t_max_s,
            "e_max_j": self.e_max_j, "predicted_latency_s": self.predicted_latency_s,
            "predicted_energy_j": self.predicted_energy_j, "step": step,
            "pairs_considered": self.pairs_considered, "head_flop_share": self.head_flop_share,
        }


def _head_share(resolution_px: int) -> float:
    try:
        return HEAD_FLOP_SHARE[resolution_px]
    except KeyError:
        raise TopologyError(
            f"workload.resolution_px={resolution_px}: no split FLOP share; valid: {sorted(HEAD_FLOP_SHARE)}"
        ) from None


def pair_cost(
    topo: Topology,
    head: DeviceLink,
    tail: DeviceLink,
    feature_bytes: Callable[[str], int],
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    impairments: Mapping[str, LinkImpairment] | None = None,
) -> SplitStepCost:
    """Predicted per-step cost of splitting the UNet between `head` and `tail` (with the
    links' `impairments` when given, e.g. a live cell's; else the topology's)."""
    profiles = load_profiles()
    wl = topo.workload
    share = _head_share(wl.resolution_px)
    ph, pt = profiles[head.profile], profiles[tail.profile]
    fbytes = int(feature_bytes(head.precision))
    lbytes = int(wl.payload_bytes)

    imp = {lk.id: (impairments or {}).get(lk.id) or device_impairment(topo, lk.id, lk.snr_up_db, lk.snr_down_db)
           for lk in (head, tail)}

    def tx_s(nbytes: int, link: DeviceLink, direction: str) -> float:
        rate_mbps = link.rate_up_mbps if direction == "up" else link.rate_down_mbps
        if not rate_mbps > 0:
            raise TopologyError(f"device {link.id}: link rate {rate_mbps:g} Mbit/s; the device has no usable link")
        fwd, rev = (imp[link.id].up, imp[link.id].down) if direction == "up" else (imp[link.id].down, imp[link.id].up)
        return tcp_transfer_time_s(nbytes, rate_mbps * 1e6 * link_efficiency, fwd, rev) + DEFAULT_MESSAGE_OVERHEAD_S

    t_lat_down = tx_s(lbytes, head, "down")
    t_head = share * step_time_s(ph, wl.resolution_px, head.precision)
    t_feat_up = tx_s(fbytes, head, "up")
    t_feat_down = tx_s(fbytes, tail, "down")
    t_tail = (1 - share) * step_time_s(pt, wl.resolution_px, tail.precision)
    t_noise_up = tx_s(lbytes, tail, "up")
    # the features leave the head and reach the tail: each end handles one copy under its
    # quota; measured, this time lands in the head's t_up, the server's t_relay and the
    # tail's t_down/t_cmp, so it is charged at the radio powers of those hops
    h_up, h_down = handling_s(fbytes, ph.cpu_cores), handling_s(fbytes, pt.cpu_cores)
    return SplitStepCost(
        head=head.id, tail=tail.id, feature_bytes=fbytes, latent_bytes=lbytes,
        t_lat_down_s=t_lat_down, t_head_cmp_s=t_head, t_feat_up_s=t_feat_up,
        t_feat_down_s=t_feat_down, t_tail_cmp_s=t_tail, t_noise_up_s=t_noise_up,
        e_head_j=ph.radio_rx_power_w * t_lat_down + ph.compute_power_w * t_head
        + ph.radio_tx_power_w * (t_feat_up + h_up),
        e_tail_j=pt.radio_rx_power_w * (t_feat_down + h_down) + pt.compute_power_w * t_tail
        + pt.radio_tx_power_w * t_noise_up,
        size_mb=model_size_mb(head.precision) + model_size_mb(tail.precision),
        t_handling_s=h_up + h_down,
    )


def plan_split(
    topo: Topology,
    links: list[DeviceLink],
    t_max_s: float,
    e_max_j: float,
    feature_bytes: Callable[[str], int],
    candidates: list[str] | None = None,
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    impairments: Mapping[str, LinkImpairment] | None = None,
) -> SplitPlan:
    """The best (head, tail) pair among `candidates` (default: every device) and its step count.

    `feature_bytes(head_precision)` is the wire size of one step's cut tensors. Raises
    InfeasibleError naming the shortfall when not even one step fits the budgets.
    """
    for name, val in (("t_max_s", t_max_s), ("e_max_j", e_max_j)):
        if not val > 0:
            raise TopologyError(f"{name}={val!r} must be positive")
    pool = [lk for lk in links if candidates is None or lk.id in set(candidates)]
    if len(pool) < 2:
        raise InfeasibleError(f"split diffusion needs two devices; {len(pool)} candidate(s) given")
    best: tuple[tuple[float, ...], SplitStepCost, int] | None = None
    n_pairs = 0
    for h in pool:
        for t in pool:
            if h.id == t.id:
                continue
            c = pair_cost(topo, h, t, feature_bytes, link_efficiency, impairments)
            n = c.steps_within(t_max_s, e_max_j)
            n_pairs += 1
            key = (n, c.size_mb, -c.latency_s)
            if best is None or key > best[0]:
                best = (key, c, n)
    assert best is not None
    _, cost, n = best
    if n == 0:
        fastest = min((pair_cost(topo, h, t, feature_bytes, link_efficiency, impairments) for h in pool for t in pool
                       if h.id != t.id), key=lambda c: max(c.latency_s / t_max_s, c.energy_j / e_max_j))
        raise InfeasibleError(
            f"split diffusion: not one step fits T_max {t_max_s:g} s and E_max {e_max_j:g} J; the cheapest pair "
            f"({fastest.head} > {fastest.tail}) needs {fastest.latency_s:.3g} s and {fastest.energy_j:.3g} J per "
            f"step ({fastest.t_tran_s:.3g} s of it on the links, {fastest.t_handling_s:.3g} s handling "
            f"{fastest.feature_bytes / 1e6:.1f} MB of features twice); "
            "raise --tmax / --emax"
        )
    return SplitPlan(head=cost.head, tail=cost.tail, steps=n, t_max_s=float(t_max_s), e_max_j=float(e_max_j),
                     step=cost, pairs_considered=n_pairs, head_flop_share=_head_share(topo.workload.resolution_px))
