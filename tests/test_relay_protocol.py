"""Relay protocol over a real mosquitto on 127.0.0.1 (no namespaces, no root): ACLs, agent
robustness, orchestrator relay and checkpoint recovery. The model here is a counting model
(each denoising step adds 1 to every latent element), so the final latent tells exactly
how many steps ran — a lost or repeated step shows up as a wrong count.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from testbed.relay import topics
from testbed.relay.agent import Agent, AgentConfig, threads_for_quota
from testbed.relay.security import acl_text, make_credentials, password_line, write_security_files
from testbed.methods import agent_handlers
from testbed.methods.multistage.orchestrator import MultistageOrchestrator
from testbed.relay.orchestrator import DevicePower, Job, RelaySettings, Timing
from testbed.selection.recovery import reselect
from testbed.relay.wire import Message, TensorSpec, decode, encode
from mqtt_loopback import start_mosquitto

pytestmark = pytest.mark.mosquitto  # conftest: skips without mosquitto, fails in CI

DEVICES = ["dev01", "dev02", "dev03"]
SHAPE = (1, 1, 8, 8)


class CountingModel:
    """Each step adds 1: after steps [a, b) the latent grew by b - a. Records what it ran."""

    latent_spec = TensorSpec("float32", SHAPE)

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.ran: list[tuple[int, int]] = []

    def initial(self, seed: int) -> np.ndarray:
        return np.zeros(SHAPE, np.float32)

    def encode(self, prompt: str) -> dict[str, np.ndarray]:
        return {"class_labels": np.array([7], np.int64)}

    def run(self, latent, cond, start, end, total, kind, state):
        assert cond["class_labels"].tolist() == [7]
        assert (state or {}).get("next_step", 0) == start
        time.sleep(self.step_s * (end - start))
        self.ran.append((start, end))
        return latent + (end - start), {"scheduler": kind, "next_step": end, "total_steps": total}


@dataclass(frozen=True)
class Cost:
    id: str
    size_mb: float
    latency_s: float
    energy_j: float
    t_down_s: float = 0.01
    t_cmp_s: float = 0.2
    t_up_s: float = 0.01


def _crash(agent: Agent, task: asyncio.Task) -> None:
    """What a killed process does to its MQTT session: the TCP connection drops without a
    DISCONNECT, so the broker publishes the last will. Then the task stops."""
    sock = agent.client._client.socket() if agent.client is not None else None
    assert sock is not None, "the agent is not connected"
    sock.shutdown(socket.SHUT_RDWR)
    task.cancel()


def _start_mosquitto(tmp_path: Path, port: int | None, paths: dict) -> tuple[subprocess.Popen, int]:
    """The run's broker on a free loopback port (`port`: that one, a restart); (process, port)."""
    return start_mosquitto(tmp_path / "mosquitto.conf", lambda p: (
        "user root\n" f"listener {p} 127.0.0.1\n" "allow_anonymous false\n"
        f"password_file {paths['password_file']}\n" f"acl_file {paths['acl_file']}\n" "persistence false\n"
        f"message_size_limit {4 * 2**20}\n"), tmp_path / "mosquitto.log", port=port)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def broker(tmp_path, unique_run_id):
    run = unique_run_id
    creds = make_credentials(run, DEVICES)
    paths = write_security_files(tmp_path / "state", creds, "127.0.0.1", 1883)  # (only observer.json names a port)
    proc, port = _start_mosquitto(tmp_path, None, paths)
    box = {"proc": proc}
    try:
        yield run, port, creds, paths, box
    finally:
        _stop(box["proc"])


def _agent_cfg(run, port, creds, dev, step_time_s=0.02, payload=65536) -> AgentConfig:
    c = creds.for_device(dev)
    return AgentConfig(run=run, device=dev, broker_host="127.0.0.1", broker_port=port, username=c.username,
                       password=c.password, step_time_s=step_time_s, payload_bytes=payload,
                       max_message_bytes=payload + 2**20, keepalive_s=2)


def _client(port, cred, **kw) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=cred.username, password=cred.password, timeout=5, **kw)


async def _drain(client, seconds) -> list:
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for m in client.messages:
                got.append(m)
    except TimeoutError:
        pass
    return got


def test_password_lines_use_mosquitto_pbkdf2_format():
    creds = make_credentials("r1", ["dev01"])
    line = password_line(creds.server, salt=b"\x00" * 12)
    user, _, rest = line.partition(":")
    assert user == "server" and rest.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    acl = acl_text(creds)
    assert "user dev01\ntopic read tb/r1/dev/dev01/task\ntopic write tb/r1/dev/dev01/result" in acl
    assert "user observer\ntopic read tb/r1/events" in acl


def test_state_files_are_private(broker):
    _run, _port, _creds, paths, _ = broker
    for p in paths.values():
        assert p.stat().st_mode & 0o077 == 0, p
    obs = json.loads(paths["observer"].read_text())
    assert obs["username"] == "observer" and obs["topic"].endswith("/events")


def test_threads_follow_cpu_quota():
    assert threads_for_quota(0.25) == 1 and threads_for_quota(1.0) == 1 and threads_for_quota(2.5) == 2


async def test_device_cannot_read_anothers_latent_or_forge_its_result(broker):
    run, port, creds, *_ = broker
    payload = encode(Message(kind="task", run=run, device="dev01", stage=0, attempt=1, steps=(0, 5), total_steps=10,
                             tensors={"latent": np.ones(SHAPE, np.float32)}), pad_to_bytes=4096)
    async with _client(port, creds.server) as server, _client(port, creds.for_device("dev02")) as spy, \
            _client(port, creds.for_device("dev01")) as dev01, _client(port, creds.observer) as obs:
        await spy.subscribe(topics.task(run, "dev01"), qos=1)
        await spy.subscribe(f"tb/{run}/#", qos=1)
        await dev01.subscribe(topics.task(run, "dev01"), qos=1)
        await server.subscribe(f"tb/{run}/dev/+/result", qos=1)
        await obs.subscribe(f"tb/{run}/#", qos=1)
        await server.publish(topics.task(run, "dev01"), payload, qos=1)
        # dev02 forges dev01's result and publishes on its own result topic claiming dev01
        await spy.publish(topics.result(run, "dev01"), b"forged", qos=1)
        await spy.publish(topics.events(run), b"forged-event", qos=1)
        await obs.publish(topics.task(run, "dev01"), b"observer-write", qos=1)
        await dev01.publish(topics.result(run, "dev01"), b"genuine", qos=1)
        got_dev01, got_spy, got_server, got_obs = await asyncio.gather(
            _drain(dev01, 1.0), _drain(spy, 1.0), _drain(server, 1.0), _drain(obs, 1.0))
    assert [bytes(m.payload) for m in got_dev01] == [payload]
    assert got_spy == []
    assert [bytes(m.payload) for m in got_server] == [b"genuine"]
    assert got_obs == []  # the observer reads only events, and nobody but the server writes them


async def test_wrong_password_is_refused(broker):
    run, port, creds, *_ = broker
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, username="dev01", password="guess", timeout=5):
            pass


async def test_agent_rejects_bad_payloads_logs_them_and_keeps_serving(broker, caplog):
    run, port, creds, *_ = broker
    model = CountingModel()
    agent = _agent(_agent_cfg(run, port, creds, "dev01"), model)
    task = asyncio.create_task(agent.serve())
    try:
        async with _client(port, creds.server) as server:
            await server.subscribe(topics.result(run, "dev01"), qos=1)
            await server.subscribe(topics.status(run, "dev01"), qos=1)
            async with asyncio.timeout(10):
                async for m in server.messages:
                    if json.loads(m.payload).get("state") == "online":
                        break
            good = Message(kind="task", run=run, device="dev01", stage=0, attempt=1, steps=(0, 3), total_steps=6,
                           tensors={"latent": np.zeros(SHAPE, np.float32), "cond.class_labels": np.array([7])},
                           meta={"method": "multistage", "scheduler": "ddim", "sched": {}})
            bad = [b"", b"garbage", encode(good)[:-3], encode(Message(**{**good.__dict__, "run": "zzz"})),
                   encode(Message(**{**good.__dict__, "tensors": {"latent": np.zeros((1, 2, 8, 8), np.float32)}}))]
            for b in bad:
                await server.publish(topics.task(run, "dev01"), b, qos=1)
            await server.publish(topics.task(run, "dev01"), encode(good, pad_to_bytes=65536), qos=1)
            res = None
            async with asyncio.timeout(10):
                async for m in server.messages:
                    if str(m.topic).endswith("/result"):
                        res = decode(bytes(m.payload), max_bytes=2**21, run=run, kind="result", device="dev01")
                        break
        assert agent.rejected == len(bad) and agent.served == 1
        assert res.steps == (0, 3) and float(res.tensors["latent"].max()) == 3.0
        assert len(bytes(m.payload)) == 65536
        # profile padding: 3 steps x 20 ms, never less; the counting model itself is instant
        assert res.meta["t_send"] - res.meta["t_recv"] >= 0.06 and res.meta["overrun_s"] == 0.0
        assert sum("rejected relay message" in r.getMessage() for r in caplog.records) == len(bad)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass
class _Plan:
    """What the orchestrator reads of a multi-stage plan: the chain, the candidates, `replan`
    (the given one, or the DP's re-selection on the costs)."""

    costs: list
    selected: list
    given: object = None

    def replan(self, t_max_s, e_max_j):
        if self.given is not None:
            return self.given
        by_id = {c.id: c for c in self.costs}
        return lambda pool, stages, t_left_s, e_left_j: reselect([by_id[d] for d in pool], stages, t_left_s,
                                                                 e_left_j).selected


def _orchestrator(run, port, creds, order, costs, events, model, *, replan=None, t_max_s=10.0, e_max_j=1000.0,
                  deadline_factor=2.0, deadline_slack_s=2.0) -> MultistageOrchestrator:
    settings = RelaySettings(run, "127.0.0.1", port, "server", creds.server.password, 65536 + 4 * 2**20)
    job = Job(model, "a handwritten 7", 1, "ddim", 65536)
    return MultistageOrchestrator(
        settings, job, {c.id: DevicePower(10.0, 2.0, 1.0) for c in costs}, plan=_Plan(costs, order, replan),
        steps_per_stage=4, t_max_s=t_max_s, e_max_j=e_max_j, emit=events.append,
        timing=Timing(online_timeout_s=10, deadline_factor=deadline_factor, deadline_slack_s=deadline_slack_s))


def _agent(cfg, model) -> Agent:
    return Agent(cfg, model, agent_handlers())


async def _start_agents(run, port, creds, model, step_time_s):
    agents = {d: _agent(_agent_cfg(run, port, creds, d, step_time_s=step_time_s), model) for d in DEVICES}
    return agents, {d: asyncio.create_task(a.serve()) for d, a in agents.items()}


async def test_relay_runs_every_step_once_in_order(broker):
    run, port, creds, *_ = broker
    model = CountingModel()
    agents, tasks = await _start_agents(run, port, creds, model, 0.01)
    costs = [Cost("dev01", 4, 0.3, 3), Cost("dev02", 2, 0.3, 3), Cost("dev03", 1, 0.3, 3)]
    events: list[dict] = []
    try:
        out = await _orchestrator(run, port, creds, ["dev02", "dev01"], costs, events, CountingModel()).run()
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert [s.device for s in out.stages] == ["dev02", "dev01"]
    assert [s.steps for s in out.stages] == [(0, 4), (4, 8)]
    assert model.ran == [(0, 4), (4, 8)] and float(out.latent.min()) == float(out.latent.max()) == 8.0
    assert out.recovered == []
    seq = [e["seq"] for e in events]
    assert seq == sorted(seq) == list(range(1, len(seq) + 1))
    kinds = [(e["type"], e["device"]) for e in events if e["device"]]
    assert kinds == [(t, d) for d in ("dev02", "dev01") for t in ("stage_started", "downloaded", "computed", "uploaded")]
    for s in out.stages:
        assert s.t_down_s > 0 and s.t_up_s > 0 and s.t_cmp_s >= 0.04 and s.energy_j > 0
        assert s.wire_bytes_down == s.wire_bytes_up == 65536


class RecordingReplan:
    """A re-planner that records what the orchestrator asked and answers with a fixed chain
    (or the error it is given)."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, pool, stages, t_left_s, e_left_j):
        self.calls.append({"pool": sorted(pool), "stages": stages, "t_left_s": t_left_s, "e_left_j": e_left_j})
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


async def _run_with_crash(broker, order, victim, replan, **kw):
    """Relay through `order`; `victim`'s agent crashes once it has the latent."""
    run, port, creds, *_ = broker
    model = CountingModel(step_s=0.05)
    agents, tasks = await _start_agents(run, port, creds, model, 0.0)
    costs = [Cost("dev01", 4, 0.5, 3), Cost("dev02", 2, 0.5, 3), Cost("dev03", 1, 0.5, 3)]
    events: list[dict] = []

    def on_event(ev):
        events.append(ev)
        if ev["type"] == "downloaded" and ev["device"] == victim:
            loop.call_later(0.05, _crash, agents[victim], tasks[victim])

    loop = asyncio.get_running_loop()
    orch = _orchestrator(run, port, creds, order, costs, [], CountingModel(), replan=replan, **kw)
    orch._emit_cb = on_event
    try:
        out = await orch.run()
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return out, events


async def test_offline_device_is_replaced_from_the_checkpoint(broker):
    """dev01's agent dies mid-computation: its last will reports it offline and the
    remaining steps go to the best remaining device from the newest checkpoint."""
    out, events = await _run_with_crash(broker, ["dev02", "dev01"], "dev01", replan=None)
    assert [s.device for s in out.stages] == ["dev02", "dev03"]
    assert [s.steps for s in out.stages] == [(0, 4), (4, 8)]
    assert float(out.latent.min()) == float(out.latent.max()) == 8.0  # no step lost, none twice
    (rec,) = out.recovered
    assert (rec.device, rec.steps, rec.took_over) == ("dev01", (4, 8), "dev03")
    types = [e["type"] for e in events]
    assert types.index("device_offline") < types.index("recovered") < len(types) - 1
    assert rec.reason == "offline" and rec.detected_after_s < 1.5  # the will, not the 3 s deadline


async def test_deadline_miss_is_recovered_and_late_result_ignored(broker):
    run, port, creds, *_ = broker
    slow = CountingModel(step_s=0.3)  # 4 steps = 1.2 s, far past dev01's deadline
    fast = CountingModel()
    a1 = _agent(_agent_cfg(run, port, creds, "dev01", step_time_s=0.0), slow)
    a3 = _agent(_agent_cfg(run, port, creds, "dev03", step_time_s=0.0), fast)
    tasks = [asyncio.create_task(a1.serve()), asyncio.create_task(a3.serve())]
    costs = [Cost("dev01", 4, 0.1, 3), Cost("dev03", 1, 0.1, 3)]
    events: list[dict] = []
    try:
        orch = _orchestrator(run, port, creds, ["dev01"], costs, events, CountingModel(),
                             deadline_factor=1.0, deadline_slack_s=0.2)
        out = await orch.run()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [s.device for s in out.stages] == ["dev03"]
    assert out.recovered[0].reason == "deadline" and out.recovered[0].took_over == "dev03"
    assert float(out.latent.max()) == 4.0
    assert "deadline_missed" in [e["type"] for e in events]


async def test_recovery_impossible_fails_loudly(broker):
    from testbed.errors import RunFailedError

    run, port, creds, *_ = broker
    model = CountingModel(step_s=0.05)
    agents, tasks = await _start_agents(run, port, creds, model, 0.0)
    costs = [Cost("dev01", 4, 0.5, 3), Cost("dev02", 2, 0.5, 300), Cost("dev03", 1, 5.0, 3)]  # neither fits

    def on_event(ev):
        if ev["type"] == "downloaded" and ev["device"] == "dev01":
            _crash(agents["dev01"], tasks["dev01"])

    orch = _orchestrator(run, port, creds, ["dev01"], costs, [], CountingModel(), t_max_s=1.0, e_max_j=100.0)
    orch._emit_cb = on_event
    try:
        with pytest.raises(RunFailedError, match="recovery impossible"):
            await orch.run()
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_a_failure_re_selects_the_rest_of_the_chain_charging_what_was_spent(broker):
    """dev01 dies in stage 0 of dev01 -> dev02: the re-planner is asked for two stages among
    the devices that have neither run nor failed (dev02, still planned, included), under
    T_max and E_max less what the run has spent; its chain (here reordered) runs the rest."""
    replan = RecordingReplan(["dev03", "dev02"])
    t0 = time.time()
    out, events = await _run_with_crash(broker, ["dev01", "dev02"], "dev01", replan, t_max_s=10.0, e_max_j=1000.0)
    (call,) = replan.calls
    assert call["pool"] == ["dev02", "dev03"] and call["stages"] == 2
    (rec,) = out.recovered
    assert rec.chain == ["dev03", "dev02"] and rec.took_over == "dev03" and rec.reason == "offline"
    assert 0 < rec.charged_s < time.time() - t0 and call["t_left_s"] == pytest.approx(10.0 - rec.charged_s)
    assert rec.energy_j > 0 and rec.charged_j == pytest.approx(rec.energy_j)  # nothing completed: the failed attempt
    assert call["e_left_j"] == pytest.approx(1000.0 - rec.charged_j)
    assert (rec.predicted_latency_s, rec.predicted_energy_j) == (1.0, 6.0)  # the chain's two stages
    assert [s.device for s in out.stages] == ["dev03", "dev02"] and [s.steps for s in out.stages] == [(0, 4), (4, 8)]
    assert float(out.latent.min()) == float(out.latent.max()) == 8.0  # no step lost, none twice
    assert out.energy_j == pytest.approx(rec.energy_j + sum(s.energy_j for s in out.stages))
    (ev,) = [e for e in events if e["type"] == "reselected"]
    assert ev["chain"] == ["dev03", "dev02"] and ev["failed"] == "dev01" and ev["steps"] == [0, 8]
    assert ev["charged_s"] == rec.charged_s and ev["t_left_s"] == pytest.approx(10.0 - rec.charged_s)
    types = [e["type"] for e in events]
    assert types.index("device_offline") < types.index("reselected") < types.index("recovered")
    assert rec.to_json()["chain"] == ["dev03", "dev02"] and rec.to_json()["charged"]["energy_j"] == rec.charged_j


async def test_a_failure_in_stage_1_charges_the_completed_stage(broker):
    replan = RecordingReplan(["dev03"])
    out, _ = await _run_with_crash(broker, ["dev01", "dev02"], "dev02", replan, t_max_s=10.0, e_max_j=1000.0)
    (call,) = replan.calls
    assert call["pool"] == ["dev03"] and call["stages"] == 1  # dev01 ran stage 0, dev02 failed
    (rec,) = out.recovered
    first = out.stages[0]
    assert first.device == "dev01" and rec.charged_s > first.t_down_s + first.t_cmp_s + first.t_up_s
    assert rec.charged_j == pytest.approx(first.energy_j + rec.energy_j)
    assert [s.device for s in out.stages] == ["dev01", "dev03"] and float(out.latent.max()) == 8.0


async def test_no_chain_fitting_ends_the_run_with_the_reason(broker):
    from testbed.errors import InfeasibleError, RunFailedError

    replan = RecordingReplan(InfeasibleError("no chain of 1 device(s) fits the budget left (0.3 s, 9 J): ..."))
    with pytest.raises(RunFailedError, match=r"recovery impossible: dev02 failed stage 1 \(offline\).*"
                                             r"no chain of 1 device\(s\) fits") as e:
        await _run_with_crash(broker, ["dev01", "dev02"], "dev02", replan)
    assert e.value.exit_code == 5


async def test_agent_reconnects_after_the_broker_restarts(broker, tmp_path):
    run, port, creds, paths, box = broker
    agent = _agent(_agent_cfg(run, port, creds, "dev01", step_time_s=0.0), CountingModel())
    task = asyncio.create_task(agent.serve())
    try:
        async def serve_one(stage: int) -> Message:
            async with _client(port, creds.server) as server:
                await server.subscribe(topics.result(run, "dev01"), qos=1)
                await server.subscribe(topics.status(run, "dev01"), qos=1)
                async with asyncio.timeout(20):
                    async for m in server.messages:  # the agent's retained "online" (after a restart: again)
                        if str(m.topic).endswith("/status") and json.loads(m.payload)["state"] == "online":
                            break
                    task_msg = Message(kind="task", run=run, device="dev01", stage=stage, attempt=1,
                                       steps=(stage * 2, stage * 2 + 2), total_steps=4,
                                       tensors={"latent": np.zeros(SHAPE, np.float32),
                                                "cond.class_labels": np.array([7])},
                                       meta={"method": "multistage", "sched": {"next_step": stage * 2}})
                    await server.publish(topics.task(run, "dev01"), encode(task_msg), qos=1)
                    async for m in server.messages:
                        if str(m.topic).endswith("/result"):
                            return decode(bytes(m.payload), max_bytes=2**21, run=run, kind="result")
            raise AssertionError("no result")

        assert (await serve_one(0)).steps == (0, 2)
        _stop(box["proc"])  # the broker goes away (retained statuses with it: persistence is off)
        await asyncio.sleep(0.5)
        box["proc"], _ = _start_mosquitto(tmp_path, port, paths)
        assert (await serve_one(1)).steps == (2, 4)  # the agent came back on its own and serves
        async with asyncio.timeout(5):  # it counts a task once its result's PUBACK is in, after the server read it
            while agent.served < 2:
                await asyncio.sleep(0.01)
        assert agent.served == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- liveness: heartbeats ----------------------------------------------------------------------
class _Hung(Agent):
    """An agent that came online and then hung: its loop still answers the broker's pings (no
    will fires), but it sends no heartbeat and never answers a task."""

    async def _heartbeat(self, client) -> None:
        await asyncio.Event().wait()

    async def handle(self, client, payload: bytes) -> None:
        await asyncio.Event().wait()


async def test_an_agent_refreshes_its_retained_online_status(broker):
    from testbed.relay.agent import HEARTBEAT_S

    run, port, creds, *_ = broker
    task = asyncio.create_task(_agent(_agent_cfg(run, port, creds, "dev02"), CountingModel()).serve())
    try:
        async with _client(port, creds.server, identifier=f"tb-{run}-hb") as server:
            await server.subscribe(topics.status(run, "dev02"), qos=1)
            got = [json.loads(m.payload) for m in await _drain(server, 2 * HEARTBEAT_S + 1.5)]
            async with _client(port, creds.server, identifier=f"tb-{run}-late") as late:  # a reader that comes later
                await late.subscribe(topics.status(run, "dev02"), qos=1)
                (retained,) = [json.loads(m.payload) for m in await _drain(late, 0.5) if m.retain]  # (+ a live beat)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(got) >= 3 and {s["state"] for s in got} == {"online"}
    ts = [s["ts"] for s in got]
    assert ts == sorted(ts) and ts[-1] - ts[0] >= 1.9 * HEARTBEAT_S
    assert retained["state"] == "online" and time.time() - retained["ts"] < HEARTBEAT_S + 1.0


async def test_a_hung_device_misses_its_heartbeats_and_fails_over_before_its_deadline(broker):
    """dev01 is connected (the broker sees it alive: no will) but silent: after SILENT_AFTER_S
    it is `device_silent`, reaches the orchestrator as offline, and dev03 takes over from the
    checkpoint — long before dev01's 60 s deadline."""
    from testbed.relay.agent import SILENT_AFTER_S

    run, port, creds, *_ = broker
    hung = _Hung(_agent_cfg(run, port, creds, "dev01", step_time_s=0.0), CountingModel(), agent_handlers())
    live = _agent(_agent_cfg(run, port, creds, "dev03", step_time_s=0.0), CountingModel())
    tasks = [asyncio.create_task(hung.serve()), asyncio.create_task(live.serve())]
    costs = [Cost("dev01", 4, 0.1, 3), Cost("dev03", 1, 0.1, 3)]
    events: list[dict] = []
    try:
        orch = _orchestrator(run, port, creds, ["dev01"], costs, events, CountingModel(), deadline_factor=1.0,
                             deadline_slack_s=60.0)
        t0 = time.monotonic()
        out = await asyncio.wait_for(orch.run(), 40)
        took_s = time.monotonic() - t0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    (rec,) = out.recovered
    assert (rec.device, rec.reason, rec.took_over) == ("dev01", "offline", "dev03")
    silent = [e for e in events if e["type"] == "device_silent"]
    assert [e["device"] for e in silent] == ["dev01"] and SILENT_AFTER_S < silent[0]["silent_s"] < SILENT_AFTER_S + 2
    assert "deadline_missed" not in [e["type"] for e in events] and took_s < SILENT_AFTER_S + 8
    assert float(out.latent.max()) == 4.0


async def test_a_retained_status_whose_heartbeat_stopped_is_not_online(broker):
    """A retained "online" 30 s old (its agent stopped beating, its connection not yet
    dropped) does not make a device online, and says so."""
    run, port, creds, *_ = broker
    async with _client(port, creds.for_device("dev02"), identifier=f"tb-{run}-old") as dev02:
        doc = {"state": "online", "device": "dev02", "ts": time.time() - 30}
        await dev02.publish(topics.status(run, "dev02"), json.dumps(doc).encode(), qos=1, retain=True)
    events: list[dict] = []
    orch = _orchestrator(run, port, creds, ["dev02"], [Cost("dev02", 1, 0.1, 3)], events, CountingModel())
    conn = asyncio.create_task(orch._connection())
    try:
        await orch.connected()
        assert not await orch.wait_online(["dev02"], timeout_s=1.5)
    finally:
        conn.cancel()
        await asyncio.gather(conn, return_exceptions=True)
    assert [e["type"] for e in events if e.get("device") == "dev02"] == ["device_silent"]
