"""End to end on topologies/small.yaml as root: namespaces, shaped links, mosquitto with
per-run ACLs, one real `testbed-agent` process per device, the tiny model.

- a run completes, its events arrive in order on tb/<run>/events, and `mosquitto_sub`
  on the host (through the host link, with the observer account) sees the same events;
- with a device killed mid-computation the run re-selects the rest of the chain (budgets
  charged with what was spent), completes, lists the recovery, and the stages cover every
  step exactly once;
- a bad payload on a task topic is rejected and logged, and that agent keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from testbed.relay import topics
from testbed.model.topology import load_topology

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.mosquitto]


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]


def _check_steps(doc: dict) -> None:
    k = load_topology(Path(__file__).parent.parent / "topologies/small.yaml").workload.steps_per_stage
    n = doc["total_steps"]
    assert n == k * len(doc["selected"])
    assert [s["steps"] for s in doc["stages"]] == [[i, i + k] for i in range(0, n, k)]  # each step once, in order


async def _until_observed(session, out: Path, needle: bytes, publish: bool = False, timeout_s: float = 60.0) -> None:
    """Until the observer's output holds `needle`; `publish`: sending a probe event every
    0.1 s meanwhile (as the run owner's event publisher), for a subscription that is not
    there yet — a sleep would guess how long mosquitto_sub takes."""
    settings = session.relay_settings("events")

    async def probe() -> None:
        async with aiomqtt.Client(settings.broker_host, settings.broker_port, username=settings.username,
                                  password=settings.password, identifier=f"tb-{settings.run}-{settings.username}") as c:
            async with asyncio.timeout(timeout_s):
                while needle not in (out.read_bytes() if out.exists() else b""):
                    if publish:
                        await c.publish(topics.events(settings.run), b'{"type": "probe"}', qos=1)
                    await asyncio.sleep(0.1)

    await session.in_server_ns(probe)


async def test_small_run_completes_and_an_outside_observer_sees_the_events(topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import AttachedCellSource, MadeCell
    from testbed.composition.session import RunSession

    run = unique_run_id[:7]
    topo = load_topology(topologies / "small.yaml")
    seen: list[dict] = []
    async with RunSession(topo, MadeCell(run), out_dir=tmp_path, on_event=seen.append) as r:
        obs = json.loads((Path("/run/testbed") / run / "observer.json").read_text())
        assert (Path("/run/testbed") / run / "observer.json").stat().st_mode & 0o077 == 0
        assert load_topology(Path("/run/testbed") / run / "topology.yaml") == topo  # for tui --attach RUN
        # from the host, through the host link (when another run holds the host's route to
        # 198.18.0.0/16, from the server's namespace instead: still outside every device)
        from testbed.emulation.procs import spawn_in

        netns = None if r.cell.status()["host_route"] else r.cell.nodes["server"].netns
        sub = spawn_in(
            netns, ["mosquitto_sub", "-h", obs["host"], "-p", str(obs["port"]), "-u", obs["username"], "-P", obs["password"],
             "-t", f"tb/{run}/#", "-W", "120", "-v"], None, tmp_path / "observer.txt")
        try:
            await _until_observed(r, tmp_path / "observer.txt", b'"probe"', publish=True)  # it has subscribed
            res = await r.run()
            await _until_observed(r, tmp_path / "observer.txt", b'"run_finished"')  # it has seen the last one
        finally:
            sub.terminate()
            sub.wait(10)
    stdout = stderr = "\n".join(ln for ln in (tmp_path / "observer.txt").read_text().splitlines()
                                if '"probe"' not in ln)
    doc = res.to_json()
    assert doc["selected"] == ["dev01", "dev02"] and doc["recovered"] == []
    _check_steps(doc)
    assert 0 < doc["ms_ssim"] <= 1 and (tmp_path / "image.png").stat().st_size > 0
    assert json.loads((tmp_path / "result.json").read_text())["run"] == run
    for s in doc["stages"]:
        assert s["bytes_down"] == s["bytes_up"] == topo.workload.payload_bytes
        assert s["t_down_s"] > 0 and s["t_up_s"] > 0 and s["energy_j"] > 0 and s["predicted"]["t_cmp_s"] > 0
    meta = doc["meta"]
    assert meta["compute"] == "profile" and meta["model"] == "tiny" and meta["seed"] == topo.seed
    assert meta["precisions"]["dev02"]["computed_in"] == "bfloat16"  # fp16 on a CPU
    # events: in order, the relay's own sequence, the same in the file and the callback
    relay_events = [e for e in _events(tmp_path) if e["seq"] is not None]
    assert [e["seq"] for e in relay_events] == list(range(1, len(relay_events) + 1))
    assert relay_events[-1]["type"] == "relay_finished"
    assert _events(tmp_path)[-1]["type"] == "run_finished"  # the run owner's, with the image's MS-SSIM
    assert _events(tmp_path)[-1]["ms_ssim"] == doc["ms_ssim"]
    assert [e["seq"] for e in seen if e["seq"] is not None] == [e["seq"] for e in relay_events]
    # the observer outside the testbed saw exactly those events, and nothing but events
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, f"mosquitto_sub saw nothing: {stderr}"
    assert all(ln.startswith(f"tb/{run}/events ") for ln in lines)
    observed = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    assert [e["seq"] for e in observed if e["seq"] is not None] == [e["seq"] for e in relay_events]
    # the run owner's own events too, before and after the relay's
    assert [e["type"] for e in observed][:4] == ["selection", "agents_online", "run_started", "stage_started"]
    assert [e["type"] for e in observed] == [e["type"] for e in _events(tmp_path)]
    # teardown removed the run's state
    assert not (Path("/run/testbed") / run).exists()
    assert (tmp_path / "logs" / "agent-dev01.log").exists()


async def test_failure_mid_stage_is_recovered_and_bad_payloads_are_rejected(topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import AttachedCellSource, MadeCell
    from testbed.composition.session import RunSession
    from testbed.methods.multistage.strategy import Multistage

    run = unique_run_id[:7]
    topo = load_topology(topologies / "small.yaml")
    async with RunSession(topo, MadeCell(run), out_dir=tmp_path) as r:
        await r.ensure_agents(r.cell.device_ids())

        async def publish_junk() -> None:  # garbage on dev03's task topic, with the server's own credentials
            async with aiomqtt.Client(r.cell.broker.host, r.cell.broker.port, username="server",
                                      password=r.rig.credentials.server.password, timeout=10) as c:
                for junk in (b"not a relay message", b"TBR1\x00\x00\x00\x02{}", b"\x00" * 300_000):
                    await c.publish(topics.task(run, "dev03"), junk, qos=1)

        await r.in_server_ns(publish_junk)
        # dev01 -> dev02 with room for a recovery: the failed attempt is charged to the budgets
        # (at the default 2 s / 70 J the DP fills them, and the kill leaves too little for dev03)
        res = await r.run(Multistage(order=["dev01", "dev02"]), t_max_s=4.0, e_max_j=200.0, fail="dev02")
    doc = res.to_json()
    _check_steps(doc)
    assert [s["device"] for s in doc["stages"]] == ["dev01", "dev03"]
    (rec,) = doc["recovered"]
    assert rec["device"] == "dev02" and rec["took_over"] == "dev03" and rec["reason"] == "offline"
    assert rec["steps"] == doc["stages"][1]["steps"]
    # the kill in stage 1 re-ran the selection for the one stage left, charging what was spent
    first = doc["stages"][0]
    assert rec["chain"] == ["dev03"]
    assert rec["charged"]["latency_s"] > first["t_down_s"] + first["t_cmp_s"] + first["t_up_s"]
    assert rec["charged"]["energy_j"] == pytest.approx(first["energy_j"] + rec["energy_j"])
    assert rec["left"]["latency_s"] == pytest.approx(doc["t_max_s"] - rec["charged"]["latency_s"])
    assert doc["within_budget"]["latency"] == (doc["latency_s"] <= doc["t_max_s"])
    events = _events(tmp_path)
    types = [e["type"] for e in events]
    assert types.index("fault_injected") < types.index("device_offline") < types.index("reselected") \
        < types.index("recovered")
    (resel,) = [e for e in events if e["type"] == "reselected"]
    assert resel["chain"] == ["dev03"] and resel["failed"] == "dev02"
    assert resel["charged_s"] == rec["charged"]["latency_s"]
    log = (tmp_path / "logs" / "agent-dev03.log").read_text()
    assert log.count("rejected relay message") == 3, log
    assert "stage 1 uploaded" in log  # ... and dev03 kept serving: it ran the recovered stage


async def test_run_on_a_cell_that_testbed_up_keeps_alive(topologies, tmp_path, unique_run_id):
    """`testbed run --run ID`: the kept cell's broker, credentials and warm agents serve the
    generation; the cell and its agents survive it."""
    import subprocess
    import sys

    from testbed.composition.cells import AttachedCellSource, MadeCell
    from testbed.composition.session import RunSession
    from testbed.emulation.attached import control_path
    from testbed.emulation.control import call_sync

    run = unique_run_id[:7]
    tb = [sys.executable, "-m", "testbed.cli"]
    up = subprocess.run([*tb, "up", str(topologies / "small.yaml"), "--run", run, "--wait"], capture_output=True,
                        text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        topo = load_topology(topologies / "small.yaml")
        assert load_topology(Path("/run/testbed") / run / "topology.yaml") == topo  # written by up's supervisor
        agents = call_sync(control_path(run), "agents_pids")
        assert sorted(agents) == ["dev01", "dev02", "dev03", "dev04"]  # warm: up --wait waited for them
        async with RunSession(topo, AttachedCellSource(run), out_dir=tmp_path) as r:
            assert r.cell.broker.port == 1883  # the cell's own broker
            doc = (await r.run()).to_json()
        _check_steps(doc)
        assert doc["selected"] == ["dev01", "dev02"]
        state = Path("/run/testbed") / run
        assert (state / "state.json").exists() and (state / "observer.json").exists()
        assert call_sync(control_path(run), "agents_pids") == agents  # the same agents serve the next run
        assert (tmp_path / "logs" / "agent-dev01.log").exists()
    finally:
        down = subprocess.run([*tb, "down", "--run", run], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
