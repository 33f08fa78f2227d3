#!/usr/bin/env python
"""Benchmark storydiff's first-and-last-frame video decoders (Wan2.1 FLF2V, LTX-Video 0.9.5).

Each transition goes through the decoder's own ``transition()`` (``storycli.motion.decoders``:
``WanDecoder`` / ``LtxDecoder`` on ``EndFramesDecoder``): prompts encoded once and parked,
keyframes resized to the preset's area, the diffusers pipeline called with both end frames,
frames resampled to the count asked for. Per decoder and size it records seconds per denoising
step (from ``on_step`` timestamps), the time before the first step (CLIP / VAE encoding of the
keyframes), after the last one (VAE decode, tiled, and the frames' post-processing), the total,
and the peak memory (CUDA ``max_memory_allocated``, reset before each transition; CPU the
process's RSS high-water) beside the resident weights. A few steps (``--steps``, 2) fit the
budget; ``extrapolated_seconds`` is the time of one transition at the preset's steps (wan 50,
ltx 40), **extrapolated**: the rest + steps × seconds per step.

The models: the real architectures with **random weights**, built directly on the device in
the benchmark's dtype (nothing is downloaded): Wan2.1-FLF2V-14B-720P's transformer, Wan2.1's
VAE, UMT5-XXL's encoder layout and CLIP ViT-H/14's vision tower; LTX-Video 0.9.5's transformer
and VAE with T5-XXL's encoder layout. The text encoders' embeddings have the offline T5
tokenizer's small vocabulary (``storycli.weights.tiny_flux``); their width and depth are the
XXL ones unless ``--text-layers`` says fewer (the results say which). On the GPU no CPU offload
(an H200 holds Wan's 14B in bf16); ``--offload-run`` adds one Wan transition with model CPU
offload to show that peak. Each model's first transition (smallest size) is an untimed warm-up.
No measurement starts after ``--budget-s``, nor one predicted to end past it.

``--tiny``: storycli's tiny random pipelines on the CPU (float32, 1 thread) at small sizes,
seconds (what tests/benchmarks/test_video_decoders_bench.py runs). ``--dry-build``: the real
configs on the meta device, parameter counts only (no memory, no GPU).

Usage::

    bash benchmarks/gpu_check.sh --video                 # GPU machine (≤ 6 min, bf16)
    python benchmarks/video_decoders.py --tiny --out /tmp/bench
    python benchmarks/video_decoders.py --dry-build

Results: ``<out>/video-decoders-<device>[-tiny]-<date>.{json,md}``, rewritten after each
measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # story_loop's shared helpers, when loaded by path (the tests)
from story_loop import Memory, made_on, settle, sync, write_results  # noqa: E402

GIB = 2**30
DECODERS = ("ltx", "wan")  # run order: LTX (2B, quick) first, then Wan's 14B

#: The real architectures' configs (Wan2.1-FLF2V-14B-720P, LTX-Video 0.9.5 and their
#: encoders; sources in its "notes"), one JSON beside this script.
CONFIGS: dict[str, Any] = json.loads((HERE / "video_decoders_configs.json").read_text())
WAN_TRANSFORMER: dict[str, Any] = CONFIGS["wan_transformer"]
WAN_VAE: dict[str, Any] = CONFIGS["wan_vae"]  # AutoencoderKLWan's defaults are Wan2.1's
UMT5_XXL: dict[str, Any] = CONFIGS["umt5_xxl"]
CLIP_VIT_H: dict[str, Any] = CONFIGS["clip_vit_h"]
LTX_TRANSFORMER: dict[str, Any] = CONFIGS["ltx_transformer"]
LTX_VAE: dict[str, Any] = CONFIGS["ltx_vae"]
T5_XXL: dict[str, Any] = CONFIGS["t5_xxl"]
LTX_SCHEDULER: dict[str, Any] = CONFIGS["ltx_scheduler"]
#: (width, height, frames) per decoder, smallest first (the first is also the warm-up).
SIZES: dict[str, list[tuple[int, int, int]]] = {
    "wan": [(832, 480, 17), (832, 480, 33), (1280, 720, 17), (1280, 720, 33)],
    "ltx": [(768, 512, 25), (768, 512, 97)],
}
TINY_SIZES: dict[str, list[tuple[int, int, int]]] = {
    "wan": [(32, 32, 5), (48, 32, 9)],
    "ltx": [(64, 64, 9), (96, 64, 17)],
}
PRESETS = {"wan": "wan", "ltx": "ltx"}
TINY_PRESETS = {"wan": "wan-tiny", "ltx": "ltx-tiny"}
START_PROMPT = "a lighthouse on a cliff at dawn, waves below"
END_PROMPT = "the same lighthouse at dusk, its lamp lit, a storm coming"
# A measurement predicted to take longer than the budget left is not started; the prediction
# scales the decoder's previous total by (latent tokens ratio) ** PREDICT_POWER.
PREDICT_POWER = 1.5
# A model is not built with less budget left than its build and warm-up take (H200, guessed).
BUILD_RESERVE_S = {"wan": 90.0, "ltx": 45.0}
OFFLOAD_TRANSFER_S = 60.0  # model CPU offload's first moves of ~40 GB, a guess for the budget


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def text_config(cls: Any, xxl: dict[str, Any], tokenizer: Any, layers: int | None) -> Any:
    """An XXL encoder config with the offline tokenizer's vocabulary (and `layers` if given)."""
    return cls(
        **(xxl | ({"num_layers": layers} if layers else {})),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_real_wan(device: Any, dtype: Any, seed: int, text_layers: int | None = None) -> Any:
    """A `WanImageToVideoPipeline` of Wan2.1-FLF2V-14B-720P's architecture, random weights."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from storycli.motion.decoders.wan_tiny import WAN_FLF2V_FLOW_SHIFT, wan_pipeline_class
    from storycli.weights.hub import clip_image_processor_class
    from storycli.weights.tiny_flux import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    with made_on(device, dtype, seed):
        transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
        vae = AutoencoderKLWan(**WAN_VAE)
        text_encoder = UMT5EncoderModel(text_config(UMT5Config, UMT5_XXL, tokenizer, text_layers))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
    # FLF2V's image positions start at zeros (trained from there): random, as the tiny Wan's.
    torch.nn.init.normal_(transformer.condition_embedder.image_embedder.pos_embed, std=0.02)
    settle([transformer, vae, text_encoder, image_encoder], device, dtype)
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=WAN_FLF2V_FLOW_SHIFT,
        solver_order=2,
    )
    return wan_pipeline_class()(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=clip_image_processor_class()(),  # 224², as ViT-H/14's
        image_encoder=image_encoder,
        transformer=transformer,
    )


def build_real_ltx(device: Any, dtype: Any, seed: int, text_layers: int | None = None) -> Any:
    """An `LTXConditionPipeline` of LTX-Video 0.9.5's architecture, random weights."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXConditionPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from storycli.weights.tiny_flux import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    with made_on(device, dtype, seed):
        transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER)
        vae = AutoencoderKLLTXVideo(**LTX_VAE)
        text_encoder = T5EncoderModel(text_config(T5Config, T5_XXL, tokenizer, text_layers))
    settle([transformer, vae, text_encoder], device, dtype)
    return LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def component_sizes(pipe: Any) -> dict[str, dict[str, int]]:
    """Parameters and weight bytes of each of the pipeline's modules."""
    import torch

    sizes = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            params = list(module.parameters())
            sizes[name] = {
                "parameters": sum(p.numel() for p in params),
                "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            }
    return sizes


def dry_build(text_layers: int | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Both real pipelines on the meta device: their modules' parameter counts (bf16 bytes)."""
    import torch

    return {
        "wan": component_sizes(build_real_wan("meta", torch.bfloat16, 0, text_layers)),
        "ltx": component_sizes(build_real_ltx("meta", torch.bfloat16, 0, text_layers)),
    }


def load_decoder(name: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(decoder, build record): the tiny pipeline, or the real architecture built on the device
    and placed as storycli places a real one (VAE tiling on), without offload."""
    import torch

    from storycli.motion.decoders.end_frames import prepare_real_pipeline
    from storycli.motion.decoders.ltx import LtxDecoder
    from storycli.motion.decoders.ltx_tiny import build_tiny_ltx_condition_pipeline
    from storycli.motion.decoders.wan import WanDecoder
    from storycli.motion.decoders.wan_tiny import build_tiny_wan_flf2v_pipeline
    from storycli.motion.presets import load_video_presets, resolve_video_preset
    from storycli.weights.devices import place_pipeline

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    presets = TINY_PRESETS if args.tiny else PRESETS
    preset = resolve_video_preset(presets[name], load_video_presets(), decoder=name)
    sync(device)
    started = time.perf_counter()
    if args.tiny:
        tiny = {"wan": build_tiny_wan_flf2v_pipeline, "ltx": build_tiny_ltx_condition_pipeline}
        pipe = tiny[name](dtype)
    else:
        real = {"wan": build_real_wan, "ltx": build_real_ltx}
        pipe = real[name](device, dtype, args.seed, args.text_layers)
        # The real path's settings (VAE tiling); its offload default ("model" on a GPU) is
        # overridden: the H200 holds every component at once.
        prepare_real_pipeline(pipe, args.device, "none")
        # Not the hub repo: describe() would look its revision up; nothing reads base here.
        preset = dataclasses.replace(preset, base=f"random {preset.base} (architecture only)")
    place_pipeline(pipe, args.device, "none")
    sync(device)
    built = time.perf_counter() - started
    cls = WanDecoder if name == "wan" else LtxDecoder
    decoder = cls(pipe, preset, steps=args.steps)
    components = component_sizes(pipe)
    return decoder, {
        "build_seconds": round(built, 3),
        "resident_bytes": Memory(device).now(),
        "components": components,
        "parameters": sum(c["parameters"] for c in components.values()),
        "weight_bytes": sum(c["weight_bytes"] for c in components.values()),
        "preset": preset.name,
        "preset_steps": args.preset_steps[name],
        "guidance": decoder.guidance,
        "vae_tiling": not args.tiny,
    }


# --------------------------------------------------------------------------------------------
# One transition
# --------------------------------------------------------------------------------------------


def keyframes(width: int, height: int) -> tuple[Any, Any]:
    """Two distinct RGB keyframes (gradients) of `width` × `height`."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    a = np.stack([x + 0 * y, y + 0 * x, np.full((height, width), 96.0)], axis=-1)
    b = np.stack([255 - y + 0 * x, 255 - x + 0 * y, np.full((height, width), 160.0)], axis=-1)
    return tuple(Image.fromarray(v.astype(np.uint8), "RGB") for v in (a, b))


def shape_of(decoder: Any, width: int, height: int, frames: int) -> dict[str, int]:
    """What the decoder renders for a `width` × `height`, `frames` request: its size, frame
    count and the transformer's tokens (latent frames × patches)."""
    from storycli.motion.decoders.end_frames import area_size, end_frames_count

    render = end_frames_count(frames, decoder.factor)
    w, h = area_size((width, height), width * height, decoder.size_multiple)
    latent_frames = (render - 1) // decoder.factor + 1
    patch = decoder.size_multiple  # pixels per token side: VAE × transformer patch
    return {
        "render_width": w,
        "render_height": h,
        "render_frames": render,
        "latent_frames": latent_frames,
        "latent_tokens": latent_frames * (w // patch) * (h // patch),
    }


def measure(decoder: Any, size: tuple[int, int, int], args: argparse.Namespace) -> dict[str, Any]:
    """One transition through `decoder.transition()` at `size` (width, height, frames)."""
    import torch

    from storycli.motion.decoders.base import TransitionRequest

    width, height, frames = size
    device = torch.device(args.device)
    decoder.preset = dataclasses.replace(decoder.preset, area=width * height)
    start, end = keyframes(width, height)
    request = TransitionRequest(
        start=start,
        end=end,
        frames=frames,
        start_prompt=START_PROMPT,
        end_prompt=END_PROMPT,
        seed=args.seed,
    )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = Memory(device)
    baseline = memory.now()
    memory.reset()
    stamps: list[float] = []

    def on_step(_done: int, _total: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    sync(device)
    started = time.perf_counter()
    video = decoder.transition(request, on_step)
    sync(device)
    ended = time.perf_counter()
    peak = memory.peak()
    if len(video) != frames or any(f.size != (width, height) for f in video):
        raise RuntimeError(f"expected {frames} frames of {width}×{height}, got {len(video)}")
    if len(stamps) != decoder.steps:
        raise RuntimeError(f"on_step ran {len(stamps)} times for {decoder.steps} steps")
    total = ended - started
    edges = [started, *stamps]
    steps = [b - a for a, b in itertools.pairwise(edges)]
    # The first step's span also holds the keyframes' encoding: the later steps' median is
    # the step time when there are any.
    per_step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    preset_steps = args.preset_steps[decoder.name]
    rest = total - per_step * len(steps)
    return {
        "width": width,
        "height": height,
        "frames": frames,
        **shape_of(decoder, width, height, frames),
        "steps": len(steps),
        "step_seconds": steps,
        "seconds_per_step": per_step,
        "before_first_step_seconds": steps[0] - per_step,
        "after_last_step_seconds": ended - stamps[-1],
        "rest_seconds": rest,
        "total_seconds": total,
        "preset_steps": preset_steps,
        "extrapolated_seconds": rest + preset_steps * per_step,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "peak_metric": memory.metric,
        "peak_resettable": memory.resettable,
    }


def predicted_seconds(done: list[dict[str, Any]], tokens: int) -> float | None:
    """The next measurement's time, scaled from the decoder's last one by its tokens."""
    if not done:
        return None
    last = done[-1]
    return last["total_seconds"] * (tokens / last["latent_tokens"]) ** PREDICT_POWER


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def run_decoder(
    name: str, args: argparse.Namespace, deadline: float, record: dict[str, Any], say: Any, save
) -> None:
    """Build `name`'s pipeline, warm up at its smallest size, then measure every size (and the
    offload run for Wan) while the budget lasts; `record` is filled and saved as it goes."""
    say(f"{name}: building on {args.device} in {args.dtype} …")
    decoder, build = load_decoder(name, args)
    record["build"] = build
    say(
        f"{name}: {build['parameters'] / 1e9:.3f} B parameters, {build['weight_bytes'] / GIB:.2f}"
        f" GiB, built in {build['build_seconds']:.1f} s"
    )
    save()
    sizes = args.sizes[name]
    started = time.perf_counter()
    warm = measure(decoder, sizes[0], args)
    record["warmup"] = {"size": list(sizes[0]), "seconds": time.perf_counter() - started}
    say(f"{name}: warm-up at {sizes[0]}: {record['warmup']['seconds']:.1f} s (untimed)")
    runs: list[dict[str, Any]] = record.setdefault("runs", [])
    skipped: list[dict[str, Any]] = record.setdefault("skipped", [])
    predicted = warm["total_seconds"]  # first real measurement: the warm-up's size again
    for size in sizes:
        left = deadline - time.perf_counter()
        tokens = shape_of(decoder, *size)["latent_tokens"]
        guess = predicted_seconds(runs, tokens) if runs else predicted
        if left <= 0 or guess > left:
            note = f"budget: {left:.0f} s left, predicted {guess:.0f} s"
            skipped.append({"size": list(size), "reason": note})
            say(f"{name} {size}: skipped ({note})")
            save()
            continue
        run = measure(decoder, size, args)
        run["predicted_seconds"] = guess
        runs.append(run)
        say(
            f"{name} {size[0]}×{size[1]}×{size[2]}: {run['seconds_per_step']:.3g} s/step, "
            f"total {run['total_seconds']:.3g} s, extrapolated {run['extrapolated_seconds']:.3g} s"
            f" at {run['preset_steps']} steps, peak {run['peak_bytes'] / GIB:.2f} GiB"
        )
        save()
    if name == "wan" and args.offload_run:
        record["offload"] = offload_run(decoder, sizes[0], args, deadline, runs, say)
        save()


def offload_run(
    decoder: Any,
    size: tuple[int, int, int],
    args: argparse.Namespace,
    deadline: float,
    runs: list[dict[str, Any]],
    say: Any,
) -> dict[str, Any]:
    """One transition at `size` after `place_pipeline(pipe, device, "model")` (the decoder's
    default on GPUs): its peak and time beside the no-offload run's."""
    from storycli.weights.devices import place_pipeline

    if not args.device.startswith("cuda"):
        return {"status": "skipped", "reason": "model CPU offload needs an accelerator"}
    base = next((r for r in runs if (r["width"], r["height"], r["frames"]) == tuple(size)), None)
    left = deadline - time.perf_counter()
    guess = (base["total_seconds"] if base else 0.0) + OFFLOAD_TRANSFER_S
    if base is None or guess > left:
        reason = f"budget: {left:.0f} s left, predicted {guess:.0f} s"
        say(f"offload run skipped ({reason})")
        return {"status": "skipped", "reason": reason}
    started = time.perf_counter()
    place_pipeline(decoder.pipe, args.device, "model")
    placed = time.perf_counter() - started
    run = measure(decoder, size, args)
    say(
        f"wan with model CPU offload {size}: total {run['total_seconds']:.1f} s, peak "
        f"{run['peak_bytes'] / GIB:.2f} GiB (placing {placed:.1f} s)"
    )
    return {"status": "ok", "offload": "model", "place_seconds": placed, **run}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    lines = [
        f"# Video decoders (Wan2.1 FLF2V, LTX-Video) — {meta['device']} — {meta['date']}"
        + (" (tiny pipelines, a smoke test)" if meta["tiny"] else ""),
        "",
        f"- device: {meta['device_name']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"transformers {meta['transformers']}, python {meta['python']}",
        f"- models: {meta['model']}; {meta['dtype']}; offload none",
        f"- {meta['steps']} denoising steps per transition through the decoder's transition(); "
        "each model's first transition (smallest size) untimed",
        f"- budget {meta['budget_s']:.0f} s; command: `{meta['command']}`; wall "
        f"{meta.get('wall_seconds', 0):.1f} s",
        "",
        "**Extrapolated** s / transition = rest + preset steps × s / step (not measured at "
        "those steps). Peak: "
        + (
            "CUDA max allocated"
            if meta["device"] != "cpu"
            else "RSS high-water (the whole process's heap, not one transition's)"
        )
        + ", weights included.",
        "",
    ]
    for name in meta["decoders"]:
        record = payload["decoders"].get(name) or {}
        if "build" not in record:
            why = "; ".join(s["reason"] for s in record.get("skipped", []))
            lines += [f"## {name}: not run" + (f" ({why})" if why else ""), ""]
            continue
        build = record.get("build", {})
        lines += [
            f"## {name} ({build.get('preset')}, guidance {build.get('guidance')})",
            "",
            f"{build.get('parameters', 0):,} parameters ({gib(build.get('weight_bytes'))} GiB), "
            f"resident {gib(build.get('resident_bytes'))} GiB, built in "
            f"{build.get('build_seconds', 0):.1f} s; warm-up "
            f"{record.get('warmup', {}).get('seconds', 0):.1f} s.",
            "",
            "| size | frames (rendered) | tokens | s / step | before steps s | after steps s "
            "| total s | extrapolated s (steps) | peak GiB | baseline GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = list(record.get("runs", []))
        if record.get("offload", {}).get("status") == "ok":
            rows.append(record["offload"] | {"label": " (model CPU offload)"})
        for r in rows:
            lines.append(
                f"| {r['render_width']}×{r['render_height']}{r.get('label', '')} | {r['frames']} "
                f"({r['render_frames']}) | {r['latent_tokens']} | {r['seconds_per_step']:.3g} "
                f"| {r['before_first_step_seconds']:.3g} | {r['after_last_step_seconds']:.3g} "
                f"| {r['total_seconds']:.3g} | {r['extrapolated_seconds']:.4g} "
                f"({r['preset_steps']}) | {gib(r['peak_bytes'])} | {gib(r['baseline_bytes'])} |"
            )
        for s in record.get("skipped", []):
            lines.append(f"\nSkipped {s['size']}: {s['reason']}.")
        offload = record.get("offload")
        if offload and offload.get("status") != "ok":
            lines.append(f"\nOffload run skipped: {offload['reason']}.")
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU (tests)")
    p.add_argument("--dry-build", action="store_true", help="real configs on meta: counts only")
    p.add_argument("--device", help="default: cuda (--tiny: cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cuda bfloat16")
    p.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    p.add_argument("--steps", type=int, default=2, help="denoising steps (≥ 2: LTX's least)")
    p.add_argument("--text-layers", type=int, help="text encoder layers (default XXL's 24)")
    p.add_argument("--offload-run", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget-s", type=float, default=300.0, help="start nothing after this")
    p.add_argument("--threads", type=int, help="torch threads (--tiny: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.threads = args.threads or (1 if args.tiny else None)
    args.sizes = TINY_SIZES if args.tiny else SIZES
    args.preset_steps = preset_steps()
    if args.steps < 2:
        p.error("--steps must be 2 or more (LTX's least)")
    return args


def preset_steps() -> dict[str, int]:
    """The real presets' steps (wan 50, ltx 40): what the extrapolation is to, tiny or not."""
    from storycli.motion.presets import load_video_presets, resolve_video_preset

    presets = load_video_presets()
    return {n: resolve_video_preset(PRESETS[n], presets, decoder=n).steps for n in DECODERS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_build:
        print(json.dumps(dry_build(args.text_layers), indent=1))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("video_decoders: no CUDA GPU visible to torch; use --tiny", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    payload = {"meta": meta_of(args, argv), "decoders": {}}
    stem = f"video-decoders-{args.device.split(':')[0]}{'-tiny' if args.tiny else ''}-"
    stem += payload["meta"]["date"]

    def save() -> Path:
        return write_results(payload, args.out, stem, t0, markdown)

    for name in args.decoders:
        record: dict[str, Any] = {}
        payload["decoders"][name] = record
        left = deadline - time.perf_counter()
        reserve = 0.0 if args.tiny else BUILD_RESERVE_S[name]
        if left <= reserve:
            reason = f"budget: {max(left, 0):.0f} s left, a build and warm-up take ~{reserve:.0f} s"
            record["skipped"] = [{"size": "all", "reason": reason}]
            say(f"{name}: not built ({reason})")
            continue
        run_decoder(name, args, deadline, record, say, save)
        gc.collect()  # the pipeline goes before the next one is built
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    path = save()
    say(f"wrote {path} and {path.with_suffix('.md')}")
    print(path.with_suffix(".md").read_text())
    return 0


def meta_of(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    from storycli.weights.devices import device_description

    layers = args.text_layers or UMT5_XXL["num_layers"]
    model = (
        "storycli's tiny random Wan FLF2V and LTX condition pipelines"
        if args.tiny
        else "random weights, real architectures: Wan2.1-FLF2V-14B-720P transformer, Wan2.1 VAE, "
        f"UMT5-XXL encoder layout ({layers} layers), CLIP ViT-H/14 vision; LTX-Video 0.9.5 "
        f"transformer and VAE, T5-XXL encoder layout ({layers} layers); offline T5 tokenizer "
        "(small vocabulary)"
    )
    return {
        "date": dt.date.today().isoformat(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "device": args.device,
        "device_name": device_description(args.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": model,
        "text_encoder_layers": None if args.tiny else layers,
        "dtype": args.dtype,
        "decoders": list(args.decoders),
        "sizes": {name: [list(s) for s in args.sizes[name]] for name in args.decoders},
        "steps": args.steps,
        "budget_s": args.budget_s,
        "offload_run": args.offload_run,
        "command": " ".join(["video_decoders.py", *(argv if argv is not None else sys.argv[1:])]),
    }


if __name__ == "__main__":
    sys.exit(main())
