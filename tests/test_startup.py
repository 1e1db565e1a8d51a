"""Warm start (issue 19): a light CLI, the start-up clock, the control socket's streaming
op, the template's preloaded models, and (root) a generation on an up cell run by its
supervisor without torch in the client, and a cold run that leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.composition.startup import StartupClock
from testbed.emulation.control import ControlServer, call, call_stream
from testbed.errors import ResourceError, TopologyError

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]
HEAVY = ("torch", "diffusers", "scipy")


def _tb(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- light ------------------------------------------------------------------------------

def test_importing_the_cli_imports_no_torch_diffusers_or_scipy():
    code = f"import sys, testbed.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_program_leaves_fast_with_its_output_and_exit_code_intact(tmp_path):
    """With torch loaded, `testbed` ends without the interpreter's teardown (os._exit): the
    error line must still be out and the exit code right."""
    r = subprocess.run([*TESTBED, "generate", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 2 and "diffusers model directory" in r.stderr


@pytest.mark.parametrize("args, cold", [
    (["run", "t.yaml"], True), (["run", "t.yaml", "--json", "--run-id", "a1"], True),
    (["run", "t.yaml", "--run", "a1"], False), (["run", "t.yaml", "--run=a1"], False),
    (["run", "--help"], False), (["run"], False), (["up", "t.yaml"], False), ([], False),
])
def test_only_a_cold_runs_command_line_prestarts_a_worker(args, cold):
    from testbed.composition.worker_start import is_cold_run

    assert is_cold_run(args) is cold


def test_a_prestarted_worker_whose_command_ends_first_exits_without_a_trace(tmp_path):
    """A cold run that ends before its cell (bad input) closes the worker's stdin: the worker
    ends once its imports are done (or at once, by PR_SET_PDEATHSIG, when its command is gone)."""
    from testbed.composition.worker_start import worker_argv, worker_environ

    proc = subprocess.Popen(worker_argv("--prestarted"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=worker_environ(), cwd=REPO)
    out, _ = proc.communicate(b"", timeout=120)
    assert proc.returncode == 0 and out == b""


def test_command_started_at_is_the_process_start_not_after_its_imports():
    code = ("import time; from testbed.composition.startup import command_started_at; "
            "import testbed.cli; print(command_started_at(), time.time())")
    before = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    started, printed = (float(x) for x in r.stdout.split())
    assert before - 0.05 <= started <= printed  # 10 ms clock ticks: a little slack below
    assert started < printed - 0.05  # the interpreter and `import testbed.cli` came after it


def test_the_clock_keeps_overlapping_phases_and_the_first_latent():
    clock = StartupClock(t0=1000.0, path="cold")
    clock.mark("template", 1000.5, 1004.0)
    clock.mark("cell", 1000.6, 1001.1)
    clock.feed({"type": "selection", "ts": 1004.2})
    clock.feed({"type": "stage_started", "ts": 1004.75})
    clock.feed({"type": "stage_started", "ts": 1006.0})  # only the first counts
    doc = clock.to_json()
    assert doc["path"] == "cold" and doc["first_stage_s"] == 4.75
    assert doc["phases"] == {"template": [0.5, 4.0], "cell": [0.6, 1.1]}
    assert doc["template_s"] == 3.5 and doc["cell_s"] == 0.5


def test_split_runs_count_from_their_run_started():
    clock = StartupClock(t0=10.0)
    clock.feed({"type": "run_started", "ts": 12.5})
    assert clock.first_stage_s == 2.5


# -- the control socket's streaming op --------------------------------------------------

async def _server(tmp_path: Path, done: list[str]) -> ControlServer:
    async def talk(emit, n: int, fail: bool = False) -> str:
        for i in range(n):
            emit({"type": "tick", "i": i})
            await asyncio.sleep(0.01)
        done.append("finished")
        if fail:
            raise TopologyError("workload.payload_bytes differs")
        return "done"

    async def ping() -> str:
        return "pong"

    server = ControlServer(tmp_path / "c.sock", {"ping": ping}, streams={"talk": talk})
    await server.start()
    return server


async def test_a_streaming_op_sends_its_events_in_order_then_its_result(tmp_path):
    server = await _server(tmp_path, [])
    try:
        seen: list[dict] = []
        assert await call_stream(tmp_path / "c.sock", "talk", seen.append, n=3) == "done"
        assert [e["i"] for e in seen] == [0, 1, 2]
        assert await call(tmp_path / "c.sock", "ping") == "pong"  # one-shot ops are unchanged
    finally:
        await server.close()


async def test_a_streaming_op_error_arrives_with_its_class_after_the_events(tmp_path):
    server = await _server(tmp_path, [])
    try:
        seen: list[dict] = []
        with pytest.raises(TopologyError, match="payload_bytes") as e:
            await call_stream(tmp_path / "c.sock", "talk", seen.append, n=2, fail=True)
        assert e.value.exit_code == 2 and len(seen) == 2
        with pytest.raises(Exception, match="talk"):  # unknown ops name the streaming ones too
            await call(tmp_path / "c.sock", "nope")
    finally:
        await server.close()


async def test_a_caller_that_goes_away_leaves_the_op_running_and_the_server_serving(tmp_path):
    done: list[str] = []
    server = await _server(tmp_path, done)
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
        writer.write(json.dumps({"op": "talk", "args": {"n": 20}}).encode() + b"\n")
        await writer.drain()
        await reader.readline()  # the first event came: the op is running
        writer.close()
        await writer.wait_closed()
        for _ in range(200):
            if done:
                break
            await asyncio.sleep(0.02)
        assert done == ["finished"]
        assert await call(tmp_path / "c.sock", "ping") == "pong"
    finally:
        await server.close()


async def test_no_cell_at_the_socket_is_a_resource_error(tmp_path):
    with pytest.raises(ResourceError, match="is it up"):
        await call_stream(tmp_path / "none.sock", "generate", lambda ev: None)


# -- the template's preloaded models ----------------------------------------------------

def test_a_preloaded_variant_is_taken_once_then_loaded_afresh():
    from testbed.relay.stage import StageModel

    StageModel.preload("tiny", "int8")
    first = StageModel.load("tiny", "int8")
    again = StageModel.load("tiny", "int8")
    assert first is not again  # the preloaded copy went to the first load (a forked agent's)
    assert first.precision == again.precision == "int8" and first.size_bytes == again.size_bytes


# -- root: warm and cold runs -----------------------------------------------------------

_CLIENT = """
import json, sys
from testbed.entry import main  # (the console script's: a cold run's worker starts first)
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump([m for m in {heavy!r} if m in sys.modules], f)
""".format(heavy=HEAVY)


def _client_run(topo: Path, out: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list]:
    """`testbed run TOPO ...` in a process that reports which heavy modules it imported."""
    seen = tmp / f"modules-{out.name}.json"
    r = subprocess.run([sys.executable, "-c", _CLIENT, str(seen), "run", str(topo), "--out", str(out),
                        "--json", *extra], capture_output=True, text=True, timeout=180, cwd=REPO)
    return r, json.loads(seen.read_text()) if seen.exists() else None


def _warm_run(run: str, topo: Path, out: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list]:
    """`testbed run TOPO --run RUN` in a process that reports which heavy modules it imported."""
    return _client_run(topo, out, tmp, "--run", run, *extra)


def _wait_state(run: str, cond, what: str, timeout_s: float = 180.0) -> dict:
    from testbed.emulation.runs import read_state

    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state(run) or {}
        if cond(state):
            return state
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}: {state}"
        time.sleep(0.05)


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.slow
def test_up_returns_when_the_cell_is_usable_and_its_agents_warm_behind_it(topologies, tmp_path, unique_run_id):
    """`up` answers once namespaces, links and the broker are up; `status` shows the agents
    coming online; a cell that keeps none warm starts, for a generation, only what it needs."""
    from testbed.emulation.attached import control_path
    from testbed.emulation.control import call_sync

    run = unique_run_id
    up = _tb("up", str(topologies / "small.yaml"), "--run", run, "--json")
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    assert state["ready"] and state["warm"] == ["dev01", "dev02", "dev03", "dev04"]
    assert state["worker"] in ("starting", "ready") and state["broker"] is not None
    shown = _tb("status", "--run", run)
    assert shown.returncode == 0 and re.search(r"agents: [0-4]/4 online", shown.stdout), shown.stdout
    _wait_state(run, lambda s: s.get("worker") == "ready" and sum(n.get("agent_online", False)
                                                                 for n in s.get("nodes", [])) == 4, "4 agents online")
    assert "agents: 4/4 online\n" in _tb("status", "--run", run).stdout
    assert _tb("down", "--run", run).returncode == 0

    # --warm none: nothing warms; a generation starts its chain (and, behind it, spares)
    up = _tb("up", str(topologies / "small.yaml"), "--run", run, "--warm", "none", "--wait", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["warm"] == [] and call_sync(control_path(run), "agents_pids") == {}
    assert "agents: 0/0 online; the other 4 start when a plan selects them" in _tb("status", "--run", run).stdout
    r, _ = _warm_run(run, topologies / "small.yaml", tmp_path / "n1", tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    events = [json.loads(x) for x in (tmp_path / "n1" / "events.jsonl").read_text().splitlines()]
    waited = next(e for e in events if e["type"] == "agents_online")
    assert waited["devices"] == len(doc["selected"]) == 2  # the generation waited for its chain only
    assert set(doc["selected"]) <= set(call_sync(control_path(run), "agents_pids"))
    assert _tb("down", "--run", run).returncode == 0


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_warm_run_is_the_supervisors_and_the_client_imports_no_torch(topologies, tmp_path, unique_run_id):
    from testbed.emulation.attached import control_path
    from testbed.emulation.control import call_sync
    from testbed.model.topology import load_topology

    run = unique_run_id
    up = _tb("up", str(topologies / "small.yaml"), "--run", run, "--wait", "--json")
    assert up.returncode == 0, up.stderr
    agents = call_sync(control_path(run), "agents_pids")
    assert sorted(agents) == ["dev01", "dev02", "dev03", "dev04"]  # --wait: every warm agent online
    t0 = time.time()
    r, heavy = _warm_run(run, topologies / "small.yaml", tmp_path / "w1", tmp_path)
    t1 = time.time()
    assert r.returncode == 0, r.stderr
    assert heavy == []  # the supervisor did the work: no torch, diffusers or scipy in the client
    doc = json.loads(r.stdout)
    assert doc["run"] == run and doc["selected"] == ["dev01", "dev02"] and doc["ms_ssim"] is not None
    startup = doc["meta"]["startup"]
    assert startup["path"] == "warm" and {"cli", "plan", "agents_wait"} <= set(startup["phases"])
    events = [json.loads(x) for x in (tmp_path / "w1" / "events.jsonl").read_text().splitlines()]
    first = next(e for e in events if e["type"] == "stage_started")
    assert t0 <= first["ts"] <= t1  # epoch seconds, when the first latent went out
    assert t0 - 0.05 <= first["ts"] - startup["first_stage_s"] <= first["ts"]  # counted from the client's start
    assert (tmp_path / "w1" / "image.png").is_file() and (tmp_path / "w1" / "logs" / "agent-dev01.log").is_file()
    assert call_sync(control_path(run), "agents_pids") == agents  # the same warm agents, still up

    # the scenario's own budgets apply; what configured the agents must be the cell's
    changed = load_topology(topologies / "small.yaml").model_dump(mode="json", exclude_unset=True)
    changed["budgets"] = {"t_max_s": 3.5, "e_max_j": 90.0}
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps(changed))
    r, _ = _warm_run(run, other, tmp_path / "w2", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["t_max_s"], json.loads(r.stdout)["e_max_j"]) == (3.5, 90.0)
    changed["workload"]["payload_bytes"] = 131072
    other.write_text(json.dumps(changed))
    r, _ = _warm_run(run, other, tmp_path / "w2b", tmp_path)
    assert r.returncode == 2 and "workload.payload_bytes" in r.stderr and "testbed up" in r.stderr

    # one generation at a time on a cell: a second caller is told so, the first one finishes
    async def two() -> tuple[dict, BaseException | None]:
        from testbed.composition.remote_run import run_on_up_cell

        topo = load_topology(topologies / "small.yaml")
        started = asyncio.Event()
        first_run = asyncio.ensure_future(run_on_up_cell(run, topo, out_dir=tmp_path / "w3",
                                                         on_event=lambda ev: started.set()))
        await asyncio.wait_for(started.wait(), 60)
        try:
            await run_on_up_cell(run, topo, out_dir=tmp_path / "w4")
            second = None
        except ResourceError as e:
            second = e
        return await first_run, second

    res, second = asyncio.run(two())
    assert res["relay_order"] and isinstance(second, ResourceError) and "one generation at a time" in str(second)
    down = _tb("down", "--run", run)
    assert down.returncode == 0, down.stderr


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_cold_run_pays_torch_once_records_its_startup_and_leaves_no_process_behind(topologies, tmp_path):
    from test_leaks import _leftovers

    t0 = time.time()
    r, heavy = _client_run(topologies / "small.yaml", tmp_path / "o", tmp_path)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr
    assert heavy == []  # the command made the cell; its worker imported torch and diffusers, once
    doc = json.loads(r.stdout)
    assert _leftovers(doc["run"], set()) == []  # no worker, template, agent, broker, namespace or state left
    s = doc["meta"]["startup"]
    assert s["path"] == "cold"
    assert {"cli", "session", "cell", "broker", "imports", "template", "server_model", "plan",
            "agents_wait"} <= set(s["phases"])
    ph = s["phases"]
    assert ph["imports"][0] < ph["cli"][1]  # the worker started before the command line's own imports ended
    assert ph["imports"][0] < ph["cell"][1]  # the worker's imports overlapped the cell's creation
    assert ph["imports"][1] <= ph["server_model"][0] and ph["imports"][1] <= ph["template"][1]  # one import for both
    assert ph["agents_wait"][1] <= s["first_stage_s"] <= wall  # the chain's agents were online before the first latent
    assert s["cell_s"] == pytest.approx(ph["cell"][1] - ph["cell"][0], abs=1e-3)  # the old keys stay


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.slow
def test_an_up_cells_worker_template_and_agents_hold_no_secret_of_the_command(topologies, unique_run_id):
    """The worker imports torch once and forks the template from itself: it must start from
    the allow-listed environment, or a secret of the command's would reach every agent."""
    from test_environ import TOKEN, _environ, _memory_holds

    from testbed.emulation.runs import read_state

    run = unique_run_id
    r = subprocess.run([*TESTBED, "up", str(topologies / "small.yaml"), "--run", run, "--wait", "--json"],
                       env={**os.environ, "HF_TOKEN": TOKEN}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    try:
        worker = read_state(run, "worker.json")
        assert worker is not None and len(worker["agents"]) == 4, worker
        pids = {"worker": worker["pid"], "template": worker["template_pid"],
                **{f"agent {d}": p for d, p in worker["agents"].items()}}
        leaked = {who: "HF_TOKEN" in (env := _environ(pid)) or TOKEN in "".join(env.values()) or
                  _memory_holds(pid, TOKEN.encode()) for who, pid in pids.items()}
        assert leaked == {who: False for who in pids}
    finally:
        assert _tb("down", "--run", run).returncode == 0
