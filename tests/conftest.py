"""Test tiers: pure by default; `root`, `docker`, `gpu` markers skip with a
reason when the resource is missing — unless TESTBED_REQUIRE names it (CI sets
TESTBED_REQUIRE=root,docker,mosquitto), in which case the missing resource FAILS the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = REPO / "topologies"


def _required() -> set[str]:
    return {x.strip() for x in os.environ.get("TESTBED_REQUIRE", "").split(",") if x.strip()}


def _have_root() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, tc, cgroups)"
    return True, ""


def _have_docker() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "needs the docker CLI and a running daemon"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False, "docker daemon did not answer"
    if r.returncode != 0:
        return False, "no running docker daemon (start dockerd)"
    return True, ""


def _have_mosquitto() -> tuple[bool, str]:
    missing = [b for b in ("mosquitto", "mosquitto_sub", "mosquitto_pub") if shutil.which(b) is None]
    if missing:
        return False, f"needs {', '.join(missing)} (apt install mosquitto mosquitto-clients)"
    return True, ""


def _have_gpu() -> tuple[bool, str]:
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
    except Exception:  # noqa: BLE001 - torch missing is "no GPU"
        pass
    return False, "needs a CUDA GPU"


_CHECKS = {"root": _have_root, "docker": _have_docker, "mosquitto": _have_mosquitto, "gpu": _have_gpu}
_cache: dict[str, tuple[bool, str]] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, check in _CHECKS.items():
        if item.get_closest_marker(name) is None:
            continue
        if name not in _cache:
            _cache[name] = check()
        ok, why = _cache[name]
        if ok:
            continue
        if name in _required():
            pytest.fail(f"TESTBED_REQUIRE={name} but: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def unique_run_id() -> str:
    """A short run id unique to the test (run ids go into 15-character interface names)."""
    return "t" + uuid.uuid4().hex[:5]


@pytest.fixture
def topologies() -> Path:
    return TOPOLOGIES
