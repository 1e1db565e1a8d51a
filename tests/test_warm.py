"""Which agents start when (issue 28), without root: the warm set of a cell, a generation
waiting for its chain only (spares behind it, or with it when it injects faults), one
agent per device when a warm-up and a generation ask at once, the status line of the
agents warming, and a cold run's clock showing its worker's phases."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from testbed.composition import session as session_mod
from testbed.composition.agents import AgentLauncher
from testbed.composition.online import MAX_SPARE_AGENTS, WARM_ALL_UP_TO, warm_set
from testbed.composition.startup import StartupClock
from testbed.errors import InputError

DEVICES = [f"dev{i:03d}" for i in range(1, 201)]


def test_the_warm_set_is_every_device_of_a_small_cell_and_none_of_a_dense_one():
    assert warm_set("auto", DEVICES[:20]) == DEVICES[:20]
    assert warm_set("auto", DEVICES[:WARM_ALL_UP_TO]) == DEVICES[:WARM_ALL_UP_TO]
    assert warm_set("auto", DEVICES[:WARM_ALL_UP_TO + 1]) == []
    assert warm_set("all", DEVICES) == DEVICES and warm_set("none", DEVICES) == []
    assert warm_set("3", DEVICES) == DEVICES[:3]
    assert warm_set("dev007, dev150", DEVICES) == ["dev007", "dev150"]
    with pytest.raises(InputError, match="--warm dev01,nope: no device dev01, nope"):
        warm_set("dev01,nope", DEVICES)


class _Session:
    """What `RunSession.ensure_agents` uses, without a cell: `ensure_online` is recorded."""

    ensure_agents = session_mod.RunSession.ensure_agents
    _in_background = session_mod.RunSession._in_background

    def __init__(self, request=None):
        self._request = request
        self._generation_clock = None
        self._background: set[asyncio.Future] = set()
        self.run_id = "t"
        self.emitted: list[dict] = []

    def need_rig(self):
        return SimpleNamespace()

    def relay_settings(self, role):
        return role

    async def in_server_ns(self, factory):
        return await factory()

    def emit(self, etype, device=None, **data):
        self.emitted.append({"type": etype, **data})


@pytest.fixture
def started(monkeypatch):
    calls: list[tuple[list[str], asyncio.Event]] = []

    async def fake_ensure_online(rig, devices, settings, in_server_ns):
        done = asyncio.Event()
        calls.append((list(devices), done))
        await done.wait()  # online when the test says so
        return len(devices)

    monkeypatch.setattr(session_mod, "ensure_online", fake_ensure_online)
    return calls


async def test_a_generation_waits_for_its_chain_and_starts_the_spares_behind_it(started):
    s = _Session(request=SimpleNamespace(faults=(), fail=None))
    spares = [d for d in DEVICES[:40] if d not in ("dev003", "dev009")]
    wait = asyncio.ensure_future(s.ensure_agents(["dev003", "dev009"], spare=spares))
    while not started:
        await asyncio.sleep(0)
    assert started[0][0] == ["dev003", "dev009"]  # the chain first, alone
    started[0][1].set()
    await asyncio.wait_for(wait, 5)  # returned with the chain online; the spares are still starting
    assert s.emitted[-1]["devices"] == 2
    async with asyncio.timeout(5):
        while len(started) < 2:
            await asyncio.sleep(0)
    assert started[1][0] == spares[:MAX_SPARE_AGENTS] and not started[1][1].is_set()
    started[1][1].set()
    await asyncio.sleep(0)


async def test_a_generation_that_injects_faults_waits_for_its_spares_too(started):
    s = _Session(request=SimpleNamespace(faults=(), fail="dev003"))
    wait = asyncio.ensure_future(s.ensure_agents(["dev003"], spare=["dev001", "dev003", "dev002"]))
    while not started:
        await asyncio.sleep(0)
    assert started[0][0] == ["dev003", "dev001", "dev002"]  # a recovery needs them online
    assert not wait.done()
    started[0][1].set()
    await asyncio.wait_for(wait, 5)
    assert len(started) == 1 and s.emitted[-1]["devices"] == 3


async def test_a_warm_up_and_a_generation_asking_at_once_start_each_agent_once(tmp_path):
    launcher = AgentLauncher("t", tmp_path, tmp_path)
    launcher.cell = SimpleNamespace(nodes={d: SimpleNamespace(state="up") for d in DEVICES[:4]})
    forked: list[str] = []
    gate = asyncio.Event()

    async def spawn(device):
        forked.append(device)
        await gate.wait()  # the template forks when it is ready
        launcher._pids[device] = 10_000_000 + len(forked)
        return launcher._pids[device]

    launcher.spawn = spawn
    warm = asyncio.ensure_future(launcher.ensure(DEVICES[:4]))
    gen = asyncio.ensure_future(launcher.ensure(["dev002", "dev003"]))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(asyncio.gather(warm, gen), 5)
    assert sorted(forked) == DEVICES[:4]  # dev002 and dev003 once each


def test_status_says_how_many_warm_agents_are_online():
    from testbed.cli.commands.emulation_cmds import _agents_line

    nodes = [{"id": "server", "role": "server"}] + [
        {"id": d, "role": "device", "agent_online": i < 12} for i, d in enumerate(DEVICES[:20])]
    assert _agents_line({"worker": "ready", "warm": DEVICES[:20], "nodes": nodes}) == "agents: 12/20 online (warming)"
    for n in nodes[1:]:
        n["agent_online"] = True
    assert _agents_line({"worker": "ready", "warm": DEVICES[:20], "nodes": nodes}) == "agents: 20/20 online"
    assert _agents_line({"worker": "starting", "warm": DEVICES[:20], "nodes": nodes}).endswith("(warming)")
    assert _agents_line({"worker": "ready", "warm": [], "nodes": nodes}) == \
        "agents: 0/0 online; the other 20 start when a plan selects them"
    assert "failed: it died" in _agents_line({"worker": "failed: it died", "warm": [], "nodes": nodes})
    assert _agents_line({"worker": None, "nodes": nodes}) is None  # no broker, no worker


def test_a_cold_runs_clock_shows_its_workers_phases_shifted_to_the_command():
    command = StartupClock(t0=1000.0, path="cold")
    command.mark("cli", 1000.0, 1000.6)
    command.mark("cell", 1000.7, 1001.2)
    worker = StartupClock(t0=1000.7)  # it started 0.7 s after the command
    worker.mark("imports", 1000.7, 1004.0)
    worker.mark("cell", 1000.0, 1000.1)  # (a phase the command has: the command's stays)
    command.include(worker)
    doc = command.to_json()
    assert doc["phases"] == {"cli": [0.0, 0.6], "cell": [0.7, 1.2], "imports": [0.7, 4.0]}
    assert doc["imports_s"] == 3.3 and command.seconds("imports") == 3.3
