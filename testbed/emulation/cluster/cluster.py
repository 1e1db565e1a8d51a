"""A Docker Swarm cluster on this machine (`testbed cluster up|status|down|stop-node|start-node`).

`cluster_up` makes the datacenter network and the node namespaces (hostnet.py), starts
one daemon per node (daemons.py), forms the Swarm (swarm.py), starts the registry on the
manager over the image store, pushes the traveling image into it where it is missing
(image.py) and has every node pull it by digest. Its state (`/run/testbed-cluster/<name>/
cluster.json`) records the plan, the image and the time each step took. `cluster_down`
removes everything by name, also after a crash: processes (by cgroup and namespace), the
network, the iptables chain, cgroups, run and data directories (the store is kept).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from testbed.emulation.cluster import cgroup_tree, datavol, hostnet, preflight
from testbed.emulation.cluster.daemons import daemon_pid, node_client, start_daemon, stop_node, wait_daemon
from testbed.emulation.cluster.image import TravelImage, push_image
from testbed.emulation.cluster.plan import (CGROUP_TOP, CLUSTER_NETS, DATA_ROOT, RUN_ROOT, ClusterPlan, NodePlan,
                                            check_cluster_name, pick_subnet, plan_cluster)
from testbed.emulation.cluster.registry import STORE, RegistryClient, registry_config, start_registry, wait_ready
from testbed.emulation.cluster.swarm import init_swarm, join_swarm, label_nodes, swarm_nodes
from testbed.emulation.nsutil import list_netns, netns_path, pids_in_netns
from testbed.emulation.owned_dirs import is_owned, make_owned_dir, remove_owned_dir
from testbed.errors import InputError, ResourceError

__all__ = ["cluster_up", "cluster_down", "cluster_status", "cluster_stop_node", "cluster_start_node", "load_plan",
           "known_clusters", "cluster_objects"]

Progress = Callable[[str], None]
_PULL_TIMEOUT_S = 600
_RUN_CONTAINERD = Path("/run/containerd")
_STATUS_TIMEOUT_S = 5


def _quiet(_: str) -> None:
    pass


def known_clusters() -> list[str]:
    """Clusters with a state directory on this host."""
    return sorted(p.name for p in RUN_ROOT.iterdir() if p.is_dir()) if RUN_ROOT.is_dir() else []


def load_plan(name: str) -> tuple[ClusterPlan, dict[str, Any]]:
    check_cluster_name(name)
    try:
        state = json.loads((RUN_ROOT / name / "cluster.json").read_text())
    except (OSError, ValueError):
        raise ResourceError(f"no cluster {name!r} is up (no {RUN_ROOT / name / 'cluster.json'}); "
                            f"start one with `testbed cluster up --nodes N --name {name}`") from None
    return plan_cluster(name, int(state["nodes_count"]), state["subnet"]), state


def _write_state(plan: ClusterPlan, state: dict[str, Any]) -> None:
    tmp = plan.state_file.with_name(".cluster.json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(plan.state_file)


def _used_subnets() -> set[str]:
    used = set()
    for name in known_clusters():
        try:
            used.add(json.loads((RUN_ROOT / name / "cluster.json").read_text())["subnet"])
        except (OSError, ValueError, KeyError):
            continue
    return used


def cluster_objects(name: str) -> list[str]:
    """What of cluster `name` exists on this host (what `cluster_down` removes)."""
    found = [f"netns {n}" for n in list_netns(f"tbc-{name}-")]
    found += [f"link {n}" for n in _links(name)]
    found += [f"iptables chain {c}" for c in hostnet.host_chains(f"TBC-{name}") if c == f"TBC-{name}"]
    found += [f"process {p}" for p in sorted(cgroup_tree.pids(f"{CGROUP_TOP}/{name}"))]
    found += [f"cgroup {h}/{CGROUP_TOP}/{name}" for h in cgroup_tree.hierarchies() if (h / CGROUP_TOP / name).exists()]
    found += [f"directory {d}" for d in (RUN_ROOT / name, DATA_ROOT / name) if d.exists()]
    found += [f"mount {m}" for m in (DATA_ROOT / name / "nodes",) if datavol.mounted_at(m)]
    return found


def _links(name: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(f"tbc{name}-"))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------
# up


def _start_registry(plan: ClusterPlan) -> int:
    STORE.mkdir(parents=True, exist_ok=True)
    plan.registry_config.write_text(registry_config(STORE, plan.registry))
    procs = [d / "cgroup.procs" for d in cgroup_tree.make(plan.registry_cgroup)]
    proc = start_registry(plan.registry_config, plan.registry_log, netns=plan.manager.netns, cgroup_procs=procs)
    wait_ready(f"http://{plan.registry}", proc, log=plan.registry_log)
    return proc.pid


def _start_node(plan: ClusterPlan, node: NodePlan, timeout_s: float) -> docker.DockerClient:
    proc = start_daemon(plan, node)
    return wait_daemon(node, proc, timeout_s)


def _pull(node: NodePlan, ref: str) -> float:
    t0 = time.perf_counter()
    client = node_client(node, timeout_s=_PULL_TIMEOUT_S)
    repo, _, digest = ref.partition("@")
    try:
        client.images.pull(repo, tag=digest)
    except docker.errors.DockerException as e:
        raise ResourceError(f"node {node.name} could not pull {ref}: {getattr(e, 'explanation', None) or e}") from None
    return time.perf_counter() - t0


async def cluster_up(name: str, nodes: int, *, timeout_s: float = 60.0, pull: bool = True,
                     progress: Progress = _quiet, pull_sequentially: bool = False) -> dict[str, Any]:
    """Make the cluster; on any failure, remove what was made and raise. With `pull`
    every node pulls the image now (all at once, or one after another); else Swarm pulls
    it where a service first needs it."""
    check_cluster_name(name)
    preflight.check_host()
    if cluster_objects(name):
        raise ResourceError(f"cluster {name!r} exists already ({', '.join(cluster_objects(name)[:4])}); "
                            f"`testbed cluster down --name {name}` first")
    plan = plan_cluster(name, nodes, pick_subnet(_used_subnets() | _host_subnets()))
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(step: str, t0: float) -> None:
        seconds[step] = round(time.perf_counter() - t0, 3)

    for root in (RUN_ROOT, DATA_ROOT):
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
    make_owned_dir(plan.run_dir)
    make_owned_dir(plan.data_dir)
    state: dict[str, Any] = {"name": name, "subnet": plan.subnet, "nodes_count": nodes, "registry": plan.registry,
                             "image": None, "seconds": seconds, "notes": preflight.notes(), "volume": False,
                             "made_run_containerd": not _RUN_CONTAINERD.exists()}
    _write_state(plan, state)
    try:
        _RUN_CONTAINERD.mkdir(mode=0o711, exist_ok=True)  # the mount point of each node's own (daemons.py)
        plan.volume_mount.mkdir()
        state["volume"] = await asyncio.to_thread(datavol.make_volume, plan.volume_image, plan.volume_mount,
                                                  datavol.VOLUME_GB_PER_NODE * nodes)
        if not state["volume"]:
            state["notes"].append("no loop devices: the nodes' data roots are plain directories, and `down` deletes "
                                  "their files one by one (slow where the file system discards)")
        _write_state(plan, state)
        t0 = time.perf_counter()
        progress(f"network {plan.subnet}: bridge {plan.bridge}, {nodes} namespaces")
        await hostnet.make_network(plan)
        await hostnet.probe_vxlan(plan.manager.netns)
        lap("network", t0)
        t0 = time.perf_counter()
        progress(f"starting {nodes} docker daemons")
        clients = await asyncio.gather(*(asyncio.to_thread(_start_node, plan, n, timeout_s) for n in plan.nodes))
        lap("daemons", t0)
        t0 = time.perf_counter()
        progress("forming the swarm")
        token = await asyncio.to_thread(init_swarm, clients[0], plan)
        await asyncio.gather(*(asyncio.to_thread(join_swarm, c, plan, n, token)
                               for c, n in zip(clients[1:], plan.nodes[1:])))
        await asyncio.to_thread(label_nodes, clients[0], plan)
        lap("swarm", t0)
        t0 = time.perf_counter()
        progress(f"registry on {plan.registry}")
        state["registry_pid"] = await asyncio.to_thread(_start_registry, plan)
        lap("registry", t0)
        t0 = time.perf_counter()
        progress("pushing the node image where the store lacks it")
        img: TravelImage = await asyncio.to_thread(push_image, RegistryClient(f"http://{plan.registry}"))
        lap("image_push", t0)
        ref = img.ref(plan.registry)
        state["image"] = {**img.to_json(), "ref": ref}
        if pull:
            t0 = time.perf_counter()
            progress(f"pulling {ref} on {nodes} nodes")
            if pull_sequentially:
                pulls = [await asyncio.to_thread(_pull, n, ref) for n in plan.nodes]
            else:
                pulls = await asyncio.gather(*(asyncio.to_thread(_pull, n, ref) for n in plan.nodes))
            state["image"]["pull_seconds"] = {n.name: round(s, 3) for n, s in zip(plan.nodes, pulls)}
            lap("image_pull", t0)
        seconds["total"] = round(time.perf_counter() - t_start, 3)
        _write_state(plan, state)
    except BaseException:
        progress("failed: removing what was made")
        await cluster_down(name)
        raise
    return await cluster_status(name)


def _host_subnets() -> set[str]:
    """/24s of CLUSTER_NETS that the host's own interfaces already use (never reuse them)."""
    r = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    supernet = ipaddress.ip_network(CLUSTER_NETS)
    out = set()
    for line in r.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            iface = ipaddress.ip_interface(words[words.index("inet") + 1])
            if iface.ip in supernet:
                out.add(str(ipaddress.ip_network(f"{iface.ip}/24", strict=False)))
    return out


# ---------------------------------------------------------------------------------------
# status, failures


def _node_status(plan: ClusterPlan, node: NodePlan, swarm: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    pid = daemon_pid(node)
    view = (swarm or {}).get(node.hostname)
    if pid is None:
        ready = False
    elif swarm is not None:
        ready = view is not None and view["state"] == "ready"
    else:  # the manager does not answer: the daemon's own answer is all there is
        try:
            ready = node_client(node, timeout_s=_STATUS_TIMEOUT_S).ping()
        except (docker.errors.DockerException, OSError):
            ready = False
    return {"name": node.name, "role": node.role, "state": "ready" if ready else "down", "address": node.address,
            "pid": pid, "hostname": node.hostname, "netns": netns_path(node.netns), "docker_host": node.docker_host,
            "swarm_state": None if view is None else view["state"]}


def _swarm_view(plan: ClusterPlan) -> dict[str, dict[str, Any]] | None:
    if daemon_pid(plan.manager) is None:
        return None
    try:
        return swarm_nodes(node_client(plan.manager, timeout_s=_STATUS_TIMEOUT_S))
    except (docker.errors.DockerException, OSError):
        return None


async def cluster_status(name: str) -> dict[str, Any]:
    """The pinned document: {"nodes": [{name, role, state, address, pid}, ...]} plus the
    subnet, registry, image and step timings of `up`."""
    plan, state = load_plan(name)
    swarm = await asyncio.to_thread(_swarm_view, plan)
    nodes = await asyncio.gather(*(asyncio.to_thread(_node_status, plan, n, swarm) for n in plan.nodes))
    return {"name": name, "subnet": plan.subnet, "host_address": plan.host_address, "registry": plan.registry,
            "nodes": list(nodes), "image": state.get("image"), "seconds": state.get("seconds", {}),
            "notes": state.get("notes", [])}


async def cluster_stop_node(name: str, node_name: str) -> dict[str, Any]:
    """SIGKILL everything node `node_name` runs (its dockerd first of all)."""
    plan, _ = load_plan(name)
    node = plan.node(node_name)
    pid = daemon_pid(node)
    killed = await asyncio.to_thread(stop_node, node)
    return {"name": name, "node": node.name, "dockerd_pid": pid, "killed": sorted(killed)}


async def cluster_start_node(name: str, node_name: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """Start a stopped node's daemon again (and the registry, on the manager); it rejoins
    the swarm by itself. Returns once the manager sees it ready (or `timeout_s` passed)."""
    plan, state = load_plan(name)
    node = plan.node(node_name)
    if daemon_pid(node) is not None:
        raise InputError(f"node {node.name} of cluster {name} is running (dockerd {daemon_pid(node)}); "
                         f"`testbed cluster stop-node {node.name} --name {name}` first")
    await asyncio.to_thread(stop_node, node)  # whatever a half-dead node still runs
    t0 = time.perf_counter()
    await asyncio.to_thread(_start_node, plan, node, timeout_s)
    if node.role == "manager":
        state["registry_pid"] = await asyncio.to_thread(_start_registry, plan)
        _write_state(plan, state)
    deadline = time.monotonic() + timeout_s
    while True:
        view = await asyncio.to_thread(_swarm_view, plan)
        if view is not None and view.get(node.hostname, {}).get("state") == "ready":
            break
        if time.monotonic() > deadline:
            raise ResourceError(f"node {node.name} answers but the swarm did not see it ready within {timeout_s:g} s; "
                                f"see {node.log}")
        await asyncio.sleep(0.2)
    return {"name": name, "node": node.name, "dockerd_pid": daemon_pid(node),
            "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------------------
# down


async def cluster_down(name: str, progress: Progress = _quiet) -> list[str]:
    """Remove everything of cluster `name`; returns what was removed (idempotent)."""
    check_cluster_name(name)
    removed: list[str] = []
    rel = f"{CGROUP_TOP}/{name}"
    t0 = time.perf_counter()
    killed = await asyncio.to_thread(cgroup_tree.kill, rel)
    progress(f"killed {len(killed)} processes ({time.perf_counter() - t0:.1f} s)")
    removed += [f"process {p}" for p in sorted(killed)]
    strays = pids_in_netns([netns_path(n) for n in list_netns(f"tbc-{name}-")])
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid}")
        except ProcessLookupError:
            pass
    removed += await hostnet.remove_network(name)
    progress(f"network removed ({time.perf_counter() - t0:.1f} s)")
    removed += [f"cgroup {d}" for d in await asyncio.to_thread(cgroup_tree.remove, rel)]
    progress(f"cgroups removed ({time.perf_counter() - t0:.1f} s)")
    made_run_containerd = False
    try:
        made_run_containerd = bool(json.loads((RUN_ROOT / name / "cluster.json").read_text()).get("made_run_containerd"))
    except (OSError, ValueError):
        pass
    data = DATA_ROOT / name
    removed += await asyncio.to_thread(datavol.remove_volume, data / "volume.img", data / "nodes")
    for h in cgroup_tree.hierarchies():  # the top directory, once no cluster is left in it
        try:
            (h / CGROUP_TOP).rmdir()
        except OSError:
            pass
    for root, d in ((RUN_ROOT, RUN_ROOT / name), (DATA_ROOT, DATA_ROOT / name)):
        if d.exists() and is_owned(d):
            await asyncio.to_thread(remove_owned_dir, d, root)
            removed.append(f"directory {d}")
            progress(f"removed {d} ({time.perf_counter() - t0:.1f} s)")
    try:
        RUN_ROOT.rmdir()
    except OSError:
        pass
    if made_run_containerd and not known_clusters():
        try:
            _RUN_CONTAINERD.rmdir()  # only when empty: the host's containerd may use it meanwhile
            removed.append(f"directory {_RUN_CONTAINERD}")
        except OSError:
            pass
    return removed
