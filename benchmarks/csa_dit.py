#!/usr/bin/env python
"""Benchmark Consistent Self-Attention in FLUX.1's transformer: per-forward time and story peak.

Two parts, in one process, on one transformer (issue 22):

1. **Per forward**: one ``FluxTransformer2DModel`` forward over a batch of rows with CSA
   (``storycli.consistency.csa_dit``) against the stock ``FluxAttnProcessor``, driven as the
   story loop drives it (``CSAState.open_call`` / ``enter`` / ``leave``, ``drop_step`` once
   the step's bank is read): a *write* forward of the R references (batch R: FLUX.1 is
   guidance-distilled, no CFG rows), then *read* forwards of m frames (batch m). Each CSA
   forward is paired with a stock forward of the same inputs, back to back, stock first in
   even rounds and CSA first in odd ones; a kind's ratio is the median of its pairs' ratios.
   Time per image of a story of F frames is composed from the kinds' medians as the loop runs
   them (one write + the reads in chunks of m), over F.
2. **Whole story**: ``generate_keyframes`` through ``FluxBackbone`` (the loop ``storydiff
   generate`` runs, VAE decode included), stock (``consistency.method: none``) and CSA, at
   3 and 6 frames, the order alternating, peak memory per story (CUDA
   ``max_memory_allocated``, reset after the pipeline is built; CPU the process's RSS
   high-water ``VmHWM``, reset likewise). All stories run in this process: on CUDA the reset
   peak counts only what the story allocates on top of what stays allocated (the pipeline,
   recorded as the baseline), so a fresh process per story would cost a 24 GB rebuild for
   nothing; on CPU (``--tiny``) peaks may include earlier stories' heap (a smoke test).
3. **Q8_0 GGUF**: the bfloat16 transformer leaves the device; a random Q8_0 GGUF file of the
   same transformer (``benchmarks/flux_gguf.py``: city96's ``flux1-dev-Q8_0.gguf`` layout, drawn
   on the device, written to /dev/shm when it has room) is loaded by storycli's own loader (what
   ``model: flux1-dev-Q8_0.gguf`` runs: weights kept quantized, each layer dequantized to
   bfloat16 for its matmul), and the stories of part 2 run again on it: issue 22's "≤ 17 GiB";
   then the longest CSA story once more with the pipeline placed as ``--offload model`` places
   it (``storycli.weights.devices.place_pipeline``): "16 GB with ``--offload model``". Skipped
   when less than ``GGUF_MIN_S`` of the budget is left (file ≈ 13 GB: ≈ 30-40 s to make).

The model: FLUX.1-dev's real transformer (19 double- + 38 single-stream blocks, 24 heads × 128,
joint_attention_dim 4096, pooled 768, guidance embedding, RoPE axes (16, 56, 56); 11.9 B
parameters) with random weights, built **directly on the device in the benchmark's dtype**
(``torch.device`` context + default dtype: no float32 copy, nothing from disk); FLUX.1's VAE
architecture (16 latent channels), random; small random text encoders with FLUX's output sizes
(T5 hidden 4096 for 512 tokens, CLIP pooled 768) and the offline tokenizers of
``storycli.weights.tiny`` / ``storycli.weights.tiny_flux``. ``--tiny``: ``storycli.weights.
tiny_flux``'s random FLUX on the CPU at 64 px, both parts in seconds (what
``tests/benchmarks/test_csa_dit_bench.py`` runs).

CSA settings: the worst case, CSA at every step in every chosen layer (``warmup_steps 0``,
probabilities 1.0), rate 0.5, the default blocks (``up``: FLUX.1's last 19 single-stream
blocks), R = 2 references of one character.

Usage::

    python benchmarks/csa_dit.py --device cuda             # 1024², bfloat16: ≈ 1-2 min
    python benchmarks/csa_dit.py --tiny --out /tmp/bench   # tiny FLUX on the CPU, seconds

Results: ``<out>/csa-dit-<device>[-tiny]-<date>.{json,md}``, rewritten after each part.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # story_loop's shared helpers, when loaded by path (the tests)
from story_loop import Memory, made_on, plan_of, settle, sync, write_results  # noqa: E402

GIB, MIB = 2**30, 2**20

# Issue 22's targets.
TIME_TARGET = 1.15  # CSA / stock time per image at FLUX.1 size, 1024²
PEAK_OVER_WEIGHTS_GIB = 4.0  # story peak ≤ transformer weights + 4 GiB (bf16, 1024², 6 frames)
GROWTH_TOLERANCE = 1.01  # "flat in frames": the longest story's CSA peak within 1 % of the shortest
GGUF_PEAK_GIB = 17.0  # story peak with a Q8_0 GGUF transformer (fits a 24 GB card with room)
GGUF_OFFLOAD_BYTES = 16e9  # the same with --offload model: a 16 GB card
GGUF_MIN_S = 120.0  # the least budget left to start the GGUF part (a 13 GB file; tiny: none)

#: FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
#: FLUX.1's VAE config (vae/config.json), 16 latent channels.
FLUX_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
#: FLUX.1-dev's scheduler (scheduler/scheduler_config.json).
FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
PARTS = ("forward", "story", "gguf")
T5_TOKENS = 512  # FLUX.1-dev's T5 budget: 512 text tokens next to 4096 image tokens at 1024²
TEXT_LAYERS = 2  # the text encoders only need their output sizes: two layers are plenty
PROMPTS = (
    "walks through a snowy forest",
    "sleeps curled up under a tree",
    "jumps over a frozen stream",
    "watches the stars from a hill",
    "runs across a golden field",
    "sits by a river at sunset",
)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_transformer(device: Any, dtype: Any, seed: int) -> Any:
    """FLUX.1-dev's transformer with random weights, made on `device` in `dtype` (parameters
    are created there: no float32 copy, nothing on the host)."""
    from diffusers import FluxTransformer2DModel

    with made_on(device, dtype, seed):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    return transformer.eval().requires_grad_(False)


def build_pipeline(transformer: Any, device: Any, dtype: Any, seed: int) -> Any:
    """A `FluxPipeline` around `transformer`: FLUX.1's VAE architecture, small random CLIP
    (pooled 768) and T5 (hidden 4096, 512 tokens) with the offline tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from storycli.weights.tiny import build_tokenizer
    from storycli.weights.tiny_flux import build_t5_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    tokenizer_2.model_max_length = T5_TOKENS  # the backbone pads T5 to the tokenizer's budget
    clip = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=4096,
        d_kv=64,
        d_ff=1024,
        num_layers=TEXT_LAYERS,
        num_heads=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    with made_on(device, dtype, seed + 1):
        vae = AutoencoderKL(**FLUX_VAE)
        text_encoder = CLIPTextModel(clip)
        text_encoder_2 = T5EncoderModel(t5)
    settle((vae, text_encoder, text_encoder_2), device, dtype)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_models(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(pipeline or None, transformer, build record): the tiny FLUX, or the real-size
    transformer now and the rest of the pipeline when the story part needs it."""
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync(device)
    started = time.perf_counter()
    if args.tiny:
        from storycli.weights.tiny_flux import build_tiny_flux_pipeline

        pipe = build_tiny_flux_pipeline(dtype=dtype, guidance_embeds=True).to(device)
        transformer = pipe.transformer
    else:
        pipe, transformer = None, build_transformer(device, dtype, args.seed)
    sync(device)
    parameters = sum(p.numel() for p in transformer.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    return (
        pipe,
        transformer,
        {
            "transformer_build_seconds": round(time.perf_counter() - started, 3),
            "transformer_parameters": parameters,
            "transformer_weight_bytes": weight_bytes,
            "config": dict(transformer.config),
        },
    )


# --------------------------------------------------------------------------------------------
# Part 1: per forward
# --------------------------------------------------------------------------------------------


def forward_inputs(transformer: Any, rows: int, grid: int, text: int, device: Any) -> dict:
    """One forward's inputs: `rows` packed latents of a `grid` × `grid` patch grid, `text` T5
    tokens, CLIP's pooled vector, timestep and guidance, FLUX's position ids."""
    import torch

    cfg = transformer.config
    dtype = transformer.dtype
    g = torch.Generator().manual_seed(1234 + rows)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    image_ids = torch.zeros(grid, grid, 3)
    image_ids[..., 1] += torch.arange(grid)[:, None]
    image_ids[..., 2] += torch.arange(grid)[None, :]
    return {
        "hidden_states": randn(rows, grid * grid, cfg.in_channels),
        "encoder_hidden_states": randn(rows, text, cfg.joint_attention_dim),
        "pooled_projections": randn(rows, cfg.pooled_projection_dim),
        "timestep": torch.full((rows,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((rows,), 3.5, device=device, dtype=torch.float32)
        if cfg.guidance_embeds
        else None,
        "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
        "img_ids": image_ids.reshape(-1, 3).to(device=device, dtype=dtype),
        "joint_attention_kwargs": {},
        "return_dict": False,
    }


def csa_worst_case() -> Any:
    """CSA in every chosen layer at every step (no warm-up, probability 1): the worst case."""
    from storycli.consistency.csa_state import CSASettings

    return CSASettings(warmup_steps=0, prob_early=1.0, prob_late=1.0)


def kinds_of(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(name, rows) of the forwards a story step runs: the write first (it fills the bank)."""
    return [("write", args.id_length)] + [(f"read-{m}", m) for m in args.micro_batches]


def time_forwards(transformer: Any, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Every kind's stock and CSA forwards in alternating pairs, `warmup` + `repeats` rounds,
    the step's bank dropped after each round as the loop drops it."""
    import torch

    from storycli.consistency.csa_dit import dit_csa_layers, installed_dit_csa
    from storycli.consistency.csa_state import CSAState

    device = torch.device(args.device)
    grid, r = args.size // (2 * args.vae_scale), args.id_length  # VAE, then 2×2 patches
    kinds = kinds_of(args)
    inputs = {
        rows: forward_inputs(transformer, rows, grid, args.text_tokens, device)
        for rows in sorted({rows for _, rows in kinds})
    }
    layers = dit_csa_layers(transformer, args.blocks)
    state = CSAState(csa_worst_case(), layers)
    stock_processors = dict(transformer.attn_processors)
    samples: dict[str, dict[str, list[float]]] = {k: {"stock": [], "csa": []} for k, _ in kinds}
    memory = Memory(device)

    def timed(rows: int) -> tuple[float, Any]:
        sync(device)
        start = time.perf_counter()
        out = transformer(**inputs[rows])[0]
        sync(device)
        return time.perf_counter() - start, out

    def consistent(kind: str, rows: int, n: int) -> tuple[float, Any]:
        transformer.set_attn_processor(dict(csa_processors))
        seed = args.seed + 1000 * n
        if kind == "write":
            streams = [state.open_call("write", r, seed, character="A")]
        else:  # a micro-batch of one-frame read calls, each with its own draws
            streams = [
                state.open_call("read", 1, seed + j, read_characters=["A"]) for j in range(rows)
            ]
        state.enter(streams)
        try:
            return timed(rows)
        finally:
            state.leave()

    rounds = args.warmup + args.repeats
    memory.reset()
    with torch.inference_mode(), installed_dit_csa(transformer, state):
        csa_processors = dict(transformer.attn_processors)
        # The first forward pays one-off costs (kernels picked, allocator grown): untimed.
        transformer.set_attn_processor(dict(stock_processors))
        first = timed(max(inputs))[0]
        say(f"first forward, {max(inputs)} rows: {first:.3f} s (untimed)")
        for n in range(rounds):
            order = ("csa", "stock") if n % 2 else ("stock", "csa")
            for kind, rows in kinds:
                pair: dict[str, tuple[float, Any]] = {}
                for side in order:
                    if side == "stock":  # hooks stay; with no call entered they only count
                        transformer.set_attn_processor(dict(stock_processors))
                        pair[side] = timed(rows)
                    else:
                        pair[side] = consistent(kind, rows, n)
                    samples[kind][side].append(pair[side][0])
                if torch.equal(pair["stock"][1], pair["csa"][1]):
                    raise RuntimeError(f"{kind}: CSA did not engage")
                say(
                    f"{kind} ({rows} rows) round {n + 1}/{rounds}: stock "
                    f"{pair['stock'][0]:.3f} s, CSA {pair['csa'][0]:.3f} s"
                    + (" (warm-up)" if n < args.warmup else "")
                )
            state.drop_step(0)  # every kind of this round ran at its calls' step 0
        transformer.set_attn_processor(dict(stock_processors))
    forwards = []
    for kind, rows in kinds:
        stock = samples[kind]["stock"][args.warmup :]
        csa = samples[kind]["csa"][args.warmup :]
        pairs = [c / s for c, s in zip(csa, stock, strict=True)]
        forwards.append(
            {
                "kind": kind,
                "rows": rows,
                "stock_seconds": statistics.median(stock),
                "csa_seconds": statistics.median(csa),
                "ratio": statistics.median(pairs),
                "pair_ratios": pairs,
                "raw_seconds": samples[kind],
            }
        )
    inputs.clear()  # the forwards' inputs go before the stories
    return {
        "image_tokens": grid * grid,
        "text_tokens": args.text_tokens,
        "csa_layers": len(layers),
        "blocks": list(args.blocks),
        "first_forward_seconds": first,
        "peak_bytes": memory.peak(),
        "peak_metric": memory.metric,
        "bank_bytes_per_step": state.peak_bank_bytes,
        "forwards": forwards,
        "stories": compose(forwards, args),
    }


def read_chunks(reads: int, micro_batch: int) -> list[int]:
    """The read forwards' sizes for `reads` frames in chunks of `micro_batch` (the loop's)."""
    return [min(micro_batch, reads - i) for i in range(0, reads, micro_batch)]


def compose(forwards: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time per image of a story step of F frames: one write + the reads in chunks of m, from
    the kinds' medians (stories whose chunks were not all measured are left out)."""
    by = {f["kind"]: f for f in forwards}
    stories = []
    for frames in args.frames:
        for m in args.micro_batches:
            chunks = read_chunks(frames - args.id_length, m)
            needed = ["write", *(f"read-{c}" for c in chunks)]
            if frames < args.id_length or any(k not in by for k in needed):
                continue
            stock = sum(by[k]["stock_seconds"] for k in needed) / frames
            csa = sum(by[k]["csa_seconds"] for k in needed) / frames
            stories.append(
                {
                    "frames": frames,
                    "micro_batch": m,
                    "forwards": needed,
                    "stock_seconds_per_image": stock,
                    "csa_seconds_per_image": csa,
                    "ratio": csa / stock,
                }
            )
    return stories


# --------------------------------------------------------------------------------------------
# Part 2: whole stories
# --------------------------------------------------------------------------------------------


def story_yaml(method: str, frames: int, args: argparse.Namespace) -> str:
    consistency: dict[str, Any] = {"method": method, "id_length": args.id_length}
    if method != "none":
        consistency |= {"warmup_steps": 0, "prob_early": 1.0, "prob_late": 1.0}
    story = {
        "name": "csa-dit-bench",
        "model": "tiny-flux",  # the loop runs the pipeline it is given; this only names FLUX
        "identity": "a small red fox with a white-tipped tail",
        "frames": [f"{PROMPTS[i % len(PROMPTS)]}, scene {i + 1}" for i in range(frames)],
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "guidance": 3.5,
        "seed": args.seed,
        "consistency": consistency,
    }
    return json.dumps(story, indent=1)  # JSON is YAML


def run_story(pipe: Any, method: str, frames: int, args: argparse.Namespace) -> dict[str, Any]:
    """One story through `generate_keyframes`, its peak from the pipeline built."""
    import torch

    from storycli.keyframes.loop import generate_keyframes
    from storycli.keyframes.schedule import render_size

    device = torch.device(args.device)
    plan = plan_of(story_yaml(method, frames, args))
    size = render_size(plan, None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = Memory(device)
    baseline = memory.now()
    memory.reset()
    started = time.perf_counter()
    trace: list[dict[str, Any]] = []
    images: list[tuple[int, int]] = []

    def on_step(step: int, _steps: int) -> None:
        trace.append({"step": step, "peak_bytes": memory.peak(), "now_bytes": memory.now()})

    loop = generate_keyframes(
        pipe,
        plan,
        range(len(plan.frames)),
        size,
        on_frame=lambda _i, image, _s: images.append(image.size),
        on_step=on_step,
        frame_batch=args.frame_batch,
    )
    seconds = time.perf_counter() - started
    peak = memory.peak()
    if len(images) != frames or any(s != (size.width, size.height) for s in images):
        raise RuntimeError(f"expected {frames} frames of {size}, got {images}")
    t5 = pipe.text_encoder_2
    return {
        "method": method,
        "frames": frames,
        "steps": args.steps,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "denoise_peak_bytes": trace[-1]["peak_bytes"] if trace else peak,
        "peak_resettable": memory.resettable,
        "t5_device_after": str(next(t5.parameters()).device),
        "seconds": seconds,
        "seconds_per_image": seconds / frames,
        "frame_batch": loop.get("frame_batch"),
        "forwards_per_step": loop.get("unet_forwards_per_step"),
        "peak_bank_bytes": loop.get("peak_bank_bytes"),
        "steps_trace": trace,
    }


def run_stories(
    pipe: Any, args: argparse.Namespace, deadline: float, say: Any, save: Any
) -> list[dict[str, Any]]:
    """Stock and CSA at each length, the order alternating; results saved after each story."""
    runs: list[dict[str, Any]] = []
    methods = ("none", "storydiffusion")
    for n, frames in enumerate(sorted(args.frames)):
        for method in methods if n % 2 == 0 else methods[::-1]:
            if time.perf_counter() > deadline:
                say(f"budget spent: story {method} × {frames} frames not run")
                continue
            run = run_story(pipe, method, frames, args)
            say(
                f"story {'stock' if method == 'none' else 'CSA'}, {frames} frames: peak "
                f"{run['peak_bytes'] / GIB:.3f} GiB (+{run['peak_over_baseline_bytes'] / MIB:.0f}"
                f" MiB over the pipeline), bank {(run['peak_bank_bytes'] or 0) / MIB:.1f} MiB, "
                f"{run['seconds']:.1f} s"
            )
            runs.append(run)
            save(runs)
    return runs


def run_story_part(
    pipe: Any,
    args: argparse.Namespace,
    deadline: float,
    say: Any,
    save: Any,
    weight_bytes: int,
    record: dict[str, Any],
) -> None:
    """Part 2 (and part 3's stories) into `record`, a dict already in the payload: the runs and
    their summary, saved after each story."""
    import torch

    record["peak_metric"] = Memory(torch.device(args.device)).metric

    def save_runs(runs: list[dict[str, Any]]) -> None:
        record["runs"] = runs
        record["summary"] = story_summary(runs, weight_bytes)
        save()

    save_runs(run_stories(pipe, args, deadline, say, save_runs))


def run_gguf_part(
    pipe: Any,
    config: dict[str, Any],
    args: argparse.Namespace,
    deadline: float,
    say: Any,
    save: Any,
    record: dict[str, Any],
    bf16: Any,
) -> None:
    """Part 3 into `record`: the pipeline's bfloat16 transformer (`bf16`, a weak reference)
    replaced by a random Q8_0 GGUF file of the same config loaded through storycli's loader,
    then the stories again."""
    import torch
    from flux_gguf import gguf_transformer

    device = torch.device(args.device)
    left = deadline - time.perf_counter()
    needed = 0.0 if args.tiny else GGUF_MIN_S
    if left < needed:
        record["note"] = f"budget spent: {left:.0f} s left, {needed:g} s needed"
        say(f"GGUF part not run: {record['note']}")
        save()
        return
    pipe.transformer = None  # the last reference to the bfloat16 transformer: it leaves
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Were something still to hold the bf16 transformer, its 22 GiB would count in every peak.
    record["bf16_transformer_freed"] = bf16() is None
    record["resident_before_bytes"] = Memory(device).now()
    say("writing a random Q8_0 GGUF FLUX.1 transformer and loading it with storycli's loader …")
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    transformer, built = gguf_transformer(public, device, getattr(torch, args.dtype), args.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    quantized = sum(type(m).__name__ == "GGUFLinear" for m in transformer.modules())
    record["build"] = built | {"transformer_weight_bytes": weight_bytes, "gguf_linears": quantized}
    pipe.transformer = transformer
    say(
        f"GGUF: {built['file_bytes'] / MIB:.0f} MiB file written in {built['write_seconds']:.1f} s"
        f" ({built['folder']}), loaded in {built['load_seconds']:.1f} s, {quantized} GGUF "
        f"linear layers, {weight_bytes / MIB:.0f} MiB on {device}"
    )
    save()
    run_story_part(pipe, args, deadline, say, save, weight_bytes, record)
    if time.perf_counter() > deadline:
        say("budget spent: the GGUF story with --offload model not run")
        return
    from storycli.weights.devices import place_pipeline

    # What `--offload model` does: each component on the device only while it runs.
    place_pipeline(pipe, str(device), "model")
    run = run_story(pipe, "storydiffusion", max(args.frames), args)
    record["offload_model"] = run
    say(
        f"GGUF, --offload model, CSA {run['frames']} frames: peak {run['peak_bytes'] / GIB:.3f} GiB"
    )
    save()


def story_summary(runs: list[dict[str, Any]], weight_bytes: int) -> dict[str, Any]:
    """CSA / stock per length; the CSA peak against the transformer's weights + 4 GiB (at the
    longest story); its growth from the shortest story to the longest."""
    by = {(r["method"], r["frames"]): r for r in runs}
    lengths = sorted({r["frames"] for r in runs})
    pairs = []
    for frames in lengths:
        stock, csa = by.get(("none", frames)), by.get(("storydiffusion", frames))
        if stock and csa:
            pairs.append(
                {
                    "frames": frames,
                    "stock_peak_bytes": stock["peak_bytes"],
                    "csa_peak_bytes": csa["peak_bytes"],
                    "peak_ratio": csa["peak_bytes"] / stock["peak_bytes"],
                    "time_ratio": csa["seconds_per_image"] / stock["seconds_per_image"],
                }
            )
    growth = {}
    for method in ("none", "storydiffusion"):
        found = [by[(method, f)] for f in lengths if (method, f) in by]
        if len(found) >= 2:
            growth[method] = {
                "frames": [found[0]["frames"], found[-1]["frames"]],
                "ratio": found[-1]["peak_bytes"] / found[0]["peak_bytes"],
                "per_frame_bytes": (found[-1]["peak_bytes"] - found[0]["peak_bytes"])
                / (found[-1]["frames"] - found[0]["frames"]),
            }
    longest = max(
        (r for r in runs if r["method"] == "storydiffusion"),
        key=lambda r: r["frames"],
        default=None,
    )
    limit = weight_bytes + PEAK_OVER_WEIGHTS_GIB * GIB
    return {
        "pairs": pairs,
        "growth": growth,
        "peak_limit_bytes": limit,
        "csa_longest_peak_bytes": longest["peak_bytes"] if longest else None,
        "csa_longest_frames": longest["frames"] if longest else None,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def verdict(value: float | None, limit: float, gpu: bool) -> str:
    if value is None:
        return "—"
    return ("✅" if value <= limit else "❌") if gpu else "— (not a GPU number)"


def story_lines(story: dict[str, Any], heading: str | None) -> list[str]:
    """Markdown: a whole-stories table (under `heading`) and the CSA / stock peak ratios."""
    lines = [f"## {heading}", ""] if heading else []
    lines += [
        "| method | frames | peak GiB | denoising peak GiB | over baseline MiB | bank MiB "
        "| frame batch | forwards / step | T5 after | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in story.get("runs", []):
        lines.append(
            f"| {'stock' if r['method'] == 'none' else 'CSA'} | {r['frames']} "
            f"| {r['peak_bytes'] / GIB:.3f} | {r['denoise_peak_bytes'] / GIB:.3f} "
            f"| {r['peak_over_baseline_bytes'] / MIB:.0f} "
            f"| {(r['peak_bank_bytes'] or 0) / MIB:.1f} | {r['frame_batch']} "
            f"| {r['forwards_per_step']} | {r['t5_device_after']} "
            f"| {r['seconds_per_image']:.3g} |"
        )
    pairs = story.get("summary", {}).get("pairs", [])
    if pairs:
        lines += [
            "",
            "CSA / stock story peak: "
            + ", ".join(f"{p['frames']} frames {p['peak_ratio']:.3f}" for p in pairs)
            + " (s / image: "
            + ", ".join(f"{p['time_ratio']:.3f}" for p in pairs)
            + "; stories run one after the other, so the time is indicative only).",
        ]
    return [*lines, ""]


def markdown(payload: dict[str, Any]) -> str:
    meta, fwd, story = payload["meta"], payload.get("forward"), payload.get("story")
    gpu = meta["device"].startswith("cuda") and not meta["tiny"]
    build = meta.get("build") or {}
    lines = [
        f"# CSA in FLUX.1's transformer — {meta['device']} — {meta['date']}"
        + (" (tiny FLUX, a smoke test)" if meta["tiny"] else ""),
        "",
        f"- device: {meta['device_name']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"transformers {meta['transformers']}, python {meta['python']}",
        f"- model: {meta['model']}; {meta['dtype']}; {meta['size']}²",
        f"- transformer: {build.get('transformer_parameters', 0):,} parameters, "
        f"{build.get('transformer_weight_bytes', 0) / GIB:.3f} GiB of weights, built in "
        f"{build.get('transformer_build_seconds', float('nan')):.2f} s on the device",
        f"- CSA: worst case (every step, every chosen layer), blocks {meta['blocks']}, R = "
        f"{meta['id_length']}; {meta['repeats']} timed rounds after {meta['warmup']} warm-up",
        f"- command: `{meta['command']}`; wall {meta.get('wall_seconds', 0):.1f} s",
        "",
    ]
    if fwd:
        lines += [
            f"## Per forward ({fwd['image_tokens']} image + {fwd['text_tokens']} text tokens, "
            f"{fwd['csa_layers']} CSA layers)",
            "",
            "| forward | rows | stock s | CSA s | × stock | pair ratios |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for f in fwd["forwards"]:
            pairs = ", ".join(f"{p:.3f}" for p in f["pair_ratios"])
            lines.append(
                f"| {f['kind']} | {f['rows']} | {f['stock_seconds']:.4g} | {f['csa_seconds']:.4g} "
                f"| {f['ratio']:.3f} | {pairs} |"
            )
        lines += [
            "",
            f"Bank of one step: {fwd['bank_bytes_per_step'] / MIB:.1f} MiB; peak during the "
            f"forwards {fwd['peak_bytes'] / GIB:.3f} GiB ({fwd['peak_metric']}).",
            "",
            "Story step composed from the medians (one write + reads in chunks of m), per image:",
            "",
            "| frames | micro-batch | stock s / image | CSA s / image | × stock |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s in fwd["stories"]:
            lines.append(
                f"| {s['frames']} | {s['micro_batch']} | {s['stock_seconds_per_image']:.4g} "
                f"| {s['csa_seconds_per_image']:.4g} | {s['ratio']:.3f} |"
            )
        lines.append("")
    if story:
        lines += story_lines(
            story, f"Whole stories ({meta['steps']} steps, peak: {story['peak_metric']}, reset "
            "once the pipeline is built)",
        )  # fmt: skip
    gguf = payload.get("gguf")
    if gguf:
        lines += [f"## Q8_0 GGUF transformer ({meta['steps']} steps)", ""]
        built = gguf.get("build")
        if built:
            lines += [
                "A random Q8_0 GGUF file (`benchmarks/flux_gguf.py`, "
                f"{built['file_bytes'] / MIB:.1f} MiB; tensors {built['tensors']}) written in "
                f"{built['write_seconds']:.1f} s to {built['folder']}, loaded by storycli's "
                f"loader in {built['load_seconds']:.1f} s ({built['gguf_linears']} GGUF linear "
                f"layers): {built['transformer_weight_bytes'] / MIB:.1f} MiB of weights on the "
                f"device (before it: {gguf['resident_before_bytes'] / GIB:.3f} GiB resident; "
                "the bf16 transformer freed: "
                f"{'yes' if gguf['bf16_transformer_freed'] else 'NO'}).",
                "",
            ]
        if gguf.get("note"):
            lines += [f"Not run: {gguf['note']}.", ""]
        if gguf.get("runs"):
            lines += story_lines(gguf, None)
        if gguf.get("offload_model"):
            lines += [
                "With `--offload model` (storycli's `place_pipeline`):",
                "",
                *story_lines({"runs": [gguf["offload_model"]]}, None),
            ]
    lines += ["## Targets (issue 22)", "", "| target | measured | met |", "|---|---:|:---:|"]
    if fwd:
        at = [s for s in fwd["stories"] if s["frames"] == max(meta["frames"])]
        for s in at:
            lines.append(
                f"| CSA / stock time per image, {s['frames']} frames, micro-batch "
                f"{s['micro_batch']} ≤ {TIME_TARGET} | {s['ratio']:.3f} "
                f"| {verdict(s['ratio'], TIME_TARGET, gpu)} |"
            )
    if story:
        summary = story["summary"]
        peak = summary["csa_longest_peak_bytes"]
        if peak is not None:
            limit = summary["peak_limit_bytes"]
            lines.append(
                f"| CSA story peak, {summary['csa_longest_frames']} frames ≤ transformer weights "
                f"+ {PEAK_OVER_WEIGHTS_GIB:g} GiB ({limit / GIB:.2f} GiB) | {peak / GIB:.3f} GiB "
                f"| {verdict(peak, limit, gpu)} |"
            )
        growth = summary["growth"].get("storydiffusion")
        if growth:
            lines.append(
                f"| flat in frames: CSA peak {growth['frames'][1]} / {growth['frames'][0]} frames "
                f"≤ {GROWTH_TOLERANCE} | {growth['ratio']:.4f} "
                f"({growth['per_frame_bytes'] / MIB:+.1f} MiB / frame) "
                f"| {verdict(growth['ratio'], GROWTH_TOLERANCE, gpu)} |"
            )
    gguf_summary = (gguf or {}).get("summary") or {}
    if gguf_summary.get("csa_longest_peak_bytes") is not None:
        peak, limit = gguf_summary["csa_longest_peak_bytes"], GGUF_PEAK_GIB * GIB
        lines.append(
            f"| Q8_0 GGUF: CSA story peak, {gguf_summary['csa_longest_frames']} frames ≤ "
            f"{GGUF_PEAK_GIB:g} GiB | {peak / GIB:.3f} GiB | {verdict(peak, limit, gpu)} |"
        )
    offload = (gguf or {}).get("offload_model")
    if offload:
        peak = offload["peak_bytes"]
        lines.append(
            f"| Q8_0 GGUF with --offload model: CSA story peak, {offload['frames']} frames ≤ 16 GB "
            f"| {peak / GIB:.3f} GiB | {verdict(peak, GGUF_OFFLOAD_BYTES, gpu)} |"
        )
    if not gpu:
        lines += [
            "",
            "Not FLUX.1 on a GPU: these numbers test the script, not the issue's targets.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU at 64 px (tests)")
    p.add_argument("--device", help="default: cuda (--tiny: cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cuda bfloat16")
    p.add_argument("--size", type=int, help="square image size (1024; --tiny 64)")
    p.add_argument("--text-tokens", type=int, help=f"T5 tokens per forward ({T5_TOKENS})")
    p.add_argument("--id-length", type=int, default=2, help="reference frames (R)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4], help="read frames")
    p.add_argument("--frames", type=int, nargs="+", default=[3, 6], help="story lengths")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per story")
    p.add_argument("--frame-batch", type=int, help="story loop's (default: its own, GPU 4)")
    p.add_argument("--blocks", nargs="+", default=["up"], help="CSA blocks (csa_dit names)")
    p.add_argument("--repeats", type=int, help="timed rounds (3; --tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget-s", type=float, default=600.0, help="start no story after this")
    p.add_argument("--threads", type=int, help="torch threads (--tiny: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.size = args.size or (64 if args.tiny else 1024)
    args.text_tokens = args.text_tokens or (64 if args.tiny else T5_TOKENS)
    args.repeats = args.repeats or (2 if args.tiny else 3)
    args.threads = args.threads or (1 if args.tiny else None)
    if min(args.frames) < args.id_length:
        p.error(f"--frames {args.frames} include stories shorter than --id-length")
    # FLUX.1's VAE downsamples 8×, the tiny one 2×; the transformer packs 2×2 patches.
    args.vae_scale = 2 if args.tiny else 8
    if args.size % (2 * args.vae_scale):
        p.error(f"--size must be a multiple of {2 * args.vae_scale}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    import diffusers
    import torch
    import transformers

    from storycli.weights.devices import device_description

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("csa_dit: no CUDA GPU visible to torch; use --tiny on a CPU", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    date = dt.date.today().isoformat()
    stem = f"csa-dit-{args.device.split(':')[0]}{'-tiny' if args.tiny else ''}-{date}"
    model = (
        "storycli.weights.tiny_flux (tiny random FLUX, dev-like: guidance embedding)"
        if args.tiny
        else "FLUX.1-dev's transformer config with random weights, built on the device; FLUX.1 "
        f"VAE architecture, random; random CLIP (pooled 768) and T5 (hidden 4096, "
        f"{args.text_tokens} tokens), {TEXT_LAYERS} layers each; offline tokenizers"
    )
    payload: dict[str, Any] = {
        "meta": {
            "date": date,
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
            "dtype": args.dtype,
            "size": args.size,
            "id_length": args.id_length,
            "micro_batches": args.micro_batches,
            "frames": args.frames,
            "steps": args.steps,
            "blocks": args.blocks,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "command": " ".join(["csa_dit.py", *(argv if argv is not None else sys.argv[1:])]),
        }
    }

    def save() -> Path:
        return write_results(payload, args.out, stem, t0, markdown)

    say(f"building the transformer on {args.device} in {args.dtype} …")
    pipe, transformer, build = build_models(args)
    payload["meta"]["build"] = build
    say(
        f"built: {build['transformer_parameters'] / 1e9:.3f} B parameters, "
        f"{build['transformer_weight_bytes'] / GIB:.2f} GiB, "
        f"{build['transformer_build_seconds']:.1f} s"
    )
    save()
    if "forward" in args.parts:
        payload["forward"] = time_forwards(transformer, args, say)
        for s in payload["forward"]["stories"]:
            say(
                f"story of {s['frames']} frames, micro-batch {s['micro_batch']}: "
                f"CSA / stock per image {s['ratio']:.3f}"
            )
        save()
    if {"story", "gguf"} & set(args.parts) and pipe is None:
        started = time.perf_counter()
        pipe = build_pipeline(
            transformer, torch.device(args.device), getattr(torch, args.dtype), args.seed
        )
        payload["meta"]["build"]["pipeline_rest_seconds"] = round(time.perf_counter() - started, 3)
    if "story" in args.parts:
        payload["story"] = {}
        run_story_part(pipe, args, deadline, say, save, build["transformer_weight_bytes"],
                       payload["story"])  # fmt: skip
    if "gguf" in args.parts:
        bf16 = weakref.ref(transformer)  # to check that the bf16 weights did leave
        del transformer  # (the pipeline's goes in run_gguf_part)
        payload["gguf"] = {}
        run_gguf_part(pipe, build["config"], args, deadline, say, save, payload["gguf"], bf16)
    path = save()
    say(f"wrote {path} and {path.with_suffix('.md')}")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
