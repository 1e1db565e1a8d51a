"""Test tiers: pure by default; `root`, `docker`, `mosquitto`, `browser` (headless Chromium +
chromedriver + selenium), `gpu` markers skip with a reason when the resource is missing —
unless TESTBED_REQUIRE names it (CI sets TESTBED_REQUIRE=root,docker,mosquitto,browser),
in which case the missing resource FAILS the test.

Leftovers: the suite refuses to start over what earlier testbed runs left on this host
(namespaces tb-<run>-*, host links tb<run>h, cgroups testbed/<run>, docker objects labelled
testbed.run, /run/testbed/<run>/): stale objects make tests fail in cascade (a docker
network on 198.18.0.0/16 blocks every docker test). `testbed down --all` removes them.
TESTBED_ALLOW_LEFTOVERS=1 skips the check, for two suites running on one machine at the
same time (each sees the other's live runs); CI runs alone and keeps it. Every run id a
test gets from `unique_run_id` is torn down after the test, also when it failed, and in
the strict mode the session fails if anything of the testbed is left at its end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = REPO / "topologies"


def _required() -> set[str]:
    return {x.strip() for x in os.environ.get("TESTBED_REQUIRE", "").split(",") if x.strip()}


def _have_root() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, tc, cgroups)"
    return True, ""


def _have_docker() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "needs the docker CLI and a running daemon"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False, "docker daemon did not answer"
    if r.returncode != 0:
        return False, "no running docker daemon (start dockerd)"
    return True, ""


def _have_mosquitto() -> tuple[bool, str]:
    missing = [b for b in ("mosquitto", "mosquitto_sub", "mosquitto_pub") if shutil.which(b) is None]
    if missing:
        return False, f"needs {', '.join(missing)} (apt install mosquitto mosquitto-clients)"
    return True, ""


def _have_browser() -> tuple[bool, str]:
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        return False, f"needs {', '.join(missing)} (apt install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False, "needs selenium (pip install -e '.[test]')"
    return True, ""


def _have_gpu() -> tuple[bool, str]:
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
    except Exception:  # noqa: BLE001 - torch missing is "no GPU"
        pass
    return False, "needs a CUDA GPU"


_CHECKS = {"root": _have_root, "docker": _have_docker, "mosquitto": _have_mosquitto, "gpu": _have_gpu,
           "browser": _have_browser}
_cache: dict[str, tuple[bool, str]] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, check in _CHECKS.items():
        if item.get_closest_marker(name) is None:
            continue
        if name not in _cache:
            _cache[name] = check()
        ok, why = _cache[name]
        if ok:
            continue
        if name in _required():
            pytest.fail(f"TESTBED_REQUIRE={name} but: {why}", pytrace=False)
        pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """TESTBED_TEST_TIMES=FILE: each test's CPU seconds (this process and the children it
    waited for, setup to teardown) and wall seconds, one line each — what sizes the tiers
    (`make check`) on a machine too busy for wall times to mean much."""
    path = os.environ.get("TESTBED_TEST_TIMES")
    if not path:
        yield
        return
    import resource
    import time

    def cpu() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    c0, t0 = cpu(), time.monotonic()
    yield
    with open(path, "a") as f:
        f.write(f"{cpu() - c0:.3f} {time.monotonic() - t0:.3f} {item.nodeid}\n")


def _allow_leftovers() -> bool:
    return os.environ.get("TESTBED_ALLOW_LEFTOVERS", "") == "1"


_handed_out: set[str] = set()  # run ids given to tests by `unique_run_id`
_started_clean = False


def _describe(objects: dict[str, list[str]]) -> str:
    return "; ".join(f"run {r}: {', '.join(sorted(o)[:4])}{', ...' if len(o) > 4 else ''}"
                     for r, o in sorted(objects.items()))


def pytest_sessionstart(session: pytest.Session) -> None:
    global _started_clean
    if _allow_leftovers():
        return
    from testbed.emulation.runs import run_objects

    found = run_objects()
    if found:
        pytest.exit(
            f"testbed objects are left on this host ({_describe(found)}); they would make tests fail in cascade. "
            "Remove them with `sudo testbed down --all` (add --force for other users' runs and leftovers of unknown "
            "owner; or, when another test suite is running on this machine "
            "right now, set TESTBED_ALLOW_LEFTOVERS=1)", returncode=pytest.ExitCode.USAGE_ERROR)
    _started_clean = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Strict mode, after a clean start: anything of the testbed left now is this suite's
    leak. It fails the session; what the suite's own run ids left is removed."""
    if not _started_clean:
        return
    from testbed.emulation.runs import cleanup_run, run_objects

    found = run_objects()
    if not found:
        return
    for run in sorted(set(found) & _handed_out):
        try:
            cleanup_run(run)
        except Exception:  # noqa: BLE001 - reported below either way
            pass
    session.config.get_terminal_writer().line(
        f"\ntests left testbed objects behind: {_describe(found)}; `sudo testbed down --all` removes them", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def unique_run_id():
    """A short run id unique to the test (run ids go into 15-character interface names).
    As root, whatever the test made under it (namespaces, links, cgroups, containers,
    networks, state) is removed afterwards, also when the test failed; a removal that
    fails is an error of the test."""
    run_id = "t" + uuid.uuid4().hex[:5]
    _handed_out.add(run_id)
    yield run_id
    if os.geteuid() == 0:
        from testbed.emulation.runs import cleanup_run

        cleanup_run(run_id)


@pytest.fixture
def topologies() -> Path:
    return TOPOLOGIES


def _dump_asyncio_tasks(*_: object) -> None:
    """SIGUSR1 (and a test cut off by pytest-timeout): every event loop's pending tasks with
    their stacks, on stderr — a hung generation waits in one of the netns loops' threads,
    where a thread dump shows only an idle selector."""
    import asyncio
    import gc
    import sys

    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if loop.is_closed():
            continue
        try:
            tasks = asyncio.all_tasks(loop)
        except RuntimeError:
            continue
        print(f"--- event loop {id(loop):#x}: {len(tasks)} tasks", file=sys.stderr)
        for task in tasks:
            task.print_stack(limit=12, file=sys.stderr)


def pytest_configure(config: pytest.Config) -> None:
    import signal

    signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: object):
    """Before pytest-timeout's own timer: ours dumps the asyncio tasks a little earlier."""
    import threading

    timeout = getattr(settings, "timeout", None)
    if timeout:
        timer = threading.Timer(max(1.0, timeout - 5), _dump_asyncio_tasks)
        timer.daemon = True
        timer.start()
        item._asyncio_dump_timer = timer  # type: ignore[attr-defined]
    return None


def pytest_timeout_cancel_timer(item: pytest.Item):
    timer = getattr(item, "_asyncio_dump_timer", None)
    if timer is not None:
        timer.cancel()
    return None
