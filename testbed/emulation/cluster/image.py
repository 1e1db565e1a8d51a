"""The traveling node image: this checkout, its virtual environment and the Python and
tools under them, as an OCI image pushed into a registry (no external registry, no docker
daemon needed to build it) and pulled by digest by every daemon of a cluster.

A layer whose content key (layers.py) is in the cache and whose blob the registry still
holds is not read again: after a commit only the checkout layer (~20 MB) is streamed. The
cache (`CACHE`, next to the store) maps content keys to blob digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.emulation.cluster.layers import Layer, image_layers
from testbed.emulation.cluster.oci import MANIFEST_TYPE, BlobRef, image_config, manifest, tar_stream
from testbed.emulation.cluster.registry import STORE, RegistryClient
from testbed.emulation.docker.image import project_root, python_bin

__all__ = ["REPO", "CACHE", "IMAGE_ENV", "IMAGE_CMD", "TravelImage", "image_tag", "image_env", "push_image"]

REPO = "testbed/node"
CACHE = STORE.parent / "image-cache.json"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED=1"]
IMAGE_CMD = ["/usr/bin/sleep", "infinity"]


def image_env() -> list[str]:
    """The image's environment: IMAGE_ENV, and PYTHONPATH naming this checkout, so that its
    `testbed` is imported inside even when the environment's editable install points to
    another checkout (a worktree sharing one virtual environment)."""
    return [*IMAGE_ENV, f"PYTHONPATH={project_root()}"]


@dataclass
class TravelImage:
    """An image in a registry: `ref(host)` is what a daemon pulls."""

    repo: str
    tag: str
    digest: str  # the manifest's
    layers: list[dict[str, Any]] = field(default_factory=list)  # name, digest, size_bytes, pushed, seconds
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(int(la["size_bytes"]) for la in self.layers)

    def ref(self, registry: str) -> str:
        return f"{registry}/{self.repo}@{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "tag": self.tag, "digest": self.digest, "size_bytes": self.size_bytes,
                "layers": self.layers, "seconds": round(self.seconds, 3), "notes": self.notes}


def image_tag(root: Path | None = None) -> str:
    """One tag per checkout (two worktrees never replace each other's image)."""
    return "c" + hashlib.sha256(str(Path(root or project_root()).resolve()).encode()).hexdigest()[:12]


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _labels(layers: list[Layer]) -> dict[str, str]:
    return {
        "testbed.image": "travel",
        "testbed.python": python_bin(),
        "testbed.checkout": str(project_root()),
        "testbed.layers": ",".join(f"{la.name}:{la.key[:16]}" for la in layers),
    }


def push_image(client: RegistryClient, layers: list[Layer] | None = None, cache_path: Path = CACHE) -> TravelImage:
    """Push the image for this checkout into the registry behind `client` (layers the
    registry already holds are skipped); returns its digest and what was pushed."""
    t0 = time.perf_counter()
    layers = layers if layers is not None else image_layers()
    cache = _load_cache(cache_path)
    refs: list[BlobRef] = []
    img = TravelImage(REPO, image_tag(), "")
    for layer in layers:
        t1 = time.perf_counter()
        hit = cache.get(layer.key)
        if hit and client.blob_exists(REPO, hit["digest"]):
            ref, pushed = BlobRef(hit["digest"], int(hit["size"])), False
        else:
            ref, pushed = client.push_stream(REPO, tar_stream(layer.entries)), True
            cache[layer.key] = {"digest": ref.digest, "size": ref.size, "layer": layer.name}
            _save_cache(cache_path, cache)
        refs.append(ref)
        img.layers.append({"name": layer.name, "digest": ref.digest, "size_bytes": ref.size, "pushed": pushed,
                           "seconds": round(time.perf_counter() - t1, 3)})
        img.notes += list(layer.notes)
    config = client.push_bytes(REPO, image_config(refs, _labels(layers), image_env(), IMAGE_CMD))
    img.digest = client.put_manifest(REPO, img.tag, manifest(config, refs), MANIFEST_TYPE)
    img.seconds = time.perf_counter() - t0
    return img


def remove_store(store: Path = STORE, cache_path: Path = CACHE) -> bool:
    """Remove the image store and its cache; False when there was none."""
    import shutil

    cache_path.unlink(missing_ok=True)
    if not store.exists():
        return False
    shutil.rmtree(store)
    return True
