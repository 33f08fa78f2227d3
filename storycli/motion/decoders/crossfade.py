"""`crossfade`: a pixel blend of the two keyframes. No model: the baseline and test reference."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from storycli.motion.decoders.base import StepCallback, TransitionRequest
from storycli.motion.predictor.model import taus


def blend(
    start: Image.Image, end: Image.Image, frames: int, on_step: StepCallback | None = None
) -> list[Image.Image]:
    """(1 − τ)·start + τ·end for τ = 0 … 1 over `frames` frames (exact keyframes at the ends).
    `on_step(done, frames)` after each frame: a long blend of big keyframes shows its progress."""
    a = np.asarray(start.convert("RGB"), dtype=np.float32)
    b = np.asarray(end.convert("RGB").resize(start.size, Image.Resampling.LANCZOS), np.float32)
    out = []
    for done, t in enumerate(taus(frames).tolist(), 1):
        mixed = np.rint(a + (b - a) * t).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(mixed))
        if on_step is not None:
            on_step(done, frames)
    return out


class CrossfadeDecoder:
    name = "crossfade"
    image_encoder = None
    baseline_embeddings = True
    fps = 8
    max_frames: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"decoder": self.name}

    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        return blend(request.start, request.end, request.frames, on_step)
