"""The `docker` backend: one container per node on a user-defined bridge network.

Layout of run R (same addresses as the netns backend, so the relay cannot tell them apart):

    host         bridge tbRbr 198.18.255.254/32 (route 198.18.0.0/16 when free), docker
                 network tb-R (internal: no route out), label testbed.run=R
    tb-R-server  container, eth0 198.18.0.1/16, ifb0 (uplink IFB made by the testbed)
    tb-R-<dev>   container, eth0 198.18.0.<10+i>/16, --cpus / --memory from the profile

The cell is shaped exactly as in the netns backend, by the same shaping plan, inside the
server container's namespace (/proc/<pid>/ns/net): HTB on the egress of the server's
eth0 (downlink), its ingress redirected to ifb0 (uplink). Containers run an idle process;
the broker is started in the server with `docker exec` (exec.py), the agents are forked
into the devices by the agent launcher, each as its own uid. Containers keep only the
capabilities their role needs (spec.NODE_CAPS), devices run as nobody, and each container
mounts only its part of the run's state: the server its broker files, a device its own
agent config. Every blocking SDK call runs in a worker thread; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors
import docker.types
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.backend import NodeSpec
from testbed.emulation.cell import NodeJoin
from testbed.emulation.docker.cleanup import docker_runs, remove_docker_run
from testbed.emulation.docker.exec import ExecProcess, exec_start
from testbed.emulation.docker.image import IMAGE, IMAGE_LABEL, build_image, docker_client, host_mounts, image_info
from testbed.emulation.docker.spec import (
    RUN_LABEL,
    GpuHost,
    NodeSpec as DockerNodeSpec,
    bridge_name,
    container_name,
    container_plan,
    detect_gpus,
    CPU_PERIOD_US,
    cpu_quota_us,
    network_name,
    network_plan,
)
from testbed.emulation.nsutil import open_iproute
from testbed.emulation.owned_dirs import make_owned_dir, remove_owned_dir
from testbed.errors import ResourceError
from testbed.model.names import CELL_NET, HOST_ADDRESS, STATE_ROOT, check_run_id

__all__ = ["DockerBackend", "docker_runs", "remove_docker_run", "run_state_dir", "cgroup_procs_of", "cgroup_dir_of",
           "cgroup_pids_of", "process_tree"]

_THREADS = 8  # parallel container starts: 4-8 threads halve the time of 20 (measured here)


def run_state_dir(run_id: str) -> Path:
    """The run's state directory on the host (/run/testbed/<run>): each container mounts
    only its part of it, at the same path (`_state_mounts`)."""
    return STATE_ROOT / run_id


def _api_error(what: str, e: docker.errors.APIError) -> ResourceError:
    return ResourceError(f"{what}: {e.explanation or e}")


class DockerBackend:
    """`Backend` (see backend.py) made of containers; each node's limits (NodeSpec) are
    docker's `--cpus`, `--memory` and GPU request."""

    name = "docker"

    def __init__(self, run_id: str, *, image: str | None = None, state_dir: Path | None = None,
                 client: docker.DockerClient | None = None, gpus: GpuHost | None = None, gso_off: bool = True,
                 limits: bool = True):
        self.run = check_run_id(run_id)
        self.gso_off = gso_off
        self.image = image or os.environ.get("TESTBED_DOCKER_IMAGE") or IMAGE
        self.with_limits = limits
        self.state_dir = state_dir
        self.host_route = False
        self._client = client
        self._gpus = gpus
        self._nodes: dict[str, NodeSpec] = {}
        self._ids: dict[str, str] = {}  # node id -> container id
        self._pids: dict[str, int] = {}  # node id -> container init PID
        self._procs: dict[str, list[ExecProcess]] = {}
        self._made_dirs: list[Path] = []
        self._keepers: dict[str, set[int]] = {}  # the container's own idle processes (init, sleep)

    # names -------------------------------------------------------------------------
    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker_client()
        return self._client

    @property
    def bridge(self) -> str:
        return bridge_name(self.run)

    @property
    def host_ifname(self) -> str:
        return self.bridge

    @property
    def pids_limit(self) -> str | None:
        return "docker pids_limit" if self.with_limits else None

    @property
    def network(self) -> str:
        return network_name(self.run)

    def container(self, node_id: str) -> str:
        return container_name(self.run, node_id)

    def netns(self, node_id: str) -> str:
        """/proc/<pid>/ns/net of the node's container (valid while the container runs)."""
        try:
            return f"/proc/{self._pids[node_id]}/ns/net"
        except KeyError:
            raise ResourceError(f"node {node_id!r} has no container in run {self.run}") from None

    def container_pid(self, node_id: str) -> int:
        return self._pids[node_id]

    def shaping_target(self) -> tuple[str, str, str]:
        return self.netns("server"), "eth0", "ifb0"

    # create ------------------------------------------------------------------------
    async def create(self, nodes: Sequence[NodeSpec]) -> None:
        """Image (built once, kept), network, one running container per node, host link."""
        self._nodes = {n.id: n for n in nodes}
        if sum(n.role == "server" for n in nodes) != 1:
            raise ResourceError("a docker run needs exactly one node with role 'server'")
        await asyncio.to_thread(self._create_sync, list(nodes))
        await self._host_address()
        await self._server_ifb()
        if self.gso_off:
            await asyncio.gather(*(self._cap_gso(n.id) for n in nodes))

    def _create_sync(self, nodes: list[NodeSpec]) -> None:
        client = self.client
        if self.image == IMAGE:
            build_image(client)
        elif image_info(client, self.image) is None:
            raise ResourceError(f"docker image {self.image!r} does not exist here; build it (images/README) "
                                "or use the default with `testbed image build`")
        info = image_info(client, self.image)
        mounts: list[tuple[str, str, bool]] = []
        if info is not None and info.labels.get(IMAGE_LABEL) == "node":
            mounts = [(m.path, m.path, m.read_only) for m in host_mounts()]
        state = self._state_mounts(nodes)
        gpus = self._gpus if self._gpus is not None else detect_gpus()
        self._make_network(client)
        plans = []
        for n in nodes:
            lim = n if self.with_limits else NodeSpec(n.id, n.role, n.address, n.index)
            spec = DockerNodeSpec(n.id, n.role, n.address, lim.cpu_cores, lim.memory_mb, lim.gpu_share_pct,
                                  dict(lim.gpu_env), lim.pids_max)
            plans.append((n.id, container_plan(self.run, spec, self.image, mounts + state[n.id], gpus)))
        with ThreadPoolExecutor(_THREADS, thread_name_prefix="tb-docker") as ex:
            results = list(ex.map(lambda p: self._start_container(client, *p), plans))
        for node_id, cid, pid in results:
            self._ids[node_id] = cid
            self._pids[node_id] = pid
            self._keepers[node_id] = process_tree(pid)

    def _state_mounts(self, nodes: list[NodeSpec]) -> dict[str, list[tuple[str, str, bool]]]:
        """What of the run's state each container sees (host, container, read-only), at
        the host's paths, made before the containers start (a bind mount needs its source):
        the server its broker directory (writable) and secrets/ (the broker's password and
        ACL files, read-only); a device only its own agent config, `agents/<device>.json`
        (read-only; the run owner fills it in and hands it to the agent's uid)."""
        state = Path(self.state_dir) if self.state_dir is not None else run_state_dir(self.run)
        if not state.exists():
            state.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._made_dirs.append(make_owned_dir(state, mode=0o711))  # marked: destroy() may remove it
        for sub, mode in (("broker", 0o700), ("secrets", 0o700), ("agents", 0o711)):
            (state / sub).mkdir(mode=mode, exist_ok=True)
        src = state.resolve()
        out: dict[str, list[tuple[str, str, bool]]] = {}
        for n in nodes:
            if n.role == "server":
                out[n.id] = [(str(src / d), str(state / d), d == "secrets") for d in ("broker", "secrets")]
                continue
            cfg = Path("agents") / f"{n.id}.json"
            with contextlib.suppress(FileExistsError):  # an empty root-only placeholder until the owner writes it
                os.close(os.open(src / cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            out[n.id] = [(str(src / cfg), str(state / cfg), True)]
        return out

    def _make_network(self, client: docker.DockerClient) -> None:
        plan = network_plan(self.run)
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=plan.pop("subnet"),
                                                                           gateway=plan.pop("gateway"))])
        # the bridge gets no address from docker: the host side is a /32 (as in the netns
        # backend), so a netns run and a docker run can exist side by side
        plan["options"]["com.docker.network.bridge.inhibit_ipv4"] = "true"
        try:
            client.networks.create(ipam=ipam, check_duplicate=True, **plan)
        except docker.errors.APIError as e:
            if "overlap" in str(e).lower():
                others = [n.name for n in client.networks.list(filters={"label": RUN_LABEL})]
                raise ResourceError(
                    f"docker network {self.network}: {CELL_NET} is taken by another docker run ({', '.join(others) or '?'}); "
                    "one docker run at a time per host — `testbed down --all` removes the others"
                ) from None
            raise _api_error(f"docker network {self.network}", e) from None

    def _start_container(self, client: docker.DockerClient, node_id: str, plan) -> tuple[str, str, int]:
        api = client.api
        mounts = [docker.types.Mount(c, h, type="bind", read_only=ro) for h, c, ro in plan.binds]
        try:
            host_config = api.create_host_config(mounts=mounts, **plan.host_config)
            net_config = api.create_networking_config(
                {plan.network: api.create_endpoint_config(ipv4_address=plan.ipv4_address)})
            c = api.create_container(plan.image, command=plan.command, name=plan.name, hostname=plan.hostname,
                                     labels=plan.labels, environment=plan.environment, host_config=host_config,
                                     networking_config=net_config, detach=True, user=plan.user)
            api.start(c["Id"])
            pid = int(api.inspect_container(c["Id"])["State"]["Pid"])
        except docker.errors.APIError as e:
            raise _api_error(f"container {plan.name}", e) from None
        if pid <= 0:
            raise ResourceError(f"container {plan.name} started but has no process (see `docker logs {plan.name}`)")
        return node_id, c["Id"], pid

    async def _host_address(self) -> None:
        """198.18.255.254/32 on the bridge and the cell route when no other run has it."""
        async with AsyncIPRoute() as root:
            found = await root.link_lookup(ifname=self.bridge)
            if not found:
                raise ResourceError(f"docker did not create bridge {self.bridge}")
            await root.addr("add", index=found[0], address=HOST_ADDRESS, prefixlen=32)
            try:
                await root.route("add", dst=CELL_NET, oif=found[0], prefsrc=HOST_ADDRESS)
                self.host_route = True
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: another run owns the host route
                    raise ResourceError(f"route {CELL_NET} via {self.bridge}: {e}") from None

    async def _server_ifb(self) -> None:
        async with open_iproute(self.netns("server")) as ipr:
            try:
                await ipr.link("add", ifname="ifb0", kind="ifb", txqlen=1000)
            except NetlinkError as e:
                raise ResourceError(f"ifb0 in the server container: {e} (the kernel needs the ifb module)") from None
            idx = (await ipr.link_lookup(ifname="ifb0"))[0]
            await ipr.link("set", index=idx, state="up")

    async def _cap_gso(self, node_id: str) -> None:
        """gso_max_segs=1 on the node's eth0, as the netns backend does: 64 KB GSO bursts
        make the HTB classes' short-term rates uneven."""
        async with open_iproute(self.netns(node_id)) as ipr:
            await ipr.link("set", index=(await ipr.link_lookup(ifname="eth0"))[0], gso_max_segs=1)

    # run time ----------------------------------------------------------------------
    async def spawn(self, node_id: str, argv: Sequence[str], env: dict[str, str] | None = None,
                    log_path: Path | None = None, *, run_as: tuple[int, int] | None = None) -> ExecProcess:
        """Start `argv` inside the node's container (docker exec, as `run_as` = (uid, gid) when
        given); output to `log_path`."""
        if node_id not in self._ids:
            raise ResourceError(f"node {node_id!r} has no container in run {self.run}")
        proc = await exec_start(self.client, self._ids[node_id], argv, env=env, log_path=log_path,
                                user=f"{run_as[0]}:{run_as[1]}" if run_as is not None else None)
        self._procs.setdefault(node_id, []).append(proc)
        return proc

    async def stop_execs(self, node_id: str) -> None:
        """End what `spawn` started in the node (docker exec sessions)."""
        for proc in self._procs.pop(node_id, []):
            await proc.stop()

    def gpu_problem(self) -> str | None:
        """A container sees the GPU only through a device request, which needs /dev/nvidiaN
        and the NVIDIA container toolkit's hook on the host."""
        gpus = self._gpus if self._gpus is not None else detect_gpus()
        if gpus.count == 0:
            return "no /dev/nvidiaN device for the containers"
        if not gpus.toolkit:
            return ("the NVIDIA container toolkit (nvidia-container-cli) is not installed, so containers cannot be "
                    "given the GPU")
        return None

    def pids(self, node_id: str) -> set[int]:
        """Processes the testbed started in the node's container: in its cgroup (agents
        forked into it, docker exec children), not the container's own idle processes."""
        if node_id not in self._pids:
            return set()
        return self._cgroup_pids(node_id) - self._keepers.get(node_id, set())

    def join(self, node_id: str) -> NodeJoin:
        """The container's network namespace, cgroups (every hierarchy) and its mount, UTS
        and IPC namespaces: a process forked from the host that enters them all runs in the
        container (its limits, accounting and filesystem; only the PID namespace differs)."""
        return NodeJoin(self.netns(node_id), tuple(str(p) for p in self.cgroup_procs(node_id)),
                        tuple(self.namespaces(node_id)))

    def _cgroup_pids(self, node_id: str) -> set[int]:
        return cgroup_pids_of(self._pids[node_id])

    def cgroup_procs(self, node_id: str) -> list[Path]:
        """The container's `cgroup.procs` files, one per hierarchy: writing a PID to each
        moves that process into the container's cgroups (its limits and accounting)."""
        return cgroup_procs_of(self._pids[node_id])

    def namespaces(self, node_id: str, kinds: Sequence[str] = ("mnt", "uts", "ipc")) -> list[str]:
        """Paths of the container's other namespaces (besides `netns`), for a process that
        joins the container from outside (setns), e.g. an agent forked by a template."""
        return [f"/proc/{self._pids[node_id]}/ns/{k}" for k in kinds]

    async def _host_peer_index(self, node_id: str) -> int:
        async with open_iproute(self.netns(node_id)) as ipr:
            links = await ipr.link("get", ifname="eth0")
            peer = links[0].get("IFLA_LINK")
        if not peer:
            raise ResourceError(f"container {self.container(node_id)}: eth0 has no host-side peer")
        return int(peer)

    async def set_link_state(self, node_id: str, up: bool) -> None:
        """Take the node's link down/up at the host side of its veth (the container keeps
        its addresses and routes, as a device that loses radio coverage does)."""
        peer = await self._host_peer_index(node_id)
        async with AsyncIPRoute() as root:
            await root.link("set", index=peer, state="up" if up else "down")

    async def set_cpu(self, node_id: str, cpu_cores: float) -> None:
        """Change a running container's CPU limit (`docker update --cpus`), e.g. a "slow" fault."""
        try:
            await asyncio.to_thread(self.client.api.update_container, self._ids[node_id], cpu_period=CPU_PERIOD_US,
                                    cpu_quota=cpu_quota_us(cpu_cores))
        except docker.errors.APIError as e:
            raise _api_error(f"docker update --cpus {cpu_cores:g} {self.container(node_id)}", e) from None

    def cgroup_dir(self, node_id: str, controller: str = "cpu") -> Path:
        """The container's cgroup directory of `controller` (v1), or its v2 directory."""
        found = cgroup_dir_of(self._pids[node_id], controller)
        if found is None:
            raise ResourceError(f"container {self.container(node_id)}: no {controller} cgroup")
        return found

    # destroy -----------------------------------------------------------------------
    async def destroy(self) -> list[str]:
        """Stop our processes, remove the run's containers, network and host route."""
        for node_id in list(self._procs):
            try:
                await self.stop_execs(node_id)
            except Exception:  # noqa: BLE001 - removal below ends them anyway
                pass
        removed = await remove_docker_run(self.run, self._client)
        for d in self._made_dirs:
            if remove_owned_dir(d, d.parent):  # only what create() made and marked
                removed.append(f"state {d}")
        self._made_dirs.clear()
        self._ids.clear()
        self._pids.clear()
        return removed


def cgroup_procs_of(pid: int) -> list[Path]:
    """The `cgroup.procs` files of process `pid`'s cgroups, one per hierarchy (a container's
    init: writing a PID to each moves that process into the container's cgroups)."""
    root = Path("/sys/fs/cgroup")
    out: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, rel = line.split(":", 2)
        names = [c.removeprefix("name=") for c in ctrls.split(",")] if ctrls else []
        for mount in ([root / ctrls, *(root / n for n in names)] if ctrls else [root, root / "unified"]):
            f = mount / rel.lstrip("/") / "cgroup.procs"
            if f.is_file():
                out.append(f)
                break
    return out


def cgroup_dir_of(pid: int, controller: str = "cpu") -> Path | None:
    """Process `pid`'s cgroup directory of `controller` (v1), or its v2 directory."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, ctrls, rel = line.split(":", 2)
        if controller in ctrls.split(","):
            for mount in (root / ctrls, root / controller):
                if mount.is_dir():
                    return mount / rel.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return None


def cgroup_pids_of(pid: int) -> set[int]:
    """Every process in the cgroup of process `pid` (its pids, cpu or memory hierarchy)."""
    for controller in ("pids", "cpu", "memory"):
        try:
            d = cgroup_dir_of(pid, controller)
            if d is not None:
                return {int(x) for x in (d / "cgroup.procs").read_text().split()}
        except OSError:
            continue
    return set()


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants now (the container's init and its idle child)."""
    out, todo = set(), [pid]
    deadline = time.monotonic() + 2.0
    while todo:
        p = todo.pop()
        out.add(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        if not kids and p == pid and time.monotonic() < deadline:
            time.sleep(0.01)  # docker's init forks the idle command right after start
            todo.append(p)
            out.discard(p)
            continue
        todo += [int(k) for k in kids]
    return out
