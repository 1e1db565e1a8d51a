"""One device cannot read another's secrets (root, mosquitto; docker for the docker cell).

On a netns cell and on a docker cell of the small scenario, with every agent online: each
agent runs as its own non-root node uid (real, effective, saved and filesystem), with no
supplementary group, no capability and no_new_privs. Then, for each device, a probe takes
the agent's path — it joins the device's node exactly as the launcher's child does
(`enter_node`) and drops to the agent's uid (`drop_privileges`) — and tries what a
compromised agent would: its own config opens; other devices' configs, the server's
credentials, the broker's files, the run's other state and the agent template's socket do
not (EACCES; in a container they are not even there); it cannot list the run directory nor
signal another agent.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from testbed.composition.template import enter_node
from testbed.emulation.node_uids import NODE_UIDS, drop_privileges
from testbed.model.topology import load_topology

pytestmark = [pytest.mark.root, pytest.mark.mosquitto, pytest.mark.slow]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _try(path: str, kind: str) -> str:
    """'ok' or the errno name of what an agent gets trying `kind` on `path`."""
    try:
        if kind == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif kind == "list":
            return "ok:" + ",".join(sorted(os.listdir(path)))
        elif kind == "connect":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        elif kind == "signal":
            os.kill(int(path), 0)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def probe_as_agent(join, uid: int, tries: list[tuple[str, str]], container: bool) -> dict[str, str]:
    """Fork; the child enters the node as the launcher's child does (its network namespace,
    and a container's mount, UTS and IPC namespaces when `container`), becomes `uid`, and
    reports what each try gets."""
    fds = [os.open(join.netns, os.O_RDONLY)] + ([os.open(p, os.O_RDONLY) for p in join.extra_ns] if container else [])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # single-threaded from here: setns of a mount namespace needs that
        code = 1
        try:
            os.close(r)
            enter_node(fds, 0, True, len(fds) - 1)
            drop_privileges(uid)
            os.write(w, json.dumps({f"{k} {p}": _try(p, k) for k, p in tries}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    for fd in fds:
        os.close(fd)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and out, "the probe failed"
    return json.loads(out)


def _check_agents_run_as_distinct_node_uids(pids: dict[str, int]) -> dict[str, int]:
    uids: dict[str, int] = {}
    for dev, pid in pids.items():
        st = _status(pid)
        ids = {int(x) for x in st["Uid"].split()}
        assert len(ids) == 1, (dev, st["Uid"])  # real, effective, saved, filesystem: one uid
        uids[dev] = ids.pop()
        assert uids[dev] != 0 and uids[dev] in NODE_UIDS
        assert {int(x) for x in st["Gid"].split()} == {uids[dev]} and st["Groups"] == ""
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0 and st["NoNewPrivs"] == "1"
    assert len(set(uids.values())) == len(uids), uids  # distinct
    return uids


def _tries(state: Path, dev: str, others: list[str], other_pids: list[int]) -> list[tuple[str, str]]:
    secret_files = ["secrets/credentials.json", "secrets/mosquitto.passwd", "secrets/mosquitto.acl",
                    "observer.json", "broker/passwd", "broker/acl", "broker/mosquitto.conf", "node-uids.json",
                    "topology.yaml"]
    return ([("read", str(state / "agents" / f"{dev}.json"))]
            + [("read", str(state / "agents" / f"{o}.json")) for o in others]
            + [("read", str(state / f)) for f in secret_files]
            + [("list", str(state / d)) for d in ("", "agents", "secrets", "broker", "logs")]
            + [("connect", str(state / "agent-template.sock"))]
            + [("signal", str(p)) for p in other_pids])


async def _isolation(session, container: bool) -> None:
    state = session.rig.state_dir
    devices = session.cell.device_ids()
    await session.ensure_agents(devices)
    pids = session.agents.pids()
    assert sorted(pids) == sorted(devices)
    uids = _check_agents_run_as_distinct_node_uids(pids)
    for dev in devices:
        others = [d for d in devices if d != dev]
        join = await session.cell.join(dev)
        views = {"host": probe_as_agent(join, uids[dev], _tries(state, dev, others, [pids[o] for o in others]), False)}
        if container:  # the agent's own view: its container
            views["container"] = probe_as_agent(join, uids[dev], _tries(state, dev, others, []), True)
        for view, got in views.items():
            own = f"read {state / 'agents' / dev}.json"
            assert got.pop(own) == "ok", (view, dev)
            if view == "host":
                assert set(got.values()) <= {"EACCES", "EPERM"}, (dev, {k: v for k, v in got.items()
                                                                        if v not in ("EACCES", "EPERM")})
                for o in others:
                    assert got[f"read {state / 'agents' / o}.json"] == "EACCES"
                assert got[f"read {state / 'secrets' / 'credentials.json'}"] == "EACCES"
                assert all(v == "EPERM" for k, v in got.items() if k.startswith("signal "))
            else:  # nothing of the run but its own config is in its container
                assert got.pop(f"list {state / 'agents'}") == f"ok:{dev}.json"
                assert got.pop(f"list {state}") == "ok:agents"
                assert set(got.values()) <= {"ENOENT", "EACCES"}, (dev, got)
                assert got[f"read {state / 'secrets' / 'credentials.json'}"] == "ENOENT"


async def test_netns_agents_are_distinct_uids_and_cannot_read_other_devices_or_the_server(
        topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession

    async with RunSession(load_topology(topologies / "small.yaml"), MadeCell(unique_run_id),
                          out_dir=tmp_path / "out") as session:
        await _isolation(session, container=False)


@pytest.mark.docker
async def test_docker_agents_are_distinct_uids_and_see_only_their_own_config(topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession

    async with RunSession(load_topology(topologies / "small.yaml"), MadeCell(unique_run_id, backend="docker"),
                          out_dir=tmp_path / "out") as session:
        await _isolation(session, container=True)
        _check_containers(unique_run_id, session.rig.state_dir, session.cell.device_ids())


def _check_containers(run: str, state: Path, devices: list[str]) -> None:
    """Devices: no capability, nobody, only their own config of the run's state; the
    server: its broker's capabilities and files. No container mounts the host's /etc."""
    from testbed.emulation.docker.image import docker_client

    client = docker_client()
    for node in [*devices, "server"]:
        attrs = client.containers.get(f"tb-{run}-{node}").attrs
        mounts = {m["Destination"] for m in attrs["Mounts"]}
        assert "/etc" not in mounts and attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert attrs["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]
        from_state = {m for m in mounts if m.startswith(f"{state}/") or m == str(state)}
        if node == "server":
            caps = {c.removeprefix("CAP_") for c in attrs["HostConfig"]["CapAdd"]}
            assert caps == {"DAC_READ_SEARCH", "SETGID", "SETUID"}
            assert from_state == {f"{state}/broker", f"{state}/secrets"}
        else:
            assert not attrs["HostConfig"]["CapAdd"] and attrs["Config"]["User"] == "65534:65534"
            assert from_state == {f"{state}/agents/{node}.json"}
