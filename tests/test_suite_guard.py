"""The suite's own hygiene (tests/conftest.py), checked by running pytest on a small test
file in a subprocess: it refuses to start over testbed objects left on the host, naming
`testbed down --all`, unless TESTBED_ALLOW_LEFTOVERS=1; and a test that fails with a
cell up (a detached `testbed up`: nothing in the test tears it down) leaves nothing
behind, because `unique_run_id` removes what its run made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.emulation.runs import cleanup_run, make_run_dir, run_dir, run_objects

REPO = Path(__file__).resolve().parent.parent

FAILING_TEST = '''
import subprocess, sys
from pathlib import Path


def test_fails_with_the_cell_up(unique_run_id, topologies):
    Path({run_file!r}).write_text(unique_run_id)
    up = subprocess.run([sys.executable, "-m", "testbed.cli", "up", str(topologies / "small.yaml"), "--run",
                         unique_run_id, "--backend", {backend!r}, "--no-broker"], capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, up.stderr
    assert False, "forced failure while the cell is up"
'''


def _pytest(test_file: Path, allow_leftovers: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TESTBED_ALLOW_LEFTOVERS"}
    if allow_leftovers:
        env["TESTBED_ALLOW_LEFTOVERS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-c", str(REPO / "pyproject.toml"),
                           "--rootdir", str(REPO), "-p", "no:cacheprovider", "-q", str(test_file)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.root
def test_the_suite_refuses_to_start_over_leftovers_and_names_down_all(unique_run_id, tmp_path):
    make_run_dir(unique_run_id)  # what a crashed run leaves: its state directory
    test_file = tmp_path / "test_trivial.py"
    test_file.write_text("def test_nothing():\n    assert True\n")
    refused = _pytest(test_file, allow_leftovers=False)
    out = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert f"run {unique_run_id}: state" in out and "testbed down --all" in out, out
    assert "1 passed" not in out
    assert run_dir(unique_run_id).is_dir()  # refused, not removed
    allowed = _pytest(test_file, allow_leftovers=True)
    assert allowed.returncode == 0 and "1 passed" in allowed.stdout, allowed.stdout + allowed.stderr


@pytest.mark.root
@pytest.mark.parametrize("backend", ["netns", pytest.param("docker", marks=pytest.mark.docker)])
def test_a_test_forced_to_fail_with_a_cell_up_leaves_nothing_behind(tmp_path, backend):
    run_file = tmp_path / "run-id"
    test_file = tmp_path / "test_forced_failure.py"
    test_file.write_text(FAILING_TEST.format(run_file=str(run_file), backend=backend))
    inner = _pytest(test_file, allow_leftovers=True)  # other suites may be running on this host
    run = run_file.read_text() if run_file.exists() else None
    try:
        assert inner.returncode == pytest.ExitCode.TESTS_FAILED, inner.stdout + inner.stderr
        assert "forced failure while the cell is up" in inner.stdout, inner.stdout
        assert run is not None
        assert run_objects().get(run) is None, run_objects().get(run)
    finally:
        if run is not None:
            cleanup_run(run)
