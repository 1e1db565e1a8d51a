"""A run's outputs fail loudly and never follow a planted link: an event that cannot be
written ends the run with a ResourceError naming the file (composition/events.py), from the
run owner's side at once and from the orchestrator's thread at its next event; the broker's
log is copied through its handle (`read_log`: no link followed), not by path."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.composition.events import EventLog
from testbed.composition.results import copy_logs
from testbed.emulation.broker import BrokerHandle
from testbed.errors import EXIT_RESOURCE, ResourceError

REPO = Path(__file__).resolve().parent.parent
FULL = Path("/dev/full")  # every write: ENOSPC

needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")


@needs_dev_full
async def test_an_event_that_cannot_be_written_ends_the_run(tmp_path):
    path = tmp_path / "events.jsonl"
    path.symlink_to(FULL)
    seen: list[dict] = []
    log = EventLog("r1", seen.append)
    log.open(path)
    with pytest.raises(ResourceError, match=r"cannot write the run's events to .*events.jsonl: No space left"):
        log.emit("selection")
    assert [e["type"] for e in seen] == ["selection"]  # the front end still saw it
    with pytest.raises(ResourceError):  # and every later event of the generation, but its end
        log.emit("agents_online")
    log.emit("run_failed", error="...")  # the front end learns why the run ended
    assert seen[-1]["type"] == "run_failed"


@needs_dev_full
async def test_an_orchestrators_event_that_cannot_be_written_ends_its_generation(tmp_path):
    path = tmp_path / "events.jsonl"
    path.symlink_to(FULL)
    log = EventLog("r1")
    log.open(path)
    sink = log.threadsafe()  # what an orchestrator on its own thread calls

    def orchestrator() -> None:
        sink({"type": "stage_started", "run": "r1"})  # written on the owner's loop: fails there

    await asyncio.to_thread(orchestrator)
    await asyncio.sleep(0.05)  # the loop wrote it (and kept the error)
    assert isinstance(log.error, ResourceError)
    with pytest.raises(ResourceError, match="No space left"):
        await asyncio.to_thread(sink, {"type": "downloaded", "run": "r1"})  # its next event raises in its thread


def test_an_events_file_that_cannot_be_made_is_an_error_naming_it(tmp_path):
    (tmp_path / "out").write_text("a file where the output directory should be")

    async def go() -> None:
        EventLog("r1").open(tmp_path / "out" / "events.jsonl")

    with pytest.raises(ResourceError, match=r"cannot write the run's events to .*out/events.jsonl"):
        asyncio.run(go())


class _Cell:
    def __init__(self, broker: BrokerHandle | None):
        self.broker = broker


def _handle(log_path: Path) -> BrokerHandle:
    return BrokerHandle("mosquitto", 0, "127.0.0.1", 1883, log_path.parent / "mosquitto.conf", log_path)


def test_the_broker_log_is_copied_through_its_handle_never_through_a_link(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("root's secret\n")
    logs = tmp_path / "broker" / "log"
    logs.mkdir(parents=True)
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "agent-dev01.log").write_text("dev01 online\n")
    out = tmp_path / "out"
    out.mkdir()
    (logs / "mosquitto.log").symlink_to(canary)  # planted by the broker's user in its own directory
    copy_logs(_Cell(_handle(logs / "mosquitto.log")), state, out)
    assert (out / "agent-dev01.log").read_text() == "dev01 online\n"
    assert not (out / "broker.log").exists()  # the link was not followed
    (logs / "mosquitto.log").unlink()
    (logs / "mosquitto.log").write_text("1: New client connected\n")
    copy_logs(_Cell(_handle(logs / "mosquitto.log")), state, out)
    assert (out / "broker.log").read_text() == "1: New client connected\n"
    copy_logs(_Cell(None), None, out)  # no broker, no state: nothing to copy, no error


@pytest.mark.root
@pytest.mark.mosquitto
@needs_dev_full
def test_a_cold_run_whose_events_cannot_be_written_exits_4_naming_the_file(topologies, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.jsonl").symlink_to(FULL)
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(topologies / "small.yaml"), "--out",
                        str(out), "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == EXIT_RESOURCE, r.stderr[-2000:]
    assert "cannot write the run's events to" in r.stderr and "No space left on device" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    run = next(line.split()[1].rstrip(":") for line in r.stderr.splitlines() if line.startswith("run "))
    assert not Path(f"/run/testbed/{run}").exists() and not any(
        n.startswith(f"tb-{run}-") for n in (os.listdir("/run/netns") if Path("/run/netns").is_dir() else []))
    assert not (out / "result.json").exists()
