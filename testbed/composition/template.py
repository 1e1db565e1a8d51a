"""The agent template: one process per cell that imports torch and the model code once and
forks each device's agent into its node.

Importing torch and diffusers costs seconds of CPU per process; 20 fresh agents on 2
cores would take minutes to come up. The launcher (agents.py) sends the template, over a
unix socket, the agent's argv, environment and log path plus *file descriptors*
(SCM_RIGHTS) of what the node is made of — `cell.join(device)`: its network namespace, one
`cgroup.procs` per hierarchy, and for a container its mount, UTS and IPC namespaces. The
template forks; the child starts its own session, opens its log, joins the cgroups, enters
the namespaces, makes its model variant (still root: its uid may not read e.g. a Hugging
Face cache under /root; the memory counts in the node's cgroup), then drops privileges to
the device's own uid (allocated for the run, node_uids.py: setgroups([]), setgid, setuid,
no_new_privs) and only then runs the agent (methods/device.py), which opens its own
config (`agents/<device>.json`, 0400, owned by that uid). The template never opens a
config or a credential. Forked agents share the template's pages (copy-on-write). Each
agent dies with the template (PR_SET_PDEATHSIG, set after the uid change that would clear
it), and the template with its owner (procs.spawn_in): a `kill -9` of the run owner
leaves no agent running.

Two ways to start it: `python -m testbed.composition.template SOCKET` (a process of its
own, for a run owner that holds torch itself: the TUI, sweeps, library sessions), or
`fork_template` from the cell's worker (worker.py), which imported torch and diffusers
once for the template and the edge server's model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from testbed.emulation.node_uids import drop_privileges
from testbed.emulation.procs import die_with_parent

__all__ = ["serve_template", "fork_template", "import_agent_code", "make_variants", "enter_node",
           "PRELOAD_ENV", "MAX_FDS"]

MAX_FDS = 32  # netns + one cgroup.procs per hierarchy + a container's other namespaces

PRELOAD_ENV = "TESTBED_TEMPLATE_PRELOAD"  # "model:precision,model:precision": variants to load before forking


def import_agent_code() -> None:
    """Everything an agent imports, imported once (torch, diffusers, aiomqtt, the model code
    and every registered method's handler). One torch thread: building a model then runs no
    parallel region, so no thread pool exists at fork time (a forked child cannot use its
    parent's OpenMP threads)."""
    import aiomqtt  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import torch
    from diffusers import DDIMScheduler, UNet2DModel  # noqa: F401

    import testbed.diffusion.models  # noqa: F401
    import testbed.diffusion.stages  # noqa: F401
    import testbed.relay.stage  # noqa: F401
    from testbed.methods import agent_handlers

    import testbed.methods.device  # noqa: F401
    for where in agent_handlers().values():  # an agent (its own uid) may not read the interpreter's files later
        importlib.import_module(where.partition(":")[0])
    torch.set_num_threads(1)


def make_variants(variants: list[tuple[str, str]]) -> None:
    """The model variants (model, precision) made once, before forking: each forked agent
    takes its own, copy-on-write."""
    from testbed.relay.stage import StageModel

    for name, precision in variants:
        StageModel.preload(name, precision)


def variants_from_env() -> list[tuple[str, str]]:
    """$TESTBED_TEMPLATE_PRELOAD ("model:precision,model:precision") as pairs."""
    return [(m, p) for m, _, p in (item.partition(":") for item in os.environ.get(PRELOAD_ENV, "").split(",") if item)]


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def enter_node(fds: list[int], cgroup_fds: int, netns_fd: bool, extra_ns_fds: int) -> None:
    """Join a node as root (what `cell.join` names, received as open files): its cgroups
    (writing "0" to each `cgroup.procs` moves the writer), its network namespace and a
    container's mount, UTS and IPC namespaces. Closes the files."""
    for fd in fds[1:1 + cgroup_fds]:
        os.write(fd, b"0")
    if netns_fd:
        _setns(fds[0])
    for fd in fds[1 + cgroup_fds:1 + cgroup_fds + extra_ns_fds]:
        _setns(fd)  # a container's mnt/uts/ipc (this child is single-threaded)
    for fd in fds:
        os.close(fd)


def _close_inherited(keep: list[int]) -> None:
    """Close every descriptor but stdin/stdout/stderr and `keep`: none of the root
    template's files may reach the agent. (Before entering a container: its /proc does
    not show this process.)"""
    for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child(req: dict[str, Any], fds: list[int], template_pid: int) -> int:
    from setproctitle import setproctitle

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as root, on the host
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _close_inherited(keep=fds)
    enter_node(fds, int(req["cgroup_fds"]), bool(req["netns_fd"]), int(req["extra_ns_fds"]))
    # the node's environment before the model: a GPU share's CUDA MPS variables apply to a
    # CUDA context made here, as root (MPS serves one uid at a time; docs/gpu.md)
    os.environ.update(req.get("env") or {})
    if req.get("model"):  # inside the node (its memory counts), before the uid that cannot read e.g. /root/.cache
        _load_model(*req["model"])
    drop_privileges(int(req["uid"]))
    die_with_parent(template_pid)  # after the uid change, which clears it: the agent ends with its template
    os.chdir("/")
    argv = [str(a) for a in req["argv"]]
    setproctitle(" ".join(argv))
    sys.argv = argv
    from testbed.methods.device import main

    try:
        main(argv[1:])  # the agent opens its own config, as its own uid
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _load_model(name: str, precision: str) -> None:
    """The agent's model variant, made before privileges drop (the template's copy when it
    made one); a failure is left to the agent, which loads again and reports it."""
    from testbed.relay.stage import StageModel

    try:
        StageModel.preload(name, precision)
    except Exception as e:  # noqa: BLE001 - the agent's own load says what is wrong
        print(f"note: loading {name}/{precision} before dropping privileges failed: {e}", flush=True)


def _private_parent(path: str) -> Path | None:
    """The first directory above `path` that other users cannot search, if any."""
    for d in reversed(Path(path).resolve().parents):
        with contextlib.suppress(OSError):
            if not d.stat().st_mode & 0o001:
                return d
    return None


def serve_template(sock_path: str, variants: list[tuple[str, str]] | None = None, *, imported: bool = False,
                   t0: float | None = None) -> None:
    """The template's loop: one fork per request, answered with {"pid": N}. `imported`: the
    agent code is imported already (a template forked from a process that imported it)."""
    t0 = time.perf_counter() if t0 is None else t0
    if not imported:
        import_agent_code()
    make_variants(variants_from_env() if variants is None else variants)
    for where in {sys.base_prefix, sys.prefix}:
        if (d := _private_parent(where)) is not None:  # e.g. a pyenv Python under /root (0700)
            print(f"note: agents run as their own uids and cannot enter {d}: they can import only what this "
                  f"template imported from {where} (install Python outside a private directory to lift this)",
                  flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished agents
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(sock_path)
    path.unlink(missing_ok=True)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(64)
    print(f"agent template ready in {time.perf_counter() - t0:.2f} s (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS)
                if not msg:  # a readiness probe: connected and closed
                    continue
                req = json.loads(msg)
            except (OSError, ValueError) as e:
                print(f"bad request: {e}", flush=True)
                continue
            template_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    srv.close()
                    conn.close()
                    code = _child(req, fds, template_pid)
                except BaseException:  # noqa: BLE001 - the child must never return into the loop
                    traceback.print_exc()
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode())


def fork_template(sock_path: Path, variants: list[tuple[str, str]], log_path: Path) -> int:
    """Fork the template from this process, which has imported the agent code
    (`import_agent_code`) and must be single-threaded, hold no secret and run with the
    allow-listed environment (the worker, worker.py): torch and diffusers are then paid
    once for the template and the edge server's model. The child makes the variants,
    serves `sock_path` and dies with this process. Returns its pid."""
    t0 = time.perf_counter()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    owner = os.getpid()
    pid = os.fork()
    if pid != 0:
        os.close(log)
        return pid
    code = 1
    try:
        os.setsid()
        die_with_parent(owner, signal.SIGTERM)
        os.dup2(log, 1)
        os.dup2(log, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        _close_inherited(keep=[])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        from setproctitle import setproctitle

        setproctitle(f"testbed-agent-template {sock_path}")  # names the run's state: `testbed down` finds it
        serve_template(str(sock_path), variants, imported=True, t0=t0)
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never return into its parent's code
        traceback.print_exc()
    finally:
        os._exit(code)


if __name__ == "__main__":
    serve_template(sys.argv[1])
