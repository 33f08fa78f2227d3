"""The small interface every transition decoder implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from storycli.weights.image_encoder import ImageEncoder

StepCallback = Callable[[int, int], None]  # (steps done, total) within one transition


@dataclass(frozen=True)
class TransitionRequest:
    """One transition between two consecutive keyframes."""

    start: Image.Image  # RGB, the size of the output video
    end: Image.Image  # RGB, same size as `start`
    frames: int  # L, including both keyframes (frame 0 ≈ start, frame L-1 ≈ end)
    # (L, D) per-frame CLIP image embeddings P_1..P_L (predicted, or the lerp baseline); None
    # for decoders without an image encoder.
    embeddings: torch.Tensor | None = None
    start_prompt: str | None = None  # the keyframes' prompts when known (generate manifest)
    end_prompt: str | None = None
    seed: int = 0


class TransitionDecoder(Protocol):
    name: str
    # The encoder whose embedding space `embeddings` must be in (the decoder's own image
    # encoder, e.g. IP-Adapter's); None for decoders that do not use embeddings.
    image_encoder: ImageEncoder | None
    # Whether, without a predictor, it takes the linear baseline between the keyframes'
    # embeddings (animatediff) or no embeddings at all (wan: its own image conditioning).
    baseline_embeddings: bool
    fps: int  # the frame rate the decoder's motion is made for
    max_frames: int | None  # the longest transition it can make (None: any)

    def describe(self) -> dict[str, Any]:
        """What makes the video (decoder, weights, settings), for the animate manifest."""
        ...

    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """Exactly `request.frames` RGB images of the start image's size."""
        ...
