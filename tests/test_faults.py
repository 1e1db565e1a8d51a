"""Faults without root: a real mosquitto on 127.0.0.1 (per-run credentials and ACL), agents
and the orchestrator in this process, a counting model (each step adds 1 to the latent, so
the final latent shows a lost or repeated step as a wrong count).

- the broker stops mid-stage and comes back: agents and orchestrator reconnect with
  backoff, the stage is re-sent from the checkpoint, the count is exact;
- the broker never comes back: the run ends with a RelayError naming the broker, bounded;
- fault specs: YAML syntax, validation (exit-2 errors), scheduling from telemetry.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.errors import RelayError, TopologyError
from testbed.composition.faults import FaultInjector, parse_fault
from testbed.methods import agent_handlers
from testbed.methods.multistage.orchestrator import MultistageOrchestrator
from testbed.relay.agent import Agent, AgentConfig
from testbed.relay.orchestrator import DevicePower, Job, RelaySettings, Timing
from testbed.relay.security import make_credentials, write_security_files
from testbed.selection.recovery import reselect
from testbed.model.topology import parse_topology
from mqtt_loopback import start_mosquitto
from test_relay_protocol import CountingModel, Cost  # the counting model: each step adds 1

needs_mosquitto = pytest.mark.mosquitto  # conftest: skips without mosquitto, fails in CI

DEVICES = ["dev01", "dev02", "dev03"]


class LocalBroker:
    """mosquitto on 127.0.0.1:<a free port> that can be stopped and started again (on that port)."""

    def __init__(self, tmp: Path, run: str):
        self.port: int | None = None  # chosen by the first start
        self.creds = make_credentials(run, DEVICES)
        self.paths = write_security_files(tmp / "state", self.creds, "127.0.0.1", 1883)  # (only observer.json names it)
        self.conf = tmp / "mosquitto.conf"
        self.log = tmp / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc, self.port = start_mosquitto(self.conf, lambda port: (
            "user root\n" f"listener {port} 127.0.0.1\n" "allow_anonymous false\n"
            f"password_file {self.paths['password_file']}\n" f"acl_file {self.paths['acl_file']}\n"
            "persistence false\n" f"message_size_limit {2**20}\n"), self.log, port=self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path, unique_run_id):
    b = LocalBroker(tmp_path, unique_run_id)
    b.start()
    try:
        yield unique_run_id, b
    finally:
        b.stop()


def _agent(run: str, b: LocalBroker, dev: str, model) -> Agent:
    c = b.creds.for_device(dev)
    return Agent(AgentConfig(run=run, device=dev, broker_host="127.0.0.1", broker_port=b.port, username=c.username,
                             password=c.password, step_time_s=0.0, payload_bytes=16384,
                             max_message_bytes=2**20, keepalive_s=2), model, agent_handlers())


@dataclass
class _Plan:
    costs: list
    selected: list

    def replan(self, t_max_s, e_max_j):
        by_id = {c.id: c for c in self.costs}
        return lambda pool, stages, t_left_s, e_left_j: reselect([by_id[d] for d in pool], stages, t_left_s,
                                                                 e_left_j).selected


def _orchestrator(run, b, order, costs, events, *, emit=None, reconnect_timeout_s: float = 30.0,
                  rejoin_timeout_s: float = 15.0) -> MultistageOrchestrator:
    settings = RelaySettings(run, "127.0.0.1", b.port, b.creds.server.username, b.creds.server.password, 2**20)
    timing = Timing(online_timeout_s=10.0, deadline_factor=2.0, deadline_slack_s=3.0,
                    reconnect_timeout_s=reconnect_timeout_s, rejoin_timeout_s=rejoin_timeout_s)
    return MultistageOrchestrator(settings, Job(CountingModel(), "p", 1, "ddim", 16384),
                                  {c.id: DevicePower(10.0, 1.0, 0.5) for c in costs}, plan=_Plan(costs, order),
                                  steps_per_stage=4, t_max_s=30.0, e_max_j=1000.0, emit=emit or events.append,
                                  timing=timing)


@needs_mosquitto
async def test_broker_restart_mid_stage_resumes_from_the_checkpoint(broker):
    run, b = broker
    models = {d: CountingModel(step_s=0.1) for d in DEVICES}  # 0.4 s per stage
    agents = {d: _agent(run, b, d, models[d]) for d in DEVICES}
    tasks = [asyncio.create_task(a.serve()) for a in agents.values()]
    costs = [Cost("dev01", 4, 0.5, 5), Cost("dev02", 3, 0.5, 5), Cost("dev03", 1, 0.5, 5)]
    events: list[dict] = []
    restarted = asyncio.Event()

    async def restart() -> None:
        await asyncio.to_thread(b.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(b.start)
        restarted.set()

    def on_event(ev):
        events.append(ev)
        if ev["type"] == "downloaded" and ev["stage"] == 1 and not restarted.is_set() and not hasattr(on_event, "t"):
            on_event.t = asyncio.get_running_loop().create_task(restart())

    orch = _orchestrator(run, b, ["dev01", "dev02"], costs, [], emit=on_event)
    try:
        async with asyncio.timeout(60):
            out = await orch.run()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert restarted.is_set()
    assert float(out.latent.min()) == float(out.latent.max()) == 8.0  # 8 steps, none lost, none repeated
    assert [s.steps for s in out.stages] == [(0, 4), (4, 8)]
    assert [s.device for s in out.stages] == ["dev01", "dev02"]  # the same device resumed: it did not fail
    (rec,) = out.recovered
    assert rec.reason == "broker" and rec.device == rec.took_over == "dev02" and rec.steps == (4, 8)
    types = [e["type"] for e in events]
    assert "broker_lost" in types and "broker_back" in types
    assert types.index("broker_lost") < types.index("broker_back") < types.index("recovered")


@needs_mosquitto
async def test_broker_that_never_returns_ends_the_run_with_a_clear_error(broker):
    run, b = broker
    agents = {d: _agent(run, b, d, CountingModel(step_s=0.1)) for d in DEVICES}
    tasks = [asyncio.create_task(a.serve()) for a in agents.values()]
    costs = [Cost("dev01", 4, 0.5, 5), Cost("dev02", 3, 0.5, 5)]

    def on_event(ev):
        if ev["type"] == "downloaded" and not hasattr(on_event, "t"):
            on_event.t = asyncio.get_running_loop().create_task(asyncio.to_thread(b.stop))

    orch = _orchestrator(run, b, ["dev01", "dev02"], costs, [], emit=on_event, reconnect_timeout_s=2.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(RelayError, match="broker"):
            async with asyncio.timeout(30):
                await orch.run()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert time.monotonic() - t0 < 15  # bounded: the reconnect budget, not a hang


def test_a_broker_handle_keeps_its_settings_so_a_restart_needs_nothing_else(tmp_path, monkeypatch):
    """The handle carries the settings it was started with (also across the control socket,
    as JSON), and the one config writer makes the same file from them again."""
    from testbed.emulation.broker import BrokerHandle, BrokerSettings, write_broker_config

    monkeypatch.setattr("testbed.emulation.broker.os.geteuid", lambda: 1000)  # no hand-over to the mosquitto user
    s = BrokerSettings(tmp_path / "pw", tmp_path / "acl", 4242, port=1884)
    kind, argv, conf, log, _ = write_broker_config("198.18.0.1", tmp_path, s)
    first = conf.read_text()
    h = BrokerHandle(kind, 1, "198.18.0.1", s.port, conf, log, s)
    back = BrokerHandle.from_json(json.loads(json.dumps(h.to_json())))
    assert back == h and back.settings == s
    conf.unlink()
    assert write_broker_config("198.18.0.1", tmp_path, back.settings)[2].read_text() == first
    if kind == "mosquitto":
        assert "listener 1884 198.18.0.1" in first and "message_size_limit 4242" in first
        assert f"password_file {tmp_path / 'pw'}" in first and f"acl_file {tmp_path / 'acl'}" in first


# -- fault specs ---------------------------------------------------------------------------
_BASE = "devices:\n  list:\n    - {id: dev01}\n    - {id: dev02}\n"


def test_fault_yaml_syntax_loads():
    topo = parse_topology(_BASE + """faults:
  - {kind: kill, device: dev01, at_stage: 0}
  - {kind: broker-restart, at_s: 1.5, duration_s: 2}
  - {kind: link-flap, device: dev02, at_s: 0.5, duration_s: 1}
  - {kind: rate-drop, device: dev02, at_stage: 1, value: 0.05}
  - {kind: slow, at_stage: 1, value: 0.1, duration_s: 5}
""")
    assert [f.kind for f in topo.faults] == ["kill", "broker-restart", "link-flap", "rate-drop", "slow"]
    assert topo.faults[3].value == 0.05 and topo.faults[4].device is None


@pytest.mark.parametrize("fault, needle", [
    ("{kind: explode}", "faults.0.kind"),
    ("{kind: kill, device: dev09}", "unknown device 'dev09'"),
    ("{kind: kill, at_s: 1, at_stage: 0}", "not both"),
    ("{kind: broker-restart, device: dev01}", "takes no device"),
    ("{kind: kill, device: dev01, duration_s: 3}", "kill takes no duration_s"),
    ("{kind: link-flap, device: dev01, value: 3}", "link-flap takes no value"),
    ("{kind: slow, device: dev01, value: -1}", "faults[0].value"),
    ("{kind: kill, device: 'dev01; reboot'}", "faults[0].device"),
])
def test_bad_fault_is_a_clear_error(fault, needle):
    with pytest.raises(TopologyError) as e:
        parse_topology(_BASE + f"faults:\n  - {fault}\n", source="t.yaml")
    msg = str(e.value).replace("faults[0]", "faults[0]")
    assert needle in msg or needle.replace(".0.", "[0].") in msg, msg
    assert "t.yaml:" in msg


def test_parse_fault_from_cli_arguments():
    assert parse_fault("slow", "dev01", value=0.2).value == 0.2
    with pytest.raises(TopologyError, match="kinds: kill, broker-restart"):
        parse_fault("melt", "dev01")


class _FakeCell:
    """What FaultInjector drives, recording the calls (any Cell would do)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.at: list[float] = []  # when each call came (monotonic)
        self.nodes = {"dev01": type("N", (), {"rate_up_mbps": 5.0, "rate_down_mbps": 9.0})()}

    def device_ids(self):
        return ["dev01"]

    def _call(self, *call):
        self.calls.append(call)
        self.at.append(time.monotonic())

    async def cut_link(self, dev):
        self._call("down", dev)

    async def restore_link(self, dev):
        self._call("up", dev)

    async def set_link(self, dev, up, down):
        self._call("rate", dev, up, down)

    async def until(self, n: int, timeout_s: float = 10.0) -> None:
        """Until the injector has made `n` calls (it fires from timers: wait for them, not for a time)."""
        async with asyncio.timeout(timeout_s):
            while len(self.calls) < n:
                await asyncio.sleep(0.005)


async def test_injector_schedules_from_telemetry_and_restores():
    cell, events = _FakeCell(), []
    topo = parse_topology(_BASE + "faults:\n  - {kind: link-flap, at_stage: 1, duration_s: 0.2}\n"
                                  "  - {kind: rate-drop, device: dev01, at_s: 0.05, value: 0.5}\n")
    inj = FaultInjector(cell, lambda etype, device, **data: events.append((etype, device, data)),
                        {"dev01": Cost("dev01", 1, 1, 1, t_cmp_s=0.2)}, topo.faults)
    t_run = time.monotonic()
    inj.feed({"type": "run_started"})
    inj.feed({"type": "downloaded", "device": "dev01", "stage": 0})
    await cell.until(1)
    assert cell.calls == [("rate", "dev01", 0.5, 0.5)]  # at_s fired; the stage-1 flap waits for its stage
    assert cell.at[0] - t_run >= 0.049  # (timers never fire early; late, under load, is fine)
    t_stage1 = time.monotonic()
    inj.feed({"type": "downloaded", "device": "dev01", "stage": 1})
    await cell.until(3)
    assert cell.calls[1:] == [("down", "dev01"), ("up", "dev01")]
    assert cell.at[1] - t_stage1 >= 0.099  # the flap waits half the predicted compute (0.1 s) ...
    assert cell.at[2] - cell.at[1] >= 0.199  # ... and lasts its duration_s
    inj.feed({"type": "downloaded", "device": "dev01", "stage": 1})  # a retried stage fires nothing again
    await inj.close()  # the rate-drop lasts the run: close() restores it
    assert cell.calls[-1] == ("rate", "dev01", 5.0, 9.0)
    kinds = [(e[0], e[2].get("kind")) for e in events]
    assert kinds == [("fault_injected", "rate-drop"), ("fault_injected", "link-flap"), ("fault_restored", "link-flap"),
                     ("fault_restored", "rate-drop")]
    assert [i.kind for i in inj.injected] == ["rate-drop", "link-flap"] and inj.errors == []


@needs_mosquitto
async def test_a_stale_result_of_an_earlier_generation_is_rejected(broker):
    """A device that missed its deadline in one generation may upload that stage late,
    while the next generation (same run, a new orchestrator) waits for the same stage and
    attempt from it. The result must be tied to the task that was sent, not just to its
    stage/attempt/steps numbers: otherwise a latent from another generation is taken."""
    import numpy as np

    from testbed.relay import topics
    from testbed.relay.wire import Message, encode

    run, b = broker
    agents = {d: _agent(run, b, d, CountingModel(step_s=0.1)) for d in DEVICES}
    tasks = [asyncio.create_task(a.serve()) for a in agents.values()]
    costs = [Cost("dev01", 4, 0.5, 5), Cost("dev02", 3, 0.5, 5)]
    stale = Message(kind="result", run=run, device="dev01", stage=0, attempt=1, steps=(0, 4), total_steps=8,
                    tensors={"latent": np.full((1, 1, 8, 8), 100.0, np.float32)},
                    meta={"t_recv": time.time() - 5, "t_send": time.time() - 1, "sched": {"next_step": 4}})

    def on_event(ev):
        if ev["type"] == "downloaded" and ev["stage"] == 0 and not hasattr(on_event, "t"):
            on_event.t = asyncio.get_running_loop().create_task(agents["dev01"].client.publish(
                topics.result(run, "dev01"), encode(stale, pad_to_bytes=16384), qos=1))

    orch = _orchestrator(run, b, ["dev01", "dev02"], costs, [], emit=on_event)
    try:
        async with asyncio.timeout(60):
            out = await orch.run()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert hasattr(on_event, "t") and on_event.t.done()
    assert float(out.latent.min()) == float(out.latent.max()) == 8.0  # not 104: the stale latent was refused
    assert out.rejected_results == 1


class _BrokerCell(_FakeCell):
    """A cell whose broker stops but does not start again (its port taken, a bad file)."""

    def __init__(self):
        super().__init__()
        from testbed.emulation.broker import BrokerHandle, BrokerSettings

        self.broker = BrokerHandle("mosquitto", 1, "198.18.0.1", 1883, Path("c"), Path("l"), BrokerSettings())

    async def stop_broker(self):
        self.calls.append(("broker", "stop"))
        self.broker = None

    async def start_broker(self, settings):
        from testbed.errors import ResourceError

        self.calls.append(("broker", "start"))
        raise ResourceError("mosquitto exited with code 1 at start; see broker/mosquitto.stdout.log: address in use")


async def test_a_broker_that_does_not_come_back_is_a_failed_fault():
    cell, events = _BrokerCell(), []
    inj = FaultInjector(cell, lambda etype, device, **data: events.append((etype, data)))
    await inj.inject("broker-restart", duration_s=0.05)
    await inj.wait_restored()
    assert cell.calls == [("broker", "stop"), ("broker", "start")]
    assert inj.errors == ["restore broker-restart: mosquitto exited with code 1 at start; see "
                          "broker/mosquitto.stdout.log: address in use"]
    assert [e[0] for e in events] == ["fault_injected", "fault_failed"] and "address in use" in events[-1][1]["error"]


def test_testbed_fault_exits_non_zero_when_the_broker_does_not_come_back(monkeypatch, capsys):
    """The CLI side (the supervisor's cell replaced by one whose broker cannot start)."""
    from testbed.cli import main
    from testbed.emulation.attached import AttachedCell

    async def connect(run_id):
        return _BrokerCell()

    monkeypatch.setattr(AttachedCell, "connect", staticmethod(connect))
    monkeypatch.setattr("testbed.emulation.runs.resolve_run", lambda run: run)
    monkeypatch.setattr("testbed.cli.commands.emulation_cmds.require_root", lambda: None)
    with pytest.raises(SystemExit) as e:
        main(["fault", "broker-restart", "--run", "tfault1", "--duration", "0.05"])
    err = capsys.readouterr().err
    assert e.value.code == 4 and "address in use" in err and "testbed status --run tfault1" in err, err
