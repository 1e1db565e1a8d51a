"""Processes the testbed starts get an allow-listed environment (environ.py): a secret of
the command's environment (HF_TOKEN) reaches neither the broker, nor the agent template,
nor any agent — not in /proc/<pid>/environ, not anywhere in an agent's memory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.emulation.environ import HARMLESS_HOME, clean_environ
from testbed.emulation.procs import spawn_in, stop_pid_sync

TOKEN = "hf_" + "Zq7" * 10  # what a user's Hugging Face token looks like


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_clean_environ_keeps_what_processes_need_and_no_secret():
    source = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "HOME": "/root", "PYTHONPATH": "/src",
              "TESTBED_RUN_ROOT": "/tmp/r", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0",
              "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN, "HF_TOKEN_PATH": "/root/t", "AWS_SECRET_ACCESS_KEY": "x",
              "GITHUB_TOKEN": "x", "SSH_AUTH_SOCK": "/tmp/s", "TESTBED_PASSWORD": "x", "DOCKER_PASSWORD": "x",
              "OPENAI_API_KEY": "x", "MAIL": "/var/mail/root", "DOCKER_HOST": "unix:///run/docker.sock"}
    env = clean_environ({"XDG_CONFIG_HOME": "/tmp/c"}, source=source)
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "PYTHONPATH": "/src", "TESTBED_RUN_ROOT": "/tmp/r",
                   "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0",
                   "DOCKER_HOST": "unix:///run/docker.sock", "HOME": HARMLESS_HOME,
                   "HF_HOME": "/root/.cache/huggingface",  # the caller's model cache is still found
                   "XDG_CONFIG_HOME": "/tmp/c"}
    assert clean_environ(source=source, home=None)["HOME"] == "/root" and "HF_HOME" not in clean_environ(
        source=source, home=None)
    assert clean_environ(source={**source, "HF_HOME": "/models"})["HF_HOME"] == "/models"
    assert not any(TOKEN in v for v in clean_environ(source=source).values())


def test_a_spawned_process_starts_without_the_callers_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    proc = spawn_in(None, ["sleep", "30"])
    try:
        env = _environ(proc.pid)
    finally:
        stop_pid_sync(proc.pid)
    assert "HF_TOKEN" not in env and TOKEN not in "".join(env.values())
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == HARMLESS_HOME


def _memory_holds(pid: int, needle: bytes, max_mapping_bytes: int = 64 << 20) -> bool:
    """Whether `needle` is anywhere in the process's writable private memory (its heap,
    Python's arenas, its stack and environment block)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) rw[-x]p \S+ \S+ \S+\s*(\S*)", line)
            if not m or m.group(3).startswith("/"):  # files' own pages hold no environment
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end - start > max_mapping_bytes:
                continue  # tensors' storage, not Python objects
            try:
                mem.seek(start)
                found |= needle in mem.read(end - start)
            except OSError:
                continue
    return found


@pytest.mark.root
@pytest.mark.mosquitto
async def test_no_agent_broker_or_template_holds_the_commands_hf_token(topologies, tmp_path, unique_run_id,
                                                                      monkeypatch):
    from testbed.composition.cells import MadeCell
    from testbed.composition.session import RunSession
    from testbed.model.topology import load_topology

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _memory_holds(os.getpid(), TOKEN.encode())  # the probe finds it where it is
    async with RunSession(load_topology(topologies / "small.yaml"), MadeCell(unique_run_id), out_dir=tmp_path) as r:
        await r.ensure_agents(r.cell.device_ids())
        agents = r.agents.pids()
        pids = {"broker": r.cell.broker.pid, "template": r.template_pid, **{f"agent {d}": p for d, p in agents.items()}}
        assert len(agents) == 4 and all(pids.values()), pids
        environ = {who: _environ(pid) for who, pid in pids.items()}
        in_memory = {who: _memory_holds(pid, TOKEN.encode()) for who, pid in pids.items() if who.startswith("agent")}
    assert {who: "HF_TOKEN" in env or TOKEN in "".join(env.values()) for who, env in environ.items()} == \
        {who: False for who in pids}
    # (an agent's /proc environ is empty: setproctitle reuses that memory for its title; its memory is searched)
    assert environ["broker"]["HOME"] == environ["template"]["HOME"] == HARMLESS_HOME
    assert in_memory == {who: False for who in in_memory}


@pytest.mark.root
def test_the_supervisor_of_up_starts_from_the_allow_list(topologies, unique_run_id):
    """`testbed up` hands its supervisor the allow-listed environment (HOME kept: the run
    owner loads the server's model from the caller's cache)."""
    from testbed.emulation.runs import run_dir, supervisor_pid

    env = {**os.environ, "HF_TOKEN": TOKEN}
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "up", str(topologies / "small.yaml"), "--run",
                        unique_run_id, "--no-broker", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pid = supervisor_pid(unique_run_id)
    assert pid is not None, (run_dir(unique_run_id) / "logs" / "supervisor.log").read_text()
    sup = _environ(pid)
    assert "HF_TOKEN" not in sup and sup["HOME"] == os.environ["HOME"] and sup["PATH"] == os.environ["PATH"]
