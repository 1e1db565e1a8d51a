"""Radio physics: path loss, SNR, Shannon rate and radio energy of each device link.

Pure functions. Path loss follows 3GPP TR 38.901 Table 7.4.1-1, UMi-Street
Canyon (LOS, NLOS, probabilistic LOS from Table 7.4.2-1); free-space (Friis) and a
log-distance model are selectable. SNR = P_tx - PL - shadowing - (-174 dBm/Hz + 10 log10 B
+ NF); rate = B log2(1 + SNR), optionally capped. Uplink: device transmits, the server's
noise figure applies; downlink: the server transmits, the device's noise figure applies.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from testbed.model.topology import Placement, RadioConfig, Topology, derive_rng

__all__ = [
    "SPEED_OF_LIGHT_MPS",
    "THERMAL_NOISE_DBM_HZ",
    "breakpoint_distance_m",
    "pathloss_umi_los_db",
    "pathloss_umi_nlos_db",
    "los_probability_umi",
    "pathloss_free_space_db",
    "pathloss_log_distance_db",
    "shadowing_sigma_db",
    "noise_power_dbm",
    "snr_db",
    "shannon_rate_mbps",
    "transfer_time_s",
    "transfer_energy_j",
    "DeviceLink",
    "compute_links",
    "link_for_position",
]

SPEED_OF_LIGHT_MPS = 299_792_458.0
THERMAL_NOISE_DBM_HZ = -174.0


def breakpoint_distance_m(fc_ghz: float, h_bs_m: float, h_ut_m: float, h_e_m: float = 1.0) -> float:
    """d'_BP = 4 h'_BS h'_UT f_c / c with effective heights h' = h - h_E (h_E = 1 m in UMi)."""
    return 4 * (h_bs_m - h_e_m) * (h_ut_m - h_e_m) * fc_ghz * 1e9 / SPEED_OF_LIGHT_MPS


def _d3d(d2d_m: float, h_bs_m: float, h_ut_m: float) -> float:
    return math.hypot(d2d_m, h_bs_m - h_ut_m)


def pathloss_umi_los_db(d2d_m: float, fc_ghz: float, h_bs_m: float, h_ut_m: float) -> float:
    """UMi-Street Canyon LOS: PL1 up to the breakpoint, PL2 beyond it."""
    d3d = _d3d(d2d_m, h_bs_m, h_ut_m)
    d_bp = breakpoint_distance_m(fc_ghz, h_bs_m, h_ut_m)
    if d2d_m <= d_bp:
        return 32.4 + 21 * math.log10(d3d) + 20 * math.log10(fc_ghz)
    return (
        32.4
        + 40 * math.log10(d3d)
        + 20 * math.log10(fc_ghz)
        - 9.5 * math.log10(d_bp**2 + (h_bs_m - h_ut_m) ** 2)
    )


def pathloss_umi_nlos_db(d2d_m: float, fc_ghz: float, h_bs_m: float, h_ut_m: float) -> float:
    """UMi-Street Canyon NLOS: max(PL_LOS, PL'_NLOS)."""
    d3d = _d3d(d2d_m, h_bs_m, h_ut_m)
    pl_nlos = 35.3 * math.log10(d3d) + 22.4 + 21.3 * math.log10(fc_ghz) - 0.3 * (h_ut_m - 1.5)
    return max(pathloss_umi_los_db(d2d_m, fc_ghz, h_bs_m, h_ut_m), pl_nlos)


def los_probability_umi(d2d_m: float) -> float:
    """TR 38.901 Table 7.4.2-1, UMi-Street Canyon."""
    if d2d_m <= 18.0:
        return 1.0
    return 18.0 / d2d_m + math.exp(-d2d_m / 36.0) * (1 - 18.0 / d2d_m)


def pathloss_free_space_db(d3d_m: float, fc_ghz: float) -> float:
    """Friis: 20 log10(4 pi d f / c)."""
    return 20 * math.log10(4 * math.pi * d3d_m * fc_ghz * 1e9 / SPEED_OF_LIGHT_MPS)


def pathloss_log_distance_db(d3d_m: float, fc_ghz: float, exponent: float, d0_m: float = 1.0) -> float:
    """Free-space loss at the reference distance d0, then 10 n log10(d / d0)."""
    d = max(d3d_m, d0_m)
    return pathloss_free_space_db(d0_m, fc_ghz) + 10 * exponent * math.log10(d / d0_m)


def shadowing_sigma_db(model: str, los: bool) -> float:
    """Log-normal shadow fading std-dev: UMi 4 dB (LOS) / 7.82 dB (NLOS); 8 dB otherwise."""
    if model == "umi-street-canyon":
        return 4.0 if los else 7.82
    if model == "free-space":
        return 0.0
    return 8.0


def noise_power_dbm(bandwidth_mhz: float, noise_figure_db: float) -> float:
    return THERMAL_NOISE_DBM_HZ + 10 * math.log10(bandwidth_mhz * 1e6) + noise_figure_db


def snr_db(tx_power_dbm: float, loss_db: float, bandwidth_mhz: float, noise_figure_db: float) -> float:
    return tx_power_dbm - loss_db - noise_power_dbm(bandwidth_mhz, noise_figure_db)


def shannon_rate_mbps(bandwidth_mhz: float, snr: float, cap_mbps: float | None = None) -> float:
    rate = bandwidth_mhz * math.log2(1 + 10 ** (snr / 10))
    return min(rate, cap_mbps) if cap_mbps is not None else rate


def transfer_time_s(payload_bytes: int, rate_mbps: float) -> float:
    """Ideal serialisation time of a payload at a rate (no protocol overhead)."""
    return payload_bytes * 8 / (rate_mbps * 1e6)


def transfer_energy_j(time_s: float, radio_power_w: float) -> float:
    """Radio energy of a transfer: the modem's electrical power times the time on air."""
    return radio_power_w * time_s


class DeviceLink(BaseModel):
    """The computed radio link of one device to the edge server."""

    model_config = ConfigDict(frozen=True)

    id: str
    profile: str
    precision: str
    x_m: float
    y_m: float
    distance_m: float
    los: bool
    pathloss_db: float
    shadowing_db: float
    snr_up_db: float
    snr_down_db: float
    rate_up_mbps: float
    rate_down_mbps: float


def link_for_position(
    radio: RadioConfig,
    d2d_m: float,
    los: bool,
    shadowing_db: float = 0.0,
) -> tuple[float, float, float, float, float]:
    """(pathloss_db, snr_up_db, snr_down_db, rate_up_mbps, rate_down_mbps) at a distance."""
    d2d = max(d2d_m, 1.0)  # co-located nodes: the formulas need a positive distance
    d3d = _d3d(d2d, radio.bs_height_m, radio.ut_height_m)
    if radio.model == "umi-street-canyon":
        fn = pathloss_umi_los_db if los else pathloss_umi_nlos_db
        pl = fn(d2d, radio.carrier_ghz, radio.bs_height_m, radio.ut_height_m)
    elif radio.model == "free-space":
        pl = pathloss_free_space_db(d3d, radio.carrier_ghz)
    else:
        pl = pathloss_log_distance_db(d3d, radio.carrier_ghz, radio.pathloss_exponent, radio.reference_distance_m)
    loss = pl + shadowing_db
    up = snr_db(radio.device_tx_power_dbm, loss, radio.bandwidth_mhz, radio.server_noise_figure_db)
    down = snr_db(radio.server_tx_power_dbm, loss, radio.bandwidth_mhz, radio.device_noise_figure_db)
    return (
        pl,
        up,
        down,
        shannon_rate_mbps(radio.bandwidth_mhz, up, radio.rate_cap_mbps),
        shannon_rate_mbps(radio.bandwidth_mhz, down, radio.rate_cap_mbps),
    )


def compute_links(topo: Topology, placement: Placement) -> list[DeviceLink]:
    """Every device's link, in placement order. LOS state and shadowing come from the seed."""
    radio = topo.radio
    los_rng = derive_rng(topo.seed, "los")
    sh_rng = derive_rng(topo.seed, "shadowing")
    links = []
    for dev in placement.devices:
        d2d = math.hypot(dev.x_m - placement.server.x_m, dev.y_m - placement.server.y_m)
        # Draw both streams for every device so one device's draw never shifts another's.
        u = float(los_rng.uniform())
        z = float(sh_rng.standard_normal())
        if radio.los == "probabilistic":
            los = u < los_probability_umi(d2d) if radio.model == "umi-street-canyon" else True
        else:
            los = radio.los == "los"
        shadow = z * shadowing_sigma_db(radio.model, los) if radio.shadowing else 0.0
        pl, up, down, r_up, r_down = link_for_position(radio, d2d, los, shadow)
        links.append(
            DeviceLink(
                id=dev.id,
                profile=dev.profile,
                precision=dev.precision,
                x_m=dev.x_m,
                y_m=dev.y_m,
                distance_m=round(d2d, 3),
                los=los,
                pathloss_db=pl,
                shadowing_db=shadow,
                snr_up_db=up,
                snr_down_db=down,
                rate_up_mbps=r_up,
                rate_down_mbps=r_down,
            )
        )
    return links
