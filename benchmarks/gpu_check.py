#!/usr/bin/env python
"""The GPU check of issues 19 and 22: `storydiff generate` on the real SDXL layout, SDXL's CSA per
forward, the ConsiStory+ protocol and the FLUX.1 DiT, in minutes.

What it does, on a CUDA machine (≤ 6 minutes with the default ``--budget-s 330``; the whole of
it takes ≈ 11, so a session runs it as two ``--only`` calls, see benchmarks/README.md):

1. Builds SDXL base's real layout with random weights **on the GPU** in float16 — the UNet of
   ``sdxl_unet_config.json``, the VAE and both text encoders with SDXL base's configs (written
   out below), the CLIP tokenizers rebuilt from ``storycli/data/bpe_simple_vocab_16e6.txt.gz``
   — and saves it as a diffusers folder of ``*.fp16.safetensors`` (≈ 7 GB, ≈ 20 s; kept in
   ``--work`` and reused by a later call on the same machine). Beside it, the same VAE with
   ``force_upcast: false``, standing for madebyollin/sdxl-vae-fp16-fix.
2. Runs the real CLI (``storydiff generate --model <that folder> --overwrite``, one process per
   run, each with its own ``--out``), most important first, stock (``consistency.method: none``)
   and CSA (``storydiffusion``) interleaved so that drift hits both alike (the groups
   ``--only`` picks from, in order): ``eager``: ``stories/two_friends.yaml`` (2 characters,
   9 frames, 1024×768, 30 steps) and ``stories/lighthouse.yaml`` (1 character, 6 frames, 1024²,
   30 steps); ``rerun``: the CSA two_friends again with nothing to do (wall clock);
   ``fp16-vae``: both two_friends sides with the fp16-safe VAE (a story's top-level ``vae:``
   key; skipped with a note if ``storydiff validate`` rejects it); last, ``compile``:
   lighthouse with ``--compile`` (the slowest; it brings lighthouse's eager pair along, its
   baseline). Other options keep their defaults (``--frame-batch``, ``--decode-batch`` …); the
   options ``generate --help`` lists are recorded.
3. Reads each run's ``manifest.json``: seconds, GPU peak (``torch.cuda.max_memory_allocated``),
   UNet forwards per step, frame batch, per-frame ``seconds`` — the story loop's time before the
   decode (text encoding + denoising) divided by its frames, so their sum is the denoising time —
   the steady step (the median of the later half of ``story_loop.step_seconds``), and measures
   each process's wall time. Compile seconds ≈ compiled wall − eager wall.
4. Runs the other benchmark scripts of ``benchmarks/gpu_scripts.py``, each in its own process:
   before the fp16-safe VAE pair, ``dit`` — issue 22's FLUX.1 DiT benchmark
   (``benchmarks/csa_dit.py``: per-forward CSA / stock and whole-story peaks on a random-weight
   FLUX.1-dev transformer, 11.9 B, bf16, built on the GPU, at 1024², then the same stories with
   a random Q8_0 GGUF transformer loaded by storycli's loader); its own
   ``csa-dit-cuda-<date>.json`` / ``.md`` go to ``--out``; before the compile pair, ``forward``
   (``benchmarks/csa.py``: SDXL per forward at 1024², R = 4) and ``consistory``
   (``storydiff bench consistory-plus --limit 1``, stock and CSA). Their targets join the
   check's (``--no-dit`` leaves the DiT out).
5. Writes one pair ``<out>/gpu-check-<date>[-<groups>].json`` and ``.md`` (rewritten after every
   run, so a killed check still leaves the runs done) with the ratios CSA / stock and a table
   against the issues' targets.

It stops starting runs when ``--budget-s`` seconds have passed since it started and kills a run
that would pass it; a failed run is recorded with its stderr tail and the others go on.

``--tiny``: the same on the CPU with the ``tiny`` preset (64 px, 2 steps), only the two_friends
pair, the rerun and the scripts' tiny modes (the other runs are listed as skipped), ≈ 35–60 s on
2 cores: what ``tests/benchmarks/test_gpu_check.py`` runs.

Usage::

    bash benchmarks/gpu_check.sh                    # on the GPU machine (installs missing wheels)
    bash benchmarks/gpu_check.sh --only forward consistory compile     # a second call
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu-check    # here, on the CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_scripts, when loaded by path (the tests)
from gpu_scripts import (  # noqa: E402
    GIB,
    ROOT,
    SCRIPTS,
    TINY_CAP,
    consistory_targets,
    dit_targets,
    forward_targets,
    log,
    run_consistory,
    run_dit,
    run_forward,
    storydiff,
    tail,
    target,
)

UNET_CONFIG = HERE / "sdxl_unet_config.json"
STORY_FILES = {
    "two_friends": ROOT / "stories/two_friends.yaml",
    "lighthouse": ROOT / "stories/lighthouse.yaml",
}
SIDES = {"stock": "none", "csa": "storydiffusion"}

# The targets.
PEAK_DEFAULT_GIB = 12.0  # story peak, default VAE
PEAK_FP16_VAE_GIB = 9.0  # story peak, fp16-safe VAE
EXTRA_FORWARDS = 1  # two_friends: CSA forwards per step ≤ stock + 1
DENOISE_RATIO = 1.20  # two_friends: denoising time CSA / stock
RERUN_S = 3.0  # a rerun with nothing to do, wall clock
STEADY_SPEEDUP = 1.2  # --compile: steady step ≥ 1.2× faster than eager

# What `--only` can pick, in the order the check runs them; a script runs just before the
# run named here (or at the end, when that run is the last or was not planned).
GROUPS = ("eager", "rerun", "dit", "fp16-vae", "forward", "consistory", "compile")
SCRIPTS_BEFORE = {
    "dit": "two_friends/stock/fp16-vae",
    "forward": "lighthouse/stock/compile",
    "consistory": "lighthouse/stock/compile",
}

# Seconds a run may take at most (GPU, tiny), and the least left of the budget to start one.
CAPS = {"eager": 150, "rerun": 60, "fp16-vae": 150, "compile": 300}
MIN_START_S = {"rerun": 10}  # others: 30 s (tiny: 5 s)
TINY_STEPS = 2
TINY_RUNS = {"two_friends/stock/eager", "two_friends/csa/eager", "two_friends/csa/rerun"}

# SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0: vae/, text_encoder/,
# text_encoder_2/, scheduler/ config.json), as written there.
SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_TEXT_ENCODER = {  # CLIP ViT-L/14's text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14's text tower, with its projection
    **SDXL_TEXT_ENCODER,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


# --------------------------------------------------------------------------------------------
# The model folders
# --------------------------------------------------------------------------------------------


def clip_tokenizer(pad_token: str) -> Any:
    """CLIP's tokenizer (49,408 tokens) from the vocabulary file storydiff ships."""
    from transformers import CLIPTokenizer

    from storycli.story.tokens import BOS, EOS, clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )


def build_sdxl_folder(folder: Path, device: str, seed: int = 0) -> dict[str, Any]:
    """SDXL base's layout with random float16 weights, made on `device`, saved to `folder` as
    `*.fp16.safetensors`. A folder finished earlier (its `.built` file) is reused."""
    marker = folder / ".built"
    if marker.is_file():
        return json.loads(marker.read_text()) | {"reused": True}
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    started = time.perf_counter()
    unet_config = {k: v for k, v in json.loads(UNET_CONFIG.read_text()).items() if k[0] != "_"}
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # no float32 copy on the way
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**SDXL_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
    finally:
        torch.set_default_dtype(previous)
    models = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }
    for module in models.values():
        torch.nn.Module.to(module, dtype=torch.float16)  # buffers made as float32, if any
        module.eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        tokenizer_2=clip_tokenizer("!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished earlier build
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    info = {
        "folder": str(folder),
        "device": device,
        "build_s": round(time.perf_counter() - started, 1),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "bytes": sum(f.stat().st_size for f in folder.rglob("*.safetensors")),
    }
    del pipe, models, unet, vae, text_encoder, text_encoder_2
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info | {"reused": False}


def fp16_safe_vae(model: Path | None, folder: Path) -> Path:
    """A VAE folder like `model`'s VAE but with `force_upcast: false` (what
    madebyollin/sdxl-vae-fp16-fix is for SDXL); for the tiny preset (`model` None), its VAE."""
    if folder.exists():
        shutil.rmtree(folder)
    if model is not None:
        shutil.copytree(model / "vae", folder)
    else:
        from storycli.weights.tiny import build_tiny_sdxl_pipeline

        build_tiny_sdxl_pipeline().vae.save_pretrained(folder, variant="fp16")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"force_upcast": False}, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# Stories and runs
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One `storydiff generate` process."""

    id: str  # story/side/variant
    story: str  # two_friends | lighthouse
    side: str  # stock | csa
    variant: str  # eager | rerun | fp16-vae | compile
    flags: list[str] = field(default_factory=list)
    status: str = "not run"  # ok | failed | timed out | skipped | not run
    note: str = ""
    args: list[str] = field(default_factory=list)
    started_at_s: float | None = None  # since the check started
    wall_s: float | None = None
    timeout_s: float | None = None
    exit_code: int | None = None
    stderr_tail: str = ""
    cli: dict[str, Any] = field(default_factory=dict)  # its --json record (status, errors)
    manifest: dict[str, Any] = field(default_factory=dict)  # what the manifest says


def plan_runs(flags: set[str] | None, tiny: bool, groups: tuple[str, ...] = GROUPS) -> list[Run]:
    """Every run, most important first; stock and CSA interleaved. Runs of variants not in
    `groups` are listed as skipped, except lighthouse's eager pair when `compile` is picked
    (its comparison). `tiny`: a pair and the rerun run (every path but the VAE variant's `vae:`
    line, which `validate` still checks), the others are listed as skipped."""

    def pair(story: str, variant: str, extra: list[str] | None = None) -> list[Run]:
        return [
            Run(f"{story}/{side}/{variant}", story, side, variant, list(extra or []))
            for side in SIDES
        ]

    runs = [*pair("two_friends", "eager"), *pair("lighthouse", "eager")]
    runs.append(Run("two_friends/csa/rerun", "two_friends", "csa", "rerun"))
    runs += pair("two_friends", "fp16-vae")
    # Issue 19's compile target is a 6-frame 1024² story: lighthouse's.
    runs += pair("lighthouse", "compile", ["--compile"])
    for run in runs:
        baseline = run.id.startswith("lighthouse/") and run.variant == "eager"
        if run.variant not in groups and not (baseline and "compile" in groups):
            run.status, run.note = "skipped", "not picked (--only)"
        elif tiny and run.id not in TINY_RUNS:
            run.status, run.note = "skipped", "tiny mode"
            if run.variant == "compile":
                run.note += ": inductor on a CPU compiles for minutes"
        elif run.variant == "compile" and flags is not None and "--compile" not in flags:
            run.status, run.note = "skipped", "`storydiff generate` has no --compile flag"
    return runs


def write_story(run: Run, folder: Path, tiny: bool, vae: Path | None) -> Path:
    """The run's story file: the story with its consistency method (and `vae:`) set."""
    import yaml

    story = yaml.safe_load(STORY_FILES[run.story].read_text())
    story["consistency"] = {**story.get("consistency", {}), "method": SIDES[run.side]}
    if tiny:
        story["steps"] = TINY_STEPS
    if vae is not None:
        story["vae"] = str(vae)
    suffix = "-fp16vae" if vae is not None else ""
    path = folder / f"{run.story}-{run.side}{suffix}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(story, sort_keys=False, allow_unicode=True))
    return path


def generate_flags(logs: Path) -> set[str] | None:
    """The options `storydiff generate --help` lists now (other engineers add some); None when
    the help itself fails (the runs will say why)."""
    code, _, out, err = storydiff(["generate", "--help"], 60, logs / "generate-help")
    # The options' rows (rich's table, or click's plain list), not the examples' commands.
    rows = re.findall(r"^[│ ]+(--[a-z][a-z0-9-]+)", out + err, re.M)
    return set(rows) - {"--help"} if code == 0 else None


def vae_key_accepted(story: Path) -> tuple[bool, str]:
    """Does `storydiff validate` accept a story with a top-level `vae:` key?"""
    code, _, out, err = storydiff(["validate", str(story)], 60, story.with_suffix(".validate"))
    return code == 0, tail(err + out, 400)


def manifest_metrics(folder: Path) -> dict[str, Any]:
    """What a run's manifest.json says: totals, peak, the story loop's numbers, and the
    denoising time (per-frame `seconds` = the loop's time before the decode / its frames)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    frames = manifest.get("frames") or []
    made = [f for f in frames if f.get("generated_this_run")]
    per_frame = [f["seconds"] for f in made if isinstance(f.get("seconds"), int | float)]
    loop = manifest.get("story_loop") or {}
    seconds, peak = manifest.get("seconds"), manifest.get("peak_memory_bytes")
    steps = loop.get("step_seconds") or []
    denoise = sum(per_frame) if made and len(per_frame) == len(made) else None
    return {
        "complete": manifest.get("complete"),
        "seconds": seconds,
        "frames": len(frames),
        "generated": len(made),
        "seconds_per_image": round(seconds / len(made), 3) if made and seconds else None,
        "denoise_s": round(denoise, 3) if denoise is not None else None,
        "denoise_s_per_image": round(denoise / len(made), 3) if denoise is not None else None,
        "peak_memory_bytes": peak,
        "peak_gib": round(peak / GIB, 3) if isinstance(peak, int) else None,
        "peak_memory_kind": manifest.get("peak_memory_kind"),
        "compiled": manifest.get("compiled"),
        "unet_forwards_per_step": loop.get("unet_forwards_per_step"),
        "frame_batch": loop.get("frame_batch"),
        "peak_bank_bytes": loop.get("peak_bank_bytes"),
        # Once compiling and warm-up are over: the median of the later half of the steps.
        "steady_step_s": round(statistics.median(steps[len(steps) // 2 :]), 4) if steps else None,
        "size": manifest.get("size"),
        "steps": (manifest.get("story") or {}).get("steps"),
        "model": manifest.get("model"),
        "versions": manifest.get("versions"),
    }


def execute(
    run: Run, story: Path, out: Path, common: list[str], timeout: float, logs: Path
) -> None:
    """Run one `generate` and record what it did in `run`."""
    args = ["generate", str(story), "--out", str(out), "--json", *common, *run.flags]
    if run.variant != "rerun":
        args.append("--overwrite")
    run.args, run.timeout_s = args, round(timeout, 1)
    started = time.time()
    code, wall, stdout, stderr = storydiff(args, timeout, logs / run.id.replace("/", "_"))
    run.wall_s, run.exit_code = round(wall, 3), code
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    run.cli = (
        {k: records[-1].get(k) for k in ("status", "exit_code", "errors") if k in records[-1]}
        if records
        else {}
    )
    if code is None:
        run.status, run.note = "timed out", f"killed after {timeout:.0f} s"
    elif code != 0:
        run.status = "failed"
    else:
        run.status = "ok"
    if code != 0:
        run.stderr_tail = tail(stderr)
    manifest = out / yaml_name(story) / "manifest.json"
    try:
        if manifest.stat().st_mtime < started - 1:  # the rerun's folder: an earlier run's
            raise ValueError("not written by this run")
        run.manifest = manifest_metrics(manifest.parent)
    except (OSError, ValueError) as exc:
        if run.status == "ok":
            run.status, run.note = "failed", f"no readable manifest: {exc}"


def yaml_name(story: Path) -> str:
    import yaml

    return yaml.safe_load(story.read_text())["name"]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def ratio(a: Any, b: Any) -> float | None:
    return (
        round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    )


def comparisons(runs: list[Run]) -> dict[str, Any]:
    """CSA / stock per story and variant; compiled against eager per story and side."""
    ok = {r.id: r for r in runs if r.status == "ok"}
    pairs: dict[str, Any] = {}
    for run in runs:
        stock, csa = (
            ok.get(f"{run.story}/stock/{run.variant}"),
            ok.get(f"{run.story}/csa/{run.variant}"),
        )
        key = f"{run.story}/{run.variant}"
        if run.side != "csa" or stock is None or csa is None or key in pairs:
            continue
        s, c = stock.manifest, csa.manifest
        pairs[key] = {
            "wall": ratio(csa.wall_s, stock.wall_s),
            "seconds": ratio(c.get("seconds"), s.get("seconds")),
            "denoise": ratio(c.get("denoise_s"), s.get("denoise_s")),
            "denoise_per_image": ratio(c.get("denoise_s_per_image"), s.get("denoise_s_per_image")),
            "peak": ratio(c.get("peak_memory_bytes"), s.get("peak_memory_bytes")),
            "forwards_per_step": [s.get("unet_forwards_per_step"), c.get("unet_forwards_per_step")],
        }
    compiled: dict[str, Any] = {}
    for run in runs:
        eager = ok.get(f"{run.story}/{run.side}/eager")
        if run.variant != "compile" or eager is None or run.status in ("skipped", "not run"):
            continue
        done = run.status == "ok"
        compiled[f"{run.story}/{run.side}"] = {
            "eager_wall_s": eager.wall_s,
            "compiled_wall_s": run.wall_s if done else None,
            "compile_s": round(run.wall_s - eager.wall_s, 1) if done and run.wall_s else None,
            "faster": (run.wall_s < eager.wall_s) if done and run.wall_s else None,
            "denoise_s": [eager.manifest.get("denoise_s"), run.manifest.get("denoise_s")],
            "steady_step_s": [
                eager.manifest.get("steady_step_s"),
                run.manifest.get("steady_step_s"),
            ],
            "steady_speedup": ratio(
                eager.manifest.get("steady_step_s"), run.manifest.get("steady_step_s")
            ),
            "status": run.status,
            "timeout_s": run.timeout_s,
        }
    return {"csa_over_stock": pairs, "compile": compiled}


def peak_targets(runs: list[Run]) -> list[dict[str, Any]]:
    """The largest story peak of the default-VAE runs and of the fp16-safe-VAE runs."""
    rows = []
    for variant, limit, label in (
        ("eager", PEAK_DEFAULT_GIB, "story peak, default VAE (largest of the eager runs)"),
        ("fp16-vae", PEAK_FP16_VAE_GIB, "story peak, fp16-safe VAE (largest of its runs)"),
    ):
        done = [r for r in runs if r.variant == variant and r.manifest.get("peak_gib")]
        done = [r for r in done if r.status == "ok"]
        if not done:
            rows.append(target(label, f"≤ {limit:g} GiB", None, None, "no run finished"))
            continue
        top = max(r.manifest["peak_gib"] for r in done)
        gpu = all(str(r.manifest.get("peak_memory_kind", "")).startswith("cuda") for r in done)
        detail = ", ".join(f"{r.id} {r.manifest['peak_gib']:.2f}" for r in done)
        if not gpu:  # never a GPU verdict from a CPU number
            detail = "CPU RSS, not a GPU peak: " + detail
        rows.append(target(label, f"≤ {limit:g} GiB", top, top <= limit if gpu else None, detail))
    return rows


def pair_targets(pair: dict[str, Any] | None) -> list[dict[str, Any]]:
    """two_friends eager: forwards per step and denoising time, CSA against stock."""
    label = "UNet forwards per step, two_friends: CSA ≤ stock + 1"
    if pair and None not in pair["forwards_per_step"]:
        stock, csa = pair["forwards_per_step"]
        limit = stock + EXTRA_FORWARDS
        forwards = target(label, f"≤ {limit}", csa, csa <= limit, f"stock {stock}, CSA {csa}")
    else:
        forwards = target(label, "", None, None, "no pair")
    value = pair["denoise"] if pair else None
    denoise = target(
        "denoising time, two_friends: CSA / stock",
        f"≤ {DENOISE_RATIO:.2f}",
        value,
        value <= DENOISE_RATIO if value is not None else None,
        "" if value is not None else "no pair with per-frame seconds",
    )
    return [forwards, denoise]


def compile_targets(compiled: dict[str, Any]) -> list[dict[str, Any]]:
    """--compile's wall time, compiling included, and its steady step against eager's, per
    story and side."""
    label = "--compile wall (compiling included) < eager wall"
    if not compiled:
        return [target(label, "< eager", None, None, "not run")]
    rows = []
    for key, c in compiled.items():
        eager = c["eager_wall_s"]
        if c["status"] == "ok":
            detail = f"compiled {c['compiled_wall_s']:.1f} s, eager {eager:.1f} s"
            rows.append(
                target(f"{label}, {key}", "< eager", c["compiled_wall_s"], c["faster"], detail)
            )
        elif c["status"] == "timed out" and (c["timeout_s"] or 0) >= eager:  # slower for sure
            detail = f"no result within {c['timeout_s']:.0f} s; eager {eager:.1f} s"
            rows.append(target(f"{label}, {key}", "< eager", None, False, detail))
        else:
            rows.append(target(f"{label}, {key}", "< eager", None, None, c["status"]))
        speedup, steady = c["steady_speedup"], c["steady_step_s"]
        detail = (
            f"steady step eager {steady[0]} s, compiled {steady[1]} s"
            if speedup is not None
            else c["status"]
        )
        met = speedup >= STEADY_SPEEDUP if speedup is not None else None
        rows.append(
            target(
                f"--compile steady step, eager / compiled, {key}",
                f"≥ {STEADY_SPEEDUP}",
                speedup,
                met,
                detail,
            )
        )
    return rows


def rerun_target(runs: list[Run]) -> dict[str, Any]:
    label, limit = "rerun with nothing to do, wall", f"< {RERUN_S:g} s"
    rerun = next((r for r in runs if r.variant == "rerun"), None)
    if rerun is None or rerun.status != "ok" or rerun.wall_s is None:
        return target(label, limit, None, None, rerun.status if rerun else "not planned")
    detail = f"{rerun.manifest.get('generated', '?')} frame(s) generated"
    return target(label, limit, rerun.wall_s, rerun.wall_s < RERUN_S, detail)


def targets(runs: list[Run], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets; `met` None where this check could not tell (not run, not a GPU)."""
    return [
        *peak_targets(runs),
        *pair_targets(summary["csa_over_stock"].get("two_friends/eager")),
        *compile_targets(summary["compile"]),
        rerun_target(runs),
    ]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def built(model: dict[str, Any]) -> str:
    if "build_s" not in model:
        return ""
    gb = model.get("bytes", 0) / 1e9
    return f", {gb:.1f} GB, {'reused' if model.get('reused') else 'built'} ({model['build_s']} s)"


def script_lines(label: str, record: dict[str, Any]) -> list[str]:
    """Markdown: how a script of gpu_scripts.py ran (its numbers are in the targets)."""
    lines = [
        "",
        f"## {label}",
        "",
        f"Status {record['status']}{': ' + record['note'] if record.get('note') else ''}; wall "
        f"{fmt(record.get('wall_s'), 1)} s of {fmt(record.get('timeout_s'), 0)} s; results: "
        f"`{record.get('results_file', '—')}`.",
    ]
    if record.get("stderr_tail"):
        lines += ["", "```", record["stderr_tail"][-1500:], "```"]
    return lines


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    model, vae_key = meta.get("model") or {}, meta.get("vae_key") or {}
    lines = [
        f"# GPU check, {meta['date']}{' (tiny model, CPU)' if meta['tiny'] else ''}",
        "",
        f"{meta['device_name']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"transformers {meta['transformers']}, Python {meta['python']}; {meta['dtype']}; "
        f"`{meta['command']}`; budget {meta['budget_s']} s, wall {fmt(meta.get('wall_s'), 1)} s.",
        "",
        f"Model: {model.get('what', '')}{built(model)}."
        + (f" **Error:** `{model['error']}`" if model.get("error") else ""),
        "",
        "`vae:` key: "
        + (
            "not checked."
            if not vae_key
            else "accepted by `storydiff validate`."
            if vae_key["accepted"]
            else f"rejected by `storydiff validate`: {vae_key['validate']}"
        ),
        "",
        f"`generate` flags at run time: {', '.join(meta.get('generate_flags') or ['—'])}.",
        "",
        "## Targets",
        "",
        *(
            ["Tiny model on a CPU: these verdicts test the script, not the issue's targets.", ""]
            if meta["tiny"]
            else []
        ),
        "| target | limit | measured | met | detail |",
        "|---|---|---:|:---:|---|",
    ]
    for t in results["targets"]:
        met = {True: "✅", False: "❌", None: "—"}[t["met"]]
        lines.append(
            f"| {t['target']} | {t['limit']} | {fmt(t['measured'], 3)} | {met} | {t['detail']} |"
        )
    lines += [
        "",
        "## Runs (in the order they ran)",
        "",
        "| run | status | wall s | manifest s | s / image | denoising s | denoising s / image "
        "| forwards / step | frame batch | peak GiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        m = r["manifest"]
        note = r["note"] or (r["cli"].get("errors") and str(r["cli"]["errors"])[:120]) or ""
        lines.append(
            f"| {r['id']} | {r['status']} | {fmt(r['wall_s'], 1)} | {fmt(m.get('seconds'), 1)} "
            f"| {fmt(m.get('seconds_per_image'))} | {fmt(m.get('denoise_s'), 1)} "
            f"| {fmt(m.get('denoise_s_per_image'))} | {fmt(m.get('unet_forwards_per_step'))} "
            f"| {fmt(m.get('frame_batch'))} | {fmt(m.get('peak_gib'))} | {note} |"
        )
    lines += [
        "",
        "## CSA / stock",
        "",
        "| story / variant | wall | manifest s | denoising | peak | forwards / step stock, CSA |",
        "|---|---:|---:|---:|---:|---|",
    ]
    if not results["csa_over_stock"]:
        lines.append("| no pair finished | | | | | |")
    for key, p in results["csa_over_stock"].items():
        lines.append(
            f"| {key} | {fmt(p['wall'], 3)} | {fmt(p['seconds'], 3)} | {fmt(p['denoise'], 3)} "
            f"| {fmt(p['peak'], 3)} | {p['forwards_per_step'][0]}, {p['forwards_per_step'][1]} |"
        )
    if results["compile"]:
        lines += [
            "",
            "## --compile against eager",
            "",
            "| story / side | eager wall s | compiled wall s | compile s ≈ | faster "
            "| steady step eager, compiled s | eager / compiled | status |",
            "|---|---:|---:|---:|:---:|---:|---:|---|",
        ]
        for key, c in results["compile"].items():
            faster = {True: "✅", False: "❌", None: "—"}[c["faster"]]
            steady = ", ".join(fmt(x, 4) for x in c["steady_step_s"])
            lines.append(
                f"| {key} | {fmt(c['eager_wall_s'], 1)} | {fmt(c['compiled_wall_s'], 1)} "
                f"| {fmt(c['compile_s'], 1)} | {faster} | {steady} "
                f"| {fmt(c['steady_speedup'], 3)} | {c['status']} |"
            )
    for name, script in SCRIPTS.items():
        record = results.get(name)
        if record:
            lines += script_lines(script.label, record)
    failed = [r for r in results["runs"] if r["stderr_tail"]]
    if failed:
        lines += ["", "## Errors (stderr tails)", ""]
        for r in failed:
            lines += [
                f"**{r['id']}** ({r['status']}):",
                "",
                "```",
                r["stderr_tail"][-1500:],
                "```",
                "",
            ]
    lines += [
        "",
        "Wall = the `storydiff` process, start to exit (imports and model load included); "
        "manifest s = `generate_story`'s own time; denoising = the sum of the frames' `seconds` "
        "(the story loop before the decode: text encoding and every step); peak = "
        "`torch.cuda.max_memory_allocated` of the story (CPU: the process's peak RSS).",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    from storycli.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    for path, text in (
        (json_path, json.dumps(results, indent=2) + "\n"),
        (md_path, markdown(results)),
    ):
        atomic_write_text(path, text)
    return json_path, md_path


def meta(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    try:
        from storycli.weights.devices import device_description

        name = device_description(device)
    except Exception:  # storycli.weights is someone else's: the check goes on without it
        name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    return {
        "date": dt.date.today().isoformat(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "device": device,
        "device_name": name,
        "dtype": "float32" if args.tiny else "float16",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "budget_s": args.budget_s,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU (tests)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no run after this")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="model folders and run outputs (default: outputs/gpu-check, kept for a warm rerun; "
        "--tiny: a temp folder, removed)",
    )
    parser.add_argument("--device", default=None, help="default: cuda (--tiny: cpu)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        metavar="GROUP",
        help=f"run only these ({', '.join(GROUPS)}; compile brings lighthouse's eager pair); "
        "the results file's name then ends in them",
    )
    parser.add_argument(
        "--no-dit", action="store_true", help="skip the FLUX.1 DiT benchmark (csa_dit.py)"
    )
    args = parser.parse_args(argv)
    picked = set(args.only or GROUPS) - ({"dit"} if args.no_dit else set())
    args.groups = tuple(g for g in GROUPS if g in picked)
    return args


def prepare_model(args: argparse.Namespace, device: str, work: Path, t0: float) -> dict[str, Any]:
    """The model the runs use: the tiny preset, or SDXL's layout built (or reused) in `work`."""
    if args.tiny:
        what = (
            "the tiny preset (`--model tiny`, 64 px, random weights): this tests the script; "
            "its times and memory say nothing about SDXL on a GPU"
        )
        return {"what": what, "arg": "tiny"}
    log(t0, f"SDXL's layout with random weights on {device} …")
    folder = work / "sdxl-random"
    info = build_sdxl_folder(folder, device)
    log(t0, f"model {'reused' if info['reused'] else 'built'}: {folder}")
    what = "SDXL base's layout with random float16 weights (pictures are noise)"
    return info | {"what": what, "arg": str(folder)}


def run_all(
    runs: list[Run],
    args: argparse.Namespace,
    work: Path,
    common: list[str],
    vae: Path,
    deadline: float,
    t0: float,
    save: Any,
    before: dict[str, Any] | None = None,
) -> None:
    """Each run in order while the budget lasts; `save()` after each. `before[run id]()` runs
    first when the loop reaches that run (whatever its status), or at the end."""
    stories, outs, before = work / "stories", {}, dict(before or {})
    for run in runs:
        if run.id in before:
            before.pop(run.id)()
        if run.status != "not run":
            continue
        left = deadline - time.perf_counter()
        if left < (5 if args.tiny else MIN_START_S.get(run.variant, 30)):
            run.note = f"budget spent ({args.budget_s:g} s)"
            continue
        if run.variant == "rerun":  # the CSA two_friends folder again, nothing to do
            first = next(r for r in runs if r.id == "two_friends/csa/eager")
            if first.status != "ok":
                run.status, run.note = "skipped", "two_friends/csa/eager did not finish"
                continue
            story, out = Path(first.args[1]), outs[first.id]
        else:
            fp16_vae = vae if run.variant == "fp16-vae" else None
            story = write_story(run, stories, args.tiny, fp16_vae)
            out = work / "runs" / run.id.replace("/", "_")
        outs[run.id] = out
        timeout = min(TINY_CAP if args.tiny else CAPS[run.variant], left)
        run.started_at_s = round(time.perf_counter() - t0, 1)
        log(t0, f"{run.id} (timeout {timeout:.0f} s) …")
        execute(run, story, out, common, timeout, work / "logs")
        m = run.manifest
        log(
            t0,
            f"{run.id}: {run.status}, wall {fmt(run.wall_s, 1)} s, denoising "
            f"{fmt(m.get('denoise_s'), 1)} s, "
            f"{fmt(m.get('unet_forwards_per_step'))} forwards/step, "
            f"peak {fmt(m.get('peak_gib'))} GiB {run.note}",
        )
        save()
    for step in before.values():
        step()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:  # tiny models gain nothing from threads; on a busy CPU they spin (conftest)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible to torch; use --tiny on a CPU", file=sys.stderr)
            return 2
    temporary = args.work is None and args.tiny
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if temporary else args.work
    work = work or ROOT / "outputs/gpu-check"
    shutil.rmtree(work / "runs", ignore_errors=True)
    results: dict[str, Any] = {"meta": meta(args, device), "runs": [], "targets": []}
    stem = f"gpu-check-{'tiny-' if args.tiny else ''}{results['meta']['date']}"
    stem += "".join(f"-{g}" for g in args.groups) if args.only else ""
    runs: list[Run] = []

    def save() -> tuple[Path, Path]:
        results["runs"] = [asdict(r) for r in runs]
        return write_results(finish(results, runs, t0), args.out, stem)

    try:
        try:
            model = prepare_model(args, device, work, t0)
        except Exception as exc:  # recorded: the results file says why nothing ran
            results["meta"]["model"] = {"what": "SDXL's layout, not built", "error": repr(exc)}
            json_path, md_path = save()
            log(t0, f"building the model failed: {exc!r}; wrote {json_path}")
            return 1
        results["meta"]["model"] = model
        vae = fp16_safe_vae(None if args.tiny else Path(model["arg"]), work / "vae-fp16-safe")
        flags = generate_flags(work / "logs")
        results["meta"]["generate_flags"] = sorted(flags) if flags is not None else None
        common = ["--model", model["arg"], "--device", device]
        common += ["--dtype", "float32" if args.tiny else "float16"]

        runs = plan_runs(flags, args.tiny, args.groups)
        accepted, why = vae_key_accepted(write_story(runs[0], work / "stories", args.tiny, vae))
        results["meta"]["vae_key"] = {"accepted": accepted, "validate": why}
        for run in runs:
            if run.variant == "fp16-vae" and not accepted:
                run.status = "skipped"
                run.note = "`storydiff validate` rejects a top-level `vae:` key"

        hooks = script_hooks(args, device, model["arg"], work, deadline, t0, results, save)
        run_all(runs, args, work, common, vae, deadline, t0, save, hooks)
        json_path, md_path = save()
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    log(t0, f"wrote {json_path} and {md_path}")
    print(md_path.read_text())
    return 0


def script_hooks(
    args: argparse.Namespace,
    device: str,
    model: str,
    work: Path,
    deadline: float,
    t0: float,
    results: dict[str, Any],
    save: Any,
) -> dict[str, Any]:
    """For `run_all`: the picked scripts (gpu_scripts.py), each run with its results saved just
    before the run `SCRIPTS_BEFORE` names."""
    runners = {
        "dit": lambda: run_dit(args, device, work, deadline, t0),
        "forward": lambda: run_forward(args, work, deadline, t0),
        "consistory": lambda: run_consistory(args, device, model, work, deadline, t0),
    }

    def step(names: list[str]) -> Any:
        def run() -> None:
            for name in names:
                results[name] = runners[name]()
                save()

        return run

    hooks: dict[str, list[str]] = {}
    for name in SCRIPTS:
        if name in args.groups:
            hooks.setdefault(SCRIPTS_BEFORE[name], []).append(name)
    return {run_id: step(names) for run_id, names in hooks.items()}


def finish(results: dict[str, Any], runs: list[Run], t0: float) -> dict[str, Any]:
    """The summary of the runs so far, into `results`."""
    summary = comparisons(runs)
    results.update(summary)
    meta = results["meta"]
    results["targets"] = [
        *targets(runs, summary),
        *forward_targets(results.get("forward"), meta),
        *consistory_targets(results.get("consistory"), meta),
        *dit_targets(results.get("dit"), meta),
    ]
    results["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    return results


if __name__ == "__main__":
    sys.exit(main())
