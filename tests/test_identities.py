"""MQTT identities are bound to accounts (root, mosquitto): a compromised device cannot
disconnect another client by reusing its client id.

A netns cell of the small scenario with the run's real broker, started through the
project's launcher (`Emulation.start_broker`) with the run's accounts
(relay/security.py). dev02 is online (its will: "offline" on its status) and the
orchestrator's account `server` follows every status. From dev01's namespace, as dev01's
agent uid and with dev01's own password, an attacker connects as `tb-<run>-dev02`,
`tb-<run>-server`, `dev02` and `server` in turn, then once more with a last will on
dev02's status that it leaves without a DISCONNECT.

With client ids bound (the watch listener's settings), every attempt connects — as dev01
— and neither dev02 nor the server is disconnected, and no forged "offline" reaches the
server. With the one-listener settings of before, the same attack kicks dev02 (and dev02's
own will announces it offline): the test can tell the two apart. The read-only accounts
connect several at once on the watch listener, where a device's password is refused.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import aiomqtt
import pytest

from testbed.composition.ns_loop import run_in_netns
from testbed.emulation.cell import BrokerSettings
from testbed.emulation.emulation import Emulation
from testbed.emulation.node_uids import allocate_uids
from testbed.emulation.procs import spawn_in
from testbed.emulation.runs import make_run_dir
from testbed.model.names import MQTT_PORT, SERVER_ADDRESS
from testbed.model.topology import load_topology
from testbed.relay import topics
from testbed.relay.security import make_credentials, write_security_files

pytestmark = [pytest.mark.root, pytest.mark.mosquitto]

ATTACKER = Path(__file__).with_name("mqtt_attacker.py")


def run_accounts(state: Path, run: str, devices: list[str], bound: bool = True):
    """The run's accounts and files (relay/security.py) and the broker settings that use
    them: with the watch listener (client ids bound) or, `bound=False`, one listener."""
    creds = make_credentials(run, devices)
    paths = write_security_files(state / "secrets", creds, SERVER_ADDRESS, MQTT_PORT,
                                 watch_port=MQTT_PORT + 1 if bound else None)
    watch = dict(watch_password_file=paths["watch_password_file"], watch_acl_file=paths["watch_acl_file"])
    return creds, paths, BrokerSettings(paths["password_file"], paths["acl_file"], 1 << 20, **(watch if bound else {}))


async def _hold(netns: str, cred, run: str, *, seconds: float, will_device: str | None = None,
                subscribe: str | None = None, port: int = MQTT_PORT, identifier: str | None = None,
                ready: threading.Event | None = None) -> dict:
    """One client inside `netns` for `seconds`: how often the broker dropped it, and the
    messages it received (topic, payload). `ready` is set once it is connected (subscribed,
    its status published): a test waits for that, not for a guessed time."""

    async def body() -> dict:
        will = (aiomqtt.Will(topics.status(run, will_device), b'{"state": "offline"}', qos=1, retain=True)
                if will_device else None)
        got: list[tuple[str, str]] = []
        dropped = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            try:
                async with aiomqtt.Client(SERVER_ADDRESS, port, username=cred.username, password=cred.password,
                                          identifier=identifier or f"tb-{run}-{cred.username}", will=will, keepalive=5,
                                          timeout=5) as c:
                    if subscribe:
                        await c.subscribe(subscribe, qos=1)
                    if will_device:
                        await c.publish(topics.status(run, will_device), b'{"state": "online"}', qos=1, retain=True)
                    if ready is not None:
                        ready.set()
                    async with asyncio.timeout(max(0.0, end - loop.time())):
                        async for m in c.messages:
                            got.append((str(m.topic), bytes(m.payload).decode()))
            except TimeoutError:
                break
            except aiomqtt.MqttError:
                dropped += 1
                await asyncio.sleep(0.1)
        return {"dropped": dropped, "got": got}

    return await run_in_netns(netns, body)


async def _attack(netns: str, uid: int, cred, run: str, out: Path, **attack) -> dict:
    doc = {"uid": uid, "host": SERVER_ADDRESS, "port": MQTT_PORT, "username": cred.username,
           "password": cred.password, "hold_s": 0.7, **attack}
    proc = await asyncio.to_thread(spawn_in, netns, [sys.executable, str(ATTACKER)], {"TESTBED_ATTACK": json.dumps(doc)},
                                   out)
    rc = await asyncio.to_thread(proc.wait, 30)
    lines = out.read_text().strip().splitlines()
    assert rc == 0 and lines, out.read_text()
    return json.loads(lines[-1])


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "one-listener"])
async def test_a_device_cannot_take_over_another_connection(topologies, unique_run_id, tmp_path, bound):
    run = unique_run_id
    state = make_run_dir(run)
    async with Emulation(load_topology(topologies / "small.yaml"), run, cgroups=False, state_dir=state) as emu:
        creds, _, settings = run_accounts(state, run, emu.device_ids(), bound)
        broker = await emu.start_broker(settings)
        uids = allocate_uids(state, emu.device_ids())
        dev01, dev02, server_ns = emu.nodes["dev01"].netns, emu.nodes["dev02"].netns, emu.nodes["server"].netns
        online = [threading.Event(), threading.Event()]
        victim = asyncio.ensure_future(_hold(dev02, creds.for_device("dev02"), run, seconds=7.0, will_device="dev02",
                                             ready=online[0]))
        server = asyncio.ensure_future(_hold(server_ns, creds.server, run, seconds=7.0,
                                             subscribe=f"tb/{run}/dev/+/status", ready=online[1]))
        assert all([await asyncio.to_thread(e.wait, 30) for e in online])  # both online
        took = await _attack(dev01, uids["dev01"], creds.for_device("dev01"), run, tmp_path / "attack.log",
                             identifiers=[f"tb-{run}-dev02", f"tb-{run}-server", "dev02", "server"])
        will = await _attack(dev01, uids["dev01"], creds.for_device("dev01"), run, tmp_path / "will.log",
                             identifiers=[f"tb-{run}-dev01"], will_topic=topics.status(run, "dev02"))
        victim_saw, server_saw = await victim, await server
        log = broker.read_log()
    assert set(took.values()) == {"connected"}, took  # each attempt logged in: dev01's own password works
    offline = [p for t, p in server_saw["got"] if t == topics.status(run, "dev02") and "offline" in p]
    if bound:
        assert will == {f"tb-{run}-dev01": "connected"} or "refused" in str(will), will
        assert victim_saw["dropped"] == 0 and server_saw["dropped"] == 0, (victim_saw, server_saw)
        assert offline == [], server_saw["got"]  # neither a kick (dev02's will) nor a forged will
        assert "already connected" not in log and f"as {run}" not in log
        assert log.count("u'dev01'") >= 4 and "as dev01 (" in log  # the broker named each attempt dev01
    else:  # the setting of before: the first attempt already displaced dev02, whose will said "offline"
        assert victim_saw["dropped"] >= 1 and offline, (victim_saw, server_saw["got"])
        assert "already connected, closing old connection" in log


async def test_read_only_accounts_connect_several_at_once_on_the_watch_listener(topologies, unique_run_id):
    run = unique_run_id
    state = make_run_dir(run)
    async with Emulation(load_topology(topologies / "small.yaml"), run, cgroups=False, state_dir=state) as emu:
        creds, paths, settings = run_accounts(state, run, emu.device_ids())
        await emu.start_broker(settings)
        assert json.loads(paths["observer"].read_text())["port"] == settings.watch_port == MQTT_PORT + 1
        ns = emu.nodes["server"].netns
        status = f"tb/{run}/dev/+/status"
        online = [threading.Event() for _ in range(3)]
        watchers = [asyncio.ensure_future(_hold(ns, c, run, seconds=3.0, subscribe=status, port=MQTT_PORT + 1,
                                                identifier=f"tb-{run}-{c.username}-{i}", ready=online[i]))
                    for i, c in enumerate((creds.monitor, creds.monitor, creds.observer))]  # each its own id
        assert all([await asyncio.to_thread(e.wait, 30) for e in online])  # all three connected at once
        device_on_watch = await _connect_once(ns, creds.for_device("dev01"), MQTT_PORT + 1)
        results = [await w for w in watchers]
    assert [r["dropped"] for r in results] == [0, 0, 0], results
    assert "refused" in device_on_watch and "authori" in device_on_watch.lower(), device_on_watch


async def _connect_once(netns: str, cred, port: int) -> str:
    async def body() -> str:
        try:
            async with aiomqtt.Client(SERVER_ADDRESS, port, username=cred.username, password=cred.password, timeout=5):
                return "connected"
        except aiomqtt.MqttError as e:
            return f"refused: {e}"

    return await run_in_netns(netns, body)
