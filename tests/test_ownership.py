"""Whose a run is (`testbed down --all` takes down only the caller's unless --force) and
whether supervisor.pid still names the run's supervisor (a reused pid is never signalled).
No root: the run root is a temporary directory, the kernel side is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from testbed.emulation import ownership, runs
from testbed.emulation.ownership import caller_identity, is_supervisor, split_by_owner


def test_the_owner_is_the_person_behind_sudo():
    ident = caller_identity({"SUDO_UID": "1234"})
    assert ident["owner"] == 1234 and ident["uid"] == os.getuid()
    plain = caller_identity({})
    assert plain["owner"] == (plain["login_uid"] if plain["login_uid"] is not None else os.getuid())


def test_split_keeps_other_users_and_unknown_owners_apart():
    me = {"owner": 1000}
    owners = {"ra": {"owner": 1000}, "rb": {"owner": 1001}, "rc": None}
    assert split_by_owner(["ra", "rb", "rc"], owners, me) == (["ra"], ["rb", "rc"])


def test_a_new_run_directory_records_its_owner(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RUN_ROOT", tmp_path)
    monkeypatch.setenv("SUDO_UID", "4321")
    d = runs.make_run_dir("rown1")
    assert ownership.read_owner(d)["owner"] == 4321
    assert (d / "owner.json").stat().st_mode & 0o077 == 0


def test_down_all_takes_down_only_the_callers_runs_unless_forced(monkeypatch, capsys):
    from testbed.cli import main

    taken: list[str] = []
    owners = {"ra": {"owner": 1000}, "rb": {"owner": 1001}, "rc": None}
    monkeypatch.setattr(runs, "known_runs", lambda: ["ra", "rb", "rc"])
    monkeypatch.setattr(runs, "cleanup_run", lambda r: taken.append(r) or [f"state {r}"])
    monkeypatch.setattr(ownership, "read_owner", lambda d: owners[d.name])
    monkeypatch.setattr(ownership, "caller_identity", lambda: {"owner": 1000})
    monkeypatch.setattr("testbed.cli.commands.emulation_cmds.require_root", lambda: None)
    for argv in (["down", "--all", "--json"], ["down", "--all", "--force"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        if "--json" in argv:
            doc = json.loads(capsys.readouterr().out)
            assert taken == ["ra"] and doc["left"] == ["rb", "rc"]
    assert taken == ["ra", "ra", "rb", "rc"]
    with pytest.raises(SystemExit) as e:
        main(["down", "--run", "ra", "--force"])
    assert e.value.code == 2


def _fake_supervisor(run: str) -> subprocess.Popen:
    """A process whose command line reads like the supervisor of `run`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m",
                             "testbed.composition.supervisor", run, "topology.yaml"])


def test_a_pid_file_naming_another_process_or_a_reused_pid_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RUN_ROOT", tmp_path)
    (tmp_path / "rsup1").mkdir()
    pid_file = tmp_path / "rsup1" / "supervisor.pid"
    sup, other = _fake_supervisor("rsup1"), subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.3)
        pid_file.write_text(str(sup.pid))
        assert runs.supervisor_pid("rsup1") == sup.pid
        assert not is_supervisor(sup.pid, "rsup2", pid_file)  # another run's supervisor
        pid_file.write_text(str(other.pid))  # a pid some other process holds now
        assert runs.supervisor_pid("rsup1") is None
        pid_file.write_text(str(sup.pid))
        old = time.time() - 60
        os.utime(pid_file, (old, old))  # written a minute before this process started: its pid was reused
        assert runs.supervisor_pid("rsup1") is None
    finally:
        for p in (sup, other):
            p.kill()
            p.wait()
    assert runs.supervisor_pid("rsup1") is None  # gone
