"""Run folders: the output folder one command owns (`generate`'s story folder, `animate`'s video
folder, `train-predictor`'s OUT).

What every such folder needs, in one place: claiming it (the folder lock of `storycli.locks`,
and refusing a folder made from something else unless overwriting), removing the temp files a
killed run left there, and reading and atomically writing its JSON manifest. What differs per
command is passed in: the manifest's name, which file names the command writes, the manifest key
naming what the folder was made from, and the sentences that refuse a folder.

A base module: it imports only the standard library and storycli's atomic, locks, paths and
errors modules, so any command can use it without an import circle.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storycli.atomic import atomic_write_text, remove_temp_files, temp_target
from storycli.errors import InvalidInput
from storycli.locks import FolderInUse, run_folder_lock

__all__ = ["Owner", "RunFolder", "TempScheme", "discard", "read_json", "write_json"]

# How a writer other than storycli.atomic names its temp files: temp file name -> the name it was
# going to become (None: not such a temp file). `storycli.motion.video.io.temp_target` is one.
TempNames = Callable[[str], str | None]


@dataclass(frozen=True)
class TempScheme:
    """Temp files a writer of their own naming (not storycli.atomic) leaves: `names` maps a temp
    file's name to its target's, `ours` says which targets belong to the folder's command."""

    names: TempNames
    ours: Callable[[str], bool]


@dataclass(frozen=True)
class Owner:
    """What a folder's manifest records as its source under `key`, this run's `value`, and the
    one-sentence refusals. `other` makes the sentence from the recorded source (a function, not
    a format string: a folder's path may hold braces); `unreadable` None treats an unreadable
    manifest as no manifest (so the folder is `foreign`)."""

    key: str
    value: str
    not_a_folder: str
    other: Callable[[Any], str]
    foreign: str
    unreadable: str | None = None


def read_json(path: Path) -> Any | None:
    """The JSON document at `path`; None when there is no such file or it does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any, *, indent: int = 2, ensure_ascii: bool = False) -> None:
    """Write `data` as JSON (and a final newline) atomically: a reader, or the next run after a
    kill, sees the old document or the new one, never half of one."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def discard(path: Path) -> None:
    """Delete a file or folder by first renaming it to an atomic-write temp name: a kill halfway
    leaves a leftover the next run's cleanup knows, never a half-deleted folder that looks
    whole (a checkpoint missing files, say)."""
    doomed = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.replace(path, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


class RunFolder:
    """One command's output folder: its lock, its leftovers and its manifest.

    `manifest`: the manifest's file name. `owns`: the file names the command writes here (their
    storycli.atomic temp files are its leftovers; the manifest is always one). `temps`: temp
    files of other writers (write_mp4's), plain files only. `error`: the exception (one of the
    command's InvalidInput classes) its refusals raise.
    """

    def __init__(
        self,
        folder: Path,
        manifest: str,
        *,
        owns: Callable[[str], bool] | None = None,
        temps: Sequence[TempScheme] = (),
        error: type[Exception] = InvalidInput,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self._owns = owns
        self._temps = tuple(temps)
        self.error = error

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest

    def owns(self, name: str) -> bool:
        """Whether `name` is a file the command writes into this folder."""
        return name == self.manifest or (self._owns is not None and self._owns(name))

    # -- claim ---------------------------------------------------------------------------------

    def lock(
        self,
        claim: contextlib.ExitStack,
        command: str,
        *,
        shared: bool = False,
        create: bool = False,
        busy: str | None = None,
    ) -> None:
        """Hold the folder's lock for `command` until `claim` closes (see
        `storycli.locks.run_folder_lock`). `busy`: the sentence refusing a folder another process
        holds, raised as `error`, in place of FolderInUse's own."""
        try:
            claim.enter_context(run_folder_lock(self.folder, command, shared=shared, create=create))
        except FolderInUse:
            if busy is None:
                raise
            raise self.error(busy) from None

    def check_owner(self, owner: Owner, overwrite: bool) -> dict[str, Any]:
        """The folder's manifest ({} if none or unreadable), refusing (with `owner`'s sentences)
        a folder whose manifest names another source, an unreadable manifest when
        `owner.unreadable` says so, and a folder holding anything but this command's leftovers
        without a manifest. With `overwrite` nothing is refused but a file in the folder's
        place, and the manifest is returned all the same: it still says which files are ours."""
        if self.folder.exists() and not self.folder.is_dir():
            raise self.error(owner.not_a_folder)
        previous = self.read_manifest()
        if overwrite:
            return previous or {}
        if previous == {} and owner.unreadable is not None:
            raise self.error(owner.unreadable)
        recorded = (previous or {}).get(owner.key)
        if recorded is None:
            # A run killed while writing its first manifest leaves only temp files of its own.
            leftovers = set(self.leftovers())
            if self.folder.exists() and any(p not in leftovers for p in self.folder.iterdir()):
                raise self.error(owner.foreign)
            return {}
        if recorded != owner.value:
            raise self.error(owner.other(recorded))
        return previous or {}

    # -- leftovers -----------------------------------------------------------------------------

    def leftovers(self) -> list[Path]:
        """The temp files killed runs of this command left here, sorted; nothing else."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            target = temp_target(path.name)
            ours = target is not None and self.owns(target)
            if (ours or self._other_leftover(path)) and not path.is_symlink():
                found.append(path)
        return sorted(found)

    def remove_leftovers(self, min_age_seconds: float = 0.0) -> list[Path]:
        """Remove what `leftovers` lists (see `storycli.atomic.remove_temp_files` on
        `min_age_seconds`); the paths removed, sorted. Call it holding the folder's lock."""
        if not self.folder.is_dir():
            return []
        removed = remove_temp_files(self.folder, self.owns, min_age_seconds)
        for path in sorted(self.folder.iterdir()):
            if self._other_leftover(path) and (
                not min_age_seconds or _age(path) >= min_age_seconds
            ):
                path.unlink(missing_ok=True)
                removed.append(path)
        return sorted(removed)

    def _other_leftover(self, path: Path) -> bool:
        """A temp file of another writer's naming (`temps`) for one of our names."""
        for scheme in self._temps:
            target = scheme.names(path.name)
            if target is not None and scheme.ours(target):
                return path.is_file() and not path.is_symlink()
        return False

    # -- manifest ------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest: None when there is none, {} when it is unreadable or not an object."""
        if not self.manifest_path.is_file():
            return None
        data = read_json(self.manifest_path)
        return data if isinstance(data, dict) else {}

    def write_manifest(
        self, data: dict[str, Any], *, indent: int = 2, ensure_ascii: bool = False
    ) -> Path:
        """Write the manifest atomically (making the folder if needed); its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, data, indent=indent, ensure_ascii=ensure_ascii)
        return self.manifest_path


def _age(path: Path) -> float:
    return time.time() - path.lstat().st_mtime
