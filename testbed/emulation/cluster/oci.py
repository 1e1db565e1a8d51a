"""The traveling image's format (pure): a layer's entries as an uncompressed tar stream,
and the OCI image config and manifest that name the layers by digest.

Layers stay uncompressed (`application/vnd.oci.image.layer.v1.tar`): on one machine or a
datacenter network gzip costs more CPU than it saves in transfer, and a layer's digest is
then also its diff id. Docker pulls such images from any Distribution registry.
"""

from __future__ import annotations

import json
import platform
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from testbed.emulation.cluster.layers import Entry
from testbed.errors import ResourceError

__all__ = ["MANIFEST_TYPE", "CONFIG_TYPE", "LAYER_TYPE", "BlobRef", "tar_stream", "image_config", "manifest",
           "canonical_json"]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
_BLOCK = 512
_CHUNK = 1 << 20
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}
_KIND = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}


@dataclass(frozen=True)
class BlobRef:
    digest: str  # "sha256:<hex>"
    size: int


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.name)
    ti.type = _KIND[e.kind]
    ti.mode = e.mode
    ti.mtime = e.mtime
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.size = e.size if e.kind == "file" else 0
    ti.linkname = e.linkname
    return ti


def tar_stream(entries: Iterable[Entry]) -> Iterator[bytes]:
    """The layer as tar bytes, file contents read in 1 MiB chunks (nothing held whole).
    Every member belongs to root (node processes drop to their own uids). A host file that
    changes size while it is read fails loudly: the layer's digest would not match its key."""
    for e in entries:
        yield _tarinfo(e).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        if e.kind != "file":
            continue
        if e.data is not None:
            yield e.data
        else:
            left = e.size
            with open(e.source, "rb") as f:  # type: ignore[arg-type]
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        raise ResourceError(f"{e.source} shrank while the image was built; build it again")
                    left -= len(chunk)
                    yield chunk
        if e.size % _BLOCK:
            yield b"\0" * (_BLOCK - e.size % _BLOCK)
    yield b"\0" * (2 * _BLOCK)


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def image_config(layers: list[BlobRef], labels: dict[str, str], env: list[str], cmd: list[str]) -> bytes:
    """The OCI image config: uncompressed layers, so each diff id is the layer's digest."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    return canonical_json({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env, "Cmd": cmd, "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
    })


def manifest(config: BlobRef, layers: list[BlobRef], annotations: dict[str, str] | None = None) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": b.size} for b in layers],
    }
    if annotations:
        doc["annotations"] = annotations
    return canonical_json(doc)
