"""Every fault kind on the real thing (root): topologies/small.yaml on the netns backend, real
`testbed-agent` processes, mosquitto with the run's ACL. One cell stays up; each test case is
one generation with one fault from a `faults:` entry, through dev01 -> dev02 with budgets
that leave room for a recovery (10 s, 400 J: the failed attempt is charged to them). Every
run must complete with each step [0, 10) computed exactly once and the fault on record; a
recovery re-selects the rest of the chain by the largest models that fit what is left:
dev02 -> dev03 after a failure in stage 0, dev03 after one in stage 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from testbed.model.topology import FaultSpec, load_topology

pytestmark = [pytest.mark.root, pytest.mark.slow]

TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "small.yaml"


def _check_exactly_once(doc: dict) -> None:
    covered = sorted(k for s in doc["stages"] for k in range(*s["steps"]))
    assert covered == list(range(doc["total_steps"])) and doc["total_steps"] == 10, doc["stages"]
    assert doc["ms_ssim"] is not None and doc["ms_ssim"] > 0


async def test_each_fault_kind_is_survived(tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.methods.multistage.strategy import Multistage

    topo = load_topology(TOPOLOGY)
    events: list[dict] = []
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path, on_event=events.append) as r:
        await r.ensure_agents(r.cell.device_ids())

        async def quiet() -> None:
            """Let the last generation's late uploads drain (an agent serves one task at a time:
            a device still uploading a stale stage would be late for the next one)."""
            await asyncio.sleep(3.0)
            await r.ensure_agents(r.cell.device_ids())

        async def run(**spec) -> dict:
            events.clear()
            doc = (await r.run(Multistage(order=["dev01", "dev02"]), t_max_s=10.0, e_max_j=400.0,
                               faults=[FaultSpec(**spec)])).to_json()
            _check_exactly_once(doc)
            (f,) = doc["faults"]
            assert f["kind"] == spec["kind"]
            types = [e["type"] for e in events]
            assert "fault_injected" in types and [t for t in types if not t.startswith("fault_")][-1] == "run_finished"
            return doc

        # a link that stays down past the stage's deadline: both stages re-selected, link back up after
        doc = await run(kind="link-flap", device="dev01", at_stage=0, duration_s=6.0)
        (rec,) = doc["recovered"]
        assert rec["reason"] == "deadline" and rec["chain"] == ["dev02", "dev03"]
        assert doc["relay_order"] == ["dev02", "dev03"] and rec["charged"]["latency_s"] > 4.0
        assert doc["faults"][0]["restored_t_s"] is not None  # undone before the run returned
        await quiet()

        # the rate drops to near zero mid-stage: the upload cannot finish in time
        doc = await run(kind="rate-drop", device="dev02", at_stage=1, value=0.01)
        assert doc["recovered"][0]["device"] == "dev02" and doc["recovered"][0]["took_over"] == "dev03"
        assert r.cell.nodes["dev02"].rate_up_mbps > 1  # restored when the run ended
        await quiet()

        # a CPU quota of 2 % from the start: dev01's real computation overruns its profile
        doc = await run(kind="slow", device="dev01", at_s=0.0, value=0.02)
        first = doc["stages"][0]
        assert first["overrun_s"] > 0 or doc["recovered"], first
        assert r.cell.backend.cg.read_limits(r.run_id, "dev01").cpu_cores == pytest.approx(
            r.cell.nodes["dev01"].cpu_quota_cores)  # quota restored
        await quiet()

        # the broker stops mid-stage 1 for 1 s: everyone reconnects, the same device resumes
        doc = await run(kind="broker-restart", at_stage=1, duration_s=1.0)
        assert [(x["device"], x["took_over"], x["reason"]) for x in doc["recovered"]] == [("dev02", "dev02", "broker")]
        types = [e["type"] for e in events]
        assert types.index("broker_lost") < types.index("broker_back") < types.index("recovered")
        await quiet()

        # the agent computing stage 0 is killed (no device named: the one in flight)
        doc = await run(kind="kill", at_stage=0)
        assert [(x["device"], x["took_over"], x["reason"]) for x in doc["recovered"]] == [("dev01", "dev02", "offline")]
        assert doc["recovered"][0]["chain"] == doc["relay_order"] == ["dev02", "dev03"]

        # and it can be brought back for the next generation
        assert r.cell.nodes["dev01"].state == "killed"
        await r.revive("dev01")
        assert r.cell.nodes["dev01"].state == "up"
        doc = (await r.run(faults=[])).to_json()
        _check_exactly_once(doc)
        assert doc["recovered"] == [] and doc["relay_order"] == ["dev01", "dev02"]
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in lines if e["type"] == "fault_injected") == 5


async def test_recovery_impossible_ends_with_exit_5_naming_the_cause(tmp_path, unique_run_id):
    """Both spares (dev03, dev04) killed first, then dev01 mid-stage: no device remains,
    the run fails loudly (RunFailedError, exit 5) instead of hanging or returning a
    partial image."""
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.errors import RunFailedError

    topo = load_topology(TOPOLOGY)
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path) as r:
        await r.ensure_agents(r.cell.device_ids())
        with pytest.raises(RunFailedError, match="recovery impossible") as e:
            await r.run(faults=[FaultSpec(kind="kill", device="dev03", at_s=0.0),
                                FaultSpec(kind="kill", device="dev04", at_s=0.0),
                                FaultSpec(kind="kill", device="dev01", at_stage=0)])
        assert e.value.exit_code == 5
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "image.png").exists()
