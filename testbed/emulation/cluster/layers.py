"""What the traveling node image holds: three layers of this host's files, listed as
entries (pure listing of the filesystem; nothing is written).

- `system`: a skeleton root (directories, the merged-/usr links, a minimal /etc naming the
  users containers need), the Python installation the project's environment is built on
  (the interpreter and its standard library, without its tests, its own site-packages or
  tkinter), the tools node containers run (mosquitto, iperf3, ip, tc, iptables, nsenter,
  sh, sleep, ping) and every shared library these and the environment's extension modules
  load (their `ldd` closure, plus iptables' plugin directory, which it opens at run time);
- `env`: the project's virtual environment (`sys.prefix`), whole;
- `checkout`: the project's files (`git ls-files`, tracked and untracked-but-not-ignored),
  at the same absolute path as here, which the environment's editable install points to.

Each layer has a content key: a hash of its sources' names, sizes, modes and mtimes, so an
unchanged layer is known without reading a byte. Paths inside the image are the host's
paths: the entry points, the venv's interpreter link and the editable install work as they
are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.emulation.docker.image import etc_files, project_root
from testbed.errors import ResourceError

__all__ = ["Entry", "Layer", "TOOLS", "system_layer", "env_layer", "checkout_layer", "image_layers", "content_key"]

#: Programs a node container may run, looked up on this host (sbin included); a missing
#: one is left out and named in the image's labels.
TOOLS = ("sh", "sleep", "mosquitto", "iperf3", "ip", "tc", "iptables", "iptables-restore", "nsenter", "ping")
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Standard-library directories a node never imports (tests alone are 120 MB).
_STDLIB_SKIP = {"test", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3/tests"}
_SKELETON_DIRS = ("usr", "etc", "proc", "sys", "dev", "run", "var", "root", "home", "opt", "srv", "mnt", "sbin")
_STICKY_DIRS = ("tmp", "var/tmp")
# /sbin stays a directory: docker mounts its init at /sbin/docker-init (as in docker/image.py)
_MERGED_USR = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "lib32": "usr/lib32"}
_ETC_EXTRA = ("/etc/protocols", "/etc/services")
#: Parts of the environment no node runs: packages' test suites, torch's C++ test programs
#: and headers (only for compiling extensions): 250 of the environment's 1600 MB here.
_ENV_SKIP_DIRS = {"tests"}
_ENV_SKIP_TORCH = ("test", "include")  # not bin: torch starts its torch_shm_manager
#: Extension modules that would pull a GUI toolkit's libraries (X11, Tk) into the image.
_GUI_MODULES = ("_tkinter",)
_LDD_BATCH = 200


@dataclass(frozen=True)
class Entry:
    """One tar member: `name` is its path in the image without the leading '/'."""

    name: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    size: int = 0
    mtime: int = 0
    source: str | None = None  # the host file a "file" entry is read from
    linkname: str = ""
    data: bytes | None = None  # a "file" made here (the skeleton's /etc)


class Layer:
    """A layer by its content key; its entries are listed on first use only (the system
    layer's closure runs `ldd` over hundreds of files: skipped when the key is known)."""

    def __init__(self, name: str, key: str, make: Callable[[], tuple[Entry, ...]], notes: tuple[str, ...] = ()):
        self.name = name  # "system" | "env" | "checkout"
        self.key = key
        self.notes = notes
        self._make = make
        self._entries: tuple[Entry, ...] | None = None

    @property
    def entries(self) -> tuple[Entry, ...]:
        if self._entries is None:
            self._entries = self._make()
        return self._entries

    @property
    def size_bytes(self) -> int:
        return sum(e.size for e in self.entries)


def content_key(entries: Iterable[Entry]) -> str:
    """A hash of every entry's name, kind, mode, size, mtime and link target (not contents:
    an unchanged mtime and size stand for unchanged bytes, as for make)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.name}\0{e.kind}\0{e.mode:o}\0{e.size}\0{e.mtime}\0{e.linkname}\n".encode())
        if e.data is not None:
            h.update(e.data)
    return h.hexdigest()


class _Collector:
    """Entries keyed by image path; parents are added as directories before children."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                host = "/" + d
                mode = stat.S_IMODE(os.stat(host).st_mode) if os.path.isdir(host) else 0o755
                self.entries[d] = Entry(d, "dir", mode)

    def add_host(self, path: str) -> None:
        """`path` as it is on this host (lstat: a symlink stays a link), with its parents."""
        name = path.lstrip("/")
        if not name or name in self.entries:
            return
        st = os.lstat(path)
        self._parents(name)
        mode, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        if stat.S_ISLNK(st.st_mode):
            self.entries[name] = Entry(name, "symlink", 0o777, mtime=mtime, linkname=os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            self.entries[name] = Entry(name, "dir", mode, mtime=mtime)
        elif stat.S_ISREG(st.st_mode):
            self.entries[name] = Entry(name, "file", mode, st.st_size, mtime, source=path)
        # sockets, fifos and devices are never part of an image

    def add_resolved(self, path: str) -> None:
        """A file reached through links (`/lib/x/libc.so.6`): stored at its real directory
        (`usr/lib/x/...` under merged /usr), each link of the chain kept as a link."""
        seen = 0
        while seen < 40:
            p = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            if not os.path.lexists(p):
                return
            self.add_host(p)
            if not os.path.islink(p):
                return
            path = os.path.join(os.path.dirname(p), os.readlink(p))
            seen += 1

    def add_tree(self, root: str, skip: set[str] = frozenset()) -> None:
        """Everything under `root` (links not followed), but the relative paths in `skip`."""
        self.add_host(root)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            dirnames[:] = sorted(d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in skip)
            for n in dirnames + sorted(f for f in filenames if os.path.normpath(os.path.join(rel, f)) not in skip):
                self.add_host(os.path.join(dirpath, n))

    def add_data(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self.entries[name] = Entry(name, "file", mode, len(data), 0, data=data)

    def sorted_entries(self) -> tuple[Entry, ...]:
        return tuple(self.entries[k] for k in sorted(self.entries))


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _ldd(paths: list[str]) -> set[str]:
    """The libraries `paths` load, as the host's loader finds them ('not found' ones are
    libraries a package bundles next to the one that loads it: skipped)."""
    found: set[str] = set()
    for i in range(0, len(paths), _LDD_BATCH):
        r = subprocess.run(["ldd", *paths[i:i + _LDD_BATCH]], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            words = line.split()
            if "=>" in words:
                target = words[words.index("=>") + 1]
                if target.startswith("/"):
                    found.add(target)
            elif words and words[0].startswith("/") and len(words) == 2:
                found.add(words[0])  # the loader itself: /lib64/ld-linux-x86-64.so.2 (0x...)
    return found


def _tool_paths() -> tuple[list[str], list[str]]:
    found, missing = [], []
    for t in TOOLS:
        p = shutil.which(t, path=_SBIN_PATH)
        (found if p else missing).append(p or t)
    return found, missing


def _python_install() -> tuple[str, str]:
    """(interpreter, standard library directory) of the installation the venv is built on."""
    exe = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_paths()["stdlib"]
    return exe, os.path.realpath(stdlib)


def _extension_modules(roots: Iterable[str]) -> list[str]:
    out = []
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            out += [os.path.join(dirpath, n) for n in filenames
                    if ".so" in n and not n.startswith(_GUI_MODULES) and not os.path.islink(os.path.join(dirpath, n))]
    return sorted(out)


def _stat_key(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime)}\0{st.st_mode:o}\n".encode())
        except OSError:
            h.update(f"{p}\0-\n".encode())
    return h.hexdigest()


def _system_entries(extension_modules: list[str]) -> tuple[Entry, ...]:
    c = _Collector()
    for d in _SKELETON_DIRS:
        c.entries[d] = Entry(d, "dir", 0o755)
    for d in _STICKY_DIRS:
        c.entries[d] = Entry(d, "dir", 0o1777)
    for name, text in etc_files().items():
        c.add_data(name, text.encode())
    for p in _ETC_EXTRA:
        if os.path.isfile(p):
            c.add_data(p.lstrip("/"), Path(p).read_bytes())
    exe, stdlib = _python_install()
    c.add_resolved(exe)
    c.add_tree(stdlib, skip=_stdlib_skip(stdlib))
    tools, _ = _tool_paths()
    for t in tools:
        c.add_resolved(t)
    elves = [exe] + [os.path.realpath(t) for t in tools if _is_elf(os.path.realpath(t))]
    elves += _extension_modules([stdlib]) + extension_modules
    inside = (stdlib.rstrip("/") + "/", sys.prefix.rstrip("/") + "/")
    libs = sorted(p for p in _ldd(elves) if not os.path.realpath(p).startswith(inside))
    for lib in libs:
        c.add_resolved(lib)
    # iptables opens its match/target plugins at run time: its plugin directory, whole
    for lib in libs:
        if os.path.basename(lib).startswith("libxtables.so"):
            plugins = os.path.join(os.path.realpath(os.path.dirname(lib)), "xtables")
            if os.path.isdir(plugins):
                c.add_tree(plugins)
                for lib2 in sorted(_ldd(_extension_modules([plugins]))):
                    c.add_resolved(lib2)
    # the skeleton's merged-/usr links, never a host directory listed through them
    for name, target in _MERGED_USR.items():
        c.entries[name] = Entry(name, "symlink", 0o777, linkname=target)
    return c.sorted_entries()


def _stdlib_skip(stdlib: str) -> set[str]:
    dynload = os.path.join(stdlib, "lib-dynload")
    gui = {f"lib-dynload/{n}" for n in os.listdir(dynload) if n.startswith(_GUI_MODULES)} if os.path.isdir(dynload) else set()
    return _STDLIB_SKIP | gui | {d for d in os.listdir(stdlib) if d.startswith("config-")}


def system_layer(env: Layer) -> Layer:
    """Skeleton, Python installation, tools and the shared libraries all of them load.
    Its key stands for its inputs (the interpreter, the standard library, the tools, the
    environment's extension modules, and the package database and loader cache, which
    change whenever a system library does): the `ldd` closure runs only when it changed."""
    exe, stdlib = _python_install()
    tools, missing = _tool_paths()
    modules = sorted("/" + e.name for e in env.entries if e.kind == "file" and ".so" in os.path.basename(e.name)
                     and not os.path.basename(e.name).startswith(_GUI_MODULES))
    std = _Collector()
    std.add_tree(stdlib, skip=_stdlib_skip(stdlib))
    h = hashlib.sha256()
    h.update(content_key(Entry(n, "file", 0o644, len(t), data=t.encode()) for n, t in sorted(etc_files().items())).encode())
    h.update(_stat_key([exe, *_ETC_EXTRA, *tools, "/var/lib/dpkg/status", "/etc/ld.so.cache"]).encode())
    h.update(content_key(std.sorted_entries()).encode())
    h.update(_stat_key(modules).encode())
    h.update(repr((TOOLS, sorted(_stdlib_skip(stdlib)), _SKELETON_DIRS, _STICKY_DIRS, _MERGED_USR)).encode())
    notes = tuple(f"not on this host, left out: {m}" for m in missing)
    return Layer("system", "in-" + h.hexdigest(), lambda: _system_entries(modules), notes)


def env_layer() -> Layer:
    """The project's virtual environment, whole (its bin/python links to the installation
    of the system layer)."""
    if sys.prefix == sys.base_prefix:
        raise ResourceError("the traveling image carries the project's virtual environment, but this Python runs "
                            f"outside one ({sys.prefix}); run the testbed from its .venv (see the README)")
    prefix = os.path.realpath(sys.prefix)
    site = os.path.relpath(os.path.realpath(sysconfig.get_paths()["purelib"]), prefix)
    skip = {os.path.join(site, "torch", d) for d in _ENV_SKIP_TORCH}
    for dirpath, dirnames, _ in os.walk(os.path.join(prefix, site)):
        skip |= {os.path.relpath(os.path.join(dirpath, d), prefix) for d in dirnames if d in _ENV_SKIP_DIRS}
    c = _Collector()
    c.add_tree(prefix, skip=skip)
    entries = c.sorted_entries()
    return Layer("env", content_key(entries), lambda: entries)


def _checkout_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files (git), else every file but .git and
    the virtual environment."""
    try:
        r = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        r = None
    if r is not None and r.returncode == 0:
        return sorted({p for p in r.stdout.decode(errors="surrogateescape").split("\0") if p})
    venv = os.path.realpath(sys.prefix)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git" and os.path.realpath(os.path.join(dirpath, d)) != venv]
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in filenames]
    return sorted(out)


def checkout_layer(root: Path | None = None) -> Layer:
    """The project's files at their absolute path (what the editable install imports)."""
    root = Path(root or project_root()).resolve()
    c = _Collector()
    c.add_host(str(root))
    for rel in _checkout_files(root):
        p = os.path.join(root, rel)
        if os.path.lexists(p):  # a tracked file deleted in the work tree is simply absent
            c.add_host(p)
    entries = c.sorted_entries()
    return Layer("checkout", content_key(entries), lambda: entries)


def image_layers() -> list[Layer]:
    """The three layers, bottom first."""
    env = env_layer()
    return [system_layer(env), env, checkout_layer()]
