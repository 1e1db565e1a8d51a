"""Per-run MQTT accounts, passwords and ACLs: who may read and write which relay topics.

Every run gets fresh random passwords (128 bits) for each role and each device. Each role
logs in as itself, so that with the broker's client-id binding (mosquitto
`use_username_as_clientid` on the cell listener) no two live connections share an
account and nobody can take another's connection over:

    account    listener  may                                              connections
    <device>   cell      read  tb/<run>/dev/<device>/task                 its agent
                         write tb/<run>/dev/<device>/result, .../status   (will: its status)
    server     cell      write tb/<run>/dev/+/task, tb/<run>/events       the orchestrator
                         read  tb/<run>/dev/+/result, tb/<run>/dev/+/status  (one at a time)
                         readwrite tb/<run>/server/# (its QoS-1 probe)
    events     cell      write tb/<run>/events                            the run owner's event
                                                                          publisher (one at a time)
    monitor    watch     read  tb/<run>/dev/+/status                      owner-wait, keeper (many)
    observer   watch     read  tb/<run>/events                            TUI attach (many)

On the cell listener the broker replaces every client id by the account's name: a device
that connects with the client id `tb-<run>-dev02` or `server` is still `dev01`, and only
dev01's own password can displace dev01's connection. The watch listener (the cell
listener's port + 1) serves the read-only accounts whose holders are root-side tools that
may connect several at once; only `monitor` and `observer` can log in there.

`write_security_files` writes, 0600 into the run's state directory (root-only):
mosquitto.passwd / mosquitto.acl (every account: what a broker with one listener uses),
watch.passwd / watch.acl (monitor and observer: the watch listener's), observer.json and
credentials.json. Passwords are PBKDF2-SHA512 in mosquitto 2's `$7$` format (like
`mosquitto_passwd -b`). Nothing else may connect: the broker runs with
`allow_anonymous false`.

A Swarm cell adds a control plane: a broker of its own on the cell's control network,
which no device's agent can log in to (docs/cluster.md). Its accounts (`ControlCredentials`):

    account          may                                              connections
    control          write tb/<run>/ctl/+/cmd                          the run owner (one)
                     read  tb/<run>/ctl/+/reply, tb/<run>/ctl/+/state
    keeper.<device>  read  tb/<run>/ctl/<device>/cmd                   the device's keeper
                     write tb/<run>/ctl/<device>/reply, .../state      (will: its state)

(`keeper.` cannot begin a device id, whose names have no dot.) On the cell's own broker the
`control` account may write only devices' status topics (`grant_undertaker`): when a
cluster node is lost, its agents' connections die without a word (their host is gone, no
FIN reaches the broker), and the run owner says "offline" for them at once instead of
leaving the orchestrator to wait for their keepalives.
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
    "EVENTS_USER",
    "MONITOR_USER",
    "OBSERVER_USER",
    "ROLE_USERS",
    "WATCH_USERS",
    "Credential",
    "RunCredentials",
    "make_credentials",
    "password_line",
    "acl_text",
    "watch_acl_text",
    "write_security_files",
    "write_private",
    "load_credentials",
    "CONTROL_USER",
    "keeper_user",
    "ControlCredentials",
    "make_control_credentials",
    "control_acl_text",
    "write_control_files",
    "grant_undertaker",
]

SERVER_USER = "server"  # the orchestrator
EVENTS_USER = "events"  # the run owner's event publisher
MONITOR_USER = "monitor"  # read-only: every device's status
OBSERVER_USER = "observer"  # read-only: the run's events
ROLE_USERS = (SERVER_USER, EVENTS_USER, MONITOR_USER, OBSERVER_USER)
#: The accounts of the watch listener (read-only; several connections each).
WATCH_USERS = (MONITOR_USER, OBSERVER_USER)
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
    events: Credential | None = None  # None: credentials.json of an older run (server did it all)
    monitor: Credential | None = None

    def for_device(self, device: str) -> Credential:
        return self.devices[device]

    def accounts(self) -> list[Credential]:
        """Every account of the run: roles first, then the devices."""
        roles = [self.server, self.events, self.monitor, self.observer]
        return [c for c in roles if c is not None] + list(self.devices.values())


def make_credentials(run: str, device_ids: list[str]) -> RunCredentials:
    """Fresh random passwords (128 bits each) for one run."""
    for d in device_ids:
        if d in ROLE_USERS:
            raise ValueError(f"device id {d!r} collides with a reserved MQTT user name "
                             f"({', '.join(ROLE_USERS)}); rename the device")

    def cred(user: str) -> Credential:
        return Credential(user, secrets.token_urlsafe(16))

    return RunCredentials(
        run=run,
        server=cred(SERVER_USER),
        observer=cred(OBSERVER_USER),
        devices={d: cred(d) for d in device_ids},
        events=cred(EVENTS_USER),
        monitor=cred(MONITOR_USER),
    )


def password_line(cred: Credential, salt: bytes | None = None) -> str:
    """One `user:$7$101$salt$hash` line of a mosquitto 2 password file."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", cred.password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"{cred.username}:$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _role_acl(run: str, user: str) -> list[str]:
    dev = f"tb/{run}/dev/+"
    return {
        SERVER_USER: [f"topic write {dev}/task", f"topic read {dev}/result", f"topic read {dev}/status",
                      f"topic write {topics.events(run)}", f"topic readwrite tb/{run}/server/#"],
        EVENTS_USER: [f"topic write {topics.events(run)}"],
        MONITOR_USER: [f"topic read {dev}/status"],
        OBSERVER_USER: [f"topic read {topics.events(run)}"],
    }[user]


def acl_text(creds: RunCredentials) -> str:
    """The mosquitto ACL of every account (the cell listener's, or a one-listener broker's)."""
    run = creds.run
    lines: list[str] = []
    for cred in creds.accounts():
        if cred.username in ROLE_USERS:
            rules = _role_acl(run, cred.username)
        else:
            dev = cred.username
            rules = [f"topic read {topics.task(run, dev)}", f"topic write {topics.result(run, dev)}",
                     f"topic write {topics.status(run, dev)}"]
        lines += [f"user {cred.username}", *rules, ""]
    return "\n".join(lines)


def watch_acl_text(creds: RunCredentials) -> str:
    """The watch listener's ACL: monitor and observer, read-only."""
    lines: list[str] = []
    for cred in (creds.monitor, creds.observer):
        if cred is not None:
            lines += [f"user {cred.username}", *_role_acl(creds.run, cred.username), ""]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Write a file readable only by its owner (0600), never briefly world-readable, never
    through a symlink planted where the file goes."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_security_files(state_dir: Path, creds: RunCredentials, broker_host: str, broker_port: int,
                         *, watch_port: int | None = None) -> dict[str, Path]:
    """The broker's password and ACL files (one-listener and watch-listener sets),
    observer.json and credentials.json (all 0600) in `state_dir`.

    observer.json is what `testbed status` prints and the TUI's attach mode reads:
    {"run", "host", "port", "username", "password", "topic"}; its port is `watch_port`
    when the broker has a watch listener (BrokerSettings.watch_password_file), else
    `broker_port`.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    paths = {
        "password_file": state_dir / "mosquitto.passwd",
        "acl_file": state_dir / "mosquitto.acl",
        "watch_password_file": state_dir / "watch.passwd",
        "watch_acl_file": state_dir / "watch.acl",
        "observer": state_dir / "observer.json",
        "credentials": state_dir / "credentials.json",
    }
    watchers = [c for c in (creds.monitor, creds.observer) if c is not None]
    write_private(paths["password_file"], "\n".join(password_line(c) for c in creds.accounts()) + "\n")
    write_private(paths["acl_file"], acl_text(creds))
    write_private(paths["watch_password_file"], "\n".join(password_line(c) for c in watchers) + "\n")
    write_private(paths["watch_acl_file"], watch_acl_text(creds))
    observer = {
        "run": creds.run,
        "host": broker_host,
        "port": watch_port if watch_port is not None else broker_port,
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
    opt = (lambda k: Credential(**d[k]) if d.get(k) else None)  # noqa: E731 - absent in older runs' files
    return RunCredentials(d["run"], Credential(**d["server"]), Credential(**d["observer"]),
                          {k: Credential(**v) for k, v in d["devices"].items()}, opt("events"), opt("monitor"))


# -- a Swarm cell's control plane ------------------------------------------------------

CONTROL_USER = "control"  # the run owner, commanding the devices' keepers


def keeper_user(device: str) -> str:
    """The control account of `device`'s keeper (a dot: never a device id or a role)."""
    return f"keeper.{device}"


@dataclass(frozen=True)
class ControlCredentials:
    run: str
    control: Credential
    keepers: dict[str, Credential]  # device id -> its keeper's account

    def accounts(self) -> list[Credential]:
        return [self.control, *self.keepers.values()]


def make_control_credentials(run: str, device_ids: list[str]) -> ControlCredentials:
    """Fresh random passwords (128 bits each) for a cell's control plane."""
    return ControlCredentials(run, Credential(CONTROL_USER, secrets.token_urlsafe(16)),
                              {d: Credential(keeper_user(d), secrets.token_urlsafe(16)) for d in device_ids})


def control_acl_text(creds: ControlCredentials) -> str:
    """The control broker's ACL: the run owner commands every keeper; a keeper hears only
    its own commands and writes only its own replies and state."""
    run = creds.run
    lines = [f"user {creds.control.username}", f"topic write {topics.control_filter(run, 'cmd')}",
             f"topic read {topics.control_filter(run, 'reply')}", f"topic read {topics.control_filter(run, 'state')}", ""]
    for dev, cred in creds.keepers.items():
        lines += [f"user {cred.username}", f"topic read {topics.control(run, dev, 'cmd')}",
                  f"topic write {topics.control(run, dev, 'reply')}", f"topic write {topics.control(run, dev, 'state')}",
                  ""]
    return "\n".join(lines)


def write_control_files(state_dir: Path, creds: ControlCredentials) -> dict[str, Path]:
    """The control broker's password and ACL files (0600) in `state_dir`."""
    paths = {"password_file": Path(state_dir) / "control.passwd", "acl_file": Path(state_dir) / "control.acl"}
    write_private(paths["password_file"], "\n".join(password_line(c) for c in creds.accounts()) + "\n")
    write_private(paths["acl_file"], control_acl_text(creds))
    return paths


def grant_undertaker(paths: dict[str, Path], control: ControlCredentials) -> None:
    """Add the `control` account to the cell broker's files (`write_security_files`'s
    `password_file` and `acl_file`): it may write every device's status topic, nothing else."""
    cred = control.control
    pw, acl = Path(paths["password_file"]), Path(paths["acl_file"])
    write_private(pw, pw.read_text() + password_line(cred) + "\n")
    write_private(acl, acl.read_text() + f"\nuser {cred.username}\ntopic write {topics.device_leaf_filter(control.run, 'status')}\n")
