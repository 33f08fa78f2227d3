"""What both benchmarks share: options, story files written only when they change, generating a
story through `generate_story` (so frames resume exactly as `storydiff generate` resumes them),
and per-story records that let a second run skip what is done without loading a model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from storycli.atomic import atomic_write_text
from storycli.errors import InvalidInput
from storycli.keyframes.generate import GenerateOptions, Hooks
from storycli.keyframes.model_cache import ModelCache
from storycli.story.checks import is_model_path
from storycli.suites import BENCH_METHODS

SCHEMA_VERSION = 1


class BenchError(InvalidInput):
    """Bad benchmark input (dataset, option): one sentence naming the file or field and the fix."""


@dataclass
class BenchOptions:
    out: Path
    model: str = "sdxl"
    methods: tuple[str, ...] = BENCH_METHODS
    limit: int | None = None
    steps: int | None = None  # None: the benchmark's own (50, as the papers)
    size: tuple[int, int] | None = None  # (width, height); None: the benchmark's own
    seed: int | None = None  # None: the benchmark's own (42)
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    frame_batch: int | None = None
    overwrite: bool = False  # regenerate every frame


@dataclass
class BenchHooks:
    """Progress callbacks; all optional. `story` gives generate's hooks for one story, as a
    context manager (the command's progress bars)."""

    on_note: Callable[[str], None] | None = None
    on_item: Callable[[int, int, str], None] | None = None  # (number, of, label): starting
    on_done: Callable[[str, dict[str, Any]], None] | None = None  # (label, record)
    story: Callable[[], AbstractContextManager[Hooks]] | None = None


@dataclass
class Generated:
    """One story's generation as a benchmark reports it."""

    folder: Path
    record: dict[str, Any]
    kept: bool  # done in an earlier run: nothing was generated (or loaded) now
    generated: int = 0


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    if not methods:
        raise BenchError(f"--methods: name at least one of {', '.join(BENCH_METHODS)}")
    for method in methods:
        if method not in BENCH_METHODS:
            raise BenchError(f"--methods {method}: choose from {', '.join(BENCH_METHODS)}")
    return tuple(dict.fromkeys(methods))


def model_value(model: str) -> str:
    """The story's `model:` value: a local path made absolute, since the story files live in
    --out and a relative path would be read relative to them."""
    path = Path(model).expanduser()
    if is_model_path(model) or path.exists():
        return str(path.resolve())
    return model


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def story_yaml(story: dict[str, Any], header: str) -> str:
    body = yaml.safe_dump(story, sort_keys=False, allow_unicode=True, width=100)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically write `text` unless the file already holds it (an unchanged story file keeps
    its mtime, and generate sees the same story). True when written."""
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when absent or unreadable (then the work is redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def generate_options(options: BenchOptions, out: Path) -> GenerateOptions:
    return GenerateOptions(
        out=out,
        device=options.device,
        dtype=options.dtype,
        offload=options.offload,
        vae_slicing=options.vae_slicing,
        vae_tiling=options.vae_tiling,
        overwrite=options.overwrite,
        frame_batch=options.frame_batch,
    )


def generation_key(story_text: str, options: BenchOptions) -> dict[str, Any]:
    """What a story's frames depend on beyond the story file: where they were made."""
    return {"story_sha256": sha256(story_text), "device": options.device, "dtype": options.dtype}


def _complete(folder: Path) -> bool:
    manifest = read_json(folder / "manifest.json")
    if manifest is None or manifest.get("complete") is not True:
        return False
    frames = manifest.get("frames")
    return isinstance(frames, list) and all(
        isinstance(f, dict) and (folder / str(f.get("file"))).is_file() for f in frames
    )


def done_before(
    story_text: str, options: BenchOptions, folder: Path, previous: dict[str, Any] | None
) -> bool:
    """Whether `generate` will keep `folder` as an earlier run left it (nothing to load)."""
    last = (previous or {}).get("generation") or {}
    key = generation_key(story_text, options)
    return not options.overwrite and last.get("key") == key and _complete(folder)


@contextlib.contextmanager
def _no_hooks() -> Iterator[Hooks]:
    yield Hooks()


def generate(
    story_path: Path,
    story_text: str,
    options: BenchOptions,
    out: Path,
    name: str,
    previous: dict[str, Any] | None,
    models: ModelCache,
    hooks: BenchHooks,
) -> Generated:
    """Generate (or resume) one story into `out/name`; its generation record.

    Skipped without loading anything when `previous` (this story's last record) was made from
    the same story file on the same device and the folder is complete; else `generate_story`
    runs, which itself keeps every frame whose inputs are unchanged."""
    from storycli.keyframes.generate import generate_story

    folder = out / name
    key = generation_key(story_text, options)
    last = (previous or {}).get("generation") or {}
    if done_before(story_text, options, folder, previous):
        return Generated(folder, last, kept=True)
    with (hooks.story or _no_hooks)() as story_hooks:
        result = generate_story(
            story_path, generate_options(options, out), None, story_hooks, None, models
        )
    manifest = read_json(folder / "manifest.json") or {}
    seconds = [
        f["seconds"]
        for f in manifest.get("frames", [])
        if isinstance(f, dict) and isinstance(f.get("seconds"), (int, float))
    ]
    # Peak memory is only known for frames made by this process; a rerun that made nothing
    # keeps the number of the run that did (same story file).
    same_story = last.get("key", {}).get("story_sha256") == key["story_sha256"]
    if result.generated:
        peak, kind = result.peak_memory_bytes, manifest.get("peak_memory_kind")
    elif same_story:
        peak, kind = last.get("peak_memory_bytes"), last.get("peak_memory_kind")
    else:
        peak, kind = None, None
    record = {
        "key": key,
        "model": result.model,
        "size": list(result.size),
        "steps": result.plan.story.steps,
        "frames": len(result.plan.frames),
        "seconds_per_image": round(sum(seconds) / len(seconds), 4) if seconds else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Generated(folder, record, kept=False, generated=len(result.generated))


def take(items: list[Any], limit: int | None) -> list[Any]:
    """The items a benchmark runs: all, or the first `limit` (in the benchmark's own order)."""
    if limit is not None and limit < 1:
        raise BenchError(f"--limit {limit}: must be at least 1")
    return items[:limit] if limit is not None else items
