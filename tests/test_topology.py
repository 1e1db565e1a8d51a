"""Topology loader: placement is seeded and inside the area; every bad input is a clear error."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from testbed.errors import TopologyError
from testbed.model.radio import compute_links
from testbed.model.topology import load_topology, parse_topology, place

MIN = "devices:\n  count: 3\n"


def test_paper_topology_has_20_devices_inside_the_area(topologies):
    topo = load_topology(topologies / "paper.yaml")
    p = place(topo)
    assert len(p.devices) == 20
    assert {d.profile for d in p.devices} <= {"jetson-agx-xavier", "jetson-agx-orin"}
    for d in p.devices:
        assert 0 <= d.x_m <= 500 and 0 <= d.y_m <= 500
        assert math.hypot(d.x_m - 250, d.y_m - 250) >= 10
    assert topo.budgets.t_max_s == 2.0 and topo.budgets.e_max_j == 200.0
    assert topo.workload.payload_bytes == 262144 and topo.workload.steps_per_stage == 5


def test_same_seed_same_placement_other_seed_other(topologies):
    a = place(load_topology(topologies / "paper.yaml", seed=3))
    b = place(load_topology(topologies / "paper.yaml", seed=3))
    c = place(load_topology(topologies / "paper.yaml", seed=4))
    assert a == b
    assert [(d.x_m, d.y_m) for d in a.devices] != [(d.x_m, d.y_m) for d in c.devices]


def test_precision_list_does_not_move_devices():
    a = place(parse_topology(MIN + "  precisions: [fp32]\n"))
    b = place(parse_topology(MIN + "  precisions: [int4, int8]\n"))
    assert [(d.x_m, d.y_m) for d in a.devices] == [(d.x_m, d.y_m) for d in b.devices]


def test_explicit_devices_keep_their_fields_and_generated_ids_do_not_collide():
    t = parse_topology(
        "devices:\n  count: 2\n  list:\n    - {id: dev01, profile: jetson-agx-orin, precision: int8,"
        " position: {x_m: 10, y_m: 20}}\n"
    )
    p = place(t)
    assert [d.id for d in p.devices] == ["dev01", "dev02", "dev03"]
    assert (p.devices[0].x_m, p.devices[0].precision) == (10, "int8")


def test_links_follow_formulas_and_are_seeded(topologies):
    topo = load_topology(topologies / "paper.yaml")
    links = compute_links(topo, place(topo))
    assert links == compute_links(topo, place(topo))
    for link in links:
        assert link.rate_up_mbps > 0 and link.rate_down_mbps > link.rate_up_mbps


BAD = {
    "empty file": (b"", "empty"),
    "not text": (b"\xff\xfe\x00garbage", "not UTF-8"),
    "top-level list": (b"- a\n- b\n", "top level is a list"),
    "top-level scalar": (b"42\n", "top level is a int"),
    "tab indentation": (b"devices:\n\tcount: 3\n", "tabs"),
    "syntax error": (b"devices: {count: 3\n", ":2: YAML syntax error"),
    "unknown key": (MIN.encode() + b"colour: red\n", ":3 colour: unknown key"),
    "wrong type": (b"devices:\n  count: many\n", ":2 devices.count"),
    "negative": (MIN.encode() + b"budgets: {t_max_s: -1}\n", "budgets.t_max_s"),
    "zero": (MIN.encode() + b"area: {width_m: 0}\n", "area.width_m"),
    "outside area": (
        b"devices:\n  list:\n    - {id: d1, position: {x_m: 612, y_m: 1}}\n",
        ":3 devices.list[0].position.x_m: 612 is outside the 500 m area",
    ),
    "unknown profile": (b"devices:\n  count: 2\n  profiles: {raspberry: 1}\n", "unknown profile 'raspberry'"),
    "unknown precision": (b"devices:\n  count: 2\n  precisions: [fp8]\n", "unknown precision 'fp8'"),
    "unknown precision in list": (
        b"devices:\n  list:\n    - {id: d1, precision: fp64}\n", "devices.list[0].precision"),
    "duplicate ids": (b"devices:\n  list:\n    - {id: d1}\n    - {id: d1}\n", "duplicate device ids ['d1']"),
    "empty device list": (b"devices:\n  list: []\n", "no devices"),
    "impossible radio": (MIN.encode() + b"radio: {ut_height_m: 12, bs_height_m: 10}\n", "must be below"),
    "bad device id": (b"devices:\n  list:\n    - {id: 'Bad Id!'}\n", "devices.list[0].id"),
    "prompt the tiny model cannot draw": (
        MIN.encode() + b"workload:\n  model: tiny\n  prompt: a cat\n", ":5 workload.prompt: prompt 'a cat'"),
    # it used to be dropped silently: the emulation reads capacities only when the air is shared
    "capacity without shared air": (
        MIN.encode() + b"cell: {capacity_up_mbps: 40}\n",
        ":3 cell.capacity_up_mbps: 40 Mbit/s caps nothing without `shared_capacity: true`"),
    "down capacity without shared air": (
        MIN.encode() + b"cell:\n  shared_capacity: false\n  capacity_down_mbps: 80\n",
        "cell.capacity_down_mbps: 80 Mbit/s caps nothing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error(case, tmp_path):
    raw, needle = BAD[case]
    f = tmp_path / "bad.yaml"
    f.write_bytes(raw)
    with pytest.raises(TopologyError) as exc:
        load_topology(f)
    assert needle in str(exc.value)
    assert str(f) in str(exc.value)


def test_missing_file():
    with pytest.raises(TopologyError, match="no such file"):
        load_topology("/nonexistent/topo.yaml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_validate_json_is_only_json(topologies):
    r = _cli("validate", str(topologies / "paper.yaml"), "--json", "--seed", "5")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["seed"] == 5 and len(doc["devices"]) == 20
    keys = {"id", "profile", "precision", "x_m", "y_m", "distance_m", "los", "pathloss_db", "shadowing_db",
            "snr_up_db", "snr_down_db", "rate_up_mbps", "rate_down_mbps"}
    assert set(doc["devices"][0]) == keys
    assert doc["server"] == {"x_m": 250.0, "y_m": 250.0}


def test_cli_validate_shows_delay_and_loss_and_what_the_numbers_are(topologies):
    r = _cli("validate", str(topologies / "paper-radio.yaml"))
    assert r.returncode == 0, r.stderr
    assert "delay ms" in r.stdout and "loss %" in r.stdout and "all modelled" in r.stdout
    dev03 = next(line for line in r.stdout.splitlines() if "dev03" in line)  # at the cell edge: both directions
    assert "6.4/5.2" in dev03 and "0.03/0.00" in dev03, dev03
    doc = json.loads(_cli("validate", str(topologies / "paper-radio.yaml"), "--json").stdout)
    assert doc["kind"] == "modelled"
    assert doc["impairments"]["dev03"]["up"]["delay_ms"] == pytest.approx(6.38, abs=0.01)


def test_cli_bad_input_exit_2_without_traceback(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("devices:\n  count: 0\n")
    r = _cli("validate", str(f))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no devices" in r.stderr


def test_cli_schema_is_json_schema():
    r = _cli("schema")
    assert r.returncode == 0
    assert "devices" in json.loads(r.stdout)["properties"]
