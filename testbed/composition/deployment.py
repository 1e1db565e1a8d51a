"""A scenario as a compose/Swarm deployment: write it (`testbed compose`), serve it (in the
server container: `python -m testbed.composition.deployment STATE`).

It writes the files with the emulation layer's generator (emulation/docker/compose.py)
and the one agent-config builder; it serves through the run owner (session.py) on a
`DeployedCell`, the server container's view of the deployment.

    compose/<name>.yml          the compose/stack file
    compose/<name>/             its state (mode 0700): topology.yaml, scenario.json,
                                secrets/ (MQTT passwords, ACL), agents/<dev>.json,
                                broker/ and out/ (result.json, image.png) once served

Only the server container mounts the state directory. A device container gets its own
`agents/<dev>.json` as a docker secret and runs its agent as its own uid
(node_uids.deployment_uids): as root, `testbed compose` hands each config to that uid
(0400); otherwise it is 0444 — the 0700 state directory keeps other users of this host out,
and no other container has it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.emulation.docker.compose import SECRET_PATH, ComposeNode, compose_doc
from testbed.emulation.docker.image import IMAGE, host_mounts, python_bin
from testbed.emulation.node_uids import deployment_uids, hand_to
from testbed.emulation.owned_dirs import make_owned_dir, remove_owned_dir
from testbed.errors import RunFailedError
from testbed.model.names import CELL_NET, MQTT_PORT, check_name
from testbed.model.profiles import load_profiles
from testbed.model.radio import compute_links
from testbed.relay import security
from testbed.composition.agents import agent_config
from testbed.composition.cells import max_message_bytes
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


def _readable_by(config: Path, uid: int) -> None:
    """A device's config, readable by its agent's uid where docker-compose bind-mounts it
    as it is (Swarm copies it into a secret): its own (0400) when we may chown, else 0444
    inside the 0700 state directory."""
    if os.geteuid() == 0:
        hand_to(config, uid)
    else:
        config.chmod(0o444)


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
    security.write_security_files(state / "secrets", creds, SERVER_HOST, MQTT_PORT, watch_port=MQTT_PORT + 1)
    max_msg = max_message_bytes(topo)
    agent = _bin("testbed-agent")
    nodes = [ComposeNode("server", "server", profiles[topo.server.profile].cpu_cores,
                         profiles[topo.server.profile].memory_mb, [python_bin(), "-m", "testbed.composition.deployment", str(state)])]
    uids = deployment_uids([link.id for link in links])
    for link in links:
        prof = profiles[link.profile]
        c = creds.for_device(link.id)
        cfg_path = state / "agents" / f"{link.id}.json"
        agent_config(topo, link, run, c, SERVER_HOST, MQTT_PORT, prof.cpu_cores, max_msg).write(cfg_path)
        _readable_by(cfg_path, uids[link.id])
        cmd = [python_bin(), "-m", "testbed.emulation.docker.selfshape",
               "--up-mbps", f"{link.rate_up_mbps:.3f}", "--down-mbps", f"{link.rate_down_mbps:.3f}",
               "--user", str(uids[link.id]), "--", agent, run, link.id, "--config", SECRET_PATH]
        nodes.append(ComposeNode(link.id, "device", prof.cpu_cores, prof.memory_mb, cmd, cfg_path))
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


def _cell_address() -> str:
    """This (the server) container's address on the cell network: the broker binds it,
    never every address (0.0.0.0) or loopback."""
    addr = socket.gethostbyname(socket.gethostname())
    if ipaddress.IPv4Address(addr) not in ipaddress.IPv4Network(CELL_NET):
        raise RunFailedError(f"compose server: its host name resolves to {addr}, not an address on the cell "
                             f"network {CELL_NET}; run it as the `server` service of the compose file")
    return addr


async def serve(state: Path) -> dict[str, Any]:
    """Broker + one generation (selection, relay through the agents), result in state/out."""
    from testbed.composition.cells import GivenCell
    from testbed.composition.session import RunSession
    from testbed.emulation.deployed_cell import DeployedCell

    state = Path(state)
    scen = json.loads((state / "scenario.json").read_text())
    topo: Topology = load_topology(scen["topology"])
    cell = DeployedCell(scen["run"], compute_links(topo, place(topo)), state, _cell_address(), topo.server.profile)
    creds = security.load_credentials(state / "secrets" / "credentials.json")
    async with RunSession(topo, GivenCell(cell, creds, state), out_dir=state / "out") as session:
        result = await session.run()
    return result.to_json()


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
