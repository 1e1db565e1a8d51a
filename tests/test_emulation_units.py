"""Pure parts of the emulation layer: mobility, broker configuration, ACL translation,
run ids and addresses (no root)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from testbed.emulation.backend import device_address
from testbed.model.names import check_run_id
from testbed.emulation.broker import _amqtt_conf, _mosquitto_conf
from testbed.emulation.cell import BrokerSettings
from testbed.emulation.mobility import RandomWaypoint
from testbed.errors import InputError, ResourceError
from testbed.model.topology import Area, MobilityConfig


def test_random_waypoint_moves_at_speed_and_stays_inside() -> None:
    cfg = MobilityConfig(speed_mps=10.0, pause_s=0.0, interval_s=0.5)
    area = Area(width_m=500, height_m=500)
    rw = RandomWaypoint(cfg, area, seed=3, start={"a": (250.0, 250.0), "b": (0.0, 0.0)})
    prev = rw.positions()
    for _ in range(200):
        pos = rw.step(0.5)
        for dev, (x, y) in pos.items():
            assert 0 <= x <= 500 and 0 <= y <= 500
            moved = math.dist(prev[dev], (x, y))
            assert moved <= 10.0 * 0.5 + 1e-9  # never faster than the speed (turns shorten it)
        prev = pos
    assert prev["a"] != (250.0, 250.0)


def test_random_waypoint_is_seeded_and_pauses() -> None:
    cfg = MobilityConfig(speed_mps=1000.0, pause_s=10.0)
    area = Area()
    a = RandomWaypoint(cfg, area, 5, {"d": (1.0, 1.0)})
    b = RandomWaypoint(cfg, area, 5, {"d": (1.0, 1.0)})
    assert a.step(1.0) == b.step(1.0)
    # at 1000 m/s it reaches the waypoint within 1 s, then holds still for the pause
    p1 = a.step(1.0)
    assert a.step(5.0) == p1


def test_mosquitto_conf_listens_on_server_only_with_credentials(tmp_path: Path) -> None:
    settings = BrokerSettings(tmp_path / "pw", tmp_path / "acl", 1 << 20)
    conf = _mosquitto_conf("198.18.0.1", tmp_path / "log", settings, tmp_path / "pw", tmp_path / "acl", None, None)
    lines = conf.splitlines()
    assert "listener 1883 198.18.0.1" in lines
    assert "allow_anonymous false" in lines and f"password_file {tmp_path / 'pw'}" in lines
    assert f"acl_file {tmp_path / 'acl'}" in lines and "message_size_limit 1048576" in lines
    assert "use_username_as_clientid true" not in lines and "per_listener_settings true" not in lines
    assert "allow_anonymous true" in _mosquitto_conf("198.18.0.1", tmp_path / "log", BrokerSettings(), None, None,
                                                     None, None)


def test_a_watch_listener_binds_client_ids_on_the_cell_listener(tmp_path: Path) -> None:
    """With the watch files, the cell listener replaces every client id by its account and
    the read-only accounts get a listener of their own (port + 1), each listener with its
    own files; the global options come before the first listener."""
    settings = BrokerSettings(tmp_path / "pw", tmp_path / "acl", 1 << 20, watch_password_file=tmp_path / "wpw",
                              watch_acl_file=tmp_path / "wacl")
    assert settings.watch_port == 1884 and BrokerSettings().watch_port is None
    assert BrokerSettings.from_json(settings.to_json()) == settings
    lines = _mosquitto_conf("198.18.0.1", tmp_path / "log", settings, tmp_path / "pw", tmp_path / "acl",
                            (tmp_path / "wpw", tmp_path / "wacl"), None).splitlines()
    cell, watch = lines.index("listener 1883 198.18.0.1"), lines.index("listener 1884 198.18.0.1")
    assert lines.index("per_listener_settings true") < cell < watch
    assert lines.index("message_size_limit 1048576") < cell
    assert cell < lines.index("use_username_as_clientid true") < watch
    assert lines[watch + 1:] == ["allow_anonymous false", f"password_file {tmp_path / 'wpw'}",
                                 f"acl_file {tmp_path / 'wacl'}"]


def test_amqtt_serves_anonymous_cells_and_refuses_credentials(tmp_path: Path) -> None:
    conf = _amqtt_conf("198.18.0.1", BrokerSettings(prefer="amqtt"))
    assert conf["listeners"]["default"]["bind"] == "198.18.0.1:1883"
    for settings in (BrokerSettings(tmp_path / "pw", prefer="amqtt"), BrokerSettings(acl_file=tmp_path / "a")):
        with pytest.raises(ResourceError, match="cannot enforce the run's MQTT accounts.*install mosquitto"):
            _amqtt_conf("198.18.0.1", settings)


def test_run_ids_and_addresses() -> None:
    assert check_run_id("t3f9a2") == "t3f9a2"
    for bad in ("", "UPPER", "has-dash", "toolong12"):
        with pytest.raises(InputError, match="run id"):
            check_run_id(bad)
    assert device_address(0) == "198.18.0.10"
    assert device_address(246) == "198.18.1.0"
    with pytest.raises(ResourceError, match="no address left"):
        device_address(70000)
    assert len(f"tb{'a' * 7}d{4999}") <= 15  # longest interface name the backend makes
