"""The `swarm` backend: a cell's nodes on a Docker Swarm cluster (`testbed cluster`, or
hosts of your own), made through the manager's daemon.

Layout of run R on cluster C:

    network tb-R       overlay, internal, attachable: 198.18.0.0/16, gateway .255.254;
                       tasks' addresses from 198.18.128.0/17 (the cell's data plane)
    network tb-R-ctl   overlay, internal, attachable, a /24 of Swarm's pool (the control
                       plane: keepers <-> the control broker; never shaped, impaired or cut)
    tb-R-server        a container on the manager (198.18.0.1 on tb-R, one address on
                       tb-R-ctl): the broker, the control broker; the run owner, on the
                       manager's host, enters its namespace as on one host
    tb-R-<dev>         a Swarm service (one task) per device on its node (`placement`,
                       default spread over every node): its keeper (composition/keeper.py)
                       shapes and impairs its own link and runs its agent as its uid;
                       Swarm restarts it when its node comes back

Limits are Swarm's (`deploy.resources`: CPU as a CFS quota, memory, pids), set per
device as on one host; a live CPU change (`slow`) goes to the node's own daemon. What
each device runs is the caller's (`launch`: argv, environment, the secret it gets).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from testbed.emulation.backend import NodeSpec
from testbed.emulation.cell import NodeJoin
from testbed.emulation.cluster.daemons import daemon_pid, node_client
from testbed.emulation.cluster.plan import ClusterPlan, NodePlan
from testbed.emulation.cluster.swarm_run import (CONTROL_SUFFIX, SECRET_FILE, TASKS_RANGE, ensure_image, make_networks,
                                                 remove_swarm_run, server_mounts, service_name, wait_tasks)
from testbed.emulation.docker.backend import cgroup_pids_of, cgroup_procs_of, process_tree
from testbed.emulation.docker.exec import ExecProcess, exec_start
from testbed.emulation.docker.spec import (CPU_PERIOD_US, NODE_LABEL, ROLE_LABEL, RUN_LABEL, NodeSpec as DockerNodeSpec,
                                           container_plan, cpu_quota_us, network_name)
from testbed.errors import InputError, ResourceError
from testbed.model.names import SERVER_ID, check_run_id

__all__ = ["SwarmBackend", "DeviceLaunch", "Launch", "spread", "DEVICE_CAPS", "HOST_LABEL"]

HOST_LABEL = "testbed.host"
#: A device's keeper shapes its own link and runs iptables (NET_ADMIN, NET_RAW), starts its
#: agent as the device's uid (SETUID, SETGID) and stops it (KILL); nothing else.
DEVICE_CAPS = ("NET_ADMIN", "NET_RAW", "SETGID", "SETUID", "KILL")
#: Every TCP of a Swarm device is Reno (a container's sysctls are fixed at its start; the
#: impairment model's loss-limited rate is Reno's, impair.py).
DEVICE_SYSCTLS = {"net.ipv4.tcp_congestion_control": "reno"}


@dataclass(frozen=True)
class DeviceLaunch:
    """What one device's container runs: its command and environment, and the one secret
    it gets (mounted 0400 root at /run/secrets/<SECRET_FILE>)."""

    argv: list[str]
    env: dict[str, str]
    secret: bytes


#: launch(device spec, its cluster node, the control broker's address) -> DeviceLaunch
Launch = Callable[[NodeSpec, str, str], DeviceLaunch]


def spread(devices: Sequence[str], nodes: Sequence[str], wanted: dict[str, str] | None = None) -> dict[str, str]:
    """Each device's cluster node: its `placement` where given, else the next node round
    robin over every node (the manager included), starting after the manager. Pure."""
    wanted = dict(wanted or {})
    unknown = {d: n for d, n in wanted.items() if n not in nodes}
    if unknown:
        raise InputError(f"placement: {', '.join(f'{d}: {n!r}' for d, n in sorted(unknown.items()))} names no node "
                         f"of the cluster (its nodes: {', '.join(nodes)})")
    out, i = {}, 1
    for d in devices:
        if d in wanted:
            out[d] = wanted[d]
            continue
        out[d] = nodes[i % len(nodes)]
        i += 1
    return out


@dataclass
class _Device:
    host: str
    service_id: str = ""
    container_id: str | None = None
    address: str | None = None


@dataclass
class _Server:
    container_id: str = ""
    pid: int = 0
    control_address: str = ""
    keepers: set[int] = field(default_factory=set)  # the container's own idle processes


class SwarmBackend:
    """`Backend` (backend.py) on a cluster: see the module docstring."""

    name = "swarm"

    def __init__(self, run_id: str, cluster: str, *, state_dir: Path | None = None, limits: bool = True,
                 gso_off: bool = True, placement: dict[str, str] | None = None, launch: Launch | None = None,
                 plan: ClusterPlan | None = None, image: str | None = None):
        from testbed.emulation.cluster.cluster import load_plan

        self.run = check_run_id(run_id)
        self.cluster = cluster
        if plan is None:
            plan, _ = load_plan(cluster)
        self.plan = plan
        self.image = image or ""
        self.push = image is None  # the image of this checkout, pushed through the cluster's registry at create
        self.state_dir = state_dir
        self.with_limits, self.gso_off = limits, gso_off
        self.placement = dict(placement or {})
        self.launch = launch
        self.host_route = False
        self.devices: dict[str, _Device] = {}
        self.server = _Server()
        self._specs: dict[str, NodeSpec] = {}
        self._procs: list[ExecProcess] = []
        self._manager: docker.DockerClient | None = None
        self.timings_s: dict[str, float] = {}

    # names -------------------------------------------------------------------------
    @property
    def manager(self) -> docker.DockerClient:
        if self._manager is None:
            self._manager = node_client(self.plan.manager, timeout_s=120)
        return self._manager

    @property
    def host_ifname(self) -> str:
        return self.plan.bridge  # what a cluster node reaches this host through (the devices: nothing)

    @property
    def pids_limit(self) -> str | None:
        return "swarm pids limit" if self.with_limits else None

    @property
    def control_network(self) -> str:
        return network_name(self.run) + CONTROL_SUFFIX

    def node_names(self) -> list[str]:
        return [n.name for n in self.plan.nodes]

    def host(self, node_id: str) -> str:
        """The cluster node `node_id` runs on (the server: the manager)."""
        return self.plan.manager.name if node_id == SERVER_ID else self.devices[node_id].host

    def address(self, node_id: str) -> str | None:
        return self._specs[node_id].address if node_id == SERVER_ID else self.devices[node_id].address

    def netns(self, node_id: str) -> str:
        """The server's namespace (/proc/<pid>/ns/net on the manager's host); a device's is
        on its node, out of reach: ""."""
        return f"/proc/{self.server.pid}/ns/net" if node_id == SERVER_ID else ""

    def shaping_target(self) -> tuple[str, str, str]:
        raise ResourceError("a Swarm cell's devices shape their own links (swarm_cell.SwarmEmulation); "
                            "nothing shapes them from the server")

    # create ------------------------------------------------------------------------
    async def create(self, nodes: Sequence[NodeSpec]) -> None:
        if self.launch is None:
            raise ResourceError("a Swarm cell needs a launch (what each device runs)")
        self._specs = {n.id: n for n in nodes}
        server = next(n for n in nodes if n.role == "server")
        devices = [n for n in nodes if n.role == "device"]
        hosts = spread([d.id for d in devices], self.node_names(), self.placement)
        self.devices = {d.id: _Device(hosts[d.id]) for d in devices}
        down = [n.name for n in self.plan.nodes if daemon_pid(n) is None and _is_local(n)]
        if down:
            raise ResourceError(f"cluster {self.cluster}: node(s) {', '.join(down)} are down; "
                                f"`testbed cluster start-node NODE --name {self.cluster}`")
        t0 = time.perf_counter()
        if self.push:  # this checkout's image: after a commit only its checkout layer is new
            self.image = await asyncio.to_thread(_push_checkout, self.plan)
        await asyncio.to_thread(ensure_image, self.manager, self.image)
        self.timings_s["image_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.to_thread(make_networks, self.manager, self.run)
        self.timings_s["networks_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.to_thread(self._start_server, server)
        await self._cap_gso()
        self.timings_s["server_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.to_thread(self._start_devices, devices)
        placed = await asyncio.to_thread(wait_tasks, self.manager, self.plan, self.run, list(self.devices))
        for dev, (host, cid, addr) in placed.items():
            if host != self.devices[dev].host:
                raise ResourceError(f"device {dev} runs on {host}, not on its node {self.devices[dev].host}")
            self.devices[dev].container_id, self.devices[dev].address = cid, addr
        self.timings_s["devices_s"] = time.perf_counter() - t0

    def _start_server(self, spec: NodeSpec) -> None:
        api = self.manager.api
        lim = spec if self.with_limits else NodeSpec(spec.id, spec.role, spec.address, spec.index)
        plan = container_plan(self.run, DockerNodeSpec(spec.id, "server", spec.address, lim.cpu_cores, lim.memory_mb),
                              self.image, server_mounts(self.state_dir, self.run))
        mounts = [docker.types.Mount(c, h, type="bind", read_only=ro) for h, c, ro in plan.binds]
        labels = {**plan.labels, HOST_LABEL: self.plan.manager.name}
        try:
            c = api.create_container(plan.image, command=plan.command, name=plan.name, hostname=plan.hostname,
                                     labels=labels, environment=plan.environment,
                                     host_config=api.create_host_config(mounts=mounts, **plan.host_config),
                                     networking_config=api.create_networking_config(
                                         {plan.network: api.create_endpoint_config(ipv4_address=plan.ipv4_address)}))
            api.connect_container_to_network(c["Id"], self.control_network)
            api.start(c["Id"])
            info = api.inspect_container(c["Id"])
        except docker.errors.APIError as e:
            raise ResourceError(f"server container {plan.name} on {self.plan.manager.name}: {e.explanation or e}") from None
        self.server = _Server(c["Id"], int(info["State"]["Pid"]),
                              info["NetworkSettings"]["Networks"][self.control_network]["IPAddress"])
        if self.server.pid <= 0 or not self.server.control_address:
            raise ResourceError(f"server container {plan.name} started without a process or control address")
        self.server.keepers = process_tree(self.server.pid)

    async def _cap_gso(self) -> None:
        from testbed.emulation.nsutil import open_iproute

        if not self.gso_off:
            return
        async with open_iproute(self.netns(SERVER_ID)) as ipr:
            async for a in await ipr.addr("dump", family=2):
                if a.get("address") == self._specs[SERVER_ID].address:
                    await ipr.link("set", index=a["index"], gso_max_segs=1)

    def _start_devices(self, devices: list[NodeSpec]) -> None:
        for spec in devices:
            self._start_device(spec)

    def _start_device(self, spec: NodeSpec) -> None:
        mgr, dev = self.manager, self.devices[spec.id]
        assert self.launch is not None
        launch = self.launch(spec, dev.host, self.server.control_address)
        name = service_name(self.run, spec.id)
        labels = {RUN_LABEL: self.run, NODE_LABEL: spec.id, ROLE_LABEL: "device", HOST_LABEL: dev.host}
        try:
            secret = mgr.secrets.create(name=name, data=launch.secret, labels=labels)
            res = docker.types.Resources(
                cpu_limit=int(spec.cpu_cores * 1e9) if self.with_limits and spec.cpu_cores else None,
                mem_limit=spec.memory_mb * 2**20 if self.with_limits and spec.memory_mb else None)
            if self.with_limits and spec.pids_max:
                res.setdefault("Limits", {})["Pids"] = spec.pids_max
            svc = mgr.services.create(
                self.image, launch.argv, name=name, hostname=spec.id, env=[f"{k}={v}" for k, v in launch.env.items()],
                labels=labels, container_labels=labels, constraints=[f"node.labels.testbed.node=={dev.host}"],
                networks=[network_name(self.run), self.control_network],
                endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
                restart_policy=docker.types.RestartPolicy("on-failure", delay=10**9, max_attempts=5),
                resources=res, init=True, cap_drop=["ALL"], cap_add=list(DEVICE_CAPS), sysctls=dict(DEVICE_SYSCTLS),
                secrets=[docker.types.SecretReference(secret.id, name, filename=SECRET_FILE, uid="0", gid="0",
                                                      mode=0o400)])
        except docker.errors.APIError as e:
            raise ResourceError(f"device service {name}: {e.explanation or e}") from None
        dev.service_id = svc.id

    # run time ----------------------------------------------------------------------
    def refresh_devices(self) -> dict[str, tuple[str, str | None, str | None]]:
        """Each device's (node, container id, cell address) as the manager sees its
        running task now (a task restarted on a returned node has new ones)."""
        placed = wait_tasks(self.manager, self.plan, self.run, list(self.devices), timeout_s=0, partial=True)
        for dev, (_host, cid, addr) in placed.items():
            self.devices[dev].container_id, self.devices[dev].address = cid, addr
        return placed

    def node_states(self) -> dict[str, str]:
        """Each cluster node: "ready" or "down" — its daemon's process on this machine
        (at once), else the manager's view (its heartbeat: seconds)."""
        from testbed.emulation.cluster.swarm import swarm_nodes

        out = {n.name: "ready" for n in self.plan.nodes if _is_local(n) and daemon_pid(n) is not None}
        out |= {n.name: "down" for n in self.plan.nodes if _is_local(n) and daemon_pid(n) is None}
        rest = [n for n in self.plan.nodes if n.name not in out]
        if rest:
            try:
                view = swarm_nodes(self.manager)
            except (docker.errors.DockerException, OSError):
                view = {}
            out |= {n.name: "ready" if view.get(n.hostname, {}).get("state") == "ready" else "down" for n in rest}
        return out

    async def set_link_state(self, node_id: str, up: bool) -> None:
        raise ResourceError(f"{node_id}: a Swarm device's link is cut by its keeper (SwarmEmulation.cut_link)")

    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        """Change a running container's CPU quota live, through its node's own daemon."""
        if node_id == SERVER_ID:
            client, cid, where = self.manager, self.server.container_id, self.plan.manager
        else:
            d = self.devices[node_id]
            where = self.plan.node(d.host)
            client, cid = node_client(where), d.container_id
        if not cid:
            raise ResourceError(f"set_cpu {node_id}: its task has no container now")
        try:
            if node_id == SERVER_ID:
                await asyncio.to_thread(client.api.update_container, cid, cpu_period=CPU_PERIOD_US,
                                        cpu_quota=cpu_quota_us(cpu_cores))
            else:  # a task's limit is NanoCpus (Swarm's), which the SDK's update_container cannot set
                await asyncio.to_thread(_update_nano_cpus, client, cid, cpu_cores)
        except (docker.errors.DockerException, OSError) as e:
            raise ResourceError(f"set_cpu {node_id}: the daemon of {where.name} ({where.docker_host}): "
                                f"{getattr(e, 'explanation', None) or e}") from None

    def _server_only(self, node_id: str, what: str) -> None:
        if node_id != SERVER_ID:
            raise ResourceError(f"{what} {node_id}: a Swarm device's processes are its keeper's; "
                                "its agent starts and stops through the keeper")

    def join(self, node_id: str) -> NodeJoin:
        self._server_only(node_id, "join")
        pid = self.server.pid
        return NodeJoin(self.netns(SERVER_ID), tuple(str(p) for p in cgroup_procs_of(pid)),
                        tuple(f"/proc/{pid}/ns/{k}" for k in ("mnt", "uts", "ipc")))

    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None, *, run_as: tuple[int, int] | None = None) -> Any:
        """Start `argv` in the server's container (docker exec, as `run_as` = (uid, gid) when given)."""
        self._server_only(node_id, "spawn")
        proc = await exec_start(self.manager, self.server.container_id, argv, env=env, log_path=log_path,
                                user=f"{run_as[0]}:{run_as[1]}" if run_as is not None else None)
        self._procs.append(proc)
        return proc

    def pids(self, node_id: str) -> set[int]:
        if node_id != SERVER_ID or self.server.pid <= 0:
            return set()
        return cgroup_pids_of(self.server.pid) - self.server.keepers

    def gpu_problem(self) -> str | None:
        return "a Swarm cell gives its devices no GPU share (docs/cluster.md)"

    # destroy -----------------------------------------------------------------------
    async def destroy(self) -> list[str]:
        for proc in self._procs:
            try:
                await proc.stop()
            except Exception:  # noqa: BLE001 - the container's removal ends them anyway
                pass
        self._procs.clear()
        removed = await asyncio.to_thread(remove_swarm_run, self.plan, self.run, self.state_dir)
        self.devices.clear()
        self.server = _Server()
        return removed


def _update_nano_cpus(client: docker.DockerClient, container_id: str, cpu_cores: float) -> None:
    """`docker update --cpus` of a Swarm task's container: its NanoCpus (a CFS quota over
    the kernel's 100 ms period), live."""
    api = client.api  # (docker-py's update_container has no NanoCpus; the Engine API has)
    res = api.post(f"{api.base_url}/v{api.api_version}/containers/{container_id}/update",
                   json={"NanoCpus": round(cpu_cores * 1e9)}, timeout=30)
    if res.status_code >= 400:
        raise ResourceError(f"docker update --cpus {cpu_cores:g} of {container_id[:12]}: {res.status_code} {res.text}")


def _push_checkout(plan: ClusterPlan) -> str:
    """Push this checkout's node image into the cluster's registry (what it lacks); its ref."""
    from testbed.emulation.cluster.image import push_image
    from testbed.emulation.cluster.registry import RegistryClient

    return push_image(RegistryClient(f"http://{plan.registry}")).ref(plan.registry)


def _is_local(node: NodePlan) -> bool:
    """A node of a cluster on this machine (its daemon's socket is a local file)."""
    return node.docker_host.startswith("unix://")
