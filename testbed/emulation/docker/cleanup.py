"""Find and remove what docker runs left: containers and networks labelled testbed.run.

Used by `DockerBackend.destroy()` and by `testbed down` (runs.py), also for runs whose
supervisor crashed. The node image is kept (`testbed image rm` removes it).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors

from testbed.emulation.docker.image import docker_client
from testbed.emulation.docker.spec import RUN_LABEL
from testbed.errors import ResourceError

__all__ = ["docker_runs", "remove_docker_run"]

_THREADS = 8


def docker_runs(client: docker.DockerClient | None = None) -> dict[str, list[str]]:
    """Run id -> container names of every docker run on this host (labels)."""
    client = client or docker_client()
    out: dict[str, list[str]] = {}
    for c in client.containers.list(all=True, filters={"label": RUN_LABEL}):
        out.setdefault(c.labels.get(RUN_LABEL, "?"), []).append(c.name)
    for n in client.networks.list(filters={"label": RUN_LABEL}):
        out.setdefault(n.attrs.get("Labels", {}).get(RUN_LABEL, "?"), [])
    return out


def _remove_sync(client: docker.DockerClient, run_id: str | None) -> list[str]:
    flt = {"label": f"{RUN_LABEL}={run_id}" if run_id else RUN_LABEL}
    removed: list[str] = []
    containers = client.containers.list(all=True, filters=flt)

    def rm(c) -> str | None:
        try:
            c.remove(force=True)
            return f"container {c.name}"
        except docker.errors.NotFound:
            return None

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="tb-docker-rm") as ex:
        removed += [r for r in ex.map(rm, containers) if r]
    for n in client.networks.list(filters=flt):
        try:
            n.remove()
            removed.append(f"network {n.name}")
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            raise ResourceError(f"docker network {n.name}: {e.explanation or e}") from None
    return removed


async def remove_docker_run(run_id: str | None, client: docker.DockerClient | None = None) -> list[str]:
    """Remove the containers and networks labelled with `run_id` (every run's when None);
    idempotent. The node image is kept: `testbed image rm` removes it."""
    try:
        client = client or await asyncio.to_thread(docker_client)
    except ResourceError:
        return []  # no daemon: nothing of ours can exist
    try:
        return await asyncio.wait_for(asyncio.to_thread(_remove_sync, client, run_id), timeout=120)
    except TimeoutError:
        raise ResourceError(f"docker did not remove run {run_id or '(all)'} within 120 s; retry `testbed down`") from None
