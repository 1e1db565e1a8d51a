"""Per-device cost model of one relay stage: download, K denoising steps, upload, the server's handling.

Pure. A device's latency and energy for its stage are additive and do not depend on
where it sits in the relay order: every stage downloads one latent from the edge server
(the first one: the initial noise), runs K steps, uploads the result, and the server
handles it before the next stage starts. With L = payload_bytes:

    T_down = tcp(L, rate_down * link_efficiency, down, up) + message_overhead_s
    T_cmp  = K * step_time(resolution, precision) + pad_late_s      (compute: profile)
    T_up   = tcp(L, rate_up * link_efficiency, up, down) + message_overhead_s + encode(L) / min(1, q)
    T_hdl  = relay_handling_s + encode(L) + decode(L)
    T      = T_down + T_cmp + T_up + T_hdl
    E_down = P_rx * T_down      E_cmp = P_cmp * T_cmp      E_up = P_tx * T_up

What each term is, and where its number comes from (docs/selection.md, "Cost model"):

- `tcp(...)`: one message over TCP on the link (selection/transfer.py): slow start at
  the link's RTT, loss through Mathis et al. 1997 (Cardwell et al. 2000 for the
  short-flow part), the link's impairments (model/impairments.py) in the data direction
  and the ACKs'. Without impairments it is exactly L * 8 / (rate * link_efficiency).
- `link_efficiency` (0.95): the share of the shaped PHY rate that arrives as application
  payload: 1448 payload bytes per 1514-byte frame (0.956) and MQTT's framing; HTB on veth
  delivered 0.96-0.97 of the configured rate to TCP, measured here.
- `message_overhead_s`: the fixed cost of one relayed message on top of its time on the
  link, as the relay's timestamps see it: the publish through the broker (two socket
  hops), waking the receiver. CALIBRATED below.
- `encode(n)`, `decode(n)`: the wire format's encoding and checked decoding of an
  n-byte message (relay/wire.py), linear in n. CALIBRATED below. The device encodes its
  result after stamping `t_send`, so its encode is part of the measured T_up, slowed by
  its CPU quota q below one core; it decodes the task inside its stage, which the
  profile's padding absorbs (the padding counts from the task's arrival).
- `relay_handling_s`: the edge server's work between two stages besides the codec —
  receiving the result, checking it, recording the stage and its events, starting the
  next publish. CALIBRATED below. T_hdl is the server's time: no device energy is charged
  for it.
- `T_cmp`: the profile's SD1.5 step time (data/profiles.yaml): emulated, not measured —
  in `compute: profile` the agent pads its stage to it, counted from the task's arrival.
  `pad_late_s`: the padding ends a little late (the agent's event-loop timer and the host's
  scheduler). CALIBRATED below. (`compute: real` has no padding and no such term; its
  compute time is this CPU's, which the profile does not predict.)

Energy is modelled: the profile's power x the modelled time.
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

__all__ = ["DEFAULT_LINK_EFFICIENCY", "DEFAULT_MESSAGE_OVERHEAD_S", "RELAY_CALIBRATION", "RelayCalibration",
           "DeviceCost", "device_costs", "model_size_mb", "planning_budgets", "HANDLING_S_PER_MB", "handling_s",
           "activation_bytes"]

DEFAULT_LINK_EFFICIENCY = 0.95


@dataclass(frozen=True)
class RelayCalibration:
    """The relay's measured constants (seconds): what a message and a stage cost besides the
    link and the profile. Measured by `bench/relay.py --calibrate`, which prints this block."""

    message_overhead_s: float  # per relayed message, beyond tcp(...)
    encode_s_per_mb: float  # wire.encode, per MB (10^6 bytes), one core
    decode_s_per_mb: float  # wire.decode with its checks, per MB, one core
    relay_handling_s: float  # per stage: the server's work between stages besides the codec
    pad_late_s: float  # per padded stage (compute: profile): how late the agent's timer ends it

    def encode_s(self, nbytes: int, cpu_cores: float = 1.0) -> float:
        """Encoding one message; Python encodes on one thread, so a quota above a core does not help."""
        return self.encode_s_per_mb * nbytes / 1e6 / min(1.0, cpu_cores)

    def decode_s(self, nbytes: int) -> float:
        return self.decode_s_per_mb * nbytes / 1e6

    def handling_s(self, nbytes: int) -> float:
        """The server's time per stage: decode the result, record it, encode the next task."""
        return self.relay_handling_s + self.encode_s(nbytes) + self.decode_s(nbytes)


#: CALIBRATED on topologies/small.yaml (never on paper.yaml, where the model is judged) by
#: `sudo .venv/bin/python bench/relay.py --calibrate --reps 8 --skip paper`, 2026-11-29, 40
#: runs on the shared 2-core VM at load average 6.6-9.2 (docs/selection.md, "Calibration":
#: the spread, and how the per-message term moves with the host's load).
RELAY_CALIBRATION = RelayCalibration(
    message_overhead_s=0.00324,
    encode_s_per_mb=0.00028,
    decode_s_per_mb=0.00033,
    relay_handling_s=0.00127,
    pad_late_s=0.00117,
)
DEFAULT_MESSAGE_OVERHEAD_S = RELAY_CALIBRATION.message_overhead_s


@dataclass(frozen=True)
class DeviceCost:
    """What one stage on this device costs (seconds, joules) and what it brings (MB).

    latency_s = t_down_s + t_cmp_s + t_up_s + t_handling_s; energy_j = e_down_j + e_cmp_j + e_up_j.
    """

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
    t_handling_s: float = 0.0  # the edge server's handling of the stage (no device energy)

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
        t_handling_s: float = 0.0,
    ) -> DeviceCost:
        """A cost whose totals are the sums of its parts."""
        return DeviceCost(id=id, size_mb=size_mb, latency_s=t_down_s + t_cmp_s + t_up_s + t_handling_s,
                          energy_j=e_down_j + e_cmp_j + e_up_j, t_down_s=t_down_s, t_cmp_s=t_cmp_s, t_up_s=t_up_s,
                          e_down_j=e_down_j, e_cmp_j=e_cmp_j, e_up_j=e_up_j, profile=profile, precision=precision,
                          t_handling_s=t_handling_s)


def model_size_mb(precision: str) -> float:
    """SD1.5 UNet weight size of a precision variant in MB (10^6 bytes)."""
    return model_size_bytes(precision) / 1e6


def device_costs(
    topo: Topology,
    links: list[DeviceLink],
    sizes_mb: Mapping[str, float] | None = None,
    link_efficiency: float = DEFAULT_LINK_EFFICIENCY,
    message_overhead_s: float | None = None,
    impairments: Mapping[str, LinkImpairment] | None = None,
    calibration: RelayCalibration = RELAY_CALIBRATION,
) -> list[DeviceCost]:
    """The stage cost of every device with a link, in link order.

    `calibration` holds the relay's measured constants (RELAY_CALIBRATION);
    `message_overhead_s` overrides its per-message one (0 and a zero calibration: the pure
    link model).

    `impairments` (device id -> delay, jitter, loss per direction) overrides what the
    topology gives (`model.impairments.link_impairments`), e.g. a live cell's current ones.

    `sizes_mb` overrides model sizes: a key may be a device id (that device) or a
    precision (every device of it); device ids win. Without it, S_j is the SD1.5 UNet
    size of the device's precision (`testbed.model.profiles.model_size_bytes`).
    """
    if not 0 < link_efficiency <= 1:
        raise TopologyError(f"link_efficiency={link_efficiency:g} must be in (0, 1], e.g. 0.95")
    if message_overhead_s is None:
        message_overhead_s = calibration.message_overhead_s
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
            t_cmp += calibration.pad_late_s if wl.compute == "profile" else 0.0
        except KeyError as e:
            raise TopologyError(f"device {link.id}: {e.args[0]}; add it to data/profiles.yaml") from None
        imp = impaired[link.id]
        t_down = tcp_transfer_time_s(wl.payload_bytes, link.rate_down_mbps * 1e6 * link_efficiency,
                                     imp.down, imp.up) + message_overhead_s
        t_up = (tcp_transfer_time_s(wl.payload_bytes, link.rate_up_mbps * 1e6 * link_efficiency, imp.up, imp.down)
                + message_overhead_s + calibration.encode_s(wl.payload_bytes, prof.cpu_cores))
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
                t_handling_s=calibration.handling_s(wl.payload_bytes),
            )
        )
    return out


def planning_budgets(topo: Topology, t_max_s: float, e_max_j: float) -> tuple[float, float]:
    """The budgets a plan fills: T_max and E_max less the topology's `budgets.margin_pct`
    (what the model cannot predict: scheduling jitter on a shared host). Whether a run kept
    its budgets is judged against T_max and E_max themselves."""
    keep = 1.0 - topo.budgets.margin_pct / 100.0
    return t_max_s * keep, e_max_j * keep


#: What a tensor message of split or patch (megabytes of activations) costs beyond the
#: cost model's link time — wire encode and decode, the MQTT clients, the broker and the
#: transport of a multi-MB message over the emulated link — in seconds per MB per unit of the quota factor (handling_s). Calibrated
#: by `bench/split_codec.py --emulated`, apart from the sweeps it is judged on: the median
#: of 30 feature hops of split runs on topologies/small.yaml (0.0131 s/MB, load average
#: ~6 on this 2-core VM shared with other jobs). The same bench puts the floor, an idle
#: loopback without a link, at 0.0044 s/MB: most of the rest is the busy host.
HANDLING_S_PER_MB = 0.013


def handling_s(nbytes: int, device_cores: float = 1.0) -> float:
    """Modelled seconds one message of `nbytes` costs outside the link: half the work is
    the server's, half the device's, which runs under its CPU quota (Python's share of it
    is one thread: quotas above one core do not speed it up)."""
    return HANDLING_S_PER_MB * nbytes / 1e6 * (0.5 + 0.5 / min(1.0, device_cores))


def activation_bytes(precision: str) -> int:
    """Bytes per activation on the head: fp32 models compute in fp32, the others in fp16
    (int8/int4 variants quantize weights only)."""
    return 4 if precision == "fp32" else 2
