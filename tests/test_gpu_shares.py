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


# where the cell uses it ---------------------------------------------------------------------

def test_node_join_carries_the_environment_through_json() -> None:
    from testbed.emulation.cell import NodeJoin

    j = NodeJoin("/run/netns/x", ("/sys/fs/cgroup/cpu/a/cgroup.procs",), (), {SHARE_ENV: "25"})
    assert NodeJoin.from_json(j.to_json()) == j
    assert NodeJoin.from_json({"netns": None}).env == {}  # a supervisor of an older run sends none


def test_docker_container_of_a_share_uses_the_runs_daemon() -> None:
    from testbed.emulation.docker.spec import GpuHost, NodeSpec, container_plan

    pipe = "/run/testbed/r1/mps/pipe"
    node = NodeSpec("dev01", "device", "198.18.0.10", 1.0, 1024, gpu_share_pct=50,
                    gpu_env={SHARE_ENV: "50", PIPE_ENV: pipe})
    p = container_plan("r1", node, "i", [], GpuHost(count=1, toolkit=True, mps_pipe_dir="/tmp/nvidia-mps"))
    assert p.environment[SHARE_ENV] == "50" and p.environment[PIPE_ENV] == pipe
    assert (pipe, pipe, False) in p.binds and ("/tmp/nvidia-mps", "/tmp/nvidia-mps", False) not in p.binds
    assert p.host_config["ipc_mode"] == "host"
    # no toolkit: the container cannot have the GPU, and gets neither request nor environment
    bare = container_plan("r1", node, "i", [], GpuHost(count=1, toolkit=False))
    assert "device_requests" not in bare.host_config and SHARE_ENV not in bare.environment


def test_backends_say_whether_their_nodes_can_have_the_gpu() -> None:
    from testbed.emulation.backend import NetnsBackend
    from testbed.emulation.docker.backend import DockerBackend
    from testbed.emulation.docker.spec import GpuHost

    assert NetnsBackend("r1").gpu_problem() is None
    assert "no /dev/nvidiaN" in (DockerBackend("r1", gpus=GpuHost(0, True)).gpu_problem() or "")
    assert "container toolkit" in (DockerBackend("r1", gpus=GpuHost(1, False)).gpu_problem() or "")
    assert DockerBackend("r1", gpus=GpuHost(1, True)).gpu_problem() is None


def _profiles_with_shares(shares: dict[str, int]):
    from testbed.model.profiles import load_profiles

    return {name: p.model_copy(update={"gpu_share_pct": shares.get(name)}) for name, p in load_profiles().items()}


@pytest.mark.root
async def test_a_cell_on_a_gpu_host_gives_each_device_its_share(bin_dir: Path, unique_run_id: str,
                                                                topologies: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.emulation.emulation import Emulation
    from testbed.emulation.runs import run_dir
    from testbed.model.topology import load_topology

    _smi(bin_dir)
    _control(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    profiles = _profiles_with_shares({"jetson-agx-orin": 50, "jetson-agx-xavier": 25})
    monkeypatch.setattr("testbed.emulation.emulation.load_profiles", lambda: profiles)
    pipe = run_dir(unique_run_id) / "mps" / "pipe"
    async with Emulation(load_topology(topologies / "small.yaml"), unique_run_id, shaping=False) as emu:
        st = emu.status()["gpu"]
        assert st["limits_applied"] and st["shares_pct"] == {"dev01": 50, "dev02": 50, "dev03": 50, "dev04": 25}
        assert (await emu.join("dev04")).env == {SHARE_ENV: "25", PIPE_ENV: str(pipe)}
        assert (await emu.join("server")).env == {}
        out = tmp_path / "env.txt"
        pid = await emu.spawn("dev04", [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write("
                                        f"os.environ['{SHARE_ENV}'] + ' ' + os.environ['{PIPE_ENV}'])"])
        assert await emu.wait(pid, 30) == 0
        assert out.read_text() == f"25 {pipe}"
        daemon = set(st["mps"]["pids"])
        assert daemon and daemon == mps_pids(pipe)
    assert not any(_running(p) for p in daemon) and not mps_pids(pipe)
    assert emu.status()["gpu"]["limits_applied"] is False


@pytest.mark.root
async def test_a_cell_without_a_gpu_changes_nothing_and_says_so(bin_dir: Path, unique_run_id: str,
                                                               topologies: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.emulation.emulation import Emulation
    from testbed.model.topology import load_topology

    # no nvidia-smi anywhere, also on a GPU host (the cell's other tools stay on PATH)
    monkeypatch.setattr("testbed.emulation.gpu._which", lambda name, path=None: None)
    profiles = _profiles_with_shares({"jetson-agx-orin": 50})
    monkeypatch.setattr("testbed.emulation.emulation.load_profiles", lambda: profiles)
    async with Emulation(load_topology(topologies / "small.yaml"), unique_run_id, shaping=False) as emu:
        st = emu.status()["gpu"]
        assert st["present"] is False and st["limits_applied"] is False and st["mps"] is None
        assert "nvidia-smi is not on PATH" in st["why"] and "dev01 50 %" in st["why"]
        assert (await emu.join("dev01")).env == {}


@pytest.mark.root
def test_testbed_down_stops_the_daemon_of_a_crashed_run(bin_dir: Path, unique_run_id: str) -> None:
    import asyncio

    from testbed.emulation.runs import cleanup_run, make_run_dir

    dirs = mps_dirs(make_run_dir(unique_run_id))
    daemon = MpsDaemon(_control(bin_dir), dirs)
    asyncio.run(daemon.start())  # and its owner is gone without stopping it
    pids = set(daemon.pids)
    removed = cleanup_run(unique_run_id)
    assert [f"mps {p}" for p in sorted(pids)] == [r for r in removed if r.startswith("mps ")]
    assert not any(_running(p) for p in pids) and not dirs.pipe.exists()


@pytest.mark.root
def test_testbed_status_says_whether_gpu_limits_apply(unique_run_id: str, topologies: Path) -> None:
    import json
    import subprocess

    def tb(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, timeout=120)

    up = tb("up", str(topologies / "small.yaml"), "--run", unique_run_id, "--no-broker", "--json")
    assert up.returncode == 0, up.stderr
    try:
        doc = json.loads(tb("status", "--run", unique_run_id, "--json").stdout)
        # no packaged profile has a GPU share: nothing is applied, on any host, and it says why
        assert doc["gpu"]["limits_applied"] is False and doc["gpu"]["mps"] is None
        assert "no device's profile has gpu_share_pct" in doc["gpu"]["why"]
        text = tb("status", "--run", unique_run_id).stdout
        assert "GPU limits not applied: no device's profile has gpu_share_pct" in " ".join(text.split())
    finally:
        assert tb("down", "--run", unique_run_id).returncode == 0


# the profile option for measured GPU step times -------------------------------------------

def test_profiles_carry_measured_gpu_step_times_only_with_their_share_and_source() -> None:
    from pydantic import ValidationError

    from testbed.model.profiles import Profile, gpu_step_time_s, load_profiles

    base = load_profiles()["jetson-agx-orin"].model_dump()
    assert base["gpu_step_s"] == {} and gpu_step_time_s(load_profiles()["jetson-agx-orin"], "sd15", "fp16") is None
    measured = {**base, "gpu_share_pct": 25, "gpu_step_s": {"sd15": {"fp32": 0.2, "fp16": 0.08}},
                "sources": {**base["sources"], "gpu_step_s": "measured: bench/gpu.py on an H100, 2026-12-06"}}
    p = Profile(**measured)
    assert gpu_step_time_s(p, "sd15", "fp16") == 0.08 and gpu_step_time_s(p, "tiny", "fp16") is None
    bad = {
        "unknown precision": {**measured, "gpu_step_s": {"sd15": {"fp8": 0.1}}},
        "is not a time > 0": {**measured, "gpu_step_s": {"sd15": {"fp32": 0.0}}},
        "set gpu_share_pct too": {**measured, "gpu_share_pct": None},
        "needs sources.gpu_step_s": {**measured, "sources": base["sources"]},
    }
    for why, body in bad.items():
        with pytest.raises(ValidationError, match=why):
            Profile(**body)


async def test_a_cell_without_shares_does_not_look_for_a_gpu() -> None:
    def detect() -> GpuInfo:
        raise AssertionError("looked for a GPU that nothing would use")

    for gpu in (await CellGpu.make({"dev01": None}, detect=detect), await CellGpu.make(SHARES, False, detect=detect)):
        await gpu.start(Path("/nonexistent"))
        st = gpu.status()
        assert st["present"] is None and st["limits_applied"] is False and gpu.env("dev01") == {}
    assert "no device's profile has gpu_share_pct" in (await CellGpu.make({"dev01": None}, detect=detect)).status()["why"]
