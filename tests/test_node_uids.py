"""Node uids (testbed/emulation/node_uids.py): each device of a run gets a distinct uid from
the node range, never one another run's record holds, a process uses or a passwd entry
names; the record makes a reopened run keep its uids. `drop_privileges` refuses root and
anything outside the range; as root, it leaves no capability and sets no_new_privs.
Allocation tests use a private state root (no root needed); the drop test forks (root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from testbed.emulation import node_uids
from testbed.emulation.node_uids import (
    DEPLOYMENT_UIDS,
    NODE_UIDS,
    RUN_UIDS,
    allocate_uids,
    deployment_uids,
    drop_privileges,
    read_uids,
)
from testbed.errors import ResourceError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "runs"
    r.mkdir()
    return r


def _run(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    return d


def test_devices_get_distinct_run_uids_recorded_in_the_run_dir(root: Path) -> None:
    a = _run(root, "ra")
    uids = allocate_uids(a, ["dev01", "dev02", "dev03"], root)
    assert len(set(uids.values())) == 3 and all(u in RUN_UIDS for u in uids.values())
    assert read_uids(a) == uids
    assert json.loads((a / "node-uids.json").read_text()) == {"uids": uids}
    assert (a / "node-uids.json").stat().st_mode & 0o077 == 0


def test_a_reopened_run_keeps_its_uids_and_new_devices_get_fresh_ones(root: Path) -> None:
    a = _run(root, "ra")
    first = allocate_uids(a, ["dev01", "dev02"], root)
    again = allocate_uids(a, ["dev02", "dev01", "dev03"], root)
    assert again["dev01"] == first["dev01"] and again["dev02"] == first["dev02"]
    assert again["dev03"] not in first.values()


def test_concurrent_runs_never_share_a_uid(root: Path) -> None:
    a, b = _run(root, "ra"), _run(root, "rb")
    ua = allocate_uids(a, [f"d{i}" for i in range(5)], root)
    ub = allocate_uids(b, [f"d{i}" for i in range(5)], root)
    assert not set(ua.values()) & set(ub.values())


def test_uids_in_use_by_a_process_are_skipped(root: Path, monkeypatch) -> None:
    busy = {RUN_UIDS.start, RUN_UIDS.start + 1}
    monkeypatch.setattr(node_uids, "uids_in_use", lambda: busy)
    got = allocate_uids(_run(root, "ra"), ["dev01"], root)
    assert got == {"dev01": RUN_UIDS.start + 2}


def test_uids_a_passwd_or_group_entry_names_are_skipped(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(node_uids, "_named", lambda: {RUN_UIDS.start})
    monkeypatch.setattr(node_uids, "uids_in_use", set)  # not this host's processes (an agent may be exiting)
    assert allocate_uids(_run(root, "ra"), ["dev01"], root) == {"dev01": RUN_UIDS.start + 1}


def test_an_exhausted_range_is_a_resource_error(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(node_uids, "RUN_UIDS", range(RUN_UIDS.start, RUN_UIDS.start + 2))
    with pytest.raises(ResourceError, match="no free node uid"):
        allocate_uids(_run(root, "ra"), ["a", "b", "c"], root)


def test_deployment_uids_are_by_position_outside_the_run_range() -> None:
    got = deployment_uids(["dev01", "dev02"])
    assert got == {"dev01": DEPLOYMENT_UIDS.start, "dev02": DEPLOYMENT_UIDS.start + 1}
    assert not set(got.values()) & set(RUN_UIDS)


@pytest.mark.parametrize("uid", [0, 1000, 65534, NODE_UIDS.stop])
def test_drop_privileges_refuses_root_and_uids_outside_the_range(uid: int) -> None:
    with pytest.raises(PermissionError, match="not a node uid"):
        drop_privileges(uid)


@pytest.mark.root
def test_dropping_leaves_one_uid_no_group_no_capability_and_no_new_privs() -> None:
    uid = RUN_UIDS.start + 12345
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            drop_privileges(uid)
            os.write(w, Path("/proc/self/status").read_bytes())
            try:
                os.setuid(0)
            except PermissionError:
                code = 0  # no way back
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        status = dict(line.split(":", 1) for line in f.read().decode().splitlines())
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, "the dropped process could become root again"
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


@pytest.mark.root
def test_down_stops_what_still_runs_as_one_of_the_runs_uids(unique_run_id: str) -> None:
    """Outside any cgroup or namespace of the run: found by its uid alone."""
    from testbed.emulation.runs import cleanup_run, make_run_dir

    uid = allocate_uids(make_run_dir(unique_run_id), ["dev01"])["dev01"]
    proc = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[], start_new_session=True)
    try:
        removed = cleanup_run(unique_run_id)
        assert proc.wait(timeout=10) is not None
        assert f"process {proc.pid}" in removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
