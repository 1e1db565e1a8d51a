"""GPU shares of device profiles as CUDA MPS limits: find the GPU, plan each device's
share, run one MPS control daemon per cell, and say in the status whether limits apply.

Plan, apply, read back: `detect_gpu` reads what the host has (nvidia-smi,
nvidia-cuda-mps-control); `plan_gpu` decides, without side effects, which devices run
under which share and, where none does, why; `MpsDaemon` (an async context manager)
starts the cell's control daemon with its pipe and log directories under the run's state
and stops it with `quit` on its control pipe; `CellGpu` joins them for `Emulation`: the
environment of each device's processes (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` and the pipe
directory) and the `gpu` record of `testbed status`. Without a GPU nothing is started,
no environment changes and the record says that the shares are not applied and why.
Nothing here imports torch or touches the GPU itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.emulation.procs import pid_alive
from testbed.errors import InputError, ResourceError

__all__ = [
    "MPS_CONTROL",
    "SHARE_ENV",
    "PIPE_ENV",
    "LOG_ENV",
    "GpuInfo",
    "GpuPlan",
    "MpsDirs",
    "MpsDaemon",
    "CellGpu",
    "detect_gpu",
    "plan_gpu",
    "share_env",
    "mps_dirs",
    "mps_start_command",
    "mps_quit_command",
    "mps_pids",
    "stop_mps",
]

MPS_CONTROL = "nvidia-cuda-mps-control"
SMI = "nvidia-smi"
SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
#: Where NVIDIA's tools live when they are not on PATH (driver containers, CUDA installs).
NVIDIA_BIN_DIRS = ("/usr/local/nvidia/bin", "/usr/local/cuda/bin", "/usr/bin")


def _which(name: str, path: str | None) -> str | None:
    """`name` on `path` (PATH when None, then NVIDIA_BIN_DIRS)."""
    if path is not None:
        return shutil.which(name, path=path)
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(NVIDIA_BIN_DIRS))


@dataclass(frozen=True)
class GpuInfo:
    """What the host offers: its NVIDIA GPUs (by nvidia-smi) and the MPS control binary."""

    names: tuple[str, ...] = ()
    driver: str | None = None
    mps_control: str | None = None
    problem: str | None = "not detected"  # why no GPU is usable (None when one is)
    looked: bool = True  # False: not looked for (nothing would use it)

    @property
    def present(self) -> bool:
        return bool(self.names) and self.problem is None

    def to_json(self) -> dict[str, Any]:
        """`present` is null where nobody looked."""
        return {"present": self.present if self.looked else None, "gpus": list(self.names), "driver": self.driver,
                "mps_control": self.mps_control}


def detect_gpu(path: str | None = None, timeout_s: float = 15.0) -> GpuInfo:
    """The host's NVIDIA GPUs, as `nvidia-smi --query-gpu=name,driver_version` lists them,
    and where nvidia-cuda-mps-control is. `path` replaces PATH (tests put fakes there)."""
    smi = _which(SMI, path)
    mps = _which(MPS_CONTROL, path)
    if smi is None:
        return GpuInfo(mps_control=mps, problem=f"{SMI} is not on PATH: no NVIDIA driver on this host")
    try:
        r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GpuInfo(mps_control=mps, problem=f"{smi} did not answer ({e})")
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
        return GpuInfo(mps_control=mps, problem=f"{smi} found no usable GPU: {why[0]}")
    rows = [[c.strip() for c in line.split(",")] for line in r.stdout.splitlines() if line.strip()]
    names = tuple(row[0] for row in rows if row[0])
    if not names:
        return GpuInfo(mps_control=mps, problem=f"{smi} lists no GPU")
    driver = rows[0][1] if len(rows[0]) > 1 else None
    return GpuInfo(names, driver, mps, None)


def share_env(share_pct: int, pipe_dir: Path) -> dict[str, str]:
    """The environment of a process that may use `share_pct` % of the GPU's threads
    through the MPS daemon whose pipes are in `pipe_dir` (read at its first CUDA call)."""
    if isinstance(share_pct, bool) or not isinstance(share_pct, int) or not 1 <= share_pct <= 100:
        raise InputError(f"gpu_share_pct: {share_pct!r} is not a whole percentage in 1-100; fix the device profile")
    return {SHARE_ENV: str(share_pct), PIPE_ENV: str(pipe_dir)}


@dataclass(frozen=True)
class GpuPlan:
    """Which devices run under which share of the GPU; `why` says what is applied or why not."""

    info: GpuInfo
    shares_pct: dict[str, int]  # every device whose profile has a share
    applies: bool
    why: str


def _shares_text(shares: Mapping[str, int], most: int = 4) -> str:
    items = [f"{d} {s} %" for d, s in sorted(shares.items())]
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def plan_gpu(info: GpuInfo, shares: Mapping[str, int | None], limits: bool = True,
             backend_problem: str | None = None) -> GpuPlan:
    """The cell's GPU plan (pure): the shares apply when limits are on, some device's
    profile has one, the host has a GPU and nvidia-cuda-mps-control, and the backend can
    give its nodes the GPU (`backend_problem` None)."""
    wanted = {d: int(s) for d, s in shares.items() if s is not None}
    for s in wanted.values():
        share_env(s, Path("/"))  # the same check as when the environment is made
    if not limits:
        return GpuPlan(info, {}, False, "limits are off in this cell: no device gets a GPU share")
    if not wanted:
        return GpuPlan(info, {}, False, "no device's profile has gpu_share_pct: there is no GPU share to apply")
    missing = f"the profiles' GPU shares ({_shares_text(wanted)}) are not applied"
    if not info.present:
        return GpuPlan(info, wanted, False, f"{info.problem}; {missing}")
    if info.mps_control is None:
        return GpuPlan(info, wanted, False, f"{MPS_CONTROL} is not on PATH (it comes with the NVIDIA driver's "
                                            f"utilities); {missing}")
    if backend_problem is not None:
        return GpuPlan(info, wanted, False, f"{backend_problem}; {missing}")
    return GpuPlan(info, wanted, True, f"{len(wanted)} device(s) run under CUDA MPS on {info.names[0]} "
                                       f"with their profile's share ({_shares_text(wanted)})")


@dataclass(frozen=True)
class MpsDirs:
    """The MPS daemon's pipe directory (clients find it through CUDA_MPS_PIPE_DIRECTORY) and
    its log directory."""

    pipe: Path
    log: Path


def mps_dirs(state_dir: Path) -> MpsDirs:
    """A run's MPS directories, under its state directory (removed with it)."""
    return MpsDirs(Path(state_dir) / "mps" / "pipe", Path(state_dir) / "mps" / "log")


def mps_start_command(control: str, dirs: MpsDirs) -> tuple[list[str], dict[str, str]]:
    """argv and the environment entries that start a control daemon on `dirs`."""
    return [control, "-d"], {PIPE_ENV: str(dirs.pipe), LOG_ENV: str(dirs.log)}


def mps_quit_command(control: str, dirs: MpsDirs) -> tuple[list[str], dict[str, str], bytes]:
    """argv, environment entries and stdin that send `quit` to the daemon on `dirs`."""
    return [control], {PIPE_ENV: str(dirs.pipe), LOG_ENV: str(dirs.log)}, b"quit\n"


def mps_pids(pipe_dir: Path) -> set[int]:
    """The MPS control daemon and servers serving `pipe_dir`: processes whose command line
    names nvidia-cuda-mps and whose environment holds that pipe directory (its clients
    carry the same variable but are not MPS programs)."""
    needle = f"{PIPE_ENV}={pipe_dir}".encode()
    found: set[int] = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if b"nvidia-cuda-mps" not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            if needle in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                found.add(int(p))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = {p for p in pids if pid_alive(p)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop_mps(dirs: MpsDirs, control: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """Stop the MPS daemon (and its servers) on `dirs`: `quit` on its control pipe, then
    SIGTERM and SIGKILL to what is left, by pid. Idempotent; returns what it stopped."""
    pids = mps_pids(dirs.pipe)
    control = control or _which(MPS_CONTROL, None)
    if (dirs.pipe / "control").exists() and control is not None:
        argv, env, stdin = mps_quit_command(control, dirs)
        try:
            subprocess.run(argv, input=stdin, env={**os.environ, **env}, capture_output=True,
                           timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass  # the signals below end it
    left = _wait_gone(pids, timeout_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        left = _wait_gone(left, 2.0)
    if left:
        raise ResourceError(f"MPS processes {sorted(left)} on {dirs.pipe} did not stop")
    return [f"mps {p}" for p in sorted(pids)]


class MpsDaemon:
    """One MPS control daemon on its own pipe and log directories: `async with
    MpsDaemon(control, dirs):` starts it (`nvidia-cuda-mps-control -d`), and on exit —
    also on errors — sends it `quit` and ends whatever of it is left."""

    def __init__(self, control: str, dirs: MpsDirs):
        self.control = control
        self.dirs = dirs
        self.pids: set[int] = set()
        self.started = False

    @property
    def running(self) -> bool:
        """Started and not stopped, its control pipe there and, where its pids were found,
        one of them alive."""
        return (self.started and (self.dirs.pipe / "control").exists()
                and (not self.pids or any(pid_alive(p) for p in self.pids)))

    async def __aenter__(self) -> MpsDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.stop())

    async def start(self, timeout_s: float = 15.0) -> None:
        await asyncio.to_thread(self._start_sync, timeout_s)

    def _start_sync(self, timeout_s: float) -> None:
        # 0711: the daemon's pipes inside carry their own modes; others may traverse, not list
        self.dirs.pipe.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.dirs.log.mkdir(mode=0o700, parents=True, exist_ok=True)
        if mps_pids(self.dirs.pipe):
            raise ResourceError(f"an MPS daemon already serves {self.dirs.pipe}; stop it (`testbed down`) first")
        argv, env = mps_start_command(self.control, self.dirs)
        out = self.dirs.log / "start.out"  # a file, not a pipe: the daemon may keep what it inherits open
        try:
            with open(out, "wb") as f:
                rc = subprocess.run(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
                                    start_new_session=True).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ResourceError(f"{self.control} -d did not start ({e})") from None
        deadline = time.monotonic() + timeout_s
        while not (self.dirs.pipe / "control").exists():
            if rc != 0 or time.monotonic() > deadline:
                stop_mps(self.dirs, self.control, timeout_s=2.0)
                said = out.read_text(errors="replace").strip() or "no output"
                raise ResourceError(f"the MPS control daemon did not start (exit code {rc}: {said}); "
                                    f"see {self.dirs.log}")
            time.sleep(0.05)
        self.pids = mps_pids(self.dirs.pipe)
        self.started = True

    async def stop(self, timeout_s: float = 10.0) -> list[str]:
        self.started = False
        stopped = await asyncio.to_thread(stop_mps, self.dirs, self.control, timeout_s)
        self.pids = set()
        return stopped

    def to_json(self) -> dict[str, Any]:
        return {"pipe_dir": str(self.dirs.pipe), "log_dir": str(self.dirs.log), "pids": sorted(self.pids),
                "running": self.running}


class CellGpu:
    """The GPU side of one cell: its plan and, while the shares apply, its MPS daemon."""

    def __init__(self, plan: GpuPlan):
        self.plan = plan
        self.daemon: MpsDaemon | None = None

    @classmethod
    async def make(cls, shares: Mapping[str, int | None], limits: bool = True, backend_problem:
                   Callable[[], str | None] = lambda: None,
                   detect: Callable[[], GpuInfo] = detect_gpu) -> CellGpu:
        """Detect (off the event loop) and plan; nothing is looked for where no device has a
        share or limits are off (a cell without shares starts as before), and the backend is
        asked only when a GPU is there."""
        if not limits or all(s is None for s in shares.values()):
            return cls(plan_gpu(GpuInfo(problem="not looked for", looked=False), shares, limits))
        info = await asyncio.to_thread(detect)
        problem = await asyncio.to_thread(backend_problem) if info.present else None
        return cls(plan_gpu(info, shares, limits, problem))

    async def start(self, state_dir: Path) -> None:
        """Start the MPS daemon where the plan applies (nothing otherwise)."""
        if self.plan.applies and self.daemon is None:
            assert self.plan.info.mps_control is not None
            daemon = MpsDaemon(self.plan.info.mps_control, mps_dirs(state_dir))
            await daemon.start()
            self.daemon = daemon

    @property
    def applied(self) -> bool:
        return self.daemon is not None and self.daemon.running

    def env(self, device: str) -> dict[str, str]:
        """What a process of `device` needs in its environment for its share ({} for none)."""
        share = self.plan.shares_pct.get(device)
        if share is None or self.daemon is None:
            return {}
        return share_env(share, self.daemon.dirs.pipe)

    def status(self) -> dict[str, Any]:
        """The `gpu` record of `testbed status`: whether GPU limits are applied, and why (not)."""
        why = self.plan.why
        if self.plan.applies and not self.applied:
            why = "the MPS daemon is not running (stopped, or not started yet); the GPU shares are not applied"
        return {**self.plan.info.to_json(), "limits_applied": self.applied, "why": why,
                "shares_pct": dict(sorted(self.plan.shares_pct.items())),
                "mps": self.daemon.to_json() if self.daemon is not None else None}

    async def close(self) -> list[str]:
        """Stop the daemon (after the processes that use it); returns problems, not raises."""
        if self.daemon is None:
            return []
        try:
            await self.daemon.stop()
        except ResourceError as e:
            return [str(e)]
        finally:
            self.daemon = None
        return []
