"""Per-run MQTT credentials and ACLs: who may read and write which relay topics.

Every run gets fresh random passwords for the orchestrator (`server`), each device
(`<device id>`) and one read-only `observer`. The mosquitto `password_file` (PBKDF2-SHA512,
mosquitto 2's `$7$` format, generated here like `mosquitto_passwd -b`) and `acl_file`
allow:

    server     read/write tb/<run>/#
    <device>   read  tb/<run>/dev/<device>/task
               write tb/<run>/dev/<device>/result, tb/<run>/dev/<device>/status
    observer   read  tb/<run>/events

Files are written 0600 into the run's state directory (root-only). Nothing else may
connect: the broker runs with `allow_anonymous false`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.relay import topics

__all__ = [
    "SERVER_USER",
    "OBSERVER_USER",
    "Credential",
    "RunCredentials",
    "make_credentials",
    "password_line",
    "acl_text",
    "write_security_files",
    "write_private",
    "load_credentials",
]

SERVER_USER = "server"
OBSERVER_USER = "observer"
_PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$


@dataclass(frozen=True)
class Credential:
    username: str
    password: str


@dataclass(frozen=True)
class RunCredentials:
    run: str
    server: Credential
    observer: Credential
    devices: dict[str, Credential]

    def for_device(self, device: str) -> Credential:
        return self.devices[device]


def make_credentials(run: str, device_ids: list[str]) -> RunCredentials:
    """Fresh random passwords (128 bits each) for one run."""
    for d in device_ids:
        if d in (SERVER_USER, OBSERVER_USER):
            raise ValueError(f"device id {d!r} collides with a reserved MQTT user name; rename the device")

    def pw() -> str:
        return secrets.token_urlsafe(16)

    return RunCredentials(
        run=run,
        server=Credential(SERVER_USER, pw()),
        observer=Credential(OBSERVER_USER, pw()),
        devices={d: Credential(d, pw()) for d in device_ids},
    )


def password_line(cred: Credential, salt: bytes | None = None) -> str:
    """One `user:$7$101$salt$hash` line of a mosquitto 2 password file."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", cred.password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"{cred.username}:$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(creds: RunCredentials) -> str:
    run = creds.run
    lines = [f"user {SERVER_USER}", f"topic readwrite tb/{run}/#", ""]
    lines += [f"user {OBSERVER_USER}", f"topic read {topics.events(run)}", ""]
    for dev in creds.devices:
        lines += [
            f"user {dev}",
            f"topic read {topics.task(run, dev)}",
            f"topic write {topics.result(run, dev)}",
            f"topic write {topics.status(run, dev)}",
            "",
        ]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Write a file readable only by its owner (0600), never briefly world-readable."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_security_files(state_dir: Path, creds: RunCredentials, broker_host: str, broker_port: int) -> dict[str, Path]:
    """password_file, acl_file, observer.json and credentials.json (all 0600) in `state_dir`.

    observer.json is what `testbed status` prints and the TUI's attach mode reads:
    {"run", "host", "port", "username", "password", "topic"}.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    all_creds = [creds.server, creds.observer, *creds.devices.values()]
    paths = {
        "password_file": state_dir / "mosquitto.passwd",
        "acl_file": state_dir / "mosquitto.acl",
        "observer": state_dir / "observer.json",
        "credentials": state_dir / "credentials.json",
    }
    write_private(paths["password_file"], "\n".join(password_line(c) for c in all_creds) + "\n")
    write_private(paths["acl_file"], acl_text(creds))
    observer = {
        "run": creds.run,
        "host": broker_host,
        "port": broker_port,
        "username": creds.observer.username,
        "password": creds.observer.password,
        "topic": topics.events(creds.run),
    }
    write_private(paths["observer"], json.dumps(observer, indent=2) + "\n")
    write_private(paths["credentials"], json.dumps(asdict(creds), indent=2) + "\n")
    return paths


def load_credentials(path: Path) -> RunCredentials:
    """credentials.json (written by write_security_files) back as RunCredentials."""
    d = json.loads(Path(path).read_text())
    return RunCredentials(d["run"], Credential(**d["server"]), Credential(**d["observer"]),
                          {k: Credential(**v) for k, v in d["devices"].items()})
