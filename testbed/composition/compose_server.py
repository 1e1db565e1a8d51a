"""A scenario as a compose/Swarm deployment: write it (`testbed compose`), serve it (in the
server container: `python -m testbed.composition.compose_server STATE`).

Composition layer, like runner.py: it uses the emulation layer's file generator
(emulation/docker_compose.py) and self-shaping entry point, and the relay's credentials,
agent configuration and (through `Runner.run`) the orchestrator.

    compose/<name>.yml          the compose/stack file
    compose/<name>/             its state (mode 0700): topology.yaml, scenario.json,
                                secrets/ (MQTT passwords, ACL), agents/<dev>.json,
                                broker/ and out/ (result.json, image.png) once served
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from testbed.emulation.docker.compose import ComposeNode, compose_doc
from testbed.emulation.docker.image import IMAGE, host_mounts, python_bin
from testbed.emulation.owned_dirs import make_owned_dir, remove_owned_dir
from testbed.errors import ResourceError, RunFailedError
from testbed.model.names import MQTT_PORT, check_name
from testbed.model.profiles import load_profiles, step_time_s
from testbed.model.radio import DeviceLink, compute_links
from testbed.relay import security
from testbed.relay.agent import AgentConfig
from testbed.model.topology import Topology, load_topology, place

__all__ = ["ComposeScenario", "write_scenario", "serve", "run_id_for"]

SERVER_HOST = "server"  # the server service's name: DNS under compose and Swarm (dnsrr)
_BROKER_READY_S = 15.0


@dataclass
class ComposeScenario:
    name: str
    run_id: str
    compose_file: Path
    state_dir: Path
    devices: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "run": self.run_id, "compose_file": str(self.compose_file),
                "state_dir": str(self.state_dir), "devices": self.devices, "warnings": self.warnings}


def run_id_for(name: str) -> str:
    """A run id from a topology name: its letters and digits, lower case, at most 7."""
    rid = "".join(ch for ch in name.lower() if ch.isascii() and ch.isalnum())[:7]
    return rid or "compose"


def _bin(name: str) -> str:
    return str(Path(python_bin()).with_name(name))


def write_scenario(file: Path, out_dir: Path, *, run_id: str | None = None, image: str = IMAGE,
                   seed: int | None = None) -> ComposeScenario:
    """Write compose/<name>.yml and its state directory from a topology file."""
    topo = load_topology(file, seed=seed)
    links = compute_links(topo, place(topo))
    profiles = load_profiles()
    run = run_id or run_id_for(topo.name)
    name = check_name(topo.name, "topology name")  # it names a file and a directory below
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / name
    remove_owned_dir(state, out_dir)  # the state of an earlier `testbed compose` of it; never a user's directory
    make_owned_dir(state)
    (state / "topology.yaml").write_text(Path(file).read_text())
    if seed is not None:  # the copy must place devices where this file's links say
        doc = yaml.safe_load((state / "topology.yaml").read_text())
        doc["seed"] = seed
        (state / "topology.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    creds = security.make_credentials(run, [link.id for link in links])
    security.write_security_files(state / "secrets", creds, SERVER_HOST, MQTT_PORT)
    wl = topo.workload
    max_msg = wl.payload_bytes + 4 * 2**20
    agent = _bin("testbed-agent")
    nodes = [ComposeNode("server", "server", profiles[topo.server.profile].cpu_cores,
                         profiles[topo.server.profile].memory_mb, [python_bin(), "-m", "testbed.composition.compose_server", str(state)])]
    for link in links:
        prof = profiles[link.profile]
        c = creds.for_device(link.id)
        cfg_path = state / "agents" / f"{link.id}.json"
        AgentConfig(run=run, device=link.id, broker_host=SERVER_HOST, broker_port=MQTT_PORT, username=c.username,
                    password=c.password, model=wl.model, precision=link.precision, compute=wl.compute,
                    step_time_s=step_time_s(prof, wl.resolution_px, link.precision), cpu_cores=prof.cpu_cores,
                    payload_bytes=wl.payload_bytes, max_message_bytes=max_msg).write(cfg_path)
        cmd = [python_bin(), "-m", "testbed.emulation.docker.selfshape",
               "--up-mbps", f"{link.rate_up_mbps:.3f}", "--down-mbps", f"{link.rate_down_mbps:.3f}",
               "--", agent, run, link.id, "--config", str(cfg_path)]
        nodes.append(ComposeNode(link.id, "device", prof.cpu_cores, prof.memory_mb, cmd))
    (state / "scenario.json").write_text(json.dumps({"run": run, "topology": str(state / "topology.yaml"),
                                                     "devices": [link.id for link in links]}, indent=2) + "\n")
    doc = compose_doc(run, topo.name, nodes, image, [m.path for m in host_mounts()], state)
    path = out_dir / f"{name}.yml"
    header = (f"# Generated by `testbed compose {file}`; run id {run}.\n"
              f"#   docker-compose -p tb-{run} -f {path.name} up --abort-on-container-exit --exit-code-from server\n"
              f"#   docker stack deploy -c {path.name} tb-{run}   (label nodes testbed.server / testbed.device = true)\n"
              f"# Results: {state}/out/result.json\n")
    tmp = out_dir / f".{name}.yml.tmp"
    tmp.unlink(missing_ok=True)
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
    os.replace(tmp, path)  # replaces a symlink at `path` instead of writing through it
    warnings = []
    if topo.cell.shared_capacity:
        warnings.append("cell.shared_capacity is not enforced in compose/Swarm deployments: each device shapes only "
                        "its own link (use --backend netns or docker on one host for a shared cell)")
    if topo.mobility is not None:
        warnings.append("mobility is not applied in compose/Swarm deployments: rates stay at the initial positions")
    return ComposeScenario(topo.name, run, path, state, [link.id for link in links], warnings)


# ---------------------------------------------------------------------------------------
# The server side, inside the server container


@dataclass
class _Cell:
    """What `Runner.run` reads of an emulation, for a cell that compose/Swarm made."""

    links: list[DeviceLink]
    warnings: list[str]
    netem: bool = False
    backend: Any = field(default_factory=lambda: SimpleNamespace(name="compose"))

    nodes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the fields Runner.run reads of emulated nodes; rates are the devices' own shaping
        self.nodes = {"server": SimpleNamespace(id="server", role="server", address="127.0.0.1", netns=None,
                                                rate_up_mbps=None, rate_down_mbps=None)}
        for link in self.links:
            self.nodes[link.id] = SimpleNamespace(id=link.id, role="device", address=None, netns=None,
                                                  rate_up_mbps=link.rate_up_mbps, rate_down_mbps=link.rate_down_mbps)

    def device_ids(self) -> list[str]:
        return [link.id for link in self.links]


def _load_credentials(path: Path) -> security.RunCredentials:
    d = json.loads(path.read_text())
    cred = security.Credential
    return security.RunCredentials(d["run"], cred(**d["server"]), cred(**d["observer"]),
                                   {k: cred(**v) for k, v in d["devices"].items()})


def _start_mosquitto(state: Path, max_message_bytes: int) -> tuple[subprocess.Popen, Path]:
    mosquitto = shutil.which("mosquitto")
    if mosquitto is None:
        raise ResourceError("mosquitto is not installed on the host whose /usr the node image mounts; apt-get install mosquitto")
    d = state / "broker"
    d.mkdir(mode=0o700, exist_ok=True)
    conf = d / "mosquitto.conf"
    log = d / "mosquitto.log"
    conf.write_text("\n".join([
        "user root",  # the secrets are root's 0600 files; the container is the boundary
        f"listener {MQTT_PORT} 0.0.0.0",
        "persistence false",
        f"log_dest file {log}",
        "allow_anonymous false",
        f"password_file {state / 'secrets' / 'mosquitto.passwd'}",
        f"acl_file {state / 'secrets' / 'mosquitto.acl'}",
        f"message_size_limit {max_message_bytes}",
        "connection_messages true",
    ]) + "\n")
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + _BROKER_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ResourceError(f"mosquitto exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", MQTT_PORT)) == 0:
                return proc, log
        time.sleep(0.05)
    proc.kill()
    raise ResourceError(f"mosquitto did not listen on :{MQTT_PORT} within {_BROKER_READY_S:g} s; see {log}")


async def serve(state: Path) -> dict[str, Any]:
    """Broker + one generation (selection, relay through the agents), result in state/out."""
    from testbed.composition.runner import Runner

    state = Path(state)
    scen = json.loads((state / "scenario.json").read_text())
    topo: Topology = load_topology(scen["topology"])
    out = state / "out"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    proc, log = await asyncio.to_thread(_start_mosquitto, state, topo.workload.payload_bytes + 4 * 2**20)
    class ComposeRunner(Runner):
        async def in_server_ns(self, factory: Any) -> Any:
            return await factory()  # this process is the server container: already on the cell

    try:
        r = ComposeRunner(topo, run_id=scen["run"], backend="compose", out_dir=out)
        r.emu = _Cell(compute_links(topo, place(topo)), ["compose/Swarm deployment: every device shapes its own link"])
        r.broker = SimpleNamespace(host="127.0.0.1", port=MQTT_PORT, kind="mosquitto", log_path=log)
        r.creds = _load_credentials(state / "secrets" / "credentials.json")
        from testbed.relay.stage import StageModel

        r._model_task = asyncio.ensure_future(asyncio.to_thread(StageModel.load, topo.workload.model, "fp32"))
        try:
            result = await r.run()
        finally:
            await r._teardown()  # the cell is not the runner's: this waits for the model, copies logs
        return result.to_json()
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log.exists():
            shutil.copy2(log, out / "logs" / "broker.log")


def serve_main(state: Path) -> int:
    """The server container's entry point: 0 with out/result.json, else an error.json."""
    try:
        asyncio.run(serve(state))
    except Exception as e:  # noqa: BLE001 - reported in the state directory and the exit code
        (Path(state) / "out").mkdir(parents=True, exist_ok=True)
        (Path(state) / "out" / "error.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        traceback.print_exc()
        print(f"compose-server: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", RunFailedError.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(Path(sys.argv[1])))
