"""The output folder of one story: ownership, resume/skip-existing, frames, grid, manifest."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from storycli import __version__
from storycli.atomic import atomic_write_bytes
from storycli.errors import InvalidInput
from storycli.keyframes.plan import Plan, PlannedFrame
from storycli.outputs import Owner, RunFolder
from storycli.render import a1111_parameters, make_grid, read_png_metadata, save_png

MANIFEST = "manifest.json"
GRID = "grid.png"
FRAME_FILE = re.compile(r"frame_\d+\.png")  # how build_plan names frames
SCHEMA_VERSION = 1


class OutputConflict(InvalidInput):
    """The output folder belongs to another story (or to something else)."""


def story_folder(folder: Path, owns: Callable[[str], bool] | None = None) -> RunFolder:
    """A story's folder `<out>/<name>/` as storycli.outputs owns it: lock, leftovers, manifest.
    `owns`: the file names this run writes there (their temp files are its leftovers)."""
    return RunFolder(folder, MANIFEST, owns=owns, error=OutputConflict)


@dataclass
class StoryRun:
    """One story's folder `<out>/<name>/` and what this run did in it."""

    folder: Path
    story_file: Path
    plan: Plan
    model: dict[str, Any]
    overwrite: bool = False
    keys: list[str] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)
    generated: set[int] = field(default_factory=set)
    previous: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.story_file = self.story_file.resolve()
        self.keys = [self.plan.frame_key(f.index, self.model) for f in self.plan.frames]
        self.previous = self.run_folder.read_manifest() or {}

    @property
    def run_folder(self) -> RunFolder:
        """The folder as storycli.outputs sees it: its manifest, ownership and leftovers."""
        return story_folder(self.folder)

    # -- ownership ----------------------------------------------------------------------------

    def check_owner(self) -> None:
        """Refuse to write into a folder made from another story, unless overwriting."""
        self.run_folder.check_owner(
            Owner(
                key="story_file",
                value=str(self.story_file),
                not_a_folder=f"{self.folder} exists and is not a folder",
                other=lambda owner: (
                    f"{self.folder} holds frames of another story ({owner}); choose another "
                    "--out or a different `name:`, or pass --overwrite to replace them"
                ),
                foreign=(
                    f"{self.folder} is not empty and has no storydiff manifest; choose another "
                    "--out or pass --overwrite"
                ),
            ),
            self.overwrite,
        )

    # -- resume -------------------------------------------------------------------------------

    def pending(self) -> list[int]:
        """Frames to generate: all with --overwrite, else those missing or with other inputs."""
        if self.overwrite:
            return [f.index for f in self.plan.frames]
        todo = []
        previous_seconds = {
            entry.get("key"): entry.get("seconds") for entry in self.previous.get("frames", [])
        }
        for frame, key in zip(self.plan.frames, self.keys, strict=True):
            path = self.folder / frame.file
            meta = None
            if path.is_file():
                try:
                    meta = read_png_metadata(path)[1]
                except ValueError:
                    meta = None  # corrupt: regenerate
            if meta is not None and meta.get("key") == key:
                if isinstance(previous_seconds.get(key), (int, float)):
                    self.seconds[frame.index] = float(previous_seconds[key])
                if meta.get("caption") != frame.caption:
                    # Captions do not change pixels: refresh the embedded metadata only.
                    with Image.open(path) as image:
                        self._write_png(frame, image.copy())
            else:
                todo.append(frame.index)
        return todo

    # -- writing ------------------------------------------------------------------------------

    def frame_metadata(self, frame: PlannedFrame, size: tuple[int, int]) -> dict[str, Any]:
        story = self.plan.story
        return {
            "schema_version": SCHEMA_VERSION,
            "storydiff_version": __version__,
            "key": self.keys[frame.index],
            "story": story.name,
            **frame.describe(),
            "size": list(size),
            "steps": story.steps,
            "guidance": story.guidance,
            "scheduler": story.scheduler,
            "noise": story.noise,
            "consistency": story.consistency.model_dump(),
            "model": self.model,
        }

    def save_frame(self, index: int, image: Image.Image, seconds: float) -> Path:
        path = self._write_png(self.plan.frames[index], image)
        self.seconds[index] = seconds
        self.generated.add(index)
        return path

    def _write_png(self, frame: PlannedFrame, image: Image.Image) -> Path:
        story = self.plan.story
        self.folder.mkdir(parents=True, exist_ok=True)
        parameters = a1111_parameters(
            frame.prompt,
            frame.negative,
            {
                "Steps": story.steps,
                "Sampler": story.scheduler,
                "CFG scale": story.guidance,
                "Seed": frame.seed,
                "Size": f"{image.width}x{image.height}",
                "Model": self.model.get("id"),
                "Consistency": " + ".join(story.consistency.methods) or "none",
                "Version": f"storydiff {__version__}",
            },
        )
        path = self.folder / frame.file
        save_png(image, path, parameters, self.frame_metadata(frame, image.size))
        return path

    def remove_stale_frames(self) -> list[Path]:
        """Delete frames an earlier run wrote that the current plan no longer has (a shortened
        story, or another story after --overwrite). Only files the previous manifest lists and
        whose embedded key is the one it recorded are removed: never a file storydiff did not
        write, nor one replaced since."""
        current = {f.file for f in self.plan.frames}
        stale = []
        for entry in self.previous.get("frames", []):
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name in current or Path(name).name != name:
                continue
            path = self.folder / name
            try:
                meta = read_png_metadata(path)[1] if path.is_file() else None
            except ValueError:
                continue  # unreadable: not provably ours
            if meta is not None and meta.get("key") == entry.get("key"):
                path.unlink()
                stale.append(path)
        return stale

    def write_grid(self) -> Path:
        images = []
        for frame in self.plan.frames:
            with Image.open(self.folder / frame.file) as img:
                images.append(img.convert("RGB"))
        grid = make_grid(images, [f.caption for f in self.plan.frames])
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = self.folder / GRID
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def write_pages(self) -> list[str]:
        """Comic pages and comic.pdf in the story's layout (see render.pages)."""
        from storycli.render.pages import write_pages

        story = self.plan.story
        previous = self.previous.get("pages") or []
        return write_pages(
            self.folder,
            [f.file for f in self.plan.frames],
            [f.caption for f in self.plan.frames],
            story.layout,
            story.seed,
            story.caption_font_size,
            previous=[p for p in previous if isinstance(p, str)],
        )

    def write_manifest(
        self,
        size: tuple[int, int],
        versions: dict[str, str],
        extra: dict[str, Any],
        complete: bool = True,
    ) -> Path:
        """Write manifest.json. It is written once before generation (`complete: false`, which
        also claims the folder for this story, so an interrupted first run can resume) and again
        at the end."""
        plan = self.plan
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "complete": complete,
            "storydiff_version": __version__,
            "versions": versions,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "story_file": str(self.story_file),
            "story": plan.story.model_dump(mode="json"),
            "model": self.model,
            "size": list(size),
            "references": {k: [i + 1 for i in v] for k, v in plan.references.items()},
            "grid": GRID,
            "frames": [
                {
                    **f.describe(),
                    "key": self.keys[f.index],
                    "seconds": self.seconds.get(f.index),
                    "generated_this_run": f.index in self.generated,
                }
                for f in plan.frames
            ],
            **extra,
        }
        return self.run_folder.write_manifest(manifest)
