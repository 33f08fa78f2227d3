"""`storydiff animate` and `storydiff train-predictor` (stage two), wired on the app in
`storycli.cli`; as everywhere there, heavy imports happen inside the commands."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from storycli.batch.runner import run_batch
from storycli.batch.shard import resolve_shard
from storycli.cli.batch import (
    FailFast,
    JsonLinesOpt,
    LogDir,
    ShardOpt,
    announce_share,
    display_shard,
    finish_batch,
    report_item,
    shard_device_for,
)
from storycli.cli.common import (
    Device,
    Dtype,
    Flag,
    JsonOpt,
    Offload,
    Quiet,
    Verbose,
    choice,
    configure_logging,
    run_guarded,
    stderr_console,
)
from storycli.cli.progress import progress_bars
from storycli.motion import DECODERS

ANIMATE_EPILOG = (
    "[bold]Examples[/]\n\n"
    "  storydiff animate outputs/lighthouse\n\n"
    "  storydiff animate outputs/lighthouse --decoder animatediff --predictor runs/smp\n\n"
    "  storydiff animate outputs/lighthouse --decoder wan --frames 33 --predictor runs/smp\n\n"
    "  storydiff animate outputs/lighthouse --decoder ltx --frames 25\n\n"
    "  storydiff animate my_drawings/ --decoder latent-slerp --frames 24 --fps 12 --hold 0.5\n\n"
    "  storydiff animate outputs/fox-compare --decoder animatediff --model tiny --frames 8\n\n"
    "  storydiff animate outputs/            (every generate run folder in outputs/)\n\n"
    "  storydiff animate 'outputs/ep*' --shard 1/2 --log-dir logs"
)


def animate(
    keyframes: Annotated[
        list[str],
        typer.Argument(
            help="`generate` output folders (a manifest gives order and prompts) or any "
            "folders of images (taken in name order); a folder of run folders or a glob "
            "gives each of them, in sorted order.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder. Default: KEYFRAMES/video. With several keyframe folders: "
            "a root, each one's videos in OUT/<folder name>.",
        ),
    ] = None,
    decoder: Annotated[
        str,
        typer.Option(
            callback=choice("--decoder", DECODERS),
            help="crossfade (pixel blend, no model), latent-slerp (SDXL VAE latents), "
            "animatediff (SD1.5 + AnimateDiff + SparseCtrl + IP-Adapter, uses the predictor), "
            "wan (Wan2.1 first-last-frame-to-video, 4k+1 frames rendered, steered by the "
            "predictor when given), ltx (LTX-Video with both keyframes as conditions, 8k+1 "
            "frames rendered).",
        ),
    ] = "crossfade",
    model: Annotated[
        str | None,
        typer.Option(
            help="Weights for the decoder: a preset in configs/video_models.yaml (animatediff, "
            "wan, ltx, tiny), a hub id or a local folder (animatediff: an SD1.5 base; wan: a "
            "Wan FLF2V diffusers repo; ltx: an LTX-Video 0.9.5+ repo; latent-slerp: a VAE)."
        ),
    ] = None,
    predictor: Annotated[
        Path | None,
        typer.Option(
            help="Motion predictor checkpoint (from train-predictor), for animatediff and wan. "
            "Default: animatediff follows the linear baseline between the two keyframes' "
            "embeddings, wan its own image conditioning."
        ),
    ] = None,
    frames: Annotated[
        int, typer.Option(min=2, help="Frames per transition, both keyframes included.")
    ] = 16,
    fps: Annotated[
        int | None,
        typer.Option(min=1, help="Frame rate. Default: the decoder's (8; wan 16, ltx 24)."),
    ] = None,
    hold: Annotated[
        float, typer.Option(min=0.0, help="Seconds each keyframe is held in story.mp4.")
    ] = 1.0,
    quality: Annotated[
        int, typer.Option(min=0, max=10, help="Video quality 0-10 (10: lossless).")
    ] = 8,
    fit: Annotated[
        str,
        typer.Option(
            help="Keyframes of another aspect ratio than the first: crop (centre-crop to fill "
            "the frame) or letterbox (the whole picture, black bars)."
        ),
    ] = "crop",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the decoder.")] = 0,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Denoising steps (animatediff, wan, ltx). Default: preset."),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, help="Guidance scale (animatediff, wan, ltx).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    overwrite: Annotated[
        bool,
        Flag("--overwrite", help="Remake every video; allow replacing another folder's videos."),
    ] = False,
    shard: ShardOpt = None,
    fail_fast: FailFast = False,
    log_dir: LogDir = None,
    json_out: JsonLinesOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Make transition videos between consecutive keyframes, and story.mp4 joining them.

    Writes transition_01_02.mp4, ... (H.264, yuv420p), story.mp4 and animate.json into the
    output folder. Transitions whose inputs are unchanged are kept, so reruns are cheap.
    Several folders load the decoder once, and one failing does not stop the others (exit
    code 3: some failed); under a launcher each process animates its share of the folders.
    """
    configure_logging(verbose, quiet)
    from storycli.batch.inputs import expand_keyframe_folders
    from storycli.motion.animate import AnimateOptions
    from storycli.motion.decoders.end_frames import frame_note
    from storycli.motion.decoders.registry import DecoderCache

    rounding = frame_note(decoder, frames)
    folders = run_guarded(lambda: expand_keyframe_folders(keyframes), verbose)
    this_shard = run_guarded(lambda: resolve_shard(shard), verbose)
    items = this_shard.take(folders)  # a folder's transitions are not shared out
    console = stderr_console()
    if rounding and not quiet:
        console.print(f"note: {escape(rounding)}", soft_wrap=True)
    announce_share(console, this_shard, len(folders), len(items), None, quiet)
    shown = display_shard(this_shard)
    show = not (quiet or json_out) and shown.leader
    decoders = DecoderCache()
    template = AnimateOptions(
        keyframes=Path(),
        out=None,
        decoder=decoder,
        model=model,
        predictor=predictor,
        frames=frames,
        fps=fps,
        hold=hold,
        quality=quality,
        fit=fit,
        seed=seed,
        device=shard_device_for(device, this_shard),
        dtype=dtype,
        offload=offload,
        steps=steps,
        guidance=guidance,
        overwrite=overwrite,
    )

    def work(folder: Path) -> dict[str, Any]:
        where = out / folder.name if out is not None and len(folders) > 1 else out
        options = dataclasses.replace(template, keyframes=folder, out=where)
        result = animate_folder(options, console, show, quiet, decoders)
        if not (quiet or json_out):
            made = sum(p.name.startswith("transition_") for p in result.generated)
            kept = len(result.transitions) - made
            story = "written" if result.story in result.generated else "unchanged"
            removed = f", {len(result.removed)} stale removed" if result.removed else ""
            prefix = "" if shown.leader else escape(f"[{shown.label}] ")
            console.print(
                f"{prefix}[green]done[/] {escape(str(result.folder))}: {made} transition(s) "
                f"made, {kept} unchanged{removed}, story.mp4 {story}, animate.json updated in "
                f"{result.seconds:.1f} s",
                soft_wrap=True,
            )
        return result.summary()

    results = run_guarded(
        lambda: run_batch(
            items,
            work,
            on_done=lambda item: report_item(item, json_out, verbose),
            fail_fast=fail_fast,
            log_dir=log_dir,
            log_name=lambda folder: folder.name,
        ),
        verbose,
    )
    finish_batch(console, results, quiet or json_out, describe_animated)


def describe_animated(record: dict[str, Any]) -> str:
    """An animate record in the summary table."""
    return f"{len(record.get('transitions', []))} transition(s), story.mp4"


def animate_folder(options: Any, console: Any, show: bool, quiet: bool, decoders: Any) -> Any:
    """One keyframe folder through `motion.animate.animate`, with its progress bars."""
    from storycli.motion.animate import AnimateHooks
    from storycli.motion.animate import animate as run_animate

    with progress_bars(console, show, info=True) as progress:
        tasks: dict[str, Any] = {}

        def on_start(count: int) -> None:
            tasks["pairs"] = progress.add_task("transitions", total=count, info="")

        def on_transition(description: str) -> None:
            # The steps bar appears with the first transition made (none on a no-op rerun).
            if "steps" not in tasks:
                tasks["steps"] = progress.add_task("steps", total=None, info="")
            progress.reset(tasks["steps"], description=escape(description), info="")

        def on_phase(phase: str, done: int, total: int) -> None:
            # Work on files (encoding an MP4, reading transitions back for story.mp4) on a
            # line of its own, so the steps bar is not left looking like the whole job.
            if "files" not in tasks:
                tasks["files"] = progress.add_task("", total=total, info="")
            if done == 0:
                progress.reset(tasks["files"], description=escape(phase), total=total, info="")
            # Every frame is sent, but ffmpeg still flushes and the file is read back.
            finishing = done == total and phase.startswith("encoding")
            progress.update(tasks["files"], completed=done, info="finishing" if finishing else "")

        def on_written(path: Path) -> None:
            if path.name.startswith("transition_"):
                progress.advance(tasks["pairs"])
            if "files" in tasks:
                progress.update(tasks["files"], info="written")

        def on_note(text: str) -> None:
            # Notes go to stderr, so they stay on with --json (stdout holds only JSON).
            if not quiet:
                console.print(f"note: {escape(text)}", soft_wrap=True)

        hooks = AnimateHooks(
            on_note=on_note,
            on_start=on_start,
            on_transition=on_transition,
            on_step=lambda done, total: progress.update(
                tasks["steps"], completed=done, total=total
            ),
            on_phase=on_phase,
            on_written=on_written,
            on_kept=lambda path: progress.advance(tasks["pairs"]),
        )
        return run_animate(options, hooks, decoders)


TRAIN_PREDICTOR_EPILOG = (
    "[bold]Examples[/]\n\n"
    "  storydiff train-predictor --data ~/videos --out runs/smp\n\n"
    "  storydiff train-predictor --data ~/videos --out runs/smp --resume --max-steps 20000\n\n"
    "  storydiff train-predictor --data clips/ --encoder tiny --frames 8 --max-steps 300 "
    "--out /tmp/smp"
)


def train_predictor(
    data: Annotated[
        Path,
        typer.Option(
            help="Folder of videos (mp4, webm, gif, mov, mkv, ...) and/or folders of frame "
            "images, searched recursively.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder: predictor, checkpoints, metrics.json, run.json."
        ),
    ] = Path("runs/predictor"),
    encoder: Annotated[
        str,
        typer.Option(
            help="CLIP image encoder: openclip-vit-h (the IP-Adapter/SVD tower, 1024-d), a hub "
            "id, a local folder, or tiny (random, for tests)."
        ),
    ] = "openclip-vit-h",
    frames: Annotated[int, typer.Option(min=3, help="Frames per clip (L), ends included.")] = 16,
    fps: Annotated[float, typer.Option(min=0.1, help="Rate videos are sampled at.")] = 8.0,
    max_steps: Annotated[int, typer.Option(min=1, help="Optimiser steps in total.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Clips per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW).")] = 1e-4,
    warmup_steps: Annotated[
        int, typer.Option(min=0, help="Linear warm-up steps (a note if above --max-steps).")
    ] = 200,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N steps.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")] = 500,
    val_fraction: Annotated[
        float, typer.Option(min=0.01, max=0.9, help="Share of videos held out for validation.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the run.")] = 0,
    resume: Annotated[
        bool,
        Flag(
            "--resume",
            help="Continue from the latest checkpoint in --out, also with changed settings "
            "(e.g. a higher --max-steps). Rerunning the same command continues an unfinished "
            "run without it.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, Flag("--overwrite", help="Start over in an --out that holds another run.")
    ] = False,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Embedding cache folder (must be writable). Default: DATA/.storydiff-cache."
        ),
    ] = None,
    device: Device = "auto",
    json_out: JsonOpt = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Train the Semantic Motion Predictor on a folder of videos.

    Each video's CLIP embeddings are computed once and cached; training then samples clips of
    `--frames` frames and learns to predict the interior frames' embeddings from the two ends.
    After each validation, OUT/metrics.json gains a record with the predictor's error against
    the linear baseline (`gain` > 0: better than lerp).
    """
    configure_logging(verbose, quiet)
    from storycli.motion.predictor.train import TrainHooks, TrainOptions
    from storycli.motion.predictor.train import train_predictor as run_training

    options = TrainOptions(
        data=data,
        out=out,
        encoder=encoder,
        frames=frames,
        fps=fps,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        val_fraction=val_fraction,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        device=device,
        cache_dir=cache,
    )
    show = not (quiet or json_out)
    console = stderr_console()

    def work() -> Any:
        with progress_bars(console, show, info=True) as progress:
            tasks: dict[str, Any] = {}

            def on_encode(done: int, total: int, name: str) -> None:
                if "encode" not in tasks:
                    tasks["encode"] = progress.add_task("embeddings", total=total, info="")
                progress.update(tasks["encode"], completed=done, info=escape(name))

            def on_step(step: int, total: int, loss: float) -> None:
                if "train" not in tasks:
                    tasks["train"] = progress.add_task("training", total=total, info="")
                progress.update(tasks["train"], completed=step, info=f"loss {loss:.4f}")

            def on_eval(record: dict[str, Any]) -> None:
                if show:
                    progress.console.print(
                        f"step {record['step']}: val mse {record['val_mse_predictor']:.4g} "
                        f"(lerp {record['val_mse_lerp']:.4g}), gain {record['gain']:+.3f}",
                        highlight=False,
                    )

            def on_note(text: str) -> None:
                # Notes go to stderr, so they stay on with --json (stdout holds only JSON).
                if not quiet:
                    console.print(f"note: {escape(text)}", soft_wrap=True, highlight=False)

            hooks = TrainHooks(
                on_encode=on_encode, on_step=on_step, on_eval=on_eval, on_note=on_note
            )
            return run_training(options, hooks)

    result = run_guarded(work, verbose)
    if json_out:
        typer.echo(json.dumps(result.summary(), indent=2, ensure_ascii=False, default=str))
    elif not quiet:
        gain = result.final.get("gain")
        console.print(
            f"[green]done[/] {escape(str(result.predictor_path))}: {result.steps} steps, "
            f"gain over lerp {gain:+.3f} (metrics.json) in {result.seconds:.1f} s",
            soft_wrap=True,
        )
