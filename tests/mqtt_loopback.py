"""A run's broker and device agents on 127.0.0.1, no emulation (tests of orchestrators over
the network without root): mosquitto with the run's credentials and ACL, one agent process
per device (`python -m testbed.methods.device`, the embedded model at fp32)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def broker_and_agents(tmp_path: Path, run: str, devices: list[str], max_message_bytes: int = 8 * 2**20,
                      payload_bytes: int = 65536, step_time_s: float | None = None) -> Iterator[Loopback]:
    """Everything stops when the block ends, also on failures. With `step_time_s` the
    agents compute in `compute: profile` (padded to that step time), else for real."""
    port = free_port()
    creds = make_credentials(run, devices)
    paths = write_security_files(tmp_path / "state", creds, "127.0.0.1", port)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("user root\n" f"listener {port} 127.0.0.1\n" "allow_anonymous false\n"
                    f"password_file {paths['password_file']}\n" f"acl_file {paths['acl_file']}\n"
                    "persistence false\n" "set_tcp_nodelay true\n")  # as the emulation's broker
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
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
