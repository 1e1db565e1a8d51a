"""What a run owner starts dies with it, also by `kill -9` (procs.spawn_in: PR_SET_PDEATHSIG
from one long-lived thread, set after any change of user id). The end-to-end case — a cold
`testbed run` killed mid-generation — is tests/test_leaks.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed.emulation.procs import pid_alive

REPO = Path(__file__).resolve().parent.parent

#: An owner process: spawns `sleep 600` with spawn_in from a thread that ends at once (as an
#: executor thread may), prints the child's pid and its own uid, then waits to be killed.
OWNER = textwrap.dedent("""
    import json, os, sys, threading, time
    from testbed.emulation.procs import spawn_in
    kw = json.loads(sys.argv[1])
    if "run_as" in kw:
        kw["run_as"] = tuple(kw["run_as"])
    box = {}
    t = threading.Thread(target=lambda: box.update(proc=spawn_in(None, ["sleep", "600"], **kw)))
    t.start(); t.join()
    print(box["proc"].pid, flush=True)
    time.sleep(600)
""")


def _owner(**kw) -> tuple[subprocess.Popen, int]:
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, json.dumps(kw)], stdout=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    return owner, int(owner.stdout.readline())


def _end(owner: subprocess.Popen, child: int) -> None:
    for pid in (owner.pid, child):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    owner.stdout.close()


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.parametrize("run_as", [None, (65534, 65534)], ids=["same-user", "run-as-nobody"])
def test_a_child_outlives_the_thread_that_started_it_but_not_its_owner(run_as):
    if run_as is not None and os.geteuid() != 0:
        pytest.skip("changing the child's user needs root")
    owner, child = _owner(**({"run_as": run_as} if run_as else {}))
    try:
        time.sleep(0.5)  # the thread that asked for it has ended: the child lives on
        assert pid_alive(child)
        if run_as is not None:
            assert _uid(child) == run_as[0]  # the uid changed, and still it dies with its owner:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        assert _gone_within(child, 5.0)
    finally:
        _end(owner, child)


def test_a_child_that_must_outlive_its_owner_says_so():
    owner, child = _owner(die_with_owner=False)
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        time.sleep(0.5)
        assert pid_alive(child)
    finally:
        _end(owner, child)
