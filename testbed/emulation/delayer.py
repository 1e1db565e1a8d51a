"""The NFQUEUE delayer: one process per cell, titled `testbed-delayer <run>`, that adds
delay and jitter where the kernel has no sch_netem; and `DelayerHandle`, its owner's side.

iptables rules on each receiver's INPUT chain (impair.py) queue a link's packets to a
netfilter queue; the delayer holds every packet until it is due (arrival + delay + a
uniform draw in [-jitter, +jitter]), never before an earlier packet of the same flow
(protocol, addresses, ports), then accepts it. A queue belongs to one network namespace,
so the delayer keeps one nfnetlink socket per namespace, each made by a thread that
entered it. Its owner talks to it over stdin/stdout, one JSON object per line:

    {"op": "add", "netns": PATH, "queue": N, "delay_ms": D, "jitter_ms": J}  -> {"ok": true}
    {"op": "set", ...same fields...}                                          -> {"ok": true}
    {"op": "stats"}   -> {"packets": ..., "held": ..., "late_us_mean": ..., "cpu_s": ...}

End of stdin (the owner exited, also by kill -9) or SIGTERM: release what it holds, exit.

It runs SCHED_FIFO (priority 10) where it may, else at nice -10: it stands in for netem,
which times packets in the kernel's softirq, and on a loaded host an ordinary process
wakes milliseconds late. It sleeps in select() between packets, so it takes only the CPU
its packets need (bench/links.py measures it).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from testbed.emulation.environ import clean_environ
from testbed.emulation.nfqueue import flow_key
from testbed.errors import ResourceError

__all__ = ["PROCESS_TITLE", "DelayerHandle", "Delayer", "main"]

PROCESS_TITLE = "testbed-delayer"
_RELEASE_SLACK_S = 50e-6  # release a packet this early rather than sleep a few microseconds more
_FLOW_SWEEP_S = 1.0
_RT_PRIORITY = 10


def _prioritize() -> str:
    """Real-time scheduling where allowed (root, and an RT budget in its cgroup), else a nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))
        return f"SCHED_FIFO {_RT_PRIORITY}"
    except OSError:
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "normal"


class Delayer:
    """The delaying loop (runs inside the delayer process)."""

    def __init__(self) -> None:
        from testbed.emulation.nfqueue import NfQueueSocket

        self._socket_type = NfQueueSocket
        self.sockets: dict[str, Any] = {}  # netns path -> NfQueueSocket
        self.queues: dict[tuple[str, int], tuple[float, float]] = {}  # -> (delay s, jitter s)
        self._heap: list[tuple[float, int, str, int, int]] = []  # (due, seq, netns, queue, packet id)
        self._last_due: dict[tuple[str, bytes], float] = {}
        self._seq = 0
        self.packets = 0
        self.max_held = 0
        self._late_sum_s = 0.0
        self._late_max_s = 0.0
        self._rng = random.Random()
        self.scheduling = "normal"

    # -- configuration ------------------------------------------------------------------
    def configure(self, op: str, netns: str, queue: int, delay_ms: float, jitter_ms: float) -> None:
        if not (0 <= jitter_ms <= delay_ms < 60_000):
            raise ValueError(f"queue {queue}: need 0 <= jitter_ms <= delay_ms < 60000 (got {delay_ms}, {jitter_ms})")
        key = (netns, int(queue))
        if op == "add" and key not in self.queues:
            if netns not in self.sockets:
                from testbed.emulation.nsutil import in_netns

                # its own namespace needs no setns (and no CAP_SYS_ADMIN): a delayer inside a
                # device container on a Swarm node holds NET_ADMIN only
                own = os.stat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino
                self.sockets[netns] = self._socket_type() if own else in_netns(netns, self._socket_type)
            self.sockets[netns].configure(int(queue))
        elif key not in self.queues:
            raise ValueError(f"queue {queue} in {netns} was never added")
        self.queues[key] = (delay_ms / 1e3, jitter_ms / 1e3)

    # -- packets ------------------------------------------------------------------------
    def receive(self, netns: str, now: float) -> None:
        heap, last_due, queues = self._heap, self._last_due, self.queues
        packets = self.sockets[netns].read()
        self.packets += len(packets)
        for p in packets:
            delay, jitter = queues.get((netns, p.queue), (0.0, 0.0))
            due = now + delay + (self._rng.uniform(-jitter, jitter) if jitter else 0.0)
            flow = (netns, flow_key(p.head))
            prev = last_due.get(flow, 0.0)
            if prev > due:  # never overtake the flow's earlier packets
                due = prev
            last_due[flow] = due
            self._seq += 1
            heapq.heappush(heap, (due, self._seq, netns, p.queue, p.packet_id))
        self.max_held = max(self.max_held, len(heap))

    def release(self, now: float, everything: bool = False) -> None:
        due_now: dict[str, list[tuple[int, int]]] = {}
        heap = self._heap
        while heap and (everything or heap[0][0] <= now + _RELEASE_SLACK_S):
            due, _, netns, queue, pid = heapq.heappop(heap)
            late = now - due
            if late > 0:
                self._late_sum_s += late
                self._late_max_s = max(self._late_max_s, late)
            due_now.setdefault(netns, []).append((queue, pid))
        for netns, items in due_now.items():
            self.sockets[netns].accept(items)

    def sweep_flows(self, now: float) -> None:
        self._last_due = {k: v for k, v in self._last_due.items() if v > now}

    def stats(self) -> dict[str, Any]:
        t = os.times()
        return {"packets": self.packets, "held": len(self._heap), "max_held": self.max_held,
                "late_us_mean": round(1e6 * self._late_sum_s / self.packets, 1) if self.packets else 0.0,
                "late_us_max": round(1e6 * self._late_max_s, 1), "cpu_s": round(t.user + t.system, 3),
                "queues": len(self.queues), "namespaces": len(self.sockets), "scheduling": self.scheduling}

    # -- the loop -------------------------------------------------------------------------
    def run(self, control_fd: int, reply: Any) -> None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        os.set_blocking(control_fd, False)
        pending = b""
        next_sweep = time.monotonic() + _FLOW_SWEEP_S
        by_fd: dict[int, str] = {}
        fds = [control_fd]
        while not stop.is_set():
            if len(by_fd) != len(self.sockets):  # a namespace was added
                by_fd = {s.fileno(): ns for ns, s in self.sockets.items()}
                fds = [control_fd, *by_fd]
            now = time.monotonic()
            timeout = max(0.0, self._heap[0][0] - now) if self._heap else _FLOW_SWEEP_S
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                if fd != control_fd:
                    self.receive(by_fd[fd], now)
                    continue
                chunk = os.read(control_fd, 65536)
                if not chunk:  # the owner is gone
                    stop.set()
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    reply(self._command(line))
            self.release(time.monotonic())
            if now >= next_sweep:
                self.sweep_flows(now)
                next_sweep = now + _FLOW_SWEEP_S
        self.release(time.monotonic(), everything=True)

    def _command(self, line: bytes) -> dict[str, Any]:
        try:
            cmd = json.loads(line)
            if cmd.get("op") == "stats":
                return self.stats()
            if cmd.get("op") not in ("add", "set"):
                raise ValueError(f"unknown op {cmd.get('op')!r}; ops: add, set, stats")
            self.configure(cmd["op"], str(cmd["netns"]), int(cmd["queue"]), float(cmd["delay_ms"]),
                           float(cmd.get("jitter_ms", 0.0)))
            return {"ok": True}
        except (ValueError, KeyError, OSError, ResourceError) as e:
            return {"ok": False, "error": str(e)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m testbed.emulation.delayer RUN", file=sys.stderr)
        return 2
    import setproctitle

    setproctitle.setproctitle(f"{PROCESS_TITLE} {args[0]}")
    out = sys.stdout

    def reply(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    delayer = Delayer()
    delayer.scheduling = _prioritize()
    delayer.run(sys.stdin.fileno(), reply)
    return 0


class DelayerHandle:
    """The owner's side: starts the cell's delayer and sends it commands.

    The delayer runs in the root namespace, outside the nodes' cgroups (it emulates the
    link, like a qdisc, and is not the server's workload), in its own session."""

    def __init__(self, run_id: str, log_path: str | None = None):
        self.run_id = run_id
        if log_path:
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "testbed.emulation.delayer", run_id],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                env=clean_environ(),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, doc: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """Send one command, return its answer (ResourceError when the delayer is gone)."""
        with self._lock:
            if self.proc.poll() is not None:
                raise ResourceError(f"the delayer of run {self.run_id} exited ({self.proc.returncode}); "
                                    "see its log in the run directory")
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(doc).encode() + b"\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
            line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise ResourceError(f"the delayer of run {self.run_id} did not answer {doc.get('op')!r} "
                                f"within {timeout_s:g} s")
        return json.loads(line)

    def queue(self, op: str, netns: str, queue: int, delay_ms: float, jitter_ms: float) -> None:
        answer = self.request({"op": op, "netns": netns, "queue": queue, "delay_ms": delay_ms,
                               "jitter_ms": jitter_ms})
        if not answer.get("ok"):
            raise ResourceError(f"delayer: netfilter queue {queue} in {netns}: {answer.get('error')} "
                                "(the kernel needs nfnetlink_queue and the NFQUEUE target)")

    def stop(self, timeout_s: float = 3.0) -> None:
        """Close its stdin (it releases what it holds and exits), SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


if __name__ == "__main__":
    sys.exit(main())
