"""Files that root writes or reads where another user can write: never through a symlink.

`write_atomic` writes a new file beside the target (O_CREAT|O_EXCL|O_NOFOLLOW: a name
someone planted is never opened), gives it its owner and mode, and renames it over the
target: a symlink or hard link planted at the target is replaced, never written through.
`read_tail` opens with O_NOFOLLOW and reads only a regular file of the expected owner.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["write_atomic", "read_tail", "is_plain_dir"]


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, uid: int = -1, gid: int = -1) -> Path:
    """Replace `path` with `data` (owner uid/gid, `mode`), never following a link at `path`."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_tail(path: Path, max_bytes: int, owner_uid: int | None = None) -> str:
    """The last `max_bytes` of a regular file ("" when it is missing, a link, another
    user's file or a hard link to something else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (owner_uid is not None and st.st_uid != owner_uid):
            return ""
        os.lseek(fd, max(0, st.st_size - max_bytes), os.SEEK_SET)
        return os.read(fd, max_bytes).decode(errors="replace")
    finally:
        os.close(fd)


def is_plain_dir(path: Path) -> bool:
    """A real directory (no symlink) at `path`."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
