"""How a cell's worker process starts, and a cold run's worker started before the command's imports.

A cold `testbed run FILE` spends most of its start-up in the worker's import of torch and
diffusers (seconds of one core). The command line's own imports (typer, the commands, the
emulation: most of a second) need not come first: the console script calls `prestart` before
it imports them, and the worker (`worker.py --prestarted`) imports torch and diffusers while
the command line parses the file, checks the plan and makes the cell. Knowing only then which
run it serves, it reads that from its stdin (`adopt` writes it: the run id and what to keep
warm, never a secret) and goes on as a worker started for that run.

Light on purpose: the console script imports it before anything else. Anything that is not a
cold run, `TESTBED_PRESTART=0`, or a prestarted worker that is gone by adoption time gets a
worker started the ordinary way (worker_link.WorkerAgents.spawn).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["worker_argv", "worker_environ", "is_cold_run", "prestart", "adopt"]

_prestarted: subprocess.Popen | None = None


def worker_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed.composition.worker", *args]


def worker_environ() -> dict[str, str]:
    """The allow-listed environment (HOME harmless, HF_HOME the caller's cache) plus the
    caller's reference cache: the worker's template hands its memory to every agent, so the
    worker must start without any secret of the command's."""
    from testbed.emulation.environ import clean_environ

    cache = os.environ.get("TESTBED_CACHE_DIR") or str(Path.home() / ".cache" / "testbed")
    return clean_environ({"TESTBED_CACHE_DIR": cache})


def is_cold_run(args: list[str]) -> bool:
    """Whether a command line is `testbed run FILE ...` without `--run ID` (a cold run, whose
    worker the command starts) and without --help. Only a guess from the words: a wrong guess
    costs one worker that exits when the command does."""
    words = [a for a in args if not a.startswith("-")]
    if not words or words[0] != "run" or len(words) < 2:
        return False
    return not any(a in ("--help", "-h") or a == "--run" or a.startswith("--run=") for a in args)


def prestart(args: list[str]) -> None:
    """Start the worker for a cold run's command line now, in this (the main) thread: it dies
    with this thread (PR_SET_PDEATHSIG), which lives as long as the command."""
    global _prestarted
    if _prestarted is not None or os.environ.get("TESTBED_PRESTART", "1") == "0" or not is_cold_run(args):
        return
    try:
        _prestarted = subprocess.Popen(worker_argv("--prestarted"), stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True, close_fds=True, env=worker_environ())
    except OSError:
        _prestarted = None  # (the ordinary start then says what is wrong)


def adopt(run_id: str, state_dir: Path, warm: str, remote_agents: bool,
          variants: list[tuple[str, str]]) -> subprocess.Popen | None:
    """The prestarted worker, told to serve `run_id` (whose state directory is `state_dir`: it
    then logs to its logs/worker.log) and the model variants its agent template makes
    (cells.preloaded_variants), or None when there is none or it is gone (the caller starts one)."""
    global _prestarted
    proc, _prestarted = _prestarted, None
    if proc is None or proc.stdin is None or proc.poll() is not None:
        return None
    try:
        proc.stdin.write(json.dumps({"run": run_id, "state_dir": str(state_dir), "warm": warm,
                                    "remote_agents": remote_agents, "variants": variants}).encode() + b"\n")
        proc.stdin.close()
    except OSError:  # it died (an import failed): a fresh one says why in the run's log
        proc.kill()
        proc.wait()
        return None
    return proc
