"""A node's Docker daemon: start it inside the node (its network namespace, a mount and
UTS namespace of its own, its cgroup), wait until it answers, find its pid, stop the node.

The launcher (`LAUNCHER`, a short sh script run by `unshare --mount --uts`) gives the
daemon what a host would: a /sys that shows the node's own interfaces (the host's /sys
shows the root namespace's, and its cgroup hierarchies are moved over), its own
/run/containerd (where containerd's shims put their sockets; the node's directory is
mounted there) and its host name. Mounts made by the daemon stay in its mount namespace,
so they vanish with it: nothing of a node is ever mounted on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import docker
import docker.errors

from testbed.emulation.cluster import cgroup_tree
from testbed.emulation.cluster.plan import ClusterPlan, NodePlan, daemon_config
from testbed.emulation.procs import pid_alive, spawn_in
from testbed.errors import ResourceError

__all__ = ["LAUNCHER", "SBIN_PATH", "prepare_node_dirs", "start_daemon", "wait_daemon", "daemon_pid", "stop_node",
           "node_client"]

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: $1 host name, $2 scratch directory, $3 the node's containerd directory; then the command.
LAUNCHER = r"""
set -e
host=$1; scratch=$2; ctrd=$3; shift 3
mount --rbind /sys "$scratch"
umount -l /sys
mount -t sysfs sysfs /sys
for sub in fs/cgroup kernel/security; do
  if mountpoint -q "$scratch/$sub"; then mount --move "$scratch/$sub" "/sys/$sub"; fi
done
umount -l "$scratch"
mount --bind "$ctrd" /run/containerd
hostname "$host"
exec "$@"
"""
_API_TIMEOUT_S = 30


def prepare_node_dirs(plan: ClusterPlan, node: NodePlan) -> None:
    """The node's directories and daemon.json; its run directory (exec root, containerd's
    sockets) starts empty, as /run after a reboot."""
    if node.run_dir.exists():
        shutil.rmtree(node.run_dir)
    if not Path("/run/containerd").is_dir():
        raise ResourceError("/run/containerd is missing: the node's own containerd directory is mounted there")
    for d in (node.run_dir, node.exec_root, node.containerd_run, node.sys_scratch, node.data_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    node.config_file.write_text(json.dumps(daemon_config(plan, node), indent=2) + "\n")


def start_daemon(plan: ClusterPlan, node: NodePlan) -> subprocess.Popen:
    """Start the node's dockerd (its containerd is its child); returns at once."""
    dockerd = shutil.which("dockerd", path=SBIN_PATH)
    if dockerd is None:
        raise ResourceError("dockerd is not installed; `apt-get install docker.io`")
    prepare_node_dirs(plan, node)
    procs = [d / "cgroup.procs" for d in cgroup_tree.make(f"{node.cgroup}/daemon")]
    argv = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", LAUNCHER, "tbc-launch",
            node.hostname, str(node.sys_scratch), str(node.containerd_run),
            dockerd, "--config-file", str(node.config_file)]
    return spawn_in(node.netns, argv, env={"PATH": SBIN_PATH}, log_path=node.log, cgroup_procs=procs,
                    die_with_owner=False)  # the cluster outlives `testbed cluster up`


def node_client(node: NodePlan, timeout_s: int = _API_TIMEOUT_S) -> docker.DockerClient:
    return docker.DockerClient(base_url=node.docker_host, timeout=timeout_s)


def wait_daemon(node: NodePlan, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> docker.DockerClient:
    """A client of the node's daemon once it answers; ResourceError with its log's tail
    when it exits or does not answer in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        if node.socket.exists():
            try:
                client = node_client(node)
                client.ping()
                return client
            except (docker.errors.DockerException, OSError):
                pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = node.log.read_text(errors="replace")[-1500:] if node.log.exists() else "(no log)"
            why = f"exited with code {proc.returncode}" if proc is not None and proc.poll() is not None \
                else f"did not answer within {timeout_s:g} s"
            raise ResourceError(f"the docker daemon of node {node.name} ({node.netns}) {why}; its log {node.log}:\n{tail}")
        time.sleep(0.1)


def daemon_pid(node: NodePlan) -> int | None:
    """The node's dockerd pid (its pid file), when that process is alive."""
    try:
        pid = int(node.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def stop_node(node: NodePlan) -> set[int]:
    """SIGKILL everything the node runs, as a host losing power: its dockerd, containerd,
    shims, containers (and the registry, on the manager). Returns the pids killed."""
    killed = cgroup_tree.kill(node.cgroup)
    for pid in killed:  # reap what this process started itself
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return killed
