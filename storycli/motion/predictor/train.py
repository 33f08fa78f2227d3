"""Training the Semantic Motion Predictor on a folder of videos (stage A: embedding-space MSE).

The recipe follows StoryDiffusion's Semantic Motion Predictor (arXiv 2405.01434, §3.2): from the
image embeddings of a clip's first and last frame, predict those of the frames between them, trained
on clips of real videos. Videos are encoded once into a cache of per-frame CLIP embeddings; each
step draws a batch of clips (K_s, K*_1..K*_L, K_e) from the training videos and fits the interior
frames with MSE(P/σ, K*/σ) + 0.5·(1 − cos(P, K*)); AdamW, linear warm-up then cosine decay,
gradient clipping, an EMA of the weights (evaluated and saved). Validation clips come from
held-out *videos* and are drawn once.

Every step's randomness is derived from (seed, step) — the clip sampler's generator and the
dropout seed — so a run that is interrupted and resumed from a checkpoint retraces the
uninterrupted run exactly. Rerunning with the same options continues an unfinished run, as
`generate` continues a story; leftovers of killed writes in OUT are removed on the next start.
Nothing is printed: progress goes through `TrainHooks`. The options and their checks are in
options.py, the run folder (OUT, checkpoints, run.json, metrics.json) in run_folder.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storycli.motion.predictor.dataset import (
    ClipBatch,
    ClipSampler,
    ClipSettings,
    DatasetError,
    EmbeddingSet,
    Skipped,
    build_embedding_cache,
    embedding_center,
    embedding_rms,
    min_video_frames,
    prepare_cache_dir,
    split_videos,
    validation_clips,
)
from storycli.motion.predictor.model import (
    MotionPredictor,
    PredictorConfig,
    lerp_embeddings,
    save_predictor,
    slerp_embeddings,
)
from storycli.motion.predictor.options import (
    TrainError,
    TrainHooks,
    TrainOptions,
    clip_settings,
    note_warmup,
    predictor_config,
    validate_options,
)
from storycli.motion.predictor.run_folder import (
    METRICS_NAME,
    checkpoint_steps,
    claim_out,
    clear_run,
    fingerprint,
    prepare_out,
    read_metrics,
    save_checkpoint,
    write_metrics,
    write_run_info,
)
from storycli.paths import check_writable_folder
from storycli.seeds import derive_seed
from storycli.weights.devices import resolve_device
from storycli.weights.image_encoder import load_image_encoder

__all__ = [
    "TrainError",
    "TrainHooks",
    "TrainOptions",
    "TrainResult",
    "baseline_metrics",
    "checkpoint_steps",
    "clip_settings",
    "evaluate",
    "predictor_config",
    "predictor_loss",
    "train_predictor",
]

SCHEMA_VERSION = 1  # of the `--json` summary (TrainResult.summary)


@dataclass
class TrainResult:
    out: Path
    predictor_path: Path  # OUT/predictor.safetensors (EMA weights), with predictor.json beside
    metrics_path: Path
    checkpoint: Path  # the last checkpoint folder
    steps: int  # completed optimiser steps
    resumed_from: int | None  # the checkpoint step this call continued from
    final: dict[str, Any]  # the last metrics record
    best: dict[str, Any]  # the record with the highest validation gain (for early stopping)
    counts: dict[str, int]  # videos, encoded, cached, skipped, train_videos, val_videos
    skipped: list[Skipped]
    config: PredictorConfig
    clips_per_second: float | None  # training throughput of this call (cached embeddings)
    encode_frames_per_second: float | None  # decode + encode rate of the sources encoded now
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The `train-predictor --json` document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "out": str(self.out),
            "predictor": str(self.predictor_path),
            "metrics": str(self.metrics_path),
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "final": self.final,
            "counts": self.counts,
            "clips_per_second": self.clips_per_second,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------------------------
# Loss, schedule, EMA, metrics
# --------------------------------------------------------------------------------------------


def predictor_loss(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """MSE(P/σ, K*/σ) + 0.5·(1 − cos(P, K*)) on the interior frames (the ends are exact)."""
    p, k = pred[:, 1:-1], target[:, 1:-1]
    mse = ((p - k) / scale).pow(2).mean()
    cos = torch.nn.functional.cosine_similarity(p, k, dim=-1).mean()
    return mse + 0.5 * (1 - cos)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over `warmup_steps` (the first step already moves), then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up (as diffusers' EMAModel): short runs are not stuck near the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _interior_errors(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interior frames: mean squared error per clip and position (B, L-2), and cosines."""
    p, k = pred[:, 1:-1].double(), target[:, 1:-1].double()
    sq = (p - k).pow(2).mean(-1)
    cos = torch.nn.functional.cosine_similarity(p, k, dim=-1)
    return sq, cos


@torch.no_grad()
def _predict(
    model: MotionPredictor | None, clips: ClipBatch, device: str, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interior errors of one method (predictor, lerp or slerp) on the validation clips."""
    frames = clips.target.shape[1]
    sq, cos = [], []
    for s in range(0, len(clips.start), 512):
        start = clips.start[s : s + 512].to(device)
        end = clips.end[s : s + 512].to(device)
        target = clips.target[s : s + 512].to(device)
        if kind == "predictor":
            pred = model(start, end, frames)
        elif kind == "lerp":
            pred = lerp_embeddings(start, end, frames)
        else:
            pred = slerp_embeddings(start, end, frames)
        a, b = _interior_errors(pred, target)
        sq.append(a.cpu())
        cos.append(b.cpu())
    return torch.cat(sq), torch.cat(cos)


def baseline_metrics(clips: ClipBatch, device: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """lerp and slerp errors on the validation clips (fixed: computed once per run)."""
    return {kind: _predict(None, clips, device, kind) for kind in ("lerp", "slerp")}


def evaluate(
    model: MotionPredictor,
    clips: ClipBatch,
    baselines: dict[str, tuple[torch.Tensor, ...]],
    device: str,
) -> dict[str, Any]:
    """Validation metrics of `model` (eval mode) against lerp/slerp, interior frames, raw units."""
    was_training = model.training
    model.eval()
    errors = {"predictor": _predict(model, clips, device, "predictor"), **baselines}
    model.train(was_training)
    mse = {k: float(sq.mean()) for k, (sq, _) in errors.items()}
    cos = {k: float(c.mean()) for k, (_, c) in errors.items()}
    scale = model.config.scale
    frames = clips.target.shape[1]
    return {
        "val_loss": mse["predictor"] / scale**2 + 0.5 * (1 - cos["predictor"]),
        **{f"val_mse_{k}": v for k, v in mse.items()},
        **{f"val_cos_{k}": v for k, v in cos.items()},
        "gain": 1 - mse["predictor"] / mse["lerp"] if mse["lerp"] > 0 else 0.0,
        "gain_slerp": 1 - mse["slerp"] / mse["lerp"] if mse["lerp"] > 0 else 0.0,
        "val_mse_by_position": {
            "tau": [round(i / (frames - 1), 6) for i in range(1, frames - 1)],
            **{k: sq.mean(0).tolist() for k, (sq, _) in errors.items()},
        },
    }


# --------------------------------------------------------------------------------------------
# Output folder: run detection, checkpoints, metrics
# --------------------------------------------------------------------------------------------


def _load_data(options: TrainOptions, hooks: TrainHooks) -> tuple[EmbeddingSet, Any]:
    encoder = load_image_encoder(options.encoder, options.device)
    settings = clip_settings(options)
    needed = min_video_frames(options.fps, options.min_video_seconds, settings.min_span + 1)
    data = build_embedding_cache(
        options.data,
        encoder,
        fps=options.fps,
        short_side=options.short_side,
        cache_dir=options.cache_dir,
        min_frames=needed,
        on_progress=hooks.on_encode,
    )
    for skipped in data.skipped:
        hooks.note(f"skipped {skipped.name}: {skipped.reason}")
    return data, encoder


@dataclass
class _Run:
    """Everything the training loop mutates, plus what a checkpoint must restore."""

    model: MotionPredictor
    ema: MotionPredictor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    loss_sum: float = 0.0  # training loss since the last evaluation (restored on resume)
    loss_count: int = 0
    window_clips: int = 0
    window_seconds: float = 0.0
    total_clips: int = 0
    total_seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)


def _build_run(options: TrainOptions, config: PredictorConfig, device: str) -> _Run:
    # Weights drawn from the run's seed, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(options.seed, "init"))
        model = MotionPredictor(config)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, options.warmup_steps, options.max_steps)
    )
    return _Run(model, ema, optimizer, scheduler)


def _restore(run: _Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = int(state["step"])
    run.loss_sum = float(state["loss_sum"])
    run.loss_count = int(state["loss_count"])


def _state(run: _Run, config: PredictorConfig, options: TrainOptions, split: dict) -> dict:
    return {
        "step": run.step,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "config": asdict(config),
        "fingerprint": fingerprint(options),
        "split": split,
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _rng_devices(device: str) -> list[int]:
    if device.startswith("cuda"):
        return [torch.device(device).index or 0]
    return []


def _train_step(run: _Run, sampler: ClipSampler, options: TrainOptions, device: str) -> float:
    """One optimiser step; its clips and dropout depend only on (seed, step)."""
    step = run.step
    rng = np.random.default_rng(derive_seed(options.seed, "clips", step))
    batch = sampler.sample(options.batch_size, rng)
    start, end = batch.start.to(device), batch.end.to(device)
    target = batch.target.to(device)
    run.model.train()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(derive_seed(options.seed, "step", step))
        pred = run.model(start, end, options.frames)
        loss = predictor_loss(pred, target, run.model.config.scale)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    update_ema(run.ema, run.model, ema_decay_at(run.step, options.ema_decay))
    return float(loss.detach())


def _eval_record(run: _Run, val: ClipBatch, baselines: dict, device: str) -> dict[str, Any]:
    record: dict[str, Any] = {"step": run.step}
    record.update(evaluate(run.ema, val, baselines, device))
    record["train_loss"] = run.loss_sum / run.loss_count if run.loss_count else None
    record["lr"] = run.scheduler.get_last_lr()[0]
    record["clips_per_second"] = (
        run.window_clips / run.window_seconds if run.window_seconds > 0 else None
    )
    run.loss_sum, run.loss_count = 0.0, 0
    run.window_clips, run.window_seconds = 0, 0.0
    return record


def _loop(
    run: _Run,
    sampler: ClipSampler,
    val: ClipBatch,
    options: TrainOptions,
    hooks: TrainHooks,
    save: Callable[[], Path],
    device: str,
) -> Path | None:
    """Train to max_steps, evaluating and checkpointing on schedule; the last checkpoint."""
    baselines = baseline_metrics(val, device)
    if run.step == 0 and not run.records:  # step 0: the untrained predictor, exactly lerp
        _append_record(run, _eval_record(run, val, baselines, device), options, hooks)
    checkpoint = None
    while run.step < options.max_steps:
        started = time.perf_counter()
        loss = _train_step(run, sampler, options, device)
        elapsed = time.perf_counter() - started
        run.loss_sum += loss
        run.loss_count += 1
        run.window_clips += options.batch_size
        run.window_seconds += elapsed
        run.total_clips += options.batch_size
        run.total_seconds += elapsed
        last = run.step == options.max_steps
        if last or run.step % options.eval_every == 0:
            _append_record(run, _eval_record(run, val, baselines, device), options, hooks)
        if last or run.step % options.checkpoint_every == 0:
            checkpoint = save()
        if hooks.on_step is not None:
            hooks.on_step(run.step, options.max_steps, loss)
    return checkpoint


def _append_record(run: _Run, record: dict, options: TrainOptions, hooks: TrainHooks) -> None:
    run.records.append(record)
    write_metrics(options.out, run.records)
    if hooks.on_eval is not None:
        hooks.on_eval(record)


def _split(options: TrainOptions, data: EmbeddingSet) -> tuple[dict, list, list]:
    """Video names of each side, and the train and validation embedding arrays."""
    names = [v.name for v in data.videos]
    train_idx, val_idx = split_videos(names, options.val_fraction, options.seed)
    if not val_idx:
        raise DatasetError(
            f"{options.data}: only one usable video ({names[0]}); need at least 2, since whole "
            "videos are held out for validation"
        )
    split = {"train": [names[i] for i in train_idx], "val": [names[i] for i in val_idx]}
    videos = [v.embeddings for v in data.videos]
    return split, [videos[i] for i in train_idx], [videos[i] for i in val_idx]


def _validation_set(
    videos: list, settings: ClipSettings, options: TrainOptions, hooks: TrainHooks
) -> ClipBatch:
    val = validation_clips(videos, settings, options.val_clips, options.seed)
    if val.forced > len(val.start) // 2:
        hooks.note(
            f"{val.forced} of {len(val.start)} validation clips fail the cut/static checks "
            f"(cut_cos {settings.cut_cos}, static_cos {settings.static_cos}); tune them"
        )
    return val


def train_predictor(options: TrainOptions, hooks: TrainHooks | None = None) -> TrainResult:
    """Train (or resume training) a motion predictor; see the module docstring for the recipe.

    Without `resume` or `overwrite`, an unfinished run of the same options in OUT is continued.
    """
    hooks = hooks or TrainHooks()
    began = time.perf_counter()
    options = replace(options, data=Path(options.data), out=Path(options.out))
    validate_options(options)
    note_warmup(options, hooks)
    with contextlib.ExitStack() as claim:
        return _train(options, hooks, claim, began)


def _train(
    options: TrainOptions, hooks: TrainHooks, claim: contextlib.ExitStack, began: float
) -> TrainResult:
    check_writable_folder(options.out, "--out")
    claimed = options.out.is_dir()
    if claimed:  # before anything is read from it: another live run there is refused
        claim_out(claim, options.out)
    resumed = prepare_out(options, hooks)
    # The cache folder is checked before the encoder loads and anything is encoded.
    prepare_cache_dir(options.data, options.cache_dir)
    device = resolve_device(options.device)
    data, encoder = _load_data(options, hooks)
    split, train_videos, val_videos = _split(options, data)
    # Only now, with the encoder and data known to be good: a failed start leaves no folder.
    options.out.mkdir(parents=True, exist_ok=True)
    if not claimed:
        claim_out(claim, options.out)
    if resumed is None:
        config = predictor_config(options, encoder.dim, embedding_rms(train_videos), encoder)
    else:
        config = PredictorConfig.from_dict(resumed[0]["config"])
        _check_encoder(config, encoder, resumed[1])
    del encoder  # the embeddings are cached: free the image tower before training
    settings = clip_settings(options)
    sampler = ClipSampler(train_videos, settings)
    val = _validation_set(val_videos, settings, options, hooks)
    if resumed is None:
        clear_run(options.out)  # an overwritten run, or the leftovers of one never checkpointed
    run = _build_run(options, config, device)
    for model in (run.model, run.ema):
        model.set_input_normalization(*embedding_center(train_videos))
    resumed_from = _resume_into(run, resumed, split, options, hooks)
    hooks.note(
        f"{len(train_videos)} training and {len(val_videos)} validation videos; "
        f"σ = {config.scale:.4g}; {sum(p.numel() for p in run.model.parameters()):,} parameters"
    )
    write_run_info(options, config, data, split, "running")

    def save() -> Path:
        state = _state(run, config, options, split)
        return save_checkpoint(options.out, run.step, state, run.ema, options.keep_checkpoints)

    checkpoint = _loop(run, sampler, val, options, hooks, save, device)
    if checkpoint is None:  # resumed a finished run: nothing to train
        checkpoint = checkpoint_steps(options.out)[-1][1]
    predictor_path = save_predictor(run.ema, options.out)
    write_run_info(options, config, data, split, "finished")
    return TrainResult(
        out=options.out,
        predictor_path=predictor_path,
        metrics_path=options.out / METRICS_NAME,
        checkpoint=checkpoint,
        steps=run.step,
        resumed_from=resumed_from,
        final=run.records[-1],
        best=max(run.records, key=lambda r: r["gain"]),
        counts={
            **data.counts,
            "train_videos": len(split["train"]),
            "val_videos": len(split["val"]),
        },
        skipped=list(data.skipped),
        config=config,
        clips_per_second=run.total_clips / run.total_seconds if run.total_seconds else None,
        encode_frames_per_second=data.encode_frames_per_second,
        seconds=time.perf_counter() - began,
    )


def _check_encoder(config: PredictorConfig, encoder: Any, path: Path) -> None:
    if (config.encoder, config.preprocess_id, config.dim) != (
        encoder.name,
        encoder.preprocess_id,
        encoder.dim,
    ):
        raise TrainError(
            f"{path}: trained on encoder {config.encoder!r} ({config.dim}-d, preprocessing "
            f"{config.preprocess_id}) but {encoder.name!r} gives {encoder.dim}-d embeddings "
            f"with preprocessing {encoder.preprocess_id}; use the same encoder to resume"
        )


def _resume_into(
    run: _Run,
    resumed: tuple[dict, Path] | None,
    split: dict,
    options: TrainOptions,
    hooks: TrainHooks,
) -> int | None:
    """Restore the checkpoint state and the metrics up to its step; the step resumed from."""
    if resumed is None:
        return None
    state, path = resumed
    _restore(run, state)
    # Records past the checkpoint came from steps that will be trained again.
    run.records = [r for r in read_metrics(options.out) if r.get("step", 0) <= run.step]
    write_metrics(options.out, run.records)
    if state.get("split") != split:
        hooks.note("the set of videos changed since the checkpoint: the split differs")
    hooks.note(f"resuming from {path.name} (step {run.step} of {options.max_steps})")
    return run.step
