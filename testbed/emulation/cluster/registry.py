"""An image registry for a cluster: Distribution (`docker-registry`, Debian's package)
serving one image store over plain HTTP, and the four calls of its HTTP API (v2) that
push an image: blob exists, blob upload (streamed), manifest put, manifest digest.

The store (`STORE`) outlives clusters, as a node image outlives runs: an image is pushed
into it once, and every cluster's registry serves it to that cluster's daemons, which pull
by digest. `serve()` runs a registry for as long as a block needs one (a build); a cluster
keeps its own in the manager's namespace (cluster.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urljoin

import requests

from testbed.emulation.cluster.oci import BlobRef
from testbed.emulation.procs import spawn_in, stop_pid_sync
from testbed.errors import ResourceError

__all__ = ["STORE", "REGISTRY_PORT", "REGISTRY_BIN", "registry_config", "start_registry", "wait_ready", "serve",
           "collect_garbage", "RegistryClient"]

STORE = Path("/var/lib/testbed-cluster/registry")
REGISTRY_PORT = 5000
REGISTRY_BIN = "docker-registry"
_HTTP_TIMEOUT_S = 30.0


def registry_config(store: Path, listen: str) -> str:
    """The registry's configuration (YAML): filesystem storage, no auth, plain HTTP on
    `listen` (an address on the cluster's datacenter network, or loopback), quiet logs."""
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {store}\n  delete:\n    enabled: true\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: {listen}\n"
    )


def start_registry(config: Path, log: Path, netns: str | None = None,
                   cgroup_procs: Sequence[Path] = ()) -> subprocess.Popen:
    """`docker-registry serve CONFIG` in `netns` (None: this namespace) and the cgroups given."""
    binary = shutil.which(REGISTRY_BIN)
    if binary is None:
        raise ResourceError(f"{REGISTRY_BIN} is not installed; `apt-get install docker-registry` "
                            "(Debian's Distribution registry; the Makefile's SYSTEM_PACKAGES has it)")
    return spawn_in(netns, [binary, "serve", str(config)], log_path=log, cgroup_procs=cgroup_procs,
                    die_with_owner=False)  # the cluster outlives `testbed cluster up`


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 15.0, log: Path | None = None) -> None:
    """Until GET /v2/ answers 200; ResourceError naming the log when it does not."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/v2/", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-800:] if log is not None and log.exists() else ""
            raise ResourceError(f"the registry at {url} did not answer within {timeout_s:g} s; its log ({log}): {tail}")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(store: Path = STORE, workdir: Path | None = None) -> Iterator[str]:
    """A registry on 127.0.0.1 (a free port) over `store` for the block; yields its URL.
    Its config and log go to `workdir` (default: the store's parent)."""
    store.mkdir(parents=True, exist_ok=True)
    workdir = workdir or store.parent
    port = _free_port()
    config, log = workdir / f"registry-{port}.yml", workdir / f"registry-{port}.log"
    config.write_text(registry_config(store, f"127.0.0.1:{port}"))
    proc = start_registry(config, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log=log)
        yield url
    finally:
        stop_pid_sync(proc.pid)
        proc.wait(timeout=5)
        config.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def collect_garbage(store: Path = STORE) -> int:
    """Delete what no tag names any more (an image replaced by a newer build of the same
    checkout: its old checkout layer) with the registry's own garbage collector; no
    registry may serve the store meanwhile. Returns the bytes freed."""
    binary = shutil.which(REGISTRY_BIN)
    if binary is None or not store.exists():
        return 0
    before = _tree_bytes(store)
    config = store.parent / f"registry-gc-{os.getpid()}.yml"
    config.write_text(registry_config(store, "127.0.0.1:0"))
    try:
        r = subprocess.run([binary, "garbage-collect", "--delete-untagged", str(config)], capture_output=True,
                           text=True, timeout=600)
    finally:
        config.unlink(missing_ok=True)
    if r.returncode != 0:
        raise ResourceError(f"{REGISTRY_BIN} garbage-collect failed: {r.stderr.strip()[-500:]}")
    return before - _tree_bytes(store)


class _Hashing:
    """Passes chunks through while counting and hashing them."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks = chunks
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for c in self.chunks:
            self.sha.update(c)
            self.size += len(c)
            yield c


class RegistryClient:
    """The calls of the registry HTTP API v2 that a push and a pull-by-digest need."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.http = requests.Session()

    def _fail(self, what: str, r: requests.Response) -> ResourceError:
        return ResourceError(f"registry {self.url}: {what} answered {r.status_code} {r.text[:300]}")

    def blob_exists(self, repo: str, digest: str) -> bool:
        r = self.http.head(f"{self.url}/v2/{repo}/blobs/{digest}", timeout=_HTTP_TIMEOUT_S)
        return r.status_code == 200

    def _start_upload(self, repo: str) -> str:
        r = self.http.post(f"{self.url}/v2/{repo}/blobs/uploads/", timeout=_HTTP_TIMEOUT_S)
        if r.status_code != 202:
            raise self._fail("starting an upload", r)
        return urljoin(self.url + "/", r.headers["Location"])

    def _finish(self, location: str, digest: str) -> None:
        sep = "&" if "?" in location else "?"
        r = self.http.put(f"{location}{sep}digest={digest}", timeout=_HTTP_TIMEOUT_S * 4)
        if r.status_code != 201:
            raise self._fail(f"finishing the upload of {digest}", r)

    def push_stream(self, repo: str, chunks: Iterable[bytes]) -> BlobRef:
        """Upload a blob of unknown digest in one streamed PATCH (chunked encoding),
        hashing it on the way; the final PUT names the digest, which the registry checks."""
        loc = self._start_upload(repo)
        body = _Hashing(chunks)
        r = self.http.patch(loc, data=iter(body), headers={"Content-Type": "application/octet-stream"},
                            timeout=_HTTP_TIMEOUT_S * 4)
        if r.status_code != 202:
            raise self._fail("a streamed upload", r)
        digest = f"sha256:{body.sha.hexdigest()}"
        self._finish(urljoin(self.url + "/", r.headers["Location"]), digest)
        return BlobRef(digest, body.size)

    def push_bytes(self, repo: str, data: bytes) -> BlobRef:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if not self.blob_exists(repo, digest):
            loc = self._start_upload(repo)
            sep = "&" if "?" in loc else "?"
            r = self.http.put(f"{loc}{sep}digest={digest}", data=data,
                              headers={"Content-Type": "application/octet-stream"}, timeout=_HTTP_TIMEOUT_S)
            if r.status_code != 201:
                raise self._fail(f"uploading {digest}", r)
        return BlobRef(digest, len(data))

    def put_manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        """Store the manifest under `tag`; returns its digest (what a pull by digest names)."""
        r = self.http.put(f"{self.url}/v2/{repo}/manifests/{tag}", data=body,
                          headers={"Content-Type": media_type}, timeout=_HTTP_TIMEOUT_S)
        if r.status_code != 201:
            raise self._fail(f"storing the manifest {repo}:{tag}", r)
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if r.headers.get("Docker-Content-Digest", digest) != digest:
            raise ResourceError(f"registry {self.url}: manifest digest {r.headers['Docker-Content-Digest']} "
                                f"is not the {digest} of what was sent")
        return digest

    def manifest_exists(self, repo: str, digest: str, media_type: str) -> bool:
        r = self.http.head(f"{self.url}/v2/{repo}/manifests/{digest}", headers={"Accept": media_type},
                           timeout=_HTTP_TIMEOUT_S)
        return r.status_code == 200
