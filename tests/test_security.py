"""Security properties of a run.

Without root (a real mosquitto on 127.0.0.1 with the run's password file and ACL; the
device/observer read-and-forge cases are in test_relay_protocol.py):
- a device cannot inject a task into another device, fake another device's status (a
  forged "offline" would trigger a reassignment), or read another device's result;
  anonymous clients and one run's credentials on another run's broker are refused;
- credentials are fresh per run; names that reach interfaces, namespaces, topics and
  file paths are validated; no shell, no unpickling anywhere in the code.
As root (the netns backend, a real Runner): the broker listens only on the edge server's
emulated address inside the server namespace; the run's secrets are private files that
teardown removes.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import stat
from pathlib import Path

import aiomqtt
import pytest

from testbed.relay import topics
from testbed.relay.security import acl_text, make_credentials
from test_faults import DEVICES, LocalBroker, broker, needs_mosquitto  # noqa: F401 - broker is a fixture

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = [REPO / d for d in ("testbed", "tui", "bench", "experiments") if (REPO / d).is_dir()]


def _client(b: LocalBroker, cred, **kw) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", b.port, username=cred.username, password=cred.password, timeout=5, **kw)


async def _drain(client, seconds) -> list:
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for m in client.messages:
                got.append((str(m.topic), bytes(m.payload)))
    except TimeoutError:
        pass
    return got


@needs_mosquitto
async def test_a_device_cannot_inject_tasks_fake_statuses_or_read_results_of_another(broker):
    run, b = broker
    c = b.creds
    async with _client(b, c.server) as server, _client(b, c.for_device("dev01")) as dev01, \
            _client(b, c.for_device("dev02")) as dev02:
        await server.subscribe(f"tb/{run}/dev/+/status", qos=1)
        await server.subscribe(f"tb/{run}/dev/+/result", qos=1)
        await dev01.subscribe(topics.task(run, "dev01"), qos=1)
        await dev02.subscribe(topics.result(run, "dev01"), qos=1)  # reading dev01's output
        await dev02.subscribe(f"tb/{run}/dev/+/result", qos=1)
        await dev02.publish(topics.task(run, "dev01"), b"injected latent", qos=1)
        await dev02.publish(topics.status(run, "dev01"), b'{"state": "offline"}', qos=1, retain=True)
        await dev01.publish(topics.result(run, "dev01"), b"dev01 result", qos=1)
        await dev02.publish(topics.status(run, "dev02"), b'{"state": "online"}', qos=1)  # its own: allowed
        got_server, got_dev01, got_dev02 = await asyncio.gather(_drain(server, 1.0), _drain(dev01, 1.0),
                                                                _drain(dev02, 1.0))
    assert got_dev01 == []  # no injected task
    assert got_dev02 == []  # no foreign result
    assert sorted(got_server) == sorted([(topics.status(run, "dev02"), b'{"state": "online"}'),
                                         (topics.result(run, "dev01"), b"dev01 result")])  # no forged status


@needs_mosquitto
async def test_anonymous_and_foreign_run_credentials_are_refused(broker, tmp_path):
    run, b = broker
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", b.port, timeout=5):
            pass
    other = make_credentials("zz" + run[2:], DEVICES)  # another run's (fresh) credentials
    for cred in (other.server, other.for_device("dev01")):
        with pytest.raises(aiomqtt.MqttError):
            async with _client(b, cred):
                pass


def test_credentials_are_fresh_per_run_and_acl_grants_nothing_wider():
    a, b = make_credentials("r1", DEVICES), make_credentials("r1", DEVICES)
    pw_a = [a.server.password, a.observer.password, *(c.password for c in a.devices.values())]
    pw_b = [b.server.password, b.observer.password, *(c.password for c in b.devices.values())]
    assert len(set(pw_a + pw_b)) == len(pw_a) + len(pw_b)  # nothing reused, within or across runs
    assert all(len(p) >= 22 for p in pw_a)  # 16 random bytes, url-safe base64
    acl = acl_text(a)
    device_topics = re.findall(r"user (dev\d+)\n((?:topic .*\n)+)", acl + "\n")
    assert len(device_topics) == len(DEVICES)
    for dev, lines in device_topics:
        for line in lines.splitlines():
            assert "#" not in line and "+" not in line and f"/dev/{dev}/" in line, line


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "../etc", "a/b", "toolong8", "r;rm", "r\x00", "ré1"])
def test_bad_run_ids_are_rejected_everywhere(bad):
    from testbed.emulation.runs import run_dir
    from testbed.errors import InputError
    from testbed.model.names import check_run_id

    with pytest.raises(InputError):
        check_run_id(bad)
    with pytest.raises(InputError):
        run_dir(bad)  # never a path outside /run/testbed
    assert topics.check_run_id is check_run_id  # one rule for topics, paths and interfaces


def test_cli_rejects_a_bad_run_id_before_touching_anything(capsys):
    from testbed.cli import main

    for argv in (["down", "--run", "../etc"], ["status", "--run", "a;b"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code in (2, 4) and "run id" in err and "Traceback" not in err, (argv, err)


def test_interface_and_namespace_names_fit_the_kernel_limits():
    from testbed.emulation.backend import NetnsBackend, NodeSpec
    from testbed.model.names import NAME_RE

    be = NetnsBackend("abcdefg")  # the longest run id
    names = [be.bridge, be.ifb, be.host_if, be.host_if + "s", be.port(NodeSpec("d", "device", "x", 4999))]
    for n in names:
        assert len(n) <= 15 and re.fullmatch(r"[a-z0-9]+", n), n  # IFNAMSIZ - 1, no odd characters
    # device ids (validated by the topology) make netns names that are plain file names
    assert NAME_RE.fullmatch("a" * 32) and not NAME_RE.fullmatch("a" * 33)
    for bad in ("../x", "a/b", "a b", "-x", ".", "x#", "x+", "x:y", "é"):
        assert not NAME_RE.fullmatch(bad)
    assert be.ns_name("a" * 24) == "tb-abcdefg-" + "a" * 24


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_no_shell_no_unpickling_in_the_code():
    files = [p for d in CODE_DIRS for p in d.rglob("*.py")]
    assert len(files) > 20
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad.append(f"{where} shell=")
            if (owner, name) in {("os", "system"), ("os", "popen"), ("pickle", "load"), ("pickle", "loads"),
                                 ("torch", "load"), ("marshal", "loads"), ("os", "execl"), ("os", "execlp")}:
                bad.append(f"{where} {owner}.{name}")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                bad.append(f"{where} {name}()")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                bad.append(f"{where} yaml.{name} (use safe_load)")
    assert bad == []


# -- as root: the real broker of a run -------------------------------------------------------
def _listening(pid: int) -> list[tuple[str, int]]:
    """LISTEN sockets in the network namespace of `pid` (/proc/<pid>/net/tcp and tcp6)."""
    out = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            if name == "tcp":
                ip = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
            else:
                ip = "ipv6:" + addr
            out.append((ip, int(port, 16)))
    return out


@pytest.mark.root
async def test_broker_listens_only_on_the_server_address_and_secrets_are_private_then_gone(
        topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession, max_message_bytes
    from testbed.model.topology import load_topology

    run = unique_run_id
    state = Path("/run/testbed") / run
    async with RunSession(load_topology(topologies / "small.yaml"), MadeCell(run), out_dir=tmp_path) as r:
        broker = r.cell.broker
        assert broker.kind == "mosquitto"
        # the broker's namespace is the server's, not the host's
        assert os.stat(f"/proc/{broker.pid}/ns/net").st_ino == os.stat(r.cell.nodes["server"].netns).st_ino
        assert os.stat(f"/proc/{broker.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert sorted(_listening(broker.pid)) == [("198.18.0.1", 1883), ("198.18.0.1", 1884)]  # the cell, the watchers
        secrets = state / "secrets"
        assert stat.S_IMODE(state.stat().st_mode) & 0o066 == 0  # nobody else may list or write the run's state
        assert stat.S_IMODE(secrets.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE((state / "agents").stat().st_mode) == 0o711  # agents reach their own file, list none
        assert {f.name for f in secrets.iterdir()} >= {"mosquitto.passwd", "mosquitto.acl", "credentials.json"}
        for f in secrets.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == 0, f
        owners = set()
        for f in (state / "agents").iterdir():  # each device's config: its agent's uid alone
            assert stat.S_IMODE(f.stat().st_mode) == 0o400 and f.stat().st_uid not in (0, *owners), f
            owners.add(f.stat().st_uid)
        creds = json.loads((secrets / "credentials.json").read_text())
        password = r.rig.credentials.server.password
        assert creds["run"] == run and creds["server"]["password"] == password
        conf = Path(broker.config_path).read_text()
        assert "allow_anonymous false" in conf and "listener 1883 198.18.0.1" in conf
        # oversized (more than the largest message any method sends): dropped
        assert f"message_size_limit {max_message_bytes(r.topology)}" in conf
    assert not state.exists()  # secrets, agent configs (with passwords) and the broker's files: removed
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and password in p.read_text(errors="ignore")]
    assert leaked == []  # the outputs (events, logs, result) never carry a password


@needs_mosquitto
async def test_oversized_payloads_are_dropped_by_the_broker_and_rejected_by_the_decoder(broker):
    from testbed.errors import RelayError
    from testbed.relay.wire import decode

    run, b = broker  # message_size_limit 1 MiB, as the runner sets payload_bytes + 4 MiB
    limit = 2**20
    async with _client(b, b.creds.server) as server, _client(b, b.creds.for_device("dev01")) as dev01:
        await dev01.subscribe(topics.task(run, "dev01"), qos=1)
        await server.publish(topics.task(run, "dev01"), b"\x00" * (limit + 1), qos=1)
        await server.publish(topics.task(run, "dev01"), b"small", qos=1)
        got = await _drain(dev01, 1.5)
    assert [p for _, p in got] == [b"small"]  # the oversized one never reached the device
    with pytest.raises(RelayError, match="exceeds the size limit"):
        decode(b"TBR1" + b"\x00" * limit, max_bytes=limit, run=run)
