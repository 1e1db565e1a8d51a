"""Root never writes through a link the broker's user planted, and a failed broker restart
is a failed fault (root, mosquitto).

The reproduction of the issue: the run's broker directory as older versions left it (the
mosquitto user's own), holding links that the mosquitto user planted at every name root
writes there (mosquitto.log, acl, mosquitto.conf, passwd, watch.passwd, watch.acl) towards
a root-only canary file. A restart takes the directory back for root and renames each file
in: the canary keeps its owner, mode and content, and the links are gone. Afterwards the
mosquitto user can create nothing in broker/ (only in its log/), and a link it plants
there is only ever opened by mosquitto itself, as the mosquitto user.

A restart that cannot start the broker (its port is taken) raises, and the cell's status
says the broker is down and why; `FaultInjector` records a failed undo and `testbed fault`
then exits non-zero (tests/test_faults_units.py has the CLI side without root).
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import socket
import stat
from pathlib import Path

import pytest

from testbed.emulation.emulation import Emulation
from testbed.emulation.nsutil import in_netns
from testbed.emulation.runs import make_run_dir
from testbed.errors import ResourceError
from testbed.model.names import MQTT_PORT, SERVER_ADDRESS
from testbed.model.topology import load_topology
from test_identities import run_accounts

pytestmark = [pytest.mark.root, pytest.mark.mosquitto]

ROOT_WRITES = ("mosquitto.log", "acl", "mosquitto.conf", "passwd", "watch.passwd", "watch.acl")


def _as_mosquitto(fn) -> int:
    """Run fn() in a child that became the mosquitto user; its errno (0: it worked)."""
    ent = pwd.getpwnam("mosquitto")
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(ent.pw_gid)
            os.setuid(ent.pw_uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:  # noqa: BLE001 - any other failure of the child
            code = 254
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _snapshot(path: Path) -> tuple:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), path.read_bytes()


async def test_restart_writes_no_file_through_a_planted_link_and_a_failed_restart_raises(
        topologies, unique_run_id, tmp_path):
    run = unique_run_id
    state = make_run_dir(run)
    canary = tmp_path / "canary"
    canary.write_text("root's own file\n")
    canary.chmod(0o600)
    before = _snapshot(canary)
    mosq = pwd.getpwnam("mosquitto")
    async with Emulation(load_topology(topologies / "small.yaml"), run, cgroups=False, state_dir=state) as emu:
        _, _, settings = run_accounts(state, run, emu.device_ids())
        await emu.start_broker(settings)
        broker = state / "broker"
        st = os.lstat(broker)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, mosq.pw_gid, 0o710)
        log_dir = os.lstat(broker / "log")
        assert (log_dir.st_uid, stat.S_IMODE(log_dir.st_mode)) == (mosq.pw_uid, 0o700)
        for name in ("passwd", "acl", "watch.passwd", "watch.acl", "mosquitto.conf"):
            f = os.lstat(broker / name)
            assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (0, mosq.pw_gid, 0o640), name
        # now: the mosquitto user cannot plant anything where root writes
        for name in ROOT_WRITES:
            assert _as_mosquitto(lambda n=name: os.symlink(canary, broker / f"{n}.x")) == errno.EACCES, name
        # the reproduction: broker/ as older versions left it (the mosquitto user's), links everywhere
        os.chown(broker, mosq.pw_uid, mosq.pw_gid)
        broker.chmod(0o700)

        def plant() -> None:
            for name in ROOT_WRITES:
                (broker / name).unlink(missing_ok=True)
                os.symlink(canary, broker / name)
            os.rename(broker / "log", broker / "old-log")
            os.symlink(tmp_path, broker / "log")  # root would chown a directory of root's

        assert _as_mosquitto(plant) == 0
        await emu.restart_broker()  # mosquitto is up again, with the run's files
        assert _snapshot(canary) == before
        assert os.lstat(tmp_path).st_uid == 0
        for name in ("passwd", "acl", "watch.passwd", "watch.acl", "mosquitto.conf"):
            assert stat.S_ISREG(os.lstat(broker / name).st_mode), name  # the link was replaced, not followed
        assert stat.S_ISDIR(os.lstat(broker / "log").st_mode) and os.lstat(broker / "log").st_uid == mosq.pw_uid
        # a link the broker's user plants in its own log/: only mosquitto (as that user) opens it
        def plant_log() -> None:
            (broker / "log" / "mosquitto.log").unlink(missing_ok=True)
            os.symlink(canary, broker / "log" / "mosquitto.log")

        assert _as_mosquitto(plant_log) == 0
        await emu.restart_broker()
        assert _snapshot(canary) == before
        assert emu.broker.read_log() == ""  # root does not read through it either

        # a restart that cannot start the broker: its port is taken while it is down
        async def take_port() -> socket.socket:
            await asyncio.sleep(0.5)

            def bind() -> socket.socket:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((SERVER_ADDRESS, MQTT_PORT))
                s.listen()
                return s

            return await asyncio.to_thread(in_netns, emu.nodes["server"].netns, bind)

        taker = asyncio.ensure_future(take_port())
        try:
            with pytest.raises(ResourceError, match="mosquitto exited"):
                await emu.restart_broker(down_s=1.5)
            status = emu.status()
            assert emu.broker is None and status["broker"] is None
            assert "mosquitto exited" in status["broker_error"]
        finally:
            (await taker).close()
        await emu.start_broker(settings)
        assert emu.status()["broker_error"] is None  # up again: the status says so
    assert _snapshot(canary) == before
