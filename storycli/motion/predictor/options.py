"""What a `train-predictor` run is asked to do: its options, progress hooks and the checks on
them, and the predictor config and clip sampling they give (see train.py for the recipe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storycli.errors import InvalidInput
from storycli.motion.predictor.dataset import ClipSettings
from storycli.motion.predictor.model import PredictorConfig


class TrainError(InvalidInput):
    """A training run that cannot start or continue (output folder, resume mismatch, data)."""


@dataclass
class TrainOptions:
    data: Path
    out: Path
    encoder: str = "openclip-vit-h"
    frames: int = 16
    fps: float = 8.0
    short_side: int | None = 224
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    eval_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    val_fraction: float = 0.1
    val_clips: int = 256
    seed: int = 0
    # Continue from the last checkpoint, also with changed options (without it, an unfinished
    # run of the very same options is continued all the same).
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    cache_dir: Path | None = None
    # Predictor size; None = PredictorConfig defaults (PredictorConfig.tiny for encoder "tiny").
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    dropout: float | None = None
    # Clip sampling: each training clip spans min..max seconds of one video (log-uniform), and
    # videos shorter than min_video_seconds are skipped (README, `storydiff train-predictor`).
    min_clip_seconds: float = 1.0
    max_clip_seconds: float = 4.0
    min_video_seconds: float = 2.0
    # None = 0.75 / 0.97, except for "tiny": its random tower maps every image to almost the
    # same direction (cos ≈ 0.99), so those thresholds would reject every clip; no checks there.
    cut_cos: float | None = None
    static_cos: float | None = None


@dataclass
class TrainHooks:
    """Optional progress callbacks (the CLI draws Rich bars with them)."""

    on_encode: Callable[[int, int, str], None] | None = None  # (done, total, source name)
    on_step: Callable[[int, int, float], None] | None = None  # (step, max_steps, loss)
    on_eval: Callable[[dict[str, Any]], None] | None = None  # one metrics record
    on_note: Callable[[str], None] | None = None  # one-line remarks (resume, skips, ...)

    def note(self, message: str) -> None:
        if self.on_note is not None:
            self.on_note(message)


def validate_options(options: TrainOptions) -> None:
    """Refuse impossible options (one sentence, TrainError) before anything is read."""
    positive = ("frames", "max_steps", "batch_size", "eval_every", "checkpoint_every", "val_clips")
    for name in positive:
        if getattr(options, name) < 1:
            raise TrainError(f"{name} must be at least 1, not {getattr(options, name)}")
    if options.frames < 3:
        raise TrainError("frames must be at least 3 (a clip needs an interior frame)")
    if options.keep_checkpoints < 1:
        raise TrainError("keep_checkpoints must be at least 1")
    if not 0 < options.val_fraction < 1:
        raise TrainError(f"val_fraction must be between 0 and 1, not {options.val_fraction}")
    if options.resume and options.overwrite:
        raise TrainError("choose either resume or overwrite, not both")
    try:
        clip_settings(options)
    except ValueError as exc:
        raise TrainError(f"clip sampling: {exc}") from exc
    size = predictor_config(options, dim=1, scale=1.0, encoder=None)
    if size.width % size.heads:
        raise TrainError(f"width {size.width} is not divisible by heads {size.heads}")


def clip_settings(options: TrainOptions) -> ClipSettings:
    """The clip sampler's settings; the cut/static thresholds default per encoder."""
    tiny = options.encoder == "tiny"
    cut = options.cut_cos if options.cut_cos is not None else (-1.0 if tiny else 0.75)
    static = options.static_cos if options.static_cos is not None else (1.0 if tiny else 0.97)
    return ClipSettings(
        frames=options.frames,
        fps=options.fps,
        min_seconds=options.min_clip_seconds,
        max_seconds=options.max_clip_seconds,
        cut_cos=cut,
        static_cos=static,
    )


def predictor_config(
    options: TrainOptions, dim: int, scale: float, encoder: Any
) -> PredictorConfig:
    """The predictor's config: size from the options, σ and encoder identity from the data."""
    size = {
        k: getattr(options, k)
        for k in ("width", "layers", "heads", "dropout")
        if getattr(options, k) is not None
    }
    extra = {
        "frames": options.frames,
        "scale": scale,
        "encoder": encoder.name if encoder is not None else "",
        "preprocess_id": encoder.preprocess_id if encoder is not None else "",
        **size,
    }
    if options.encoder == "tiny":
        return PredictorConfig.tiny(dim, **extra)
    return PredictorConfig(dim=dim, **extra)


def note_warmup(options: TrainOptions, hooks: TrainHooks) -> None:
    """Note a warm-up longer than the run: the learning rate would never reach its peak."""
    if options.max_steps < options.warmup_steps:
        peak = options.lr * options.max_steps / options.warmup_steps  # lr of the last step
        hooks.note(
            f"max_steps {options.max_steps} is shorter than warmup_steps "
            f"{options.warmup_steps}: the learning rate never reaches its peak {options.lr:g} "
            f"(it stops at {peak:.3g}); lower --warmup-steps"
        )
