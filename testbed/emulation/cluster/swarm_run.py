"""What a Swarm cell makes on its cluster, by name and label (docker SDK; every wait
bounded): the image on the manager, the cell's two overlay networks, the server's state
mounts, the devices' tasks as they run, and the removal of all of it — by
`SwarmBackend.destroy()` and by `testbed down` for a run whose supervisor crashed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from testbed.emulation.cluster.daemons import daemon_pid, node_client
from testbed.emulation.cluster.plan import ClusterPlan
from testbed.emulation.docker.spec import GATEWAY, RUN_LABEL, SUBNET, network_name
from testbed.errors import ResourceError

__all__ = ["CONTROL_SUFFIX", "SECRET_FILE", "TASKS_RANGE", "service_name", "ensure_image", "make_networks",
           "server_mounts", "wait_tasks", "remove_swarm_run", "swarm_runs"]

CONTROL_SUFFIX = "-ctl"
SECRET_FILE = "keeper.json"  # /run/secrets/keeper.json in a device's container
#: Swarm gives tasks (and each node's overlay endpoint) addresses from here; .0.1 stays the server's
TASKS_RANGE = "198.18.128.0/17"
_NETWORK_RETRY_S = 90.0  # a removed run's tasks may still hold the pool on a node (docs/cluster.md)
_GONE_S = 60.0


def service_name(run_id: str, device: str) -> str:
    return f"tb-{run_id}-{device}"


def ensure_image(client: docker.DockerClient, ref: str) -> None:
    """The node image on this daemon (pulled by digest from the cluster's registry)."""
    try:
        client.images.get(ref)
        return
    except docker.errors.ImageNotFound:
        pass
    repo, _, digest = ref.partition("@")
    try:
        client.images.pull(repo, tag=digest)
    except docker.errors.DockerException as e:
        raise ResourceError(f"pulling {ref}: {getattr(e, 'explanation', None) or e}") from None


def _create_network(client: docker.DockerClient, name: str, run_id: str, ipam: Any | None) -> None:
    deadline = time.monotonic() + _NETWORK_RETRY_S
    while True:
        try:
            client.networks.create(name, driver="overlay", internal=True, attachable=True, ipam=ipam,
                                   labels={RUN_LABEL: run_id}, check_duplicate=True)
            return
        except docker.errors.APIError as e:
            text = str(e.explanation or e)
            if "overlap" not in text.lower() or time.monotonic() > deadline:
                raise ResourceError(f"overlay network {name}: {text}; one Swarm cell at a time per cluster "
                                    "(`testbed down --run ID` removes another)") from None
        time.sleep(1.0)  # a node still tears down a removed run's containers on this pool


def make_networks(client: docker.DockerClient, run_id: str) -> None:
    """The cell network (198.18.0.0/16, as on one host) and the control network."""
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=SUBNET, gateway=GATEWAY,
                                                                       iprange=TASKS_RANGE)])
    _create_network(client, network_name(run_id), run_id, ipam)
    _create_network(client, network_name(run_id) + CONTROL_SUFFIX, run_id, None)


def server_mounts(state_dir: Path | None, run_id: str) -> list[tuple[str, str, bool]]:
    """What of the run's state the server container sees (host, container, read-only), at
    the host's paths (the run owner runs on the manager's host): its broker's directory,
    the control broker's, and secrets/ (both brokers' password and ACL files)."""
    if state_dir is None:
        raise ResourceError(f"run {run_id}: a Swarm cell needs its state directory")
    state = Path(state_dir)
    for sub in ("broker", "control-broker", "secrets"):
        (state / sub).mkdir(mode=0o700, exist_ok=True)
    src = state.resolve()
    return [(str(src / d), str(state / d), d == "secrets") for d in ("broker", "control-broker", "secrets")]


def _node_names_by_id(client: docker.DockerClient, plan: ClusterPlan) -> dict[str, str]:
    by_host = {n.hostname: n.name for n in plan.nodes}
    return {sn.id: by_host.get(sn.attrs["Description"]["Hostname"], sn.attrs["Description"]["Hostname"])
            for sn in client.nodes.list()}


def _task_view(task: dict[str, Any], cell: str) -> tuple[str | None, str | None]:
    cid = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
    addr = None
    for att in task.get("NetworksAttachments") or []:
        if ((att.get("Network") or {}).get("Spec") or {}).get("Name") == cell and att.get("Addresses"):
            addr = att["Addresses"][0].split("/")[0]
    return cid, addr


def wait_tasks(client: docker.DockerClient, plan: ClusterPlan, run_id: str, devices: list[str], *,
               timeout_s: float = 900.0, partial: bool = False) -> dict[str, tuple[str, str | None, str | None]]:
    """Device -> (its node, container id, cell address) once every device's task runs (a
    first run on a node pulls the image: minutes on a busy machine). `partial`: those
    running now. A task that failed (no suitable node, an image it cannot pull) raises."""
    names = {service_name(run_id, d): d for d in devices}
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = _node_names_by_id(client, plan)
        services = {s.id: s.name for s in client.services.list(filters={"label": f"{RUN_LABEL}={run_id}"})}
        running: dict[str, tuple[str, str | None, str | None]] = {}
        states: dict[str, str] = {}
        for task in client.api.tasks(filters={"service": list(names)}):
            dev = names.get(services.get(task.get("ServiceID", ""), ""))
            st = task.get("Status") or {}
            if dev is not None and st.get("State") in ("failed", "rejected") and not partial:
                where = plan.node(nodes.get(task.get("NodeID", ""), plan.manager.name))
                raise ResourceError(f"device {dev}'s task {st.get('State')} on {where.name}: "
                                    f"{st.get('Err') or st.get('Message')}; {_logs_tail(where, task)}")
            if dev is None or task.get("DesiredState") != "running":
                continue
            states[dev] = f"{st.get('State')}{': ' + st['Err'] if st.get('Err') else ''}"
            if st.get("State") == "running":
                running[dev] = (nodes.get(task.get("NodeID", ""), "?"), *_task_view(task, network_name(run_id)))
        if partial or len(running) == len(devices):
            return running
        if time.monotonic() > deadline:
            waiting = {d: states.get(d, "no task") for d in devices if d not in running}
            raise ResourceError(f"devices not running after {timeout_s:g} s: "
                                + "; ".join(f"{d} ({s})" for d, s in sorted(waiting.items())))
        time.sleep(0.5)


def _logs_tail(node: Any, task: dict[str, Any], lines: int = 6) -> str:
    """The end of a failed task's output, where its node's daemon is reachable."""
    cid = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
    try:
        text = node_client(node).api.logs(cid, tail=lines).decode(errors="replace").strip()
        return f"its output ends: {text}" if text else "it printed nothing"
    except (docker.errors.DockerException, OSError, TypeError):
        return f"see `docker service logs` of {task.get('ServiceID')} on the manager"


def _local_clients(plan: ClusterPlan) -> list[docker.DockerClient]:
    return [node_client(n, timeout_s=30) for n in plan.nodes
            if n.docker_host.startswith("unix://") and daemon_pid(n) is not None]


def swarm_runs(plan: ClusterPlan) -> dict[str, list[str]]:
    """Run id -> its services, containers, networks and secrets on this cluster."""
    out: dict[str, list[str]] = {}
    if daemon_pid(plan.manager) is None:
        return out
    mgr = node_client(plan.manager, timeout_s=30)
    flt = {"label": RUN_LABEL}
    found = [("service", o.name, o.attrs["Spec"].get("Labels")) for o in mgr.services.list(filters=flt)]
    found += [("secret", o.name, o.attrs["Spec"].get("Labels")) for o in mgr.secrets.list(filters=flt)]
    found += [("network", o.name, o.attrs.get("Labels")) for o in mgr.networks.list(filters=flt)]
    found += [("container", o.name, o.labels) for o in mgr.containers.list(all=True, filters=flt)]
    for kind, name, labels in found:
        out.setdefault((labels or {}).get(RUN_LABEL, "?"), []).append(f"{kind} {name}")
    return out


def remove_swarm_run(plan: ClusterPlan, run_id: str, state_dir: Path | None = None) -> list[str]:
    """Remove run `run_id`'s services (waiting until no node runs their containers), its
    server container, networks and secrets on cluster `plan`; what was removed."""
    if daemon_pid(plan.manager) is None and plan.manager.docker_host.startswith("unix://"):
        raise ResourceError(f"cluster {plan.name}: its manager is down; `testbed cluster start-node "
                            f"{plan.manager.name} --name {plan.name}` and `testbed down` again")
    mgr = node_client(plan.manager, timeout_s=60)
    flt = {"label": f"{RUN_LABEL}={run_id}"}
    removed: list[str] = []
    for svc in mgr.services.list(filters=flt):
        if _gone_meanwhile(svc.remove):  # (another teardown of the same run)
            removed.append(f"service {svc.name}")
    deadline = time.monotonic() + _GONE_S
    clients = _local_clients(plan)
    while True:
        left = [c for client in clients for c in client.containers.list(all=True, filters=flt)]
        for c in left:
            if c.labels.get("com.docker.swarm.service.id") is None:  # the server: ours to remove
                try:
                    c.remove(force=True)
                    removed.append(f"container {c.name}")
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as e:
                    if e.status_code != 409:
                        raise ResourceError(f"container {c.name}: {e.explanation or e}") from None
        if not left:
            break
        if time.monotonic() > deadline:
            raise ResourceError(f"run {run_id}: containers {', '.join(sorted(c.name for c in left))} are still "
                                f"there {_GONE_S:g} s after their services were removed; `testbed down` again")
        time.sleep(0.3)
    for net in mgr.networks.list(filters=flt):
        for _ in range(20):
            try:
                net.remove()
                removed.append(f"network {net.name}")
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError as e:
                if "active endpoints" not in str(e.explanation or e):
                    raise ResourceError(f"network {net.name}: {e.explanation or e}") from None
                time.sleep(0.5)
    for sec in mgr.secrets.list(filters=flt):
        if _gone_meanwhile(sec.remove):
            removed.append(f"secret {sec.name}")
    return removed


def _gone_meanwhile(remove: Any) -> bool:
    """Call `remove`; False when the object was gone already."""
    try:
        remove()
        return True
    except docker.errors.NotFound:
        return False
