"""A selected device that sends malformed messages — from its own namespace, with its own
credentials, mid-run — fails only its own stage: every message is a `status_rejected` /
`result_rejected` event naming it, its deadline event says what it sent, and the run either
completes by recovery or ends with exit 5 naming the device and why (issue 25, acceptance).

The device is a real agent of a real cell: tests/garbage_method.py is a test-only method
(multi-stage with `meta.method: garbage`) whose agents answer the first attempt of stage 0
with garbage only — bad types, JSON nested 100 000 deep, a status over 4 KiB, a wire header
over 64 KiB, a latent of the wrong shape, another device's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import garbage_method
from testbed.errors import EXIT_RUN_FAILED, RunFailedError

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def plugin_env(monkeypatch) -> None:
    """The agent template (and so every agent) loads the plug-in too."""
    monkeypatch.setenv("TESTBED_METHODS", "garbage_method")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def _of(events: list[dict], etype: str) -> list[dict]:
    return [e for e in events if e["type"] == etype]


@pytest.mark.root
@pytest.mark.mosquitto
async def test_garbage_from_a_selected_device_fails_its_stage_only(plugin_env, topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    events: list[dict] = []
    topo = load_topology(topologies / "small.yaml")
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path / "a", on_event=events.append) as session:
        # budgets that leave room for a takeover after the deadline (the DP picks dev01, dev02)
        doc = (await session.run("garbage", selector="dp", t_max_s=8.0, e_max_j=70.0)).to_json()
        first = list(events)
        events.clear()
        # the small scenario's own budgets (2 s): after the deadline nothing fits any more
        with pytest.raises(RunFailedError) as failed:
            await session.run("garbage", selector="dp", out_dir=tmp_path / "b")

    bad = doc["selected"][0]
    statuses, results = _of(first, "status_rejected"), _of(first, "result_rejected")
    assert {e["device"] for e in statuses + results} == {bad}  # every rejection names the sender, only it
    assert len(statuses) == len(garbage_method.bad_statuses(bad)) and len(results) == 5
    reasons = " | ".join(e["error"] for e in statuses + results)
    for why in ("must be an integer", "state is missing", "JSON nested deeper than 8", "meta nested deeper than 8",
                "bytes (at most 4096)",
                "a device speaks only for itself", "exceeds 65536 bytes", "tensor 'latent' is float32[64, 64, 64]"):
        assert why in reasons, (why, reasons)
    missed = _of(first, "deadline_missed")
    assert [e["device"] for e in missed] == [bad]
    assert f"{bad} sent 11 message(s) that failed the checks" in missed[0]["rejected"]
    # the run went on by recovery: the device's stage was taken over, the image is there
    assert [(r["device"], r["reason"]) for r in doc["recovered"]] == [(bad, "deadline")]
    assert bad not in doc["relay_order"] and doc["total_steps"] == len(doc["selected"]) * topo.workload.steps_per_stage
    assert doc["ms_ssim"] is not None and json.loads((tmp_path / "a" / "result.json").read_text())["run"] == doc["run"]
    assert "Traceback" not in "".join((tmp_path / "a" / "logs").joinpath(f).read_text()
                                      for f in os.listdir(tmp_path / "a" / "logs") if f.startswith("agent-"))

    # no recovery fits: exit 5, naming the device and what it sent
    assert failed.value.exit_code == EXIT_RUN_FAILED
    msg = str(failed.value)
    assert f"{bad} failed stage 0 (deadline)" in msg and f"{bad} sent 11 message(s) that failed the checks" in msg
    assert _of(events, "run_failed") and {e["device"] for e in _of(events, "result_rejected")} == {bad}
