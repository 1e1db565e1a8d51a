"""SIGTERM, SIGHUP and SIGINT end `testbed run`, `testbed sweep`, `testbed tui` and `testbed
up`'s supervisor with the same teardown as Ctrl-C (testbed/cli/signals.py; the supervisor's
own handlers): afterwards no namespace, link, cgroup, process or run directory of the run is
left, and the command exits 128 + the signal's number."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_leaks import _leftovers, _run_processes, end_command, remove_everything_of
from testbed.cli import signals

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]


# -- the helper -----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_cancels_the_command_and_waits_for_its_teardown(sig, capsys):
    done: list[str] = []

    async def command() -> None:
        try:
            os.kill(os.getpid(), sig)
            await asyncio.sleep(30)
            done.append("finished")  # never: the signal cancels it
        finally:
            os.kill(os.getpid(), sig)  # a second signal during the teardown does not cut it short
            await asyncio.sleep(0.3)
            done.append("torn down")

    with pytest.raises(SystemExit) as ended:
        signals.run(command())
    assert ended.value.code == 128 + sig and done == ["torn down"]
    said = capsys.readouterr().err
    assert f"{signal.Signals(sig).name}: stopping" in said and "still tearing down" in said
    # the handlers are gone with the loop: the defaults are back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_a_signal_the_result_comes_back():
    async def command() -> int:
        return 7

    assert signals.run(command()) == 7


def test_an_app_is_asked_to_exit_and_its_teardown_awaited():
    class App:
        def __init__(self) -> None:
            self.asked = asyncio.Event()
            self.torn_down = False

        def exit(self) -> None:
            self.asked.set()

        async def run_async(self) -> None:
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGHUP)).start()
            await self.asked.wait()
            await asyncio.sleep(0.2)  # the app's ExitApp handler tears a run down
            self.torn_down = True

    app = App()
    with pytest.raises(SystemExit) as ended:
        signals.run_app(app)
    assert ended.value.code == 128 + signal.SIGHUP and app.torn_down


# -- a cold `testbed run` -------------------------------------------------------------------
def _children_run_id(pid: int) -> str | None:
    """The run id of the cell's worker (or agent template) that `pid` started: its command
    line names the run directory."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            status = Path(f"/proc/{p}/status").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
        adopted = cmd.startswith("testbed-worker ") and "/run/testbed/" in cmd  # (not a prestarted one yet)
        if ppid == pid and ("agent-template.sock" in cmd or adopted):
            return cmd.split("/run/testbed/")[1].split("/")[0]
    return None


def _namespaces(run: str) -> set[int]:
    d = Path("/run/netns")
    return {os.stat(d / n).st_ino for n in os.listdir(d) if n.startswith(f"tb-{run}-")} if d.is_dir() else set()


def _wait(cond, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _points(run: str, out: Path) -> dict:
    """When to send the signal: while the cell comes up, while the agents start, mid-generation."""
    def stage_started() -> bool:
        try:
            return '"stage_started"' in (out / "events.jsonl").read_text()
        except FileNotFoundError:
            return False

    return {"cell": lambda: _namespaces(run),
            "agents": lambda: any(f"testbed-agent {run} " in x for x in _run_processes(run, set())),
            "generation": stage_started}


def _signal_command(argv: list[str], log_path: Path, point: str, out: Path, sig: int) -> None:
    """Start a run-owning command, send `sig` at `point`, check that it exits 128 + sig and
    leaves nothing of its run."""
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([*TESTBED, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    run, ns = None, set()
    try:
        run = _wait(lambda: _children_run_id(proc.pid), 120, "the cell's worker", proc)
        _wait(_points(run, out)[point], 180, f"the {point} point", proc)
        ns = _namespaces(run)
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=120) == 128 + sig, log_path.read_text()[-2000:]
        ns |= _namespaces(run)
        assert _leftovers(run, ns) == [], log_path.read_text()[-2000:]
        assert f"{signal.Signals(sig).name}: stopping" in log_path.read_text()
    finally:
        end_command(proc)
        log.close()
        if run is not None:
            remove_everything_of(run, ns)


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.parametrize("sig,point", [(signal.SIGTERM, "cell"), (signal.SIGTERM, "agents"),
                                       (signal.SIGTERM, "generation"), (signal.SIGHUP, "generation")])
def test_a_signal_during_a_cold_run_leaves_nothing(sig, point, topologies, tmp_path):
    out = tmp_path / "out"
    _signal_command(["run", str(topologies / "small.yaml"), "--out", str(out), "--json"], tmp_path / "run.log",
                    point, out, sig)


@pytest.mark.root
@pytest.mark.mosquitto
def test_sigterm_to_a_sweep_leaves_nothing(topologies, tmp_path):
    out = tmp_path / "sweep"
    _signal_command(["sweep", str(topologies / "small.yaml"), "--tmax", "2", "--emax", "70", "--seeds", "1",
                     "--runs", "multistage:dp", "--no-figures", "--out", str(out)], tmp_path / "sweep.log",
                    "agents", out, signal.SIGTERM)


# -- `testbed up`'s supervisor ----------------------------------------------------------------
@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.parametrize("sig,point", [(signal.SIGTERM, "cell"), (signal.SIGTERM, "ready"),
                                       (signal.SIGHUP, "ready")])
def test_a_signal_to_an_up_cells_supervisor_leaves_nothing(sig, point, topologies, unique_run_id):
    """The supervisor as `testbed up` starts it (own session, clean environment); a signal
    while its cell comes up cancels the start-up, one later stops the cell."""
    from testbed.emulation.environ import clean_environ
    from testbed.emulation.runs import make_run_dir, read_state

    run = unique_run_id
    d = make_run_dir(run)
    log = open(d / "logs" / "supervisor.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "testbed.composition.supervisor", run,
                             str(topologies / "small.yaml")], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            env=clean_environ(home=None))
    ns: set[int] = set()
    try:
        ready = (lambda: (read_state(run) or {}).get("ready"))
        _wait(lambda: _namespaces(run) if point == "cell" else ready(), 180, f"the {point} point", proc)
        ns = _namespaces(run)
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=120) == 128 + sig
        ns |= _namespaces(run)
        assert _leftovers(run, ns) == []  # its run directory too: `testbed down` finds nothing more
    finally:
        end_command(proc)
        log.close()
        remove_everything_of(run, ns)


# -- `testbed tui` --------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.mosquitto
def test_sigterm_to_the_tui_tears_its_run_down(topologies, tmp_path):
    """The TUI in a terminal (a pty), a run started with `r`, SIGTERM mid-generation: the
    app exits through its ExitApp handler, which cancels the run and awaits its teardown."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*TESTBED, "tui", str(topologies / "small.yaml"), "--out", str(tmp_path / "out")],
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"})
    os.close(slave)
    screen = bytearray()

    def drain() -> None:  # the app blocks when nobody reads its terminal
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    run, ns = None, set()
    try:
        _wait(lambda: b"devices" in screen or len(screen) > 2000, 60, "the first screen", proc)
        time.sleep(2.0)  # the predicted costs load in the background
        os.write(master, b"r")
        run = _wait(lambda: _children_run_id(proc.pid), 120, "the run's agent template", proc)
        out = _wait(lambda: next((p for p in (tmp_path / "out").glob("*") if (p / "events.jsonl").exists()), None),
                    180, "the run's events", proc)
        _wait(_points(run, out)["generation"], 180, "the generation", proc)
        ns = _namespaces(run)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        ns |= _namespaces(run)
        assert _leftovers(run, ns) == []
    finally:
        end_command(proc)
        os.close(master)
        if run is not None:
            remove_everything_of(run, ns)
