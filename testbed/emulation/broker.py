"""Start the MQTT broker inside the edge server's namespace and wait until it accepts.

mosquitto when installed (listening only on the server address; the host reaches it over
the host link), else the embedded amqtt broker. The relay layer passes a password file
and a mosquitto-format ACL file when it wants per-device credentials; config and log live
in the run's state directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.emulation.cell import BrokerSettings
from testbed.emulation.nsutil import in_netns
from testbed.emulation.procs import spawn_in, stop_pid
from testbed.errors import ResourceError
from testbed.model.names import MQTT_PORT

__all__ = ["BrokerHandle", "BrokerSettings", "start_broker", "write_broker_config", "parse_mosquitto_acl", "MQTT_PORT"]



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


def parse_mosquitto_acl(text: str) -> dict[str, dict[str, list[str]]]:
    """mosquitto ACL (`user NAME` then `topic [read|write|readwrite] TOPIC` lines) ->
    {user: {"publish": [...], "subscribe": [...]}} for amqtt's topic ACL plugin."""
    acl: dict[str, dict[str, list[str]]] = {}
    user: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if parts[0] == "user" and len(parts) == 2:
            user = parts[1]
            acl.setdefault(user, {"publish": [], "subscribe": []})
        elif parts[0] == "topic" and user is not None:
            access, topic = (parts[1], parts[2]) if len(parts) == 3 else ("readwrite", parts[1])
            if access in ("read", "readwrite"):
                acl[user]["subscribe"].append(topic)
            if access in ("write", "readwrite"):
                acl[user]["publish"].append(topic)
        else:
            raise ResourceError(f"ACL line {n}: {line!r} is not supported by the amqtt fallback "
                                "(only `user NAME` and `topic [read|write|readwrite] TOPIC`); install mosquitto")
    return acl


def _mosquitto_conf(host: str, port: int, state_dir: Path, password_file: Path | None,
                    acl_file: Path | None, max_message_bytes: int | None) -> str:
    lines = [
        f"listener {port} {host}",
        "persistence false",
        f"log_dest file {state_dir / 'mosquitto.log'}",
        "log_type error", "log_type warning", "log_type notice",
        "connection_messages true",
        "set_tcp_nodelay true",  # relay a latent's last segment without waiting for the ACK (Nagle)
    ]
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines.append("allow_anonymous true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if max_message_bytes is not None:
        lines.append(f"message_size_limit {max_message_bytes}")
    return "\n".join(lines) + "\n"


def _amqtt_conf(host: str, port: int, password_file: Path | None, acl_file: Path | None) -> dict:
    plugins: dict = {}
    if password_file is not None:
        plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": str(password_file)}
    else:
        plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
    if acl_file is not None:
        acl = parse_mosquitto_acl(acl_file.read_text())
        plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {
            "publish-acl": {u: a["publish"] for u, a in acl.items()},
            "subscribe-acl": {u: a["subscribe"] for u, a in acl.items()},
        }
    conf: dict = {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": plugins}
    # amqtt has no message size limit option: the relay's decoder checks sizes itself.
    return conf


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """True when every directory above `path` lets uid/gid search it (x permission)."""
    for d in path.resolve().parents:
        st = d.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _hand_to_mosquitto_user(state_dir: Path, password_file: Path | None,
                            acl_file: Path | None) -> tuple[Path | None, Path | None, str | None]:
    """mosquitto started as root drops to the `mosquitto` user *before* it opens its log,
    password and ACL files. One rule for every caller: when that user exists and can reach
    the broker directory (e.g. /run/testbed/<run>/broker, the run directory being 0711),
    the directory becomes its own (0700) with 0600 copies of the password and ACL files and
    the log; otherwise (no such user, or the directory lies under a private 0700 directory
    such as a test's tmp dir or an attached generation's) mosquitto stays root
    (`user root`) and reads the files where they are. Returns (password, acl, user line)."""
    if os.geteuid() != 0:
        return password_file, acl_file, None
    try:
        ent = pwd.getpwnam("mosquitto")
    except KeyError:
        return password_file, acl_file, "root"
    if not _reachable_by(state_dir, ent.pw_uid, ent.pw_gid):
        return password_file, acl_file, "root"
    out: list[Path | None] = []
    for src, name in ((password_file, "passwd"), (acl_file, "acl")):
        if src is None:
            out.append(None)
            continue
        dst = state_dir / name
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(src).read_bytes())
        os.chown(dst, ent.pw_uid, ent.pw_gid)
        out.append(dst)
    log = state_dir / "mosquitto.log"
    log.touch(mode=0o600)
    os.chown(log, ent.pw_uid, ent.pw_gid)
    os.chown(state_dir, ent.pw_uid, ent.pw_gid)
    state_dir.chmod(0o700)
    return out[0], out[1], None


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
    host:settings.port; return once it accepts TCP. The handle keeps `settings`."""
    settings = settings or BrokerSettings()
    state_dir.mkdir(parents=True, exist_ok=True)
    kind, argv, conf_path, log_path, stdout_log = write_broker_config(host, state_dir, settings)
    if spawn is None:
        proc = await asyncio.to_thread(spawn_in, netns, argv, None, stdout_log, cgroup_procs)
    else:  # a backend that starts processes its own way (docker exec): async (argv, log_path) -> Popen-like
        proc = await spawn(argv, stdout_log)
    handle = BrokerHandle(kind, proc.pid, host, settings.port, conf_path, log_path, settings, netns)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            tail = stdout_log.read_text(errors="replace")[-400:] if stdout_log.exists() else ""
            if kind == "mosquitto" and log_path.exists():
                tail += log_path.read_text(errors="replace")[-400:]
            raise ResourceError(f"{kind} exited with code {proc.returncode} at start; see {stdout_log}: {tail.strip()}")
        reachable = (lambda: _can_connect(host, settings.port))
        if await asyncio.to_thread(in_netns, netns, reachable) if netns else await asyncio.to_thread(reachable):
            return handle
        if time.monotonic() > deadline:
            await handle.stop()
            raise ResourceError(f"{kind} did not accept connections on {host}:{settings.port} within "
                                f"{ready_timeout_s:g} s; see {stdout_log}")
        await asyncio.sleep(0.05)


def write_broker_config(host: str, state_dir: Path,
                        settings: BrokerSettings) -> tuple[str, list[str], Path, Path, Path]:
    """The one place a broker configuration is written: (kind, argv, config, log, stdout log).

    mosquitto when installed (and preferred), else the embedded amqtt broker."""
    mosquitto = shutil.which("mosquitto") if settings.prefer == "mosquitto" else None
    if mosquitto:
        conf_path = state_dir / "mosquitto.conf"
        password_file, acl_file, run_as = _hand_to_mosquitto_user(state_dir, settings.password_file,
                                                                  settings.acl_file)
        conf_path.write_text(_mosquitto_conf(host, settings.port, state_dir, password_file, acl_file,
                                             settings.max_message_bytes) + (f"user {run_as}\n" if run_as else ""))
        return ("mosquitto", [mosquitto, "-c", str(conf_path)], conf_path, state_dir / "mosquitto.log",
                state_dir / "mosquitto.stdout.log")
    conf_path = state_dir / "amqtt.yaml"
    conf_path.write_text(yaml.safe_dump(_amqtt_conf(host, settings.port, settings.password_file, settings.acl_file)))
    stdout_log = state_dir / "amqtt.stdout.log"
    return ("amqtt", [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf_path)], conf_path,
            stdout_log, stdout_log)
