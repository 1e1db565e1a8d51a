"""The TUI in a browser (`testbed tui --serve`, tui/web.py): the server's page and token
without a browser, then headless Chromium (selenium + Debian's chromedriver) loading the
page, selecting devices, running the paper scenario cold (root: it brings a cell up) and
seeing the run finish on the page.

Chromium draws the terminal on a canvas, so the test reads the page's text from the
websocket: a script installed before the page's own wraps `WebSocket` and keeps what the
served TUI sends (its terminal output), which the test strips of escape sequences. The
browser is kept off every address but loopback (--host-resolver-rules, no proxy)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testbed.errors import InputError
from tui.web import check_host, page_url, served_command

REPO = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed.cli"]

# Flags that work as root on this machine (no sandbox, no GPU), nothing fetched from outside.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1280,800",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")

_RECORD_WEBSOCKET = """
window.__tbText = [];
window.__tbClosed = false;
const OrigWebSocket = window.WebSocket;
window.WebSocket = function (url, protocols) {
  const ws = protocols === undefined ? new OrigWebSocket(url) : new OrigWebSocket(url, protocols);
  ws.addEventListener("message", (ev) => {
    const d = ev.data;
    if (typeof d === "string") { window.__tbText.push(d); }
    else if (d instanceof ArrayBuffer) { window.__tbText.push(new TextDecoder().decode(d)); }
    else if (d instanceof Blob) { d.arrayBuffer().then((b) => window.__tbText.push(new TextDecoder().decode(b))); }
  });
  ws.addEventListener("close", () => { window.__tbClosed = true; });
  return ws;
};
window.WebSocket.prototype = OrigWebSocket.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""

_ESCAPES = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path: Path, topology: str) -> tuple[subprocess.Popen, str]:
    """`testbed tui FILE --serve` on a free loopback port; (its process, the page's URL)."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen([*TESTBED, "tui", str(REPO / topology), "--serve", "--port", str(port), "--out",
                             str(tmp_path / "out")], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log.seek(0)
        if m := re.search(r"on (http://127\.0\.0\.1:\d+/[\w-]+/)", log.read()):
            return proc, m.group(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        time.sleep(0.1)
    _stop(proc)
    pytest.fail(f"the server printed no URL within 60 s: {(tmp_path / 'serve.log').read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """The server and every TUI it started (one session: start_new_session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:  # a TUI that outlived the server (it quits when its websocket goes)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_host_and_command():
    assert check_host("127.0.0.1") == ("127.0.0.1", None)
    assert check_host("localhost") == ("127.0.0.1", None)
    assert check_host("::1") == ("::1", None)
    addr, warning = check_host("198.18.0.1")
    assert addr == "198.18.0.1" and "reachable from other machines" in warning
    with pytest.raises(InputError, match="give an IP address"):
        check_host("example.org")
    assert page_url("::1", 8000, "tok") == "http://[::1]:8000/tok/"
    cmd = served_command(["/a dir/t.yaml", "--out", "/o"])
    assert cmd.endswith("-m testbed.cli tui '/a dir/t.yaml' --out /o")  # quoted for textual-serve's shell


def test_bad_host_or_port_is_bad_input():
    for args, needle in ((["--host", "nowhere.example"], "give an IP address"), (["--port", "70000"], "--port")):
        r = subprocess.run([*TESTBED, "tui", str(REPO / "topologies/small.yaml"), "--serve", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_server_serves_its_page_under_the_token_only_and_nothing_from_outside(tmp_path):
    proc, url = _start_server(tmp_path, "topologies/small.yaml")
    try:
        status, page = _get(url)
        assert status == 200
        root = url.rsplit("/", 2)[0] + "/"
        assert _get(root)[0] == 404  # without the token: nothing
        token = url.rstrip("/").rsplit("/", 1)[1]
        assert f"ws://127.0.0.1:{url.split(':')[2].split('/')[0]}/{token}/ws" in page
        # every address the page loads from is this server (textual-serve's own page asks Google Fonts)
        loaded = re.findall(r"(?:href|src)=\"(https?://[^\"]+)\"|url\(\"(https?://[^\"]+)\"\)", page)
        assert loaded and all(u.startswith(root) for pair in loaded for u in pair if u), loaded
    finally:
        _stop(proc)


def _driver(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not download anything
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver", log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_WEBSOCKET})
    return driver


def _screen_text(driver) -> str:
    return _ESCAPES.sub("", "".join(driver.execute_script("return window.__tbText")))


def _wait_for(driver, pattern: str, timeout_s: float, what: str) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if m := re.search(pattern, _screen_text(driver)):
            return m
        time.sleep(0.25)
    tail = _screen_text(driver)[-1500:]
    pytest.fail(f"the page did not show {what} within {timeout_s:g} s; its last text:\n{tail}")


@pytest.mark.root
@pytest.mark.mosquitto
@pytest.mark.browser
@pytest.mark.slow
def test_the_paper_scenario_runs_from_a_browser(tmp_path):
    """Load the page, select (s), run (r) the paper scenario cold, see it finish, quit (q)."""
    t0 = time.monotonic()
    proc, url = _start_server(tmp_path, "topologies/paper.yaml")
    driver = None
    run_id = None
    try:
        driver = _driver(tmp_path)
        driver.get(url)
        _wait_for(driver, r"20 devices; s selects", 60, "the first screen")
        keys = driver.find_element("css selector", ".xterm-helper-textarea")
        keys.send_keys("s")
        chain = _wait_for(driver, r"chain (dev\d\d(?: → dev\d\d)*)", 30, "a selected chain").group(1)
        keys.send_keys("r")
        run_id = _wait_for(driver, r"run (r[0-9a-f]{5}) ", 60, "the run's id").group(1)
        _wait_for(driver, rf"run {run_id} finished", 300, "the run finish")
        result = json.loads((tmp_path / "out" / run_id / "result.json").read_text())
        assert result["run"] == run_id and " → ".join(result["relay_order"]) == chain
        _wait_for(driver, rf"MS-SSIM {result['ms_ssim']:.3f}", 30, "the run's MS-SSIM")
        keys.send_keys("q")
        deadline = time.monotonic() + 120
        while not driver.execute_script("return window.__tbClosed && document.body.classList.contains('-closed')"):
            assert time.monotonic() < deadline, "the TUI did not quit: the page never said 'Session ended'"
            time.sleep(0.25)
        assert not [n for n in os.listdir("/run/netns") if n.startswith(f"tb-{run_id}-")]
    finally:
        if driver is not None:
            driver.quit()
        _stop(proc)
        if run_id is not None:
            from testbed.emulation.runs import cleanup_run

            cleanup_run(run_id)
        print(f"browser test wall time: {time.monotonic() - t0:.1f} s")
