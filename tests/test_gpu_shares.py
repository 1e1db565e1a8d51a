"""GPU shares as CUDA MPS limits (testbed/emulation/gpu.py), without a GPU: a fake
nvidia-smi and a fake nvidia-cuda-mps-control on a private PATH stand in for the driver's
tools; the fake daemon speaks the real one's protocol (`-d` makes `control` in
$CUDA_MPS_PIPE_DIRECTORY and serves it; `quit` on it ends the daemon)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.emulation.gpu import (
    LOG_ENV,
    PIPE_ENV,
    SHARE_ENV,
    CellGpu,
    GpuInfo,
    MpsDaemon,
    detect_gpu,
    mps_dirs,
    mps_pids,
    mps_quit_command,
    mps_start_command,
    plan_gpu,
    share_env,
    stop_mps,
)
from testbed.errors import InputError, ResourceError

H100 = "NVIDIA H100 80GB HBM3, 580.159.04"

FAKE_CONTROL = textwrap.dedent("""\
    #!{python}
    # A stand-in for nvidia-cuda-mps-control: `-d` daemonizes and serves the control pipe
    # in $CUDA_MPS_PIPE_DIRECTORY; without -d it sends its stdin to that pipe.
    import os, sys
    pipe = os.path.join(os.environ["CUDA_MPS_PIPE_DIRECTORY"], "control")
    log = os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log")
    if sys.argv[1:] == ["-d"]:
        if os.fork():
            sys.exit(0)
        os.setsid()
        os.mkfifo(pipe, 0o600)
        with open(log, "a") as f:
            f.write("started\\n")
        while True:
            with open(pipe) as p:
                for line in p:
                    with open(log, "a") as f:
                        f.write(line)
                    if line.strip() == "quit" and not os.environ.get("FAKE_MPS_IGNORE_QUIT"):
                        os.unlink(pipe)
                        sys.exit(0)
    else:
        with open(pipe, "w") as p:
            p.write(sys.stdin.read())
    """)


def _tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def _smi(bin_dir: Path, out: str = H100, rc: int = 0) -> None:
    (bin_dir / "smi.out").write_text(out + "\n" if out else "")
    _tool(bin_dir, "nvidia-smi", f"#!/bin/sh\ncat '{bin_dir}/smi.out'\nexit {rc}\n")


def _running(pid: int) -> bool:
    """Alive and not a zombie (the fake daemon's parent exits; who reaps it is the host's)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _control(bin_dir: Path) -> str:
    _tool(bin_dir, "nvidia-cuda-mps-control", FAKE_CONTROL.format(python=sys.executable))
    return str(bin_dir / "nvidia-cuda-mps-control")


@pytest.fixture
def state_dir(tmp_path: Path):
    d = tmp_path / "run"
    d.mkdir()
    yield d
    for pid in mps_pids(mps_dirs(d).pipe):  # whatever a failed test left
        os.kill(pid, signal.SIGKILL)


# detection ------------------------------------------------------------------------------

def test_detect_reads_nvidia_smi_and_finds_the_control_binary(bin_dir: Path) -> None:
    _smi(bin_dir, f"{H100}\n{H100}")
    control = _control(bin_dir)
    info = detect_gpu(path=str(bin_dir))
    assert info.present and info.names == ("NVIDIA H100 80GB HBM3",) * 2 and info.driver == "580.159.04"
    assert info.mps_control == control and info.problem is None


def test_detect_without_a_driver_says_why(bin_dir: Path) -> None:
    info = detect_gpu(path=str(bin_dir))
    assert not info.present and "nvidia-smi is not on PATH" in (info.problem or "")
    _smi(bin_dir, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", rc=9)
    info = detect_gpu(path=str(bin_dir))
    assert not info.present and "couldn't communicate with the NVIDIA driver" in (info.problem or "")
    _smi(bin_dir, "")
    assert detect_gpu(path=str(bin_dir)).problem == f"{bin_dir}/nvidia-smi lists no GPU"


# the environment of a share and the plan -----------------------------------------------

def test_share_env_names_the_share_and_the_daemon(tmp_path: Path) -> None:
    assert share_env(25, tmp_path) == {SHARE_ENV: "25", PIPE_ENV: str(tmp_path)}
    for bad in (0, 101, 50.5, True, "50"):
        with pytest.raises(InputError, match="gpu_share_pct"):
            share_env(bad, tmp_path)  # type: ignore[arg-type]


GPU = GpuInfo(("NVIDIA H100 80GB HBM3",), "580.159.04", "/usr/bin/nvidia-cuda-mps-control", None)
SHARES = {"dev01": 50, "dev02": None, "dev03": 25}


def test_plan_applies_only_with_limits_shares_gpu_control_and_backend() -> None:
    ok = plan_gpu(GPU, SHARES)
    assert ok.applies and ok.shares_pct == {"dev01": 50, "dev03": 25}
    assert "2 device(s) run under CUDA MPS on NVIDIA H100" in ok.why and "dev03 25 %" in ok.why
    cases = {
        "limits are off": plan_gpu(GPU, SHARES, limits=False),
        "no device's profile has gpu_share_pct": plan_gpu(GPU, {"dev01": None}),
        "nvidia-smi is not on PATH": plan_gpu(GpuInfo(problem="nvidia-smi is not on PATH: no NVIDIA driver"), SHARES),
        "nvidia-cuda-mps-control is not on PATH": plan_gpu(GpuInfo(GPU.names, "1", None, None), SHARES),
        "no NVIDIA container toolkit": plan_gpu(GPU, SHARES, backend_problem="no NVIDIA container toolkit"),
    }
    for why, plan in cases.items():
        assert not plan.applies and why in plan.why, plan
    assert "the profiles' GPU shares (dev01 50 %, dev03 25 %) are not applied" in cases["nvidia-smi is not on PATH"].why
    with pytest.raises(InputError):
        plan_gpu(GPU, {"dev01": 0})


def test_daemon_commands_are_planned_on_the_runs_directories(tmp_path: Path) -> None:
    dirs = mps_dirs(tmp_path)
    assert dirs.pipe == tmp_path / "mps" / "pipe" and dirs.log == tmp_path / "mps" / "log"
    env = {PIPE_ENV: str(dirs.pipe), LOG_ENV: str(dirs.log)}
    assert mps_start_command("/x/nvidia-cuda-mps-control", dirs) == (["/x/nvidia-cuda-mps-control", "-d"], env)
    assert mps_quit_command("/x/nvidia-cuda-mps-control", dirs) == (["/x/nvidia-cuda-mps-control"], env, b"quit\n")


# the daemon's lifecycle -------------------------------------------------------------------

async def test_daemon_starts_serves_and_quits_on_its_control_pipe(bin_dir: Path, state_dir: Path) -> None:
    dirs = mps_dirs(state_dir)
    async with MpsDaemon(_control(bin_dir), dirs) as daemon:
        assert (dirs.pipe / "control").exists() and daemon.running
        assert len(daemon.pids) == 1 and daemon.pids == mps_pids(dirs.pipe)
        assert oct(dirs.pipe.stat().st_mode & 0o777) == "0o711" and oct(dirs.log.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(ResourceError, match="already serves"):
            await MpsDaemon(str(bin_dir / "nvidia-cuda-mps-control"), dirs).start()
        pid = next(iter(daemon.pids))
    assert not mps_pids(dirs.pipe) and not _running(pid) and not daemon.running
    assert (dirs.log / "control.log").read_text().split() == ["started", "quit"]  # stopped by `quit`, not a signal
    assert stop_mps(dirs) == []  # idempotent


async def test_a_daemon_that_ignores_quit_is_ended_by_pid(bin_dir: Path, state_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MPS_IGNORE_QUIT", "1")
    dirs = mps_dirs(state_dir)
    daemon = MpsDaemon(_control(bin_dir), dirs)
    await daemon.start()
    pids = set(daemon.pids)
    assert await daemon.stop(timeout_s=0.5) == [f"mps {p}" for p in sorted(pids)]
    assert not any(_running(p) for p in pids) and not mps_pids(dirs.pipe)


async def test_a_control_binary_that_fails_is_reported(bin_dir: Path, state_dir: Path) -> None:
    _tool(bin_dir, "nvidia-cuda-mps-control", "#!/bin/sh\necho 'An instance of this daemon is already running' >&2\nexit 1\n")
    with pytest.raises(ResourceError, match="did not start .exit code 1: An instance of this daemon"):
        await MpsDaemon(str(bin_dir / "nvidia-cuda-mps-control"), mps_dirs(state_dir)).start(timeout_s=2)


# the cell's GPU side ------------------------------------------------------------------------

async def test_without_a_gpu_nothing_changes_and_the_status_says_so(bin_dir: Path, state_dir: Path) -> None:
    gpu = await CellGpu.make(SHARES, detect=lambda: detect_gpu(path=str(bin_dir)))
    await gpu.start(state_dir)
    assert gpu.env("dev01") == {} and gpu.daemon is None and not (state_dir / "mps").exists()
    st = gpu.status()
    assert st["present"] is False and st["limits_applied"] is False and st["mps"] is None
    assert "nvidia-smi is not on PATH" in st["why"] and "are not applied" in st["why"]
    assert await gpu.close() == []


async def test_with_a_gpu_the_devices_with_a_share_get_it_through_the_cells_daemon(bin_dir: Path,
                                                                                   state_dir: Path) -> None:
    _smi(bin_dir)
    _control(bin_dir)
    asked: list[bool] = []

    def backend_problem() -> None:
        asked.append(True)

    gpu = await CellGpu.make(SHARES, backend_problem=backend_problem, detect=lambda: detect_gpu(path=str(bin_dir)))
    assert asked == [True]
    try:
        await gpu.start(state_dir)
        pipe = state_dir / "mps" / "pipe"
        assert gpu.env("dev01") == {SHARE_ENV: "50", PIPE_ENV: str(pipe)}
        assert gpu.env("dev02") == {} and gpu.env("server") == {}
        st = gpu.status()
        assert st["present"] and st["limits_applied"] and st["gpus"] == ["NVIDIA H100 80GB HBM3"]
        assert st["shares_pct"] == {"dev01": 50, "dev03": 25} and st["mps"]["running"]
        assert st["mps"]["pids"] == sorted(mps_pids(pipe)) and len(st["mps"]["pids"]) == 1
    finally:
        assert await gpu.close() == []
    assert not mps_pids(state_dir / "mps" / "pipe") and gpu.env("dev01") == {}
    assert gpu.status()["limits_applied"] is False


async def test_a_backend_that_cannot_give_its_nodes_the_gpu_applies_nothing(bin_dir: Path, state_dir: Path) -> None:
    _smi(bin_dir)
    _control(bin_dir)
    gpu = await CellGpu.make(SHARES, backend_problem=lambda: "the NVIDIA container toolkit is missing",
                             detect=lambda: detect_gpu(path=str(bin_dir)))
    await gpu.start(state_dir)
    assert gpu.daemon is None and gpu.env("dev01") == {}
    assert gpu.status()["present"] and not gpu.status()["limits_applied"]
    assert "the NVIDIA container toolkit is missing" in gpu.status()["why"]
