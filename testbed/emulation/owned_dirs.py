"""Directories the testbed makes and may later delete: made with a marker file, removed
only when proven to be ours.

Every `rmtree` of the testbed goes through `remove_owned_dir`: the path must resolve to a
directory strictly inside the directory the command owns (`owner`: the run root, an
--out-dir), must not be a symlink, and must hold the marker that `make_owned_dir` wrote.
A name that escapes (`..`, `/tmp/x`) or a directory the user made is never touched.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from testbed.errors import InputError, ResourceError

__all__ = ["MARKER", "make_owned_dir", "mark_owned", "is_owned", "remove_owned_dir"]

#: The marker file in every directory the testbed made (its content says who made it).
MARKER = ".testbed-owned"


def mark_owned(path: Path) -> Path:
    """Write the marker into `path`, a directory this process has just made."""
    fd = os.open(Path(path) / MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("made by the testbed; `testbed down` or the command that made it removes this directory\n")
    return Path(path)


def make_owned_dir(path: Path, mode: int = 0o700) -> Path:
    """mkdir `path` (its parent must exist; FileExistsError if it exists) and mark it ours."""
    path = Path(path)
    path.mkdir(mode=mode)
    return mark_owned(path)


def is_owned(path: Path) -> bool:
    """Whether `path` is a real directory (no symlink) holding a regular-file marker."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return stat.S_ISREG(os.lstat(Path(path) / MARKER).st_mode)
    except OSError:
        return False


def _inside(path: Path, owner: Path) -> Path:
    """`path` resolved, when it lies strictly inside `owner` (resolved); else InputError."""
    real_owner = Path(owner).resolve()
    # resolve the parent only: the last component must not be followed if it is a symlink
    real = Path(path).parent.resolve() / Path(path).name
    if Path(path).name in ("", ".", "..") or real == real_owner or not real.is_relative_to(real_owner):
        raise InputError(f"refusing to remove {path}: it is not inside {real_owner}, the directory this command owns")
    return real


def remove_owned_dir(path: Path, owner: Path) -> bool:
    """Remove `path` when it is inside `owner` and marked ours; False when it does not exist.

    InputError when it escapes `owner`; ResourceError when it exists but the testbed did
    not make it (a user's directory, a symlink), naming what to do instead.
    """
    real = _inside(path, owner)
    if not os.path.lexists(real):
        return False
    if not is_owned(real):
        raise ResourceError(
            f"{real} exists but was not made by the testbed (no {MARKER} marker, or a symlink); "
            "it is left alone: move it away or choose another directory"
        )
    shutil.rmtree(real)
    return True
