"""Start the MQTT broker inside the edge server's namespace and wait until it accepts.

mosquitto when installed (listening only on the server address; the host reaches it over
the host link), else the embedded amqtt broker — for anonymous cells only (see
`_amqtt_conf`). The relay layer passes password and ACL files when it wants per-account
credentials (relay/security.py), and a watch listener's files when client ids are bound
to accounts (BrokerSettings). Config, credentials and log live in the run's
`broker/` directory, which root owns: root never writes where the broker's user can
(docs/security.md, "Files root writes").
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.emulation.cell import BrokerSettings
from testbed.emulation.nsutil import in_netns
from testbed.emulation.procs import spawn_in, stop_pid
from testbed.emulation.safe_files import read_tail, write_atomic
from testbed.errors import ResourceError
from testbed.model.names import MQTT_PORT

__all__ = ["BrokerHandle", "BrokerSettings", "start_broker", "write_broker_config", "broker_status", "MQTT_PORT",
           "LOG_DIR"]

#: The one subdirectory of broker/ that the broker's own user may write (its log).
LOG_DIR = "log"


@dataclass
class BrokerHandle:
    """A running broker and the settings it was started with (a restart reuses them)."""

    kind: str  # "mosquitto" | "amqtt"
    pid: int
    host: str
    port: int
    config_path: Path
    log_path: Path
    settings: BrokerSettings = field(default_factory=BrokerSettings)
    netns: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "pid": self.pid, "host": self.host, "port": self.port,
                "config_path": str(self.config_path), "log_path": str(self.log_path),
                "settings": self.settings.to_json(), "netns": self.netns}

    @classmethod
    def from_json(cls, d: dict) -> BrokerHandle:
        return cls(d["kind"], int(d["pid"]), d["host"], int(d["port"]), Path(d["config_path"]), Path(d["log_path"]),
                   BrokerSettings.from_json(d.get("settings") or {}), d.get("netns"))

    async def stop(self) -> None:
        await stop_pid(self.pid)

    def read_log(self, max_bytes: int = 1 << 20) -> str:
        """The end of the broker's log, read without following a link the broker's user
        may have planted in its log directory ("" when there is no plain log file)."""
        return read_tail(self.log_path, max_bytes)


def broker_status(handle: BrokerHandle | None, error: str | None) -> dict:
    """The broker's part of a cell's status document: `broker` (None while it is down) and
    `broker_error` (why its last start or restart failed; None when it did not)."""
    b = None if handle is None else {"kind": handle.kind, "pid": handle.pid, "host": handle.host, "port": handle.port,
                                     "watch_port": handle.settings.watch_port}
    return {"broker": b, "broker_error": error}


def _mosquitto_conf(host: str, log_path: Path, settings: BrokerSettings, password_file: Path | None,
                    acl_file: Path | None, watch_files: tuple[Path, Path] | None, run_as: str | None) -> str:
    lines = [
        "persistence false",
        f"log_dest file {log_path}",
        "log_type error", "log_type warning", "log_type notice",
        "connection_messages true",
        "set_tcp_nodelay true",  # relay a latent's last segment without waiting for the ACK (Nagle)
    ]
    if run_as:
        lines.append(f"user {run_as}")
    if settings.max_message_bytes is not None:
        lines.append(f"message_size_limit {settings.max_message_bytes}")
    if watch_files is not None:
        lines.append("per_listener_settings true")  # each listener its own accounts
    lines.append(f"listener {settings.port} {host}")
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines.append("allow_anonymous true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if watch_files is not None:
        # the client id of every connection is its account: dev01 saying "tb-r1-dev02" or
        # "server" is still dev01, and only dev01's password can displace dev01
        lines += ["use_username_as_clientid true",
                  f"listener {settings.watch_port} {host}", "allow_anonymous false",
                  f"password_file {watch_files[0]}", f"acl_file {watch_files[1]}"]
    return "\n".join(lines) + "\n"


def _amqtt_conf(host: str, settings: BrokerSettings) -> dict:
    """An anonymous amqtt broker. amqtt 0.12 cannot hold a run's accounts: it reads no
    mosquitto `$7$` hashes, and it ends (clean session) or rewrites (persistent session)
    the session of a client id *before* it authenticates the new connection, so anyone
    who can reach it — even with a wrong password — can disconnect any client or replace
    its will. A cell with credentials therefore refuses it; install mosquitto."""
    if settings.password_file is not None or settings.acl_file is not None or settings.watch_password_file is not None:
        raise ResourceError(
            "the amqtt fallback broker cannot enforce the run's MQTT accounts (it cannot read their password hashes "
            "and lets any client, even one with a wrong password, take over another's client id); "
            "install mosquitto (apt-get install mosquitto) — only anonymous test cells may use amqtt")
    return {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{settings.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """True when every directory above `path` lets uid/gid search it (x permission)."""
    for d in path.resolve().parents:
        st = d.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _broker_user(state_dir: Path) -> pwd.struct_passwd | None:
    """The `mosquitto` user that mosquitto, started as root, drops to — when it exists and
    can reach `state_dir` (e.g. /run/testbed/<run>/broker, the run directory being 0711).
    None: mosquitto stays root (`user root`; no such user, or `state_dir` lies under a
    private directory such as a test's tmp dir)."""
    if os.geteuid() != 0:
        return None
    try:
        ent = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    return ent if _reachable_by(state_dir, ent.pw_uid, ent.pw_gid) else None


def _own_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    """`path` is a real directory (made when missing) with this owner and mode; a link or
    a file planted there is refused."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ResourceError(f"broker directory {path} is not a plain directory ({e.strerror}); "
                            "`testbed down` the run and bring it up again") from None
    try:
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    except OSError as e:
        raise ResourceError(f"broker directory {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _prepare_broker_dir(state_dir: Path) -> tuple[pwd.struct_passwd | None, int]:
    """The broker directory, owned by root before anything is written into it: root:<the
    broker user's group> 0710 (the broker traverses it and reads its files by name), and
    its `log/` (the broker user's own, 0700): root never creates, truncates or chowns a
    file there. A `log` that is not a real directory is refused. Returns (broker user,
    group of its files)."""
    ent = _broker_user(state_dir)
    gid = ent.pw_gid if ent is not None else 0
    _own_dir(state_dir, 0, gid, 0o710 if ent is not None else 0o700)
    log_dir = state_dir / LOG_DIR
    try:
        if stat.S_ISLNK(os.lstat(log_dir).st_mode):
            os.unlink(log_dir)  # only an older layout's broker user could have made it; root owns broker/ now
    except FileNotFoundError:
        pass
    _own_dir(log_dir, ent.pw_uid if ent is not None else 0, gid, 0o700)
    return ent, gid


def _can_connect(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


async def start_broker(
    netns: str | None,
    host: str,
    state_dir: Path,
    settings: BrokerSettings | None = None,
    *,
    cgroup_procs: tuple[Path, ...] = (),
    ready_timeout_s: float = 15.0,
    spawn=None,
) -> BrokerHandle:
    """Start the broker in `netns` (None: this process's namespace), listening on
    host:settings.port (and settings.watch_port); return once it accepts TCP. The handle
    keeps `settings`. A broker that exits or does not accept is a ResourceError."""
    settings = settings or BrokerSettings()
    kind, argv, conf_path, log_path, stdout_log = await asyncio.to_thread(write_broker_config, host, state_dir, settings)
    # mosquitto starts as its own user (never root) where it would drop to it: a uid change
    # inside it would clear the death signal that ends it with its owner (procs.spawn_in)
    ent = _broker_user(Path(state_dir)) if kind == "mosquitto" else None
    run_as = (ent.pw_uid, ent.pw_gid) if ent is not None else None
    if spawn is None:
        proc = await asyncio.to_thread(spawn_in, netns, argv, None, stdout_log, cgroup_procs, run_as=run_as)
    else:  # a backend's own way (its node, docker exec): async (argv, log_path, run_as) -> Popen-like
        proc = await spawn(argv, stdout_log, run_as)
    handle = BrokerHandle(kind, proc.pid, host, settings.port, conf_path, log_path, settings, netns)
    ports = [p for p in (settings.port, settings.watch_port) if p is not None]
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            tail = read_tail(stdout_log, 400)
            if kind == "mosquitto":
                tail += handle.read_log(400)
            raise ResourceError(f"{kind} exited with code {proc.returncode} at start; see {stdout_log}: {tail.strip()}")
        reachable = (lambda: all(_can_connect(host, p) for p in ports))
        if await asyncio.to_thread(in_netns, netns, reachable) if netns else await asyncio.to_thread(reachable):
            return handle
        if time.monotonic() > deadline:
            await handle.stop()
            raise ResourceError(f"{kind} did not accept connections on {host}:{'/'.join(map(str, ports))} within "
                                f"{ready_timeout_s:g} s; see {stdout_log}")
        await asyncio.sleep(0.05)


def write_broker_config(host: str, state_dir: Path,
                        settings: BrokerSettings) -> tuple[str, list[str], Path, Path, Path]:
    """The one place a broker configuration is written: (kind, argv, config, log, stdout log).

    mosquitto when installed (and preferred), else the embedded amqtt broker. Every file
    root writes is renamed into place (safe_files.write_atomic), in a directory only root
    may write (`_prepare_broker_dir`); the broker reads its copies of the credentials,
    owned by root and readable by its group."""
    state_dir = Path(state_dir)
    mosquitto = shutil.which("mosquitto") if settings.prefer == "mosquitto" else None
    if not mosquitto:
        conf = _amqtt_conf(host, settings)  # refuses a cell with credentials before anything is made
        state_dir.mkdir(parents=True, exist_ok=True)
        _prepare_broker_dir(state_dir)
        conf_path = write_atomic(state_dir / "amqtt.yaml", yaml.safe_dump(conf))
        stdout_log = state_dir / "amqtt.stdout.log"
        return ("amqtt", [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf_path)], conf_path,
                stdout_log, stdout_log)
    state_dir.mkdir(parents=True, exist_ok=True)
    ent, gid = _prepare_broker_dir(state_dir)
    mode = 0o640 if ent is not None else 0o600

    def copy_in(src: Path | None, name: str) -> Path | None:
        if src is None:
            return None
        if ent is None:  # mosquitto stays root and reads the file where it is
            return Path(src)
        return write_atomic(state_dir / name, Path(src).read_bytes(), mode, 0, gid)  # ent: we are root

    password_file = copy_in(settings.password_file, "passwd")
    acl_file = copy_in(settings.acl_file, "acl")
    watch = None
    if settings.watch_password_file is not None:
        if settings.watch_acl_file is None or settings.password_file is None:
            raise ResourceError("broker: a watch listener needs its ACL file and the cell listener's password file")
        watch = (copy_in(settings.watch_password_file, "watch.passwd"), copy_in(settings.watch_acl_file, "watch.acl"))
    log_path = state_dir / LOG_DIR / "mosquitto.log"
    conf_path = write_atomic(state_dir / "mosquitto.conf",
                             _mosquitto_conf(host, log_path, settings, password_file, acl_file, watch,
                                             None if ent is not None or os.geteuid() != 0 else "root"),
                             mode, 0 if os.geteuid() == 0 else -1, gid if os.geteuid() == 0 else -1)
    return "mosquitto", [mosquitto, "-c", str(conf_path)], conf_path, log_path, state_dir / "mosquitto.stdout.log"
