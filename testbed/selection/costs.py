"""Per-device cost model of one relay stage: download, K denoising steps, upload.

Pure. A device's latency and energy for its stage are additive and do not
depend on where it sits in the relay order: every stage downloads one latent from the
edge server (the first one: the initial noise), runs K steps and uploads the result.

    T_down = tcp(payload_bytes, rate_down * link_efficiency, down, up) + message_overhead_s
    T_cmp  = K * step_time(resolution, precision)
    T_up   = tcp(payload_bytes, rate_up * link_efficiency, up, down) + message_overhead_s
    E_down = P_rx * T_down      E_cmp = P_cmp * T_cmp      E_up = P_tx * T_up

`tcp(...)` is the time of one message over TCP on the link (selection/transfer.py): slow
start at the link's RTT, loss through Mathis et al. 1997 (Cardwell et al. 2000 for the
short-flow part), the link's impairments (model/impairments.py: the topology's `links:`,
`link:` overrides or the radio model) in the data direction and the ACKs' direction.
Without impairments it is exactly payload_bytes * 8 / (rate * link_efficiency).

`link_efficiency` is the share of the shaped PHY rate that arrives as application payload:
HTB on veth delivered 0.96-0.97 of the configured rate to TCP (1448 payload bytes per
1514-byte frame, measured here) and a 256 KB MQTT relay through shaped links took
436.5 ms against 419.4 ms ideal (0.961); MQTT headers and acknowledgements cost a little
more, so the default is 0.95.

`message_overhead_s` is the fixed cost of one relayed message on top of its time on the
air: the MQTT publish through the broker, encoding and decoding, and waking the receiver.
At the rates of a 500 m cell (100-280 Mbit/s, 8-30 ms per 256 KB) it is a visible share
of a transfer: on an idle 2-core VM, bench/relay.py measured the transfers of small.yaml
and paper.yaml 0.5-1.5 ms per message longer than the rate alone predicts (with 3 ms the
prediction was 8-18 % high; under heavy load the residual grew to 1-15 ms). The default is
1 ms; set it to 0 to get the pure rate model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from testbed.errors import TopologyError
from testbed.model.impairments import LinkImpairment, link_impairments
from testbed.model.profiles import load_profiles, model_size_bytes, step_time_s
from testbed.model.radio import DeviceLink
from testbed.model.topology import Topology
from testbed.selection.transfer import tcp_transfer_time_s

__all__ = ["DEFAULT_LINK_EFFICIENCY", "DEFAULT_MESSAGE_OVERHEAD_S", "DeviceCost", "device_costs", "model_size_mb"]

DEFAULT_LINK_EFFICIENCY = 0.95
DEFAULT_MESSAGE_OVERHEAD_S = 0.001


@dataclass(frozen=True)
class DeviceCost:
    """What one stage on this device costs (seconds, joules) and what it brings (MB)."""

    id: str
    size_mb: float
    latency_s: float
    energy_j: float
    t_down_s: float
    t_cmp_s: float
    t_up_s: float
    e_down_j: float
    e_cmp_j: float
    e_up_j: float
    profile: str = ""
    precision: str = ""

    @staticmethod
    def from_parts(
        id: str,  # noqa: A002 - the field's name
        size_mb: float,
        t_down_s: float,
        t_cmp_s: float,
        t_up_s: float,
        e_down_j: float,
        e_cmp_j: float,
        e_up_j: float,
        profile: str = "",
        precision: str = "",
    ) -> DeviceCost:
        """A cost whose totals are the sums of its parts."""
        return DeviceCost(
            id=id,
            size_mb=size_mb,
            latency_s=t_down_s + t_cmp_s + t_up_s,
            energy_j=e_down_j + e_cmp_j + e_up_j,
            t_down_s=t_down_s,
            t_cmp_s=t_cmp_s,
            t_up_s=t_up_s,
            e_down_j=e_down_j,
            e_cmp_j=e_cmp_j,
            e_up_j=e_up_j,
            profile=profile,
            precision=precision,
        )


def model_size_mb(precision: str) -> float:
    """SD1.5 UNet weight size of a precision variant in MB (10^6 bytes)."""
    return model_size_bytes(precision) / 1e6


def device_costs(
    topo: Topology,
    links: list[DeviceLink],
    sizes_mb: Mapping[str, float] | None = None,
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    message_overhead_s: float = DEFAULT_MESSAGE_OVERHEAD_S,
    impairments: Mapping[str, LinkImpairment] | None = None,
) -> list[DeviceCost]:
    """The stage cost of every device with a link, in link order.

    `impairments` (device id -> delay, jitter, loss per direction) overrides what the
    topology gives (`model.impairments.link_impairments`), e.g. a live cell's current ones.

    `sizes_mb` overrides model sizes: a key may be a device id (that device) or a
    precision (every device of it); device ids win. Without it, S_j is the SD1.5 UNet
    size of the device's precision (`testbed.model.profiles.model_size_bytes`).
    """
    if not 0 < link_efficiency <= 1:
        raise TopologyError(f"link_efficiency={link_efficiency:g} must be in (0, 1], e.g. 0.95")
    if not 0 <= message_overhead_s < 10:
        raise TopologyError(f"message_overhead_s={message_overhead_s:g} must be in [0, 10) s, e.g. 0.003")
    profiles = load_profiles()
    wl = topo.workload
    sizes = dict(sizes_mb or {})
    impaired = link_impairments(topo, links) | dict(impairments or {})
    out: list[DeviceCost] = []
    for link in links:
        prof = profiles[link.profile]
        for name, rate in (("rate_down_mbps", link.rate_down_mbps), ("rate_up_mbps", link.rate_up_mbps)):
            if not rate > 0:
                raise TopologyError(f"device {link.id}: {name}={rate:g}; the device has no usable link")
        try:
            t_cmp = wl.steps_per_stage * step_time_s(prof, wl.resolution_px, link.precision)
        except KeyError as e:
            raise TopologyError(f"device {link.id}: {e.args[0]}; add it to data/profiles.yaml") from None
        imp = impaired[link.id]
        t_down = tcp_transfer_time_s(wl.payload_bytes, link.rate_down_mbps * 1e6 * link_efficiency,
                                     imp.down, imp.up) + message_overhead_s
        t_up = tcp_transfer_time_s(wl.payload_bytes, link.rate_up_mbps * 1e6 * link_efficiency,
                                   imp.up, imp.down) + message_overhead_s
        if link.id in sizes:
            size = sizes[link.id]
        elif link.precision in sizes:
            size = sizes[link.precision]
        else:
            size = model_size_mb(link.precision)
        if not size > 0:
            raise TopologyError(f"device {link.id}: model size {size!r} MB must be positive")
        out.append(
            DeviceCost.from_parts(
                id=link.id,
                size_mb=float(size),
                t_down_s=t_down,
                t_cmp_s=t_cmp,
                t_up_s=t_up,
                e_down_j=prof.radio_rx_power_w * t_down,
                e_cmp_j=prof.compute_power_w * t_cmp,
                e_up_j=prof.radio_tx_power_w * t_up,
                profile=link.profile,
                precision=link.precision,
            )
        )
    return out
