"""What a transition is conditioned on besides its two keyframes: the motion predictor's
per-frame embeddings P_1..P_L, or the linear baseline between the keyframes' embeddings.

Which decoders take them: those with an `image_encoder` (the space P_i live in). Those whose
`baseline_embeddings` is false (wan) take them only from a predictor; without one they use their
own image conditioning unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_predictor_checked(path: Path | None) -> Any:
    """The --predictor checkpoint (None without one). Loaded before the decoder so that a
    missing or broken one fails fast, whichever decoder is asked for."""
    from storycli.motion.predictor.model import load_predictor

    return None if path is None else load_predictor(path)


def keyframe_embeddings(
    decoder: Any,
    images: list[Any],
    predictor: Any,
    predictor_path: Path | None,
    note: Callable[[str], None],
) -> tuple[Any, Any]:
    """Per-keyframe embeddings K (None: the decoder takes none this run) and the predictor
    (None: the linear baseline). Raises `PredictorError` for a predictor of another width than
    the decoder's image encoder."""
    from storycli.motion.predictor.model import PredictorError, weights_path

    wanted = predictor is not None or decoder.baseline_embeddings
    encoder = decoder.image_encoder if wanted else None
    if encoder is None:
        if predictor is not None:
            note(f"--predictor ignored: the {decoder.name} decoder does not use embeddings")
        return None, None
    if predictor is not None:
        config = predictor.config
        if config.dim != encoder.dim:
            raise PredictorError(
                f"{weights_path(predictor_path)}: the predictor works on {config.dim}-d "
                f"embeddings but the {decoder.name} decoder's image encoder ({encoder.name}) "
                f"gives {encoder.dim}-d ones; use a predictor trained on that encoder"
            )
        if config.encoder and config.encoder != encoder.name:
            note(
                f"the predictor was trained on {config.encoder} embeddings, decoding on "
                f"{encoder.name}"
            )
    return encoder.encode(images), predictor


def frame_embeddings(k_all: Any, predictor: Any, a: int, frames: int) -> Any:
    """P_1..P_L for the transition from keyframe `a` to `a + 1` (None when K is None)."""
    import torch

    from storycli.motion.predictor.model import lerp_embeddings

    if k_all is None:
        return None
    start, end = k_all[a : a + 1], k_all[a + 1 : a + 2]
    with torch.inference_mode():
        if predictor is None:
            return lerp_embeddings(start, end, frames)[0]
        return predictor(start, end, frames)[0]
