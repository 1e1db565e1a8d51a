"""Radio formulas against values computed by hand (TR 38.901 Table 7.4.1-1, UMi-SC)."""

import math

import pytest

from testbed.model import radio
from testbed.model.topology import RadioConfig


def test_breakpoint_distance():
    # 4 (10-1)(1.5-1) 3.5e9 / c
    assert radio.breakpoint_distance_m(3.5, 10, 1.5) == pytest.approx(210.145, abs=1e-3)


def test_umi_los_before_breakpoint():
    assert radio.pathloss_umi_los_db(100, 3.5, 10, 1.5) == pytest.approx(85.3142, abs=1e-3)


def test_umi_los_after_breakpoint_uses_pl2():
    assert radio.pathloss_umi_los_db(300, 3.5, 10, 1.5) == pytest.approx(98.2386, abs=1e-3)


def test_umi_los_continuous_at_breakpoint():
    d = radio.breakpoint_distance_m(3.5, 10, 1.5)
    below = radio.pathloss_umi_los_db(d - 1e-6, 3.5, 10, 1.5)
    above = radio.pathloss_umi_los_db(d + 1e-6, 3.5, 10, 1.5)
    assert above == pytest.approx(below, abs=0.05)


def test_umi_nlos_is_max_of_los_and_nlos_prime():
    assert radio.pathloss_umi_nlos_db(100, 3.5, 10, 1.5) == pytest.approx(104.6438, abs=1e-3)
    for d in (10, 50, 200, 400):
        assert radio.pathloss_umi_nlos_db(d, 3.5, 10, 1.5) >= radio.pathloss_umi_los_db(d, 3.5, 10, 1.5)


def test_los_probability():
    assert radio.los_probability_umi(10) == 1.0
    assert radio.los_probability_umi(18) == 1.0
    assert radio.los_probability_umi(100) == pytest.approx(0.230985, abs=1e-6)


def test_free_space_and_log_distance():
    assert radio.pathloss_free_space_db(100, 3.5) == pytest.approx(83.3291, abs=1e-3)
    fs1 = radio.pathloss_free_space_db(1, 3.5)
    assert radio.pathloss_log_distance_db(100, 3.5, 3.0, 1.0) == pytest.approx(fs1 + 60.0, abs=1e-9)


def test_noise_snr_and_shannon_rate():
    assert radio.noise_power_dbm(20, 5) == pytest.approx(-95.9897, abs=1e-4)
    snr = radio.snr_db(23, 85.31419, 20, 5)
    assert snr == pytest.approx(33.6756, abs=1e-3)
    assert radio.shannon_rate_mbps(20, snr) == pytest.approx(223.748, abs=1e-2)
    assert radio.shannon_rate_mbps(20, snr, cap_mbps=100) == 100


def test_link_uses_server_nf_up_and_device_nf_down():
    cfg = RadioConfig(los="los")
    pl, up, down, r_up, r_down = radio.link_for_position(cfg, 100, los=True)
    assert pl == pytest.approx(85.3142, abs=1e-3)
    assert up == pytest.approx(23 - pl - radio.noise_power_dbm(20, 5))
    assert down == pytest.approx(30 - pl - radio.noise_power_dbm(20, 9))
    assert r_down > r_up


def test_transfer_time_and_energy():
    assert radio.transfer_time_s(262144, 20) == pytest.approx(262144 * 8 / 20e6)
    assert radio.transfer_energy_j(0.5, 2.0) == 1.0


def test_rate_falls_with_distance():
    cfg = RadioConfig(los="nlos")
    rates = [radio.link_for_position(cfg, d, los=False)[3] for d in (20, 50, 100, 200, 350)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert all(math.isfinite(r) and r > 0 for r in rates)
