"""Find and remove what docker runs left: containers and networks labelled testbed.run.

Used by `DockerBackend.destroy()` and by `testbed down` (runs.py), also for runs whose
supervisor crashed. The node image is kept (`testbed image rm` removes it).

Docker 20.10 sometimes loses count of a network's endpoints when many containers on it
are removed at once; the network then refuses removal ("has active endpoints") until the
daemon restarts, and keeps the cell's 198.18.0.0/16 pool. So teardown first drops the
host-side address and route the testbed put on the bridge, then disconnects the
containers one endpoint at a time, removes them in parallel, and removes the network in a
bounded retry loop that force-disconnects every endpoint it still lists and every
container of the run by name (`docker network disconnect -f`, which clears stale ones).
A failure is a ResourceError naming the object and the fix, never a silent leftover.
"""

from __future__ import annotations

import asyncio
import errno
import time
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.emulation.docker.image import docker_client
from testbed.emulation.docker.spec import RUN_LABEL, bridge_name
from testbed.errors import ResourceError
from testbed.model.names import CELL_NET, HOST_ADDRESS, RUN_ID_RE

__all__ = ["docker_runs", "remove_docker_run", "remove_network", "release_host_side"]

_THREADS = 8
_CONTAINERS_GONE_S = 60.0  # docker rm -f of 21 containers on 2 busy cores: a few seconds
_NETWORK_GONE_S = 30.0
_TOTAL_S = 150.0


def docker_runs(client: docker.DockerClient | None = None) -> dict[str, list[str]]:
    """Run id -> objects ("container NAME", "network NAME") of every docker run on this
    host, found by the label testbed.run."""
    client = client or docker_client()
    out: dict[str, list[str]] = {}
    for c in client.containers.list(all=True, filters={"label": RUN_LABEL}):
        out.setdefault(c.labels.get(RUN_LABEL, "?"), []).append(f"container {c.name}")
    for n in client.networks.list(filters={"label": RUN_LABEL}):
        out.setdefault((n.attrs.get("Labels") or {}).get(RUN_LABEL, "?"), []).append(f"network {n.name}")
    return out


def _remove_container(c) -> str | None:
    try:
        c.remove(force=True)
        return f"container {c.name}"
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as e:
        if e.status_code == 409:  # "removal already in progress" (another `down`): waited for below
            return None
        raise ResourceError(f"docker container {c.name}: {e.explanation or e}; retry `testbed down`") from None


def _wait_containers_gone(client: docker.DockerClient, flt: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [c.name for c in client.containers.list(all=True, filters=flt)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise ResourceError(f"docker containers {', '.join(sorted(left))} are still there {timeout_s:g} s after "
                                "`docker rm -f`; retry `testbed down`, or restart the docker daemon")
        time.sleep(0.2)


def remove_network(client: docker.DockerClient, name: str, endpoint_names: list[str] = (),
                   timeout_s: float = _NETWORK_GONE_S) -> bool:
    """Remove network `name`, force-disconnecting what still holds it; False if it was gone.

    `endpoint_names`: the containers that were attached (a stale endpoint outlives its
    container; `disconnect(..., force=True)` by name clears it). Bounded: ResourceError
    after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        net = None
        try:
            net = client.networks.get(name)
            net.remove()
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as e:
            if time.monotonic() + delay > deadline:
                raise ResourceError(
                    f"docker network {name}: {e.explanation or e} after {timeout_s:g} s of retries and forced "
                    f"disconnects; run `testbed down --all` again, or restart the docker daemon"
                ) from None
        # still held ("has active endpoints"): clear what holds it, wait, retry
        listed = (net.attrs.get("Containers") or {}) if net is not None else {}
        attached = {v.get("Name") or k for k, v in listed.items()}
        for ep in sorted(attached | set(endpoint_names)):
            try:
                client.api.disconnect_container_from_network(ep, name, force=True)
            except docker.errors.APIError:
                pass  # not attached: nothing to clear
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def release_host_side(run_id: str) -> list[str]:
    """Drop what the testbed added to the run's docker bridge: the host's /32 and the route
    to the cell. Done before the network is removed, so that a network docker fails to
    remove does not keep the host's route to 198.18.0.0/16 from the next run."""
    removed: list[str] = []
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge_name(run_id))
        if not found:
            return removed
        try:
            ipr.route("del", dst=CELL_NET, oif=found[0])
            removed.append(f"route {CELL_NET} via {bridge_name(run_id)}")
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):  # no such route: another run holds it
                raise
        try:
            ipr.addr("del", index=found[0], address=HOST_ADDRESS, prefixlen=32)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise
    return removed


def _detach_one_by_one(client: docker.DockerClient, networks: list) -> None:
    """Disconnect every container from the run's networks, one endpoint at a time.

    Measured here (docker 20.10, 21 containers): `rm -f` of all containers in parallel left
    a network with a stale endpoint count in 1 of 25 cycles, which only a daemon restart
    clears; disconnecting first, one by one, then removing in parallel left none in 50.
    """
    for net in networks:
        for cid in (net.attrs.get("Containers") or {}):
            try:
                client.api.disconnect_container_from_network(cid, net.id)
            except docker.errors.APIError:
                pass  # stopped or gone meanwhile: its removal releases the endpoint


def _inspect(client: docker.DockerClient, network_id: str):
    """The network with its endpoints (a list entry has none), None when it is gone."""
    try:
        return client.networks.get(network_id)
    except docker.errors.NotFound:
        return None


def _remove_sync(client: docker.DockerClient, run_id: str | None) -> list[str]:
    flt = {"label": f"{RUN_LABEL}={run_id}" if run_id else RUN_LABEL}
    removed: list[str] = []
    networks = [n for n in (_inspect(client, n.id) for n in client.networks.list(filters=flt)) if n is not None]
    for n in networks:
        run = (n.attrs.get("Labels") or {}).get(RUN_LABEL, "")
        if RUN_ID_RE.fullmatch(run):
            removed += release_host_side(run)
    _detach_one_by_one(client, networks)
    containers = client.containers.list(all=True, filters=flt)
    names = [c.name for c in containers]
    with ThreadPoolExecutor(_THREADS, thread_name_prefix="tb-docker-rm") as ex:
        removed += [r for r in ex.map(_remove_container, containers) if r]
    _wait_containers_gone(client, flt, _CONTAINERS_GONE_S)
    for n in networks:
        if remove_network(client, n.name, names):
            removed.append(f"network {n.name}")
    return removed


async def remove_docker_run(run_id: str | None, client: docker.DockerClient | None = None) -> list[str]:
    """Remove the containers and networks labelled with `run_id` (every run's when None);
    idempotent. The node image is kept: `testbed image rm` removes it."""
    try:
        client = client or await asyncio.to_thread(docker_client)
    except ResourceError:
        return []  # no daemon: nothing of ours can exist
    try:
        return await asyncio.wait_for(asyncio.to_thread(_remove_sync, client, run_id), timeout=_TOTAL_S)
    except TimeoutError:
        raise ResourceError(f"docker did not remove run {run_id or '(all)'} within {_TOTAL_S:g} s; "
                            "retry `testbed down`") from None
    except docker.errors.DockerException as e:  # the daemon went away mid-way, a socket timeout
        raise ResourceError(f"docker, removing run {run_id or '(all)'}: {e}; retry `testbed down`") from None
