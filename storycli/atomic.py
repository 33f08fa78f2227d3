"""Atomic file writes: temp file in the same folder, fsync, then ``os.replace``.

A reader never sees a half-written file: it sees either the old content (or no file) or the
complete new content. The temp file is named ``.<name>.<random>.tmp`` next to the target and is
removed again if anything goes wrong before the rename.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_path",
    "remove_temp_files",
    "temp_target",
]

# `.NAME.<12 hex>.tmp`, as `_open_temp` names them.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{12}\.tmp")

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _open_temp(target: Path) -> tuple[int, Path]:
    """Create a fresh, exclusive temp file next to ``target``; return (fd, temp path)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 is filtered by the umask, so the file gets the usual default permissions.
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file next to {target}")


def fsync_path(path: Path) -> None:
    """Best-effort fsync of a file, or of a folder so a rename in it is durable (POSIX only)."""
    if os.name != "posix" and path.is_dir():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path`` (temp file + fsync + ``os.replace``).

    The folder must exist. On any exception the temp file is removed, ``path`` is left as it was
    (absent or with its old content) and the exception is re-raised.
    """
    target = Path(path)
    fd, tmp = _open_temp(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``path`` (encoded with ``encoding``, no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def temp_target(name: str) -> str | None:
    """The file a temp file named `name` was going to become (None: not one of ours)."""
    match = _TEMP_NAME.fullmatch(name)
    return match["name"] if match else None


def remove_temp_files(
    folder: Path, ours: Callable[[str], bool], min_age_seconds: float = 0.0
) -> list[Path]:
    """Delete the temp files (and temp folders of the same naming) a killed run left in
    `folder` for the targets `ours` claims; anything else, however it looks, stays. Only call
    this while no other process can be writing into `folder`, or with `min_age_seconds` longer
    than any write takes (a temp file lives for one write)."""
    removed: list[Path] = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        target = temp_target(path.name)
        if target is None or not ours(target) or path.is_symlink():
            continue
        if min_age_seconds and time.time() - path.lstat().st_mtime < min_age_seconds:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
