"""A run's broker and device agents on 127.0.0.1, no emulation (tests of orchestrators over
the network without root): mosquitto with the run's credentials and ACL, one agent process
per device (`python -m testbed.methods.device`, the embedded model at fp32)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.relay.agent import AgentConfig
from testbed.relay.security import RunCredentials, make_credentials, write_security_files


@dataclass
class Loopback:
    run: str
    port: int
    creds: RunCredentials
    dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(conf: Path, conf_text: Callable[[int], str], log: Path, *, port: int | None = None,
                    tries: int = 5) -> tuple[subprocess.Popen, int]:
    """mosquitto on a loopback port that it holds itself. A port probed free can be taken by
    another process (another test, another suite on this machine) before mosquitto binds it,
    and a connect would then reach that process: the sign is mosquitto's own "running" line
    in its log (after every listener opened); on "Address already in use" another port is
    tried. `port`: that port only (a broker started again). Returns (process, port)."""
    for _ in range(1 if port is not None else tries):
        p = port if port is not None else free_port()
        conf.write_text(conf_text(p))
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            text = log.read_bytes()[start:].decode(errors="replace")
            if " running" in text:
                return proc, p
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                stop_process(proc)
                raise AssertionError(f"mosquitto did not start within 20 s: {text[-500:]}")
            time.sleep(0.02)
        if "Address already in use" not in text:
            raise AssertionError(f"mosquitto did not start: {text[-500:]}")
    raise AssertionError(f"mosquitto found no free port in {tries} tries")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def broker_and_agents(tmp_path: Path, run: str, devices: list[str], max_message_bytes: int = 8 * 2**20,
                      payload_bytes: int = 65536, step_time_s: float | None = None) -> Iterator[Loopback]:
    """Everything stops when the block ends, also on failures. With `step_time_s` the
    agents compute in `compute: profile` (padded to that step time), else for real."""
    creds = make_credentials(run, devices)
    paths = write_security_files(tmp_path / "state", creds, "127.0.0.1", 1883)  # (only observer.json names a port)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        broker, port = start_mosquitto(
            tmp_path / "mosquitto.conf",
            lambda p: ("user root\n" f"listener {p} 127.0.0.1\n" "allow_anonymous false\n"
                       f"password_file {paths['password_file']}\n" f"acl_file {paths['acl_file']}\n"
                       "persistence false\n" "set_tcp_nodelay true\n"),  # as the emulation's broker
            tmp_path / "mosquitto.log")
        procs.append(broker)
        for dev in devices:
            c = creds.for_device(dev)
            cfg = AgentConfig(run=run, device=dev, broker_host="127.0.0.1", broker_port=port, username=c.username,
                              password=c.password, model="tiny", precision="fp32",
                              compute="real" if step_time_s is None else "profile", step_time_s=step_time_s or 0.0,
                              payload_bytes=payload_bytes, max_message_bytes=max_message_bytes, keepalive_s=2)
            cpath = tmp_path / f"{dev}.json"
            cfg.write(cpath)
            log = open(tmp_path / f"{dev}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "testbed.methods.device", run, dev,  # serves every method
                                           "--config", str(cpath)], stdout=log, stderr=subprocess.STDOUT))
        yield Loopback(run, port, creds, tmp_path)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
