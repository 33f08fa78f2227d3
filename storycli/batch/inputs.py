"""What `generate` and `animate` were given, expanded into a sorted list of items."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from storycli.errors import InvalidInput

STORY_SUFFIXES = (".yaml", ".yml")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.json"


class InputError(InvalidInput):
    """A named story, folder or pattern that matches nothing."""


def _matches(arg: str) -> list[Path]:
    """`arg` itself when it exists, else what it matches as a glob (a shell that did not expand
    it, or quoted on purpose so the tool sorts the matches)."""
    path = Path(arg).expanduser()
    if path.exists() or not glob.has_magic(arg):
        return [path]
    return [Path(p) for p in glob.glob(str(path), recursive=True)]


def _sorted_unique(paths: Iterable[Path]) -> list[Path]:
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(path.resolve(), path)
    return sorted(seen.values(), key=lambda p: str(p))


def expand_stories(args: Iterable[str | Path]) -> list[Path]:
    """Story files from files, folders (their *.yaml / *.yml, not recursive) and globs, sorted.
    A missing file or a folder or pattern without stories is an error naming it."""
    found: list[Path] = []
    for arg in args:
        matches = _matches(str(arg))
        if not matches:
            raise InputError(f"{arg}: no file matches this pattern")
        for path in matches:
            if path.is_dir():
                stories = [p for p in path.iterdir() if p.suffix.lower() in STORY_SUFFIXES]
                if not stories:
                    raise InputError(f"{path}: this folder holds no story files (*.yaml)")
                found += stories
            elif path.exists() or len(matches) == 1:
                found.append(path)  # a missing single file is reported by load_story
    return _sorted_unique(found)


def _is_keyframe_folder(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()
    )


def expand_keyframe_folders(args: Iterable[str | Path]) -> list[Path]:
    """Keyframe folders from folders and globs, sorted: a `generate` run folder or a folder of
    images is one item; a folder that holds run folders (a `generate --out` root) gives each of
    them. Anything else is reported by `animate` itself."""
    found: list[Path] = []
    for arg in args:
        matches = _matches(str(arg))
        if not matches:
            raise InputError(f"{arg}: no folder matches this pattern")
        for path in matches:
            if path.is_dir() and not _is_keyframe_folder(path):
                runs = [p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
                found += runs or [path]
            else:
                found.append(path)
    return _sorted_unique(found)
