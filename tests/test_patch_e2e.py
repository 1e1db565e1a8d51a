"""Patch-parallel diffusion end to end: real agents (separate processes), a real mosquitto,
the embedded model.

- over loopback (no root): synchronous at every step, the bands computed by two agents
  equal the unbroken run at fp32, the context crossing the broker at every exchange point;
  displaced after one synchronous step, the agents compute at the same time and never wait
  for context, and each message carries SD1.5's context bytes; a later generation on the
  same agents is exact again (no context of an earlier one leaks into it);
- on the emulation (root): `--method patch` on the paper's cell with T_max 4 s runs two or
  more devices in parallel, a record per device and step, and the result says `patch`; a
  device killed mid-run ends the run with RunFailedError (exit 5) naming it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mqtt_loopback import broker_and_agents

from testbed.errors import RunFailedError
from testbed.methods.patch.orchestrator import PatchOrchestrator
from testbed.relay.orchestrator import DevicePower, Job, RelaySettings, Timing
from testbed.relay.stage import StageModel
from testbed.methods.patch.plan import BandCost, PatchPlan

REPO = Path(__file__).resolve().parent.parent
DEVICES = ["dev01", "dev02"]
CTX_BYTES = 600_000  # what the plan says each band sends and receives per step (the padding target)
STEP_TIME_S = 0.4  # the agents' profile: a band computes 0.55 x 0.4 s


def _plan(steps: int, warmup: int) -> PatchPlan:
    bands = [BandCost(device=d, index=i, task_bytes=16384, noise_bytes=8192, ctx_up_bytes=CTX_BYTES,
                      ctx_down_bytes=CTX_BYTES, t_cmp_s=0.22, t_handling_s=0.01, size_mb=1.0) for i, d in enumerate(DEVICES)]
    return PatchPlan(selected=list(DEVICES), n=2, steps=steps, warmup_steps=warmup, t_max_s=60.0, e_max_j=1000.0,
                     t_sync_s=1.0, t_displaced_s=0.5, t_final_s=0.3, e_sync_j=1.0, e_displaced_j=1.0, e_final_j=0.5,
                     bands=bands, flop_share=0.55,
                     sync_points=44, sets_considered=1,
                     breakdown={"t_task_down_s": 0.01, "t_ctx_up_s": 0.05, "t_ctx_down_s": 0.05, "t_noise_up_s": 0.01})


@pytest.fixture
def loopback(tmp_path, unique_run_id):
    with broker_and_agents(tmp_path, unique_run_id, DEVICES, step_time_s=STEP_TIME_S) as lb:
        yield lb


async def _run(lb, model, plan: PatchPlan):
    events: list[dict] = []
    orch = PatchOrchestrator(
        RelaySettings(lb.run, "127.0.0.1", lb.port, "server", lb.creds.server.password, 8 * 2**20),
        Job(StageModel("tiny", "fp32", model), "a handwritten 4", 5, "ddim", 65536),
        {d: DevicePower(10.0, 2.0, 1.0) for d in DEVICES}, plan=plan, emit=events.append,
        timing=Timing(online_timeout_s=180, deadline_factor=20, deadline_slack_s=60))
    return await asyncio.wait_for(orch.run(), timeout=300), events


@pytest.mark.mosquitto
async def test_patch_over_the_network_synchronous_and_displaced(loopback):
    import torch

    from testbed.diffusion import encode_prompt, initial_latent, load_model, run_stage

    model = await asyncio.to_thread(load_model, "tiny", "fp32")
    steps = 5
    sync, events = await _run(loopback, model, _plan(steps, warmup=steps))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agents (1-core quota): same kernels, same summation order
    try:
        ref, _ = run_stage(model, initial_latent(model, 5), encode_prompt(model, "a handwritten 4"), 0, steps, steps,
                           "ddim")
    finally:
        torch.set_num_threads(threads)
    assert float((sync.latent - ref).abs().max()) < 1e-4  # the bands together are the unbroken UNet
    assert [(r.step, r.device, r.band, r.mode) for r in sync.records] == [
        (s, d, i, "sync") for s in range(steps) for i, d in enumerate(DEVICES)]
    for r in sync.records:
        h = model.unet.config.sample_size
        assert r.rows == ([0, h // 2] if r.band == 0 else [h // 2, h]) and r.halo_rows == [1, 1]
        assert r.t_wait_s > 0  # a synchronous step waits for the other band at its exchange points
        # each exchange point is its own message, padded to its share of SD1.5's bytes
        assert CTX_BYTES <= r.bytes_context_up < 1.15 * CTX_BYTES
        assert 0 < r.bytes_context_real_up < CTX_BYTES / 2
    assert sum(1 for e in events if e["type"] == "patch_step") == 2 * steps

    displaced, events = await _run(loopback, model, _plan(steps, warmup=1))
    assert [r.mode for r in displaced.records] == ["sync"] * 2 + ["displaced"] * 2 * (steps - 1)
    for s in range(steps):
        a, b = (r for r in displaced.records if r.step == s)
        assert max(a.t_cmp_start, b.t_cmp_start) < min(a.t_cmp_end, b.t_cmp_end)  # computing at the same time
        if s >= 1:
            assert a.t_wait_s == b.t_wait_s == 0.0  # the previous step's context was already there
        if s < steps - 1:  # the last step's context has no reader: not sent
            assert a.bytes_context_up >= CTX_BYTES and b.bytes_context_up >= CTX_BYTES
        else:
            assert a.bytes_context_up == b.bytes_context_up == 0
    diff = float((displaced.latent - ref).abs().max())
    assert 1e-4 < diff < 1.5  # stale context: not the unbroken run, but the same image's neighbourhood
    # the same agents, a third generation: nothing of the earlier ones' context is used
    again, _ = await _run(loopback, model, _plan(steps, warmup=steps))
    assert float((again.latent - ref).abs().max()) < 1e-4


@pytest.mark.root
@pytest.mark.mosquitto
async def test_patch_run_on_the_paper_cell_within_t_max(unique_run_id, tmp_path):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    topo = load_topology(REPO / "topologies" / "paper.yaml")
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path) as r:
        res = await r.run("patch", t_max_s=4.0)
        doc = res.to_json()
        # a band lost mid-run has no other owner: the run ends (exit 5) and says why
        with pytest.raises(RunFailedError, match=f"{doc['selected'][0]} .*(went offline|missed the deadline)"):
            await r.run("patch", t_max_s=4.0, fail=doc["selected"][0], out_dir=tmp_path / "fail")
    plan = doc["plan"]
    assert doc["method"] == "patch" and len(doc["selected"]) == plan["n"] >= 2
    assert len(doc["stages"]) == plan["n"] * plan["steps"] == plan["n"] * doc["total_steps"]
    sent: dict[int, list[float]] = {}  # step -> when the server sent each band its task
    for ev in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines()):
        if ev["type"] == "stage_started":
            sent.setdefault(ev["stage"], []).append(ev["ts"])
    for s in range(doc["total_steps"]):
        recs = [x for x in doc["stages"] if x["steps"] == [s, s + 1]]
        assert sorted(x["device"] for x in recs) == sorted(doc["selected"])
        # in parallel: every band had its task before any band finished (a band's own compute,
        # 42 ms emulated, can end before a band on a slower link has even received its task)
        assert len(sent[s]) == plan["n"] and max(sent[s]) < min(x["t_cmp_end"] for x in recs)
        for x in recs:
            assert x["halo_rows"] == [1, 1] and x["t_cmp_s"] > 0 and x["energy_j"] > 0
            assert x["bytes_up"] > 0 and x["bytes_down"] > 0
    assert plan["predicted_latency_s"] <= 4.0 and doc["latency_s"] < 2.0 * plan["predicted_latency_s"] + 1.0
    assert 0.0 <= doc["ms_ssim"] <= 1.0 and Path(doc["image"]).is_file()
    assert (tmp_path / "result.json").is_file()


@pytest.mark.root
@pytest.mark.docker
@pytest.mark.slow
def test_patch_run_with_the_docker_backend(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(REPO / "topologies" / "paper.yaml"),
                        "--backend", "docker", "--method", "patch", "--tmax", "4", "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["meta"]["backend"] == "docker" and doc["method"] == "patch" and len(doc["selected"]) >= 2
    first = [x for x in doc["stages"] if x["steps"] == [0, 1]]
    assert len(first) == len(doc["selected"])
    assert max(x["t_cmp_start"] for x in first) < min(x["t_cmp_end"] for x in first)  # in parallel
    for dev in doc["selected"]:  # the agents ran inside their containers
        assert "online" in (tmp_path / "logs" / f"agent-{dev}.log").read_text()
    leftover = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=testbed.run={doc['run']}"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert leftover == []
