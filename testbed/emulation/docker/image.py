"""The node image without a registry: `docker import` of a skeleton root filesystem.

The image holds only directories, the merged-/usr symlinks and a minimal /etc (passwd and
group naming root, nobody and the host's mosquitto user, nsswitch.conf): a few hundred
bytes. Every container bind-mounts, read-only, the host's /usr, the Python installation
the project's virtual environment is built on, the environment and the checkout, at the
same paths — never the host's /etc. So a container runs exactly the host's interpreter and
packages (torch included) with no copy and no pull — the image is tied to this host's
layout, which its labels record. Users with a registry can build a self-contained image
from images/Dockerfile.*.

Also the one place that opens a docker client (`docker_client`), with daemon errors turned
into `ResourceError`s that say how to start dockerd.
"""

from __future__ import annotations

import io
import json
import pwd
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from testbed.errors import ResourceError

__all__ = [
    "IMAGE",
    "IMAGE_LABEL",
    "HostMount",
    "ImageInfo",
    "docker_client",
    "host_mounts",
    "etc_files",
    "project_root",
    "skeleton_tar",
    "build_image",
    "image_info",
    "remove_image",
    "python_bin",
]

#: The local image every node container runs; kept between runs (`testbed down` keeps it).
IMAGE = "testbed-node:local"
IMAGE_LABEL = "testbed.image"
_API_TIMEOUT_S = 60

_SKELETON_DIRS = ("usr", "etc", "proc", "sys", "dev", "run", "var", "root", "home", "opt", "srv", "mnt", "sbin")
_STICKY_DIRS = ("tmp", "var/tmp")
# /sbin stays a real directory: docker mounts its init (tini) at /sbin/docker-init, which
# cannot be created inside the read-only /usr mount that a symlink would point into.
_SKELETON_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "lib32": "usr/lib32"}


@dataclass(frozen=True)
class HostMount:
    """A host path bind-mounted at the same path inside every node container."""

    path: str
    read_only: bool = True


@dataclass(frozen=True)
class ImageInfo:
    name: str
    id: str
    size_bytes: int
    created: str
    labels: dict[str, str]


def docker_client(timeout_s: int = _API_TIMEOUT_S) -> docker.DockerClient:
    """A client of the local daemon (default socket or DOCKER_HOST); ResourceError if none."""
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except docker.errors.DockerException as e:
        raise ResourceError(
            f"no docker daemon answers ({e}); start one with `sudo .ci/start-dockerd` "
            "(or your distribution's docker service)"
        ) from None
    return client


def project_root() -> Path:
    """The checkout the `testbed` package is imported from (an editable install)."""
    return Path(__file__).resolve().parents[3]


def python_bin() -> str:
    """The interpreter of the project's environment, as a path valid inside containers."""
    return str(Path(sys.prefix) / "bin" / "python")


def host_mounts() -> list[HostMount]:
    """The read-only host paths a node container needs, outermost first, no duplicates.
    Not /etc: the image's own minimal /etc names the users the containers need."""
    candidates = ["/usr", sys.base_prefix, sys.prefix, str(project_root())]
    out: list[str] = []
    for p in sorted({str(Path(c).resolve()) for c in candidates}, key=lambda x: (x.count("/"), x)):
        if any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            continue  # already visible through an outer mount
        out.append(p)
    return [HostMount(p) for p in out]


def _system_users() -> list[tuple[str, int, int]]:
    """(name, uid, gid) of the users a container needs: root, the host's mosquitto user
    (the broker drops to it; the files it reads are the host's, owned by that uid) and nobody."""
    users = [("root", 0, 0)]
    try:
        ent = pwd.getpwnam("mosquitto")
        users.append(("mosquitto", ent.pw_uid, ent.pw_gid))
    except KeyError:
        pass
    return users + [("nobody", 65534, 65534)]


def etc_files() -> dict[str, str]:
    """The image's /etc: passwd, group and nsswitch.conf (files first; the hosts docker
    writes, then its DNS)."""
    users = _system_users()
    return {
        "etc/passwd": "".join(f"{n}:x:{u}:{g}::/nonexistent:/usr/sbin/nologin\n" for n, u, g in users),
        "etc/group": "".join(f"{n}:x:{g}:\n" for n, _, g in users),
        "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    }


def skeleton_tar() -> bytes:
    """The image's whole root filesystem as an uncompressed tar (directories, links, /etc)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for d in _SKELETON_DIRS + _STICKY_DIRS:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o1777 if d in _STICKY_DIRS else 0o755
            tf.addfile(ti)
        for name, target in _SKELETON_LINKS.items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
        for name, text in etc_files().items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(text.encode()), 0o644
            tf.addfile(ti, io.BytesIO(text.encode()))
    return buf.getvalue()


def _labels() -> dict[str, str]:
    return {
        IMAGE_LABEL: "node",
        "testbed.mounts": ",".join(m.path for m in host_mounts()),
        "testbed.python": python_bin(),
        "testbed.users": ",".join(f"{n}={u}:{g}" for n, u, g in _system_users()),
    }


def image_info(client: docker.DockerClient, name: str = IMAGE) -> ImageInfo | None:
    try:
        img = client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as e:
        raise ResourceError(f"docker image {name}: {e.explanation or e}") from None
    a = img.attrs
    return ImageInfo(name, img.id, int(a.get("Size", 0)), a.get("Created", ""), dict(img.labels or {}))


def build_image(client: docker.DockerClient, name: str = IMAGE, force: bool = False) -> tuple[ImageInfo, bool]:
    """Make `name` from the skeleton (docker import); (info, built). An image already made
    for this host's layout is kept unless `force`; a replaced one is removed when unused."""
    old = image_info(client, name)
    labels = _labels()
    if old is not None and not force and all(old.labels.get(k) == v for k, v in labels.items()):
        return old, False
    repo, tag = name.rsplit(":", 1) if ":" in name else (name, "latest")
    changes = [f"LABEL {k}={json.dumps(v)}" for k, v in labels.items()]
    changes += ['ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'CMD ["/usr/bin/sleep", "infinity"]']
    try:
        client.api.import_image_from_data(skeleton_tar(), repository=repo, tag=tag, changes=changes)
    except docker.errors.APIError as e:
        raise ResourceError(f"docker import of {name} failed: {e.explanation or e}") from None
    new = image_info(client, name)
    if new is None:
        raise ResourceError(f"docker import reported success but {name} does not exist")
    if old is not None and old.id != new.id:
        try:
            client.images.remove(old.id, noprune=False)
        except docker.errors.APIError:
            pass  # still used by a container: docker keeps it, and so do we
    return new, True


def remove_image(client: docker.DockerClient, name: str = IMAGE) -> bool:
    """Remove the node image; False when it did not exist."""
    try:
        client.images.remove(name)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as e:
        raise ResourceError(f"cannot remove {name}: {e.explanation or e} (a container still uses it? `testbed down --all`)") from None
    return True
