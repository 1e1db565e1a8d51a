"""Processes inside node containers: `docker exec`, output streamed to a host log file.

A process the testbed starts in a container (the broker, an agent) is a docker exec whose
output a daemon thread copies into the log file on the host, so the container needs no
writable mount for logs. Its host PID comes from `exec_inspect`; stopping it signals that
PID (SIGTERM, then SIGKILL) — the process is ours, started by us.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from testbed.emulation.procs import pid_alive, stop_pid
from testbed.errors import ResourceError

__all__ = ["ExecProcess", "exec_start", "exec_start_sync"]

_START_TIMEOUT_S = 15.0


@dataclass
class ExecProcess:
    """A process started with docker exec; quacks like the parts of `subprocess.Popen`
    the emulation uses (`pid`, `poll()`, `returncode`)."""

    client: docker.DockerClient
    exec_id: str
    container: str
    argv: list[str]
    pid: int
    log_path: Path | None
    _thread: threading.Thread | None = field(default=None, repr=False)
    returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        if self.returncode is not None:
            return self.returncode
        if self.pid > 0 and pid_alive(self.pid):
            return None  # no daemon round trip while the process runs
        try:
            info = self.client.api.exec_inspect(self.exec_id)
        except docker.errors.NotFound:  # its container is gone
            self.returncode = -9
            return self.returncode
        except docker.errors.APIError:
            return None
        if not info.get("Running") and info.get("ExitCode") is not None:
            self.returncode = int(info["ExitCode"])
        return self.returncode

    def alive(self) -> bool:
        return self.returncode is None and pid_alive(self.pid)

    async def stop(self, timeout_s: float = 3.0) -> None:
        if self.pid > 0 and pid_alive(self.pid):
            await stop_pid(self.pid, timeout_s)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)
        await asyncio.to_thread(self.poll)


def _pump(stream, log_path: Path | None) -> None:
    """Copy an exec's output stream into `log_path` until the process ends."""
    try:
        if log_path is None:
            for _ in stream:
                pass
            return
        with open(log_path, "ab", buffering=0) as f:
            for chunk in stream:
                f.write(chunk)
    except Exception:  # noqa: BLE001 - the daemon closed the stream: the process is gone
        pass


def exec_start_sync(
    client: docker.DockerClient,
    container: str,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    workdir: str | None = None,
    user: str | None = None,
) -> ExecProcess:
    """Start `argv` in `container` (as `user`, "uid:gid", when given); return once it has a PID (bounded)."""
    if not argv:
        raise ResourceError("spawn: empty command line")
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ex = client.api.exec_create(container, list(argv), stdout=True, stderr=True, environment=env or {},
                                    workdir=workdir, user=user or "")
        stream = client.api.exec_start(ex["Id"], stream=True, demux=False)
    except docker.errors.NotFound:
        raise ResourceError(f"container {container} does not exist (was the run taken down?)") from None
    except docker.errors.APIError as e:
        raise ResourceError(f"docker exec {argv[0]} in {container}: {e.explanation or e}") from None
    t = threading.Thread(target=_pump, args=(stream, log_path), name=f"tb-exec-{container}", daemon=True)
    t.start()
    proc = ExecProcess(client, ex["Id"], container, list(argv), 0, log_path, t)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = client.api.exec_inspect(ex["Id"])
        if info.get("Pid"):
            proc.pid = int(info["Pid"])
            if not info.get("Running") and info.get("ExitCode") is not None:
                proc.returncode = int(info["ExitCode"])
            return proc
        if not info.get("Running") and info.get("ExitCode") is not None:
            proc.returncode = int(info["ExitCode"])
            if proc.returncode == 126 or proc.returncode == 127:
                raise ResourceError(f"spawn in {container}: {argv[0]!r} cannot be run there (exit {proc.returncode}); "
                                    "is the path visible inside the container?")
            return proc
        time.sleep(0.02)
    raise ResourceError(f"docker exec {argv[0]} in {container} did not start within {_START_TIMEOUT_S:g} s")


async def exec_start(client: docker.DockerClient, container: str, argv: Sequence[str], **kw) -> ExecProcess:
    """`exec_start_sync` in a worker thread (keyword arguments: env, log_path, workdir, user)."""
    return await asyncio.to_thread(exec_start_sync, client, container, argv, **kw)
