"""A template process that imports heavy modules (torch) once and forks node processes.

Importing torch in 20 fresh processes costs tens of seconds on two cores (DESIGN.md,
Compute); forking a process that already imported it costs milliseconds. The template
(`python -m testbed.emulation.forkserver SOCKET --preload torch,...`) listens on a Unix
socket (root-only, in the run's state directory); for each request it forks a child that
enters the node's network namespace and cgroups, starts its own session, redirects
stdout/stderr to the log, sets the environment and argv, then runs a module as __main__
(`runpy`). The template reaps its children and answers status queries.

Requests and replies are single JSON lines (never pickle):
    {"op": "spawn", "netns": PATH, "cgroup_procs": [...], "module": "pkg.mod",
     "argv": [...], "env": {...}, "log": PATH, "torch_threads": N}  -> {"pid": N}
    {"op": "status", "pid": N}  -> {"returncode": N | null}
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ForkServer", "start_forkserver"]

_CLONE_NEWNET = 0x40000000
_MAX_REQUEST_BYTES = 1 << 20


# --- the template process ---------------------------------------------------------------
def _child(req: dict[str, Any]) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setsid()
        for p in req.get("cgroup_procs", []):
            with open(p, "w") as f:
                f.write("0")
        if req.get("netns"):
            fd = os.open(req["netns"], os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if req.get("log") else os.open(os.devnull, os.O_WRONLY)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(req.get("env") or {})
        if req.get("torch_threads") and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(req["torch_threads"]))
        sys.argv = [req["module"], *req.get("argv", [])]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the child's log, then exit 1
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(sock_path: str, preload: list[str]) -> None:
    for mod in preload:
        importlib.import_module(mod)
    exits: dict[int, int] = {}
    children: set[int] = set()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    tmp = sock_path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    srv.bind(tmp)
    os.umask(old)
    srv.listen(64)
    os.rename(tmp, sock_path)  # the socket appears only once it accepts
    srv.settimeout(0.2)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(json.dumps({"ready": True, "pid": os.getpid(), "preloaded": preload}), flush=True)
    while not stop:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    exits[pid] = os.waitstatus_to_exitcode(status)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(10)
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < _MAX_REQUEST_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            try:
                req = json.loads(buf)
                if req["op"] == "spawn":
                    pid = os.fork()
                    if pid == 0:
                        srv.close()
                        conn.close()
                        _child(req)
                    children.add(pid)
                    reply: dict[str, Any] = {"pid": pid}
                elif req["op"] == "status":
                    pid = int(req["pid"])
                    if pid in children:
                        with contextlib.suppress(ChildProcessError):
                            done, status = os.waitpid(pid, os.WNOHANG)
                            if done:
                                children.discard(pid)
                                exits[pid] = os.waitstatus_to_exitcode(status)
                    reply = {"returncode": exits.get(pid)} if pid in exits or pid in children else {"error": "unknown pid"}
                else:
                    reply = {"error": f"unknown op {req['op']!r}"}
            except (ValueError, KeyError, TypeError, OSError) as e:
                reply = {"error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")
    for pid in children:  # the template's own children die with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)


# --- the client side ----------------------------------------------------------------------
@dataclass
class ForkServer:
    pid: int
    sock_path: Path
    preload: tuple[str, ...]

    async def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.sock_path))
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
        finally:
            writer.close()
        reply = json.loads(line)
        if "error" in reply:
            from testbed.errors import ResourceError

            raise ResourceError(f"forkserver: {reply['error']}")
        return reply

    async def spawn(self, module: str, argv: list[str], env: dict[str, str] | None, log_path: Path | None,
                    netns: str | None, cgroup_procs: list[Path], torch_threads: int | None = None) -> int:
        reply = await self._ask({"op": "spawn", "module": module, "argv": list(argv), "env": env or {},
                                 "log": str(log_path) if log_path else None, "netns": netns,
                                 "cgroup_procs": [str(p) for p in cgroup_procs], "torch_threads": torch_threads})
        return int(reply["pid"])

    async def returncode(self, pid: int) -> int | None:
        return (await self._ask({"op": "status", "pid": pid}))["returncode"]


async def start_forkserver(sock_path: Path, preload: tuple[str, ...], log_path: Path,
                           timeout_s: float = 120.0) -> tuple[ForkServer, Any]:
    """Start the template (in the caller's namespace, outside every node cgroup) and wait
    until it has imported `preload` and listens."""
    from testbed.emulation.procs import spawn_in
    from testbed.errors import ResourceError

    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    proc = await asyncio.to_thread(spawn_in, None, [sys.executable, "-m", "testbed.emulation.forkserver",
                                                    str(sock_path), "--preload", ",".join(preload)], None, log_path)
    deadline = time.monotonic() + timeout_s
    while not sock_path.exists():
        if proc.poll() is not None:
            raise ResourceError(f"forkserver exited with code {proc.returncode} while importing {preload}; see {log_path}")
        if time.monotonic() > deadline:
            raise ResourceError(f"forkserver not ready within {timeout_s:g} s; see {log_path}")
        await asyncio.sleep(0.05)
    return ForkServer(proc.pid, sock_path, tuple(preload)), proc


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="testbed-forkserver")
    ap.add_argument("socket")
    ap.add_argument("--preload", default="")
    args = ap.parse_args(argv)
    serve(args.socket, [m for m in args.preload.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
