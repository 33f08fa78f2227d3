"""Transition decoders: keyframe pair (+ per-frame embeddings) -> frames."""

from __future__ import annotations

from .. import DECODERS
from .base import StepCallback, TransitionDecoder, TransitionRequest

__all__ = ["DECODERS", "StepCallback", "TransitionDecoder", "TransitionRequest", "load_decoder"]


def load_decoder(
    name: str,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "none",
    steps: int | None = None,
    guidance: float | None = None,
) -> TransitionDecoder:
    """The named decoder, its weights loaded (`model`: a preset, hub id or local folder)."""
    if name == "crossfade":
        from .crossfade import CrossfadeDecoder

        return CrossfadeDecoder()
    if name == "latent-slerp":
        from .latent_slerp import LatentSlerpDecoder, load_vae

        return LatentSlerpDecoder(*load_vae(model, device, dtype))
    if name == "animatediff":
        from .animatediff import load_animatediff_decoder

        return load_animatediff_decoder(
            model or "animatediff",
            device=device,
            dtype=dtype,
            offload=offload,  # type: ignore[arg-type]
            steps=steps,
            guidance=guidance,
        )
    raise ValueError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
