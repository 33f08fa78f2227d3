"""The decoders by name: `--decoder NAME` → a loaded `TransitionDecoder`, and the cache that keeps
one loaded across a batch of keyframe folders."""

from __future__ import annotations

from storycli.motion import DECODERS
from storycli.motion.decoders.base import TransitionDecoder


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
        from storycli.motion.decoders.crossfade import CrossfadeDecoder

        return CrossfadeDecoder()
    if name == "latent-slerp":
        from storycli.motion.decoders.latent_slerp import LatentSlerpDecoder, load_vae

        return LatentSlerpDecoder(*load_vae(model, device, dtype))
    if name == "animatediff":
        from storycli.motion.decoders.animatediff import load_animatediff_decoder

        return load_animatediff_decoder(
            model or "animatediff",
            device=device,
            dtype=dtype,
            offload=offload,  # type: ignore[arg-type]
            steps=steps,
            guidance=guidance,
        )
    if name in ("wan", "ltx"):
        if name == "wan":
            from storycli.motion.decoders.wan import load_wan_decoder as load_end_frames
        else:
            from storycli.motion.decoders.ltx import load_ltx_decoder as load_end_frames

        return load_end_frames(
            model or name,
            device=device,
            dtype=dtype,
            offload=offload,  # type: ignore[arg-type]
            steps=steps,
            guidance=guidance,
        )
    raise ValueError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")


class DecoderCache:
    """The decoder of the last keyframe folder, kept for the next one with the same decoder,
    weights, device and settings: a batch of folders loads the video model once."""

    def __init__(self) -> None:
        self.loads = 0
        self._key: tuple[object, ...] | None = None
        self._decoder: TransitionDecoder | None = None

    def load(self, name: str, model: str | None = None, **options: object) -> TransitionDecoder:
        key = (name, model, *sorted(options.items()))
        if key != self._key or self._decoder is None:
            self._decoder = None  # free the old one before loading the next
            self._decoder = load_decoder(name, model, **options)  # type: ignore[arg-type]
            self._key = key
            self.loads += 1
        return self._decoder
