"""How many cases each property-based test runs: `examples(n)` is n times TESTBED_FUZZ_SCALE
(default 1: the suite's quick pass; TESTBED_FUZZ_SCALE=10 is the long run whose counts
docs/security.md records)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("TESTBED_FUZZ_SCALE", "1")))


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
