"""Exact resume inside a run: the story loop's state, saved every few steps.

What makes the next step: every frame's latents, the scheduler's state (multistep history, step
index), the generators a stepping scheduler draws from, and each plan call's CSA generator and
step count. The reference bank lives for one step and is rebuilt by the next write forward, so
it is not saved. Saved atomically next to the frames, keyed by the frames' inputs (and what
else changes the numbers); a run that loads it continues with the very same numbers.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from storycli.atomic import atomic_write_bytes

CHECKPOINT_NAME = ".story-loop.pt"
DEFAULT_EVERY_SECONDS = 180.0  # a few minutes of work: cheap next to what it saves


@dataclass
class LoopCheckpoint:
    """Where the story loop keeps its state, what a saved state must match to be resumed, and
    how often it is saved (every `every_steps` steps, else every `every_seconds` of work)."""

    path: Path
    key: str
    every_steps: int | None = None
    every_seconds: float = DEFAULT_EVERY_SECONDS
    saved: list[int] = field(default_factory=list)  # steps saved by this run
    resumed_from: int | None = None  # the step a resumed run continued after
    _last: float = field(default_factory=time.perf_counter)

    def load(self) -> dict[str, Any] | None:
        """The saved state for these frames, or None (none, another run's, or unreadable)."""
        if not self.path.is_file():
            return None
        try:
            # Our own file (the scheduler is a pickled diffusers object), not a download.
            state = torch.load(self.path, weights_only=False)
        except Exception:  # truncated or from other versions: start over, it is only a cache
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None
        self.resumed_from = int(state["step"])
        return state

    def due(self, step: int, steps: int) -> bool:
        if step + 1 >= steps:
            return False  # the frames themselves are written next
        if self.every_steps is not None:
            return (step + 1) % self.every_steps == 0
        return time.perf_counter() - self._last >= self.every_seconds

    def save(self, step: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"key": self.key, "step": step, **state}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
        self.saved.append(step)
        self._last = time.perf_counter()

    def remove(self) -> None:
        """Once the frames are written the state is worth nothing."""
        self.path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        return {"resumed_from_step": self.resumed_from, "saved_steps": list(self.saved)}
