"""No password on a command line (root, mosquitto): during a relay run on the small
scenario, with the TUI's attach path following it through `mosquitto_sub` in the server's
namespace, every process's argv (/proc/<pid>/cmdline, what `ps` shows every user) is
sampled. None holds any of the run's passwords; none that the run or this test started
holds the word "password". The attach path still receives the run's events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest

from testbed.model.topology import load_topology

pytestmark = [pytest.mark.root, pytest.mark.mosquitto, pytest.mark.slow]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _ours(pid: int, root: int, run_dir: str) -> bool:
    """Started by this test (any depth), or naming the run's state directory."""
    p: int | None = pid
    for _ in range(64):
        if p is None or p <= 1:
            break
        if p == root:
            return True
        p = _parent(p)
    try:
        return run_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ArgvSampler:
    """Samples every process's argv every 50 ms in a thread (the run's loop may be busy)."""

    def __init__(self, secrets: list[str], run_dir: str):
        self.secrets = [s.encode() for s in secrets]
        self.run_dir = run_dir
        self.violations: set[str] = set()
        self.samples = 0
        self.seen_ours: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="argv-sampler", daemon=True)

    def __enter__(self) -> ArgvSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        me = os.getpid()
        ours: dict[tuple[str, bytes], bool] = {}  # (pid, argv) -> started by the run or this test
        while not self._stop.is_set():
            for p in os.listdir("/proc"):
                if not p.isdigit() or int(p) == me:
                    continue
                try:
                    argv = Path(f"/proc/{p}/cmdline").read_bytes()
                except OSError:
                    continue
                shown = argv.replace(b"\0", b" ").decode(errors="replace")[:200]
                if any(s in argv for s in self.secrets):
                    self.violations.add(f"{p}: a password in `{shown}`")
                elif ours.setdefault((p, argv), _ours(int(p), me, self.run_dir)):
                    self.seen_ours.add(shown.split(" ")[0])
                    if b"password" in argv.lower():
                        self.violations.add(f"{p}: the word 'password' in `{shown}`")
            self.samples += 1
            self._stop.wait(0.05)


async def test_no_password_on_any_command_line_during_a_run_and_an_attach(topologies, tmp_path, unique_run_id):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from tui.attach import follow_events_in_netns, read_observer

    topo = load_topology(topologies / "small.yaml")
    got: list[dict] = []
    async with RunSession(topo, MadeCell(unique_run_id), out_dir=tmp_path / "out") as r:
        creds = r.rig.credentials
        secrets = [creds.server.password, creds.observer.password, *(c.password for c in creds.devices.values())]
        run_dir = str(Path("/run/testbed") / unique_run_id) + "/"
        info = read_observer(unique_run_id)
        netns = r.cell.nodes["server"].netns  # the mosquitto_sub path of attach, inside the server namespace

        async def attach() -> None:
            async with contextlib.aclosing(follow_events_in_netns(info, netns)) as events:
                async for ev in events:
                    got.append(ev)
                    if ev.get("type") == "run_finished":
                        return

        with ArgvSampler(secrets, run_dir) as sampler:
            follower = asyncio.create_task(attach())
            await asyncio.sleep(1.0)  # mosquitto_sub subscribes
            res = await r.run()
            await asyncio.wait_for(follower, timeout=30)
    assert res.to_json()["total_steps"] > 0
    assert any(ev.get("type") == "run_finished" for ev in got), got[-3:]  # attach followed the whole run
    assert sampler.samples > 20
    assert {"mosquitto", "mosquitto_sub"} <= {Path(a).name for a in sampler.seen_ours}, sampler.seen_ours
    assert sampler.violations == set()
