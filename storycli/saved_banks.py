"""Saved characters: a character's reference bank, step by step, reused by other stories.
(Torch-free to import: story validation reads the metadata.)

`generate --save-characters DIR` writes `DIR/<name>/character.json` (what made the bank: model,
size, steps, scheduler, CSA rates, seed, description) and one `step_NNNN.safetensors` per banked
step, each as the story loop makes it (atomically, so a killed run leaves whole steps only;
`complete` turns true at the end). A story then says `characters: {Mara: {bank: DIR/Mara}}`:
Mara's references do not run, and at every step her read frames read the saved keys and values
of that step — the very tensors a run with her references would have banked, so with the same
frames, seed and micro-batches the read frames come out pixel for pixel the same. A bank made
under other settings would silently give other pictures, so every setting that shapes it must
match (`mismatches`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storycli.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch

META = "character.json"
SCHEMA_VERSION = 1
# What must be equal for a saved bank to be the bank this story would make.
MATCHED = ("model", "size", "steps", "scheduler", "cfg", "sa32", "sa64", "blocks", "levels")


def step_file(step: int) -> str:
    return f"step_{step:04d}.safetensors"


def read_meta(folder: Path) -> dict[str, Any]:
    """A saved character's metadata; ValueError naming what is wrong with the folder."""
    path = folder / META
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a saved character (no {META}); make one with "
            "`storydiff generate --save-characters DIR`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a storydiff saved character (schema_version)")
    if not meta.get("complete"):
        raise ValueError(
            f"{folder}: the run that saved this character did not finish; run it again"
        )
    return meta


def mismatches(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`field: saved value, this story value` for every setting that differs."""
    return [
        f"{key}: saved with {saved.get(key)!r}, this story has {wanted.get(key)!r}"
        for key in MATCHED
        if saved.get(key) != wanted.get(key)
    ]


@dataclass
class BankWriter:
    """Writes one character's bank as the story loop makes it."""

    folder: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("step_*.safetensors"):  # another run's steps
            old.unlink()
        self.steps: list[int] = []
        self._digest = hashlib.sha256()  # of every step's bytes: what frame keys follow
        self._write_meta(complete=False)

    def _write_meta(self, complete: bool) -> None:
        meta = {"schema_version": SCHEMA_VERSION, **self.meta, "complete": complete}
        meta["banked_steps"] = list(self.steps)
        meta["digest"] = self._digest.hexdigest()[:16]
        atomic_write_text(self.folder / META, json.dumps(meta, indent=2) + "\n")

    def save_step(self, step: int, layers: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in layers.items()}
        data = save(tensors)
        atomic_write_bytes(self.folder / step_file(step), data)
        self._digest.update(data)
        self.steps.append(step)

    def finish(self) -> None:
        self._write_meta(complete=True)


@dataclass
class SavedBank:
    """A saved character, read one step at a time."""

    folder: Path

    def load_step(self, step: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load

        path = self.folder / step_file(step)
        if not path.is_file():
            return None  # not banked at this step (warm-up, or CSA skipped every layer)
        return {name: t.to(device) for name, t in load(path.read_bytes()).items()}
