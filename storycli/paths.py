"""Where files go: checking an output location before any slow work starts."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from storycli.errors import InvalidInput

# The probe file's name: `.write-check.<hex>.tmp`, the shape of an atomic write's temp file, so
# the leftover cleanup of a killed run also removes a probe a kill left behind.
PROBE_NAME = "write-check"


class OutputLocationError(InvalidInput):
    """An output folder that cannot be created or written."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def write_problem(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (or made in it, when it does not exist yet: then
    its nearest existing parent is tried), or None when they can.

    Tried for real, a probe file created and removed: permission bits say nothing for root or a
    read-only filesystem, and `os.access` can differ from what a network file system allows.
    """
    folder = Path(folder).absolute()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    probe = existing / f".{PROBE_NAME}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        where = "" if existing == folder else f" (in {existing})"
        return f"cannot write there{where}: {exc.strerror or type(exc).__name__}"
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def check_writable_folder(folder: Path, option: str, hint: str = "") -> None:
    """Raise `OutputLocationError` (`OPTION FOLDER: why; hint`) unless `folder` is, or can be
    made, a writable folder. Creates nothing."""
    problem = write_problem(folder)
    if problem is not None:
        raise OutputLocationError(
            f"{option} {folder}: {problem}; {hint or f'choose another {option}'}"
        )


def inside_folder(folder: Path, name: str) -> Path | None:
    """`folder / name` when it is one of `folder`'s own files (resolved, links followed: no
    `..`, no absolute path, no link leading out), else None."""
    root = Path(folder).resolve()
    path = Path(folder) / name
    try:
        return path if path.resolve().is_relative_to(root) and path.resolve() != root else None
    except (OSError, RuntimeError):  # a link loop
        return None
