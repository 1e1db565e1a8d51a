"""Fuzzing the topology loader: whatever bytes or YAML structure arrives, the loader either
returns a Topology (which then places and links without error) or raises TopologyError —
never another exception (the CLI would print a traceback instead of an exit-2 message)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.errors import TopologyError
from testbed.model.radio import compute_links
from testbed.model.topology import parse_topology, place

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
SMALL = (TOPOLOGIES / "small.yaml").read_bytes()

# the vocabulary of the schema, so random structures reach deep validators
KEYS = ["name", "seed", "area", "width_m", "height_m", "server", "position", "x_m", "y_m", "profile", "devices",
        "count", "profiles", "precisions", "min_distance_m", "list", "id", "precision", "radio", "model", "los",
        "carrier_ghz", "bandwidth_mhz", "bs_height_m", "ut_height_m", "shadowing", "rate_cap_mbps", "workload",
        "resolution_px", "steps_per_stage", "payload_bytes", "prompt", "compute", "scheduler", "budgets", "t_max_s",
        "e_max_j", "cell", "shared_capacity", "mobility", "speed_mps", "interval_s", "faults", "kind", "device",
        "at_s", "at_stage", "duration_s", "value", "expect", "min", "max", "jetson-agx-orin", "edge-server-a5000"]
WORDS = ["dev01", "dev02", "jetson-agx-orin", "jetson-agx-xavier", "fp32", "fp16", "int8", "int4", "kill",
         "broker-restart", "link-flap", "rate-drop", "slow", "los", "nlos", "tiny", "profile", "ddim", "random-waypoint",
         "umi-street-canyon", "Bad Id!", "../../etc", "a" * 300]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.sampled_from(WORDS)
           | st.integers(min_value=0, max_value=600))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5), max_leaves=30)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=7)


def _load_or_topology_error(raw: bytes | str) -> None:
    try:
        topo = parse_topology(raw, source="fuzz.yaml")
    except TopologyError as e:
        assert str(e).startswith("fuzz.yaml"), str(e)  # located at the file
        return
    try:  # a valid topology must also place and link (bounded: at most 5000 devices)
        compute_links(topo, place(topo))
    except TopologyError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_give_only_topology_errors(data):
    _load_or_topology_error(data)


@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents)
def test_random_structures_give_only_topology_errors(doc):
    _load_or_topology_error(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["devices", "budgets", "workload", "radio", "faults", "server", "area", "cell", "mobility"]),
       values)
@pytest.mark.slow  # (make check leaves it to make test: seconds of CPU)
def test_one_bad_section_in_a_good_topology_gives_only_topology_errors(section, value):
    doc = yaml.safe_load(SMALL)
    doc[section] = value
    _load_or_topology_error(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(SMALL) - 1), st.integers(min_value=0, max_value=40),
       st.binary(max_size=8))
def test_spliced_real_files_give_only_topology_errors(pos, cut, insert):
    _load_or_topology_error(SMALL[:pos] + insert + SMALL[pos + cut:])


def test_deep_nesting_and_alias_bombs_are_topology_errors():
    for raw in (b"[" * 5000, b"devices: " + b"{a: " * 3000 + b"1" + b"}" * 3000,
                b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                b"devices: {count: 2}\nfaults: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"):
        try:
            parse_topology(raw, source="fuzz.yaml")
        except TopologyError:
            continue
        raise AssertionError(f"accepted {raw[:40]!r}")
