"""Run-folder locks: one storydiff process writes a folder at a time.

The lock is an `flock` on the folder itself: no lock file to leave behind or to list among the
outputs, and the kernel drops it when the process dies, even by SIGKILL, so a killed run never
leaves a folder stuck. Where flock is unavailable (not POSIX, some network file systems) nothing
is locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from storycli.errors import InvalidInput

# The commands that lock a folder, as they appear on a command line (to name a lock's holder).
COMMANDS = ("generate", "pages", "evaluate", "animate", "train-predictor")


class FolderInUse(InvalidInput):
    """A folder another storydiff process is writing."""


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on `folder` itself: no lock file to leave behind, and the kernel drops it
    when the process dies, even by SIGKILL. Yields False when `wait` is False and another
    process holds a conflicting lock; True (without locking) where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield True
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without flock (some network mounts): no locking
            pass
        yield True
    finally:
        os.close(fd)  # releases the lock


def lock_holder(fd: int) -> str | None:
    """The storydiff command holding an flock on the file open as `fd`, when this machine says
    (Linux's /proc/locks and the holder's command line); None when unknown."""
    try:
        st = os.fstat(fd)
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        lines = Path("/proc/locks").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        parts = line.split()  # `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`
        if "->" in parts or "FLOCK" not in parts:
            continue  # a waiter, or another kind of lock
        i = parts.index("FLOCK")
        if len(parts) < i + 5 or parts[i + 4] != where:
            continue
        try:
            args = Path(f"/proc/{parts[i + 3]}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if arg.decode(errors="replace") in COMMANDS:
                return arg.decode()
    return None


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


@contextlib.contextmanager
def run_folder_lock(
    folder: Path, command: str, *, shared: bool = False, create: bool = False
) -> Iterator[None]:
    """Hold `folder` for `command` until the block ends, or raise `FolderInUse` (one sentence
    naming the folder and the command holding it) when another process holds it.

    `shared`: processes that write one folder together on purpose (the shards of one
    `generate --shard` story) hold it together; any other command is refused meanwhile.
    `create`: make a missing folder to lock it, and remove it again (with the parents made for
    it) if it is still empty at the end. Without `create` a missing folder is not locked: the
    command reports it as it does anyway."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    folder = Path(folder).absolute()
    for _ in range(10):
        existing = folder
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing != folder:
            if not create:
                yield
                return
            folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:
            continue  # removed meanwhile by a run that had made it
        except OSError:
            yield  # not a folder, or unreadable: the command reports it
            return
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd)
                who = f"`storydiff {holder}`" if holder else "storydiff"
                raise FolderInUse(
                    f"{folder} is in use by another {who} run; wait for it to end or choose "
                    "another folder"
                ) from None
            except OSError:  # a file system without flock (some network mounts): no locking
                pass
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(folder))
            except OSError:
                same = False
            if not same:
                continue  # the folder was removed (and maybe made again) before we locked it
            try:
                yield
            finally:
                if existing != folder:  # made for this run: gone again if nothing went in
                    _remove_empty(folder, existing)
            return
        finally:
            os.close(fd)
    raise FolderInUse(f"{folder} keeps being removed and made again by another process")
