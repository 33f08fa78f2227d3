#!/usr/bin/env python
"""Measure a whole story's peak memory through storydiff's story loop, CSA against stock.

Runs ``storycli.keyframes.loop.generate_keyframes`` — the loop ``storydiff generate`` runs: every
step, each character's references as one write forward, the other frames in micro-batches of
``frame_batch`` reading that step's bank, the bank dropped, one scheduler step for all latents,
then the VAE decode — on an SDXL pipeline built from the real SDXL UNet
(``sdxl_unet_config.json``) and SDXL VAE architectures with random weights, small random CLIP
text encoders with SDXL's output sizes (768; 1280 with a 1280 projection) and
``storycli.weights.tiny``'s
offline tokenizers. Nothing is downloaded.

Each measurement is one story run in a fresh process. Peak = the process's RSS high-water mark
(``VmHWM``, reset once the pipeline is built, so it covers the story: text encoding, the loop,
decoding) on CPU, ``torch.cuda.max_memory_allocated`` (reset likewise) on CUDA. "Stock" is the
same story with ``consistency.method: none``: plain SDXL attention, frames batched the same way,
through the same loop. Stories run at two or more step counts and two or more lengths, so the
report shows peak memory against steps and against frames.

Usage::

    python benchmarks/story_loop.py --device cpu       # 512², fp32: steps 2 4, frames 4 6, R 2
    python benchmarks/story_loop.py --device cuda      # 1024², fp16
    python benchmarks/story_loop.py --quick --out /tmp/bench   # tiny pipeline, 64 px, seconds

Results go to ``<out>/story-<device>-<date>.{json,md}`` (``story-<device>-quick-<date>``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SDXL_CONFIG = HERE / "sdxl_unet_config.json"
GIB, MIB = 2**30, 2**20

PEAK_TARGET = 1.05  # story peak ≤ 1.05 × stock
GROWTH_TOLERANCE = 1.01  # "no growth": the longest / most-step story's peak within 1 %
METHODS = ("none", "storydiffusion")  # stock, CSA
PROMPTS = (
    "walks through a snowy forest",
    "sleeps curled up under a tree",
    "jumps over a frozen stream",
    "watches the stars from a hill",
    "runs across a golden field",
    "sits by a river at sunset",
    "looks out of a cave in the rain",
    "plays with a butterfly in the grass",
)

# SDXL's VAE (stabilityai/sdxl-vae config) and text encoders' output sizes.
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
TEXT_LAYERS = 2  # SDXL uses the penultimate hidden state: two layers are the fewest


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else 0


class Memory:
    """Peak memory where the UNet runs: CUDA max allocated, or the process RSS high-water."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.metric = "cuda_max_memory_allocated" if self.cuda else "rss_vmhwm"
        self.resettable = True

    def now(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # VmHWM back to the current RSS (Linux ≥ 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024


def process_peak_rss() -> int:
    """The process's RSS high-water since it started (ru_maxrss; KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --------------------------------------------------------------------------------------------
# Pipeline and story
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def made_on(device: Any, dtype: Any, seed: int) -> Iterator[None]:
    """Parameters created on `device` in `dtype` (no float32 copy to inflate the peak, nothing
    on the host), from `seed`."""
    import torch

    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def settle(modules: Iterable[Any], device: Any, dtype: Any) -> None:
    """Modules made under `made_on` ready to run: eval, no grad, buffers (made as float32) in
    `dtype` too."""
    import torch

    for module in modules:
        module.eval().requires_grad_(False)
        torch.nn.Module.to(module, device=device, dtype=dtype)


def sync(device: Any) -> None:
    """Wait for the GPU's queued work (timings); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_of(story_text: str) -> Any:
    """The plan of a story given as YAML text, through storydiff's own loader and planner."""
    from storycli.keyframes.plan import build_plan
    from storycli.story.loader import load_story

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "story.yaml"
        path.write_text(story_text)
        return build_plan(load_story(path))


def write_results(
    payload: dict[str, Any], out: Path, stem: str, t0: float, markdown: Callable[[dict], str]
) -> Path:
    """`<out>/<stem>.json` and its `.md` (`markdown(payload)`), the wall time so far in the
    payload's meta. Atomically (storycli.atomic): the GPU check may kill a benchmark mid-write
    and then read its files."""
    from storycli.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    payload["meta"]["wall_seconds"] = time.perf_counter() - t0
    json_path = out / f"{stem}.json"
    for path, text in (
        (json_path, json.dumps(payload, indent=1, default=str) + "\n"),
        (json_path.with_suffix(".md"), markdown(payload)),
    ):
        atomic_write_text(path, text)
    return json_path


def build_sdxl_pipeline(dtype: Any, device: Any, seed: int) -> Any:
    """SDXL's UNet and VAE architectures with random weights, small random text encoders with
    SDXL's output sizes, storycli.weights.tiny's tokenizers; parameters created in `dtype` on
    `device` (no float32 copy to inflate the peak)."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from storycli.weights.tiny import build_tokenizer, sdxl_euler_scheduler

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")

    def text_config(tok: Any, hidden: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            projection_dim=hidden,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    unet_config = json.loads(SDXL_CONFIG.read_text())
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with made_on(device, dtype, seed):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(text_config(tokenizer, 768, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 1280, 20, "gelu"))
    settle((unet, vae, text_encoder, text_encoder_2), device, dtype)
    scheduler = sdxl_euler_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def story_yaml(spec: dict[str, Any]) -> str:
    """The measured story: one character (identity form), `id_length` references, the rest
    read frames; CSA settings `worst-case` (every step banks, every layer applies CSA) or the
    story defaults."""
    consistency = {"method": spec["method"], "id_length": spec["id_length"]}
    if spec["csa"] == "worst-case":
        consistency |= {"warmup_steps": 0, "prob_early": 1.0, "prob_late": 1.0}
    frames = [f"{PROMPTS[i % len(PROMPTS)]}, scene {i + 1}" for i in range(spec["frames"])]
    story = {
        "identity": "a small red fox with a white-tipped tail",
        "frames": frames,
        "steps": spec["steps"],
        "width": spec["size"],
        "height": spec["size"],
        "guidance": 5.0,
        "scheduler": "euler",
        "seed": spec["seed"],
        "consistency": consistency,
    }
    return json.dumps(story, indent=1)  # JSON is YAML


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the pipeline, run one story through generate_keyframes, report its peak."""
    import torch

    from storycli.keyframes.loop import generate_keyframes
    from storycli.keyframes.models import set_scheduler
    from storycli.keyframes.schedule import render_size
    from storycli.weights.devices import device_description, place_pipeline

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    if spec["model"] == "tiny":
        from storycli.weights.tiny import build_tiny_sdxl_pipeline

        pipe = build_tiny_sdxl_pipeline(dtype=dtype)
    else:
        pipe = build_sdxl_pipeline(dtype, device, spec["seed"])
    place_pipeline(pipe, str(device), "none")
    build_s = time.perf_counter() - t0

    plan = plan_of(story_yaml(spec))
    set_scheduler(pipe, plan.story.scheduler)
    size = render_size(plan, None)

    memory = Memory(device)
    baseline = memory.now()
    memory.reset()
    started = time.perf_counter()
    trace: list[dict[str, Any]] = []
    images: list[tuple[int, int]] = []

    def on_step(step: int, _steps: int) -> None:
        trace.append(
            {
                "step": step,
                "seconds": time.perf_counter() - started,
                "current_bytes": memory.now(),
                "peak_bytes": memory.peak(),
            }
        )

    loop = generate_keyframes(
        pipe,
        plan,
        range(len(plan.frames)),
        size,
        on_frame=lambda _i, image, _s: images.append(image.size),
        on_step=on_step,
        frame_batch=spec["frame_batch"],
    )
    seconds = time.perf_counter() - started
    peak = memory.peak()
    if len(images) != spec["frames"] or any(s != (size.width, size.height) for s in images):
        raise RuntimeError(f"expected {spec['frames']} frames of {size}, got {images}")
    return {
        **{k: spec[k] for k in ("method", "frames", "steps", "id_length")},
        "device_name": device_description(str(device)),
        "torch_threads": torch.get_num_threads(),
        "build_seconds": build_s,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "process_peak_rss_bytes": process_peak_rss(),
        "peak_metric": memory.metric,
        "peak_resettable": memory.resettable,
        "seconds": seconds,
        "seconds_per_image": seconds / spec["frames"],
        "calls": [(c.phase, list(c.frames)) for c in plan.calls],
        "story_loop": json.loads(json.dumps(loop or {}, default=str)),
        "steps_trace": trace,
        "loadavg": os.getloadavg(),
    }


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """One story in a fresh Python process, so its peak is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)]
        proc = subprocess.run([*cmd, str(result_path)], check=False)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"worker for {spec} failed")
        return json.loads(result_path.read_text())


def story_configs(frames: list[int], steps: list[int]) -> list[tuple[int, int]]:
    """(frames, steps) to run: every step count at the shortest story, every length at the
    fewest steps."""
    short, few = min(frames), min(steps)
    configs = [(short, s) for s in sorted(steps)]
    configs += [(f, few) for f in sorted(frames) if f != short]
    return configs


def denoise_peak(run: dict[str, Any]) -> int:
    """The peak up to the last denoising step: prompts and the story loop, before the decode."""
    return run["steps_trace"][-1]["peak_bytes"] if run["steps_trace"] else run["peak_bytes"]


def summarize(runs: list[dict[str, Any]]) -> dict:
    """CSA / stock per story, and each method's peak against steps and against frames (the whole
    story's peak, and the peak before the decode)."""
    frames = sorted({r["frames"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    by = {(r["method"], r["frames"], r["steps"]): r for r in runs}
    stories = []
    for f, s in story_configs(frames, steps):
        stock, csa = by.get(("none", f, s)), by.get(("storydiffusion", f, s))
        if not stock or not csa:
            continue
        stories.append(
            {
                "frames": f,
                "steps": s,
                "stock_peak_bytes": stock["peak_bytes"],
                "csa_peak_bytes": csa["peak_bytes"],
                "peak_ratio": csa["peak_bytes"] / stock["peak_bytes"],
                "stock_denoise_peak_bytes": denoise_peak(stock),
                "csa_denoise_peak_bytes": denoise_peak(csa),
                "denoise_peak_ratio": denoise_peak(csa) / denoise_peak(stock),
                "stock_over_baseline_bytes": stock["peak_over_baseline_bytes"],
                "csa_over_baseline_bytes": csa["peak_over_baseline_bytes"],
                "baseline_ratio": csa["baseline_bytes"] / stock["baseline_bytes"],
                "peak_bank_bytes": csa["story_loop"].get("peak_bank_bytes"),
                "stock_seconds_per_image": stock["seconds_per_image"],
                "csa_seconds_per_image": csa["seconds_per_image"],
                "time_ratio": csa["seconds_per_image"] / stock["seconds_per_image"],
            }
        )

    def growth(method: str, axis: str) -> dict[str, Any] | None:
        short, few = frames[0], steps[0]
        points = (
            [(s, by.get((method, short, s))) for s in steps]
            if axis == "steps"
            else [(f, by.get((method, f, few))) for f in frames]
        )
        found = [(x, r) for x, r in points if r]
        if len(found) < 2:
            return None
        return {
            "axis": axis,
            "at": {"frames": short} if axis == "steps" else {"steps": few},
            "points": [(x, r["peak_bytes"]) for x, r in found],
            "ratio": found[-1][1]["peak_bytes"] / found[0][1]["peak_bytes"],
            "denoise_points": [(x, denoise_peak(r)) for x, r in found],
            "denoise_ratio": denoise_peak(found[-1][1]) / denoise_peak(found[0][1]),
        }

    return {
        "stories": stories,
        "growth": {
            method: {axis: growth(method, axis) for axis in ("steps", "frames")}
            for method in METHODS
        },
    }


def default_args(args: argparse.Namespace) -> argparse.Namespace:
    cuda, quick = args.device == "cuda", args.quick
    defaults = {
        "size": 64 if quick else (1024 if cuda else 512),
        "steps": [1, 2] if quick else [2, 4],
        "frames": [3, 4] if quick else [4, 6],
        "dtype": "float16" if cuda and not quick else "float32",
        "isolate": "none" if quick else "process",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.frames) < args.id_length:
        raise SystemExit(f"--frames {args.frames} include stories shorter than --id-length")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, help="square image size (cpu 512, cuda 1024)")
    p.add_argument("--steps", type=int, nargs="+", help="step counts (at the shortest story)")
    p.add_argument("--frames", type=int, nargs="+", help="story lengths (at the fewest steps)")
    p.add_argument("--id-length", type=int, default=2, help="reference frames (R)")
    p.add_argument(
        "--frame-batch",
        type=int,
        help="read frames per forward (default: the story loop's, 2 on CPU and 4 on GPUs)",
    )
    p.add_argument(
        "--csa",
        choices=["worst-case", "defaults"],
        default="worst-case",
        help="worst-case (default): CSA at every step and layer, so every step banks; "
        "defaults: the story defaults (warm-up step, probabilities 0.7/0.9)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="cpu: float32 (what storydiff uses there; bfloat16 convolutions are ~250x slower "
        "on CPUs without AVX-512 BF16), cuda: float16",
    )
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="tiny pipeline at 64 px: a smoke test")
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="process (default): each story in a fresh process, so its peak is its own; none: "
        "all in this process (default for --quick; peaks then include earlier runs' heap)",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only recompute the summary and rewrite the .md of a results .json",
    )
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec_path, result_path = args._worker
        result = run_worker(json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps(result))
        return 0
    if args.report:
        payload = json.loads(args.report.read_text())
        payload["summary"] = summarize(payload["runs"])
        args.report.write_text(json.dumps(payload, indent=1) + "\n")
        args.report.with_suffix(".md").write_text(markdown(payload))
        return 0
    args = default_args(args)

    import diffusers
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    date = dt.date.today().isoformat()
    stem = f"story-{args.device}-quick-{date}" if args.quick else f"story-{args.device}-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    for n, (frames, steps) in enumerate(story_configs(args.frames, args.steps)):
        # Alternate which method runs first, so slow drift in the machine favours neither.
        for method in METHODS if n % 2 == 0 else METHODS[::-1]:
            spec = {
                "method": method,
                "frames": frames,
                "steps": steps,
                "id_length": args.id_length,
                "size": args.size,
                "frame_batch": args.frame_batch,
                "csa": args.csa,
                "device": args.device,
                "dtype": args.dtype,
                "model": "tiny" if args.quick else "sdxl",
                "threads": args.threads,
                "seed": args.seed,
            }
            label = "stock" if method == "none" else "CSA"
            print(f"== {label}: {frames} frames, {steps} steps", file=sys.stderr, flush=True)
            result = run_isolated(spec) if args.isolate == "process" else run_worker(spec)
            print(
                f"   peak {result['peak_bytes'] / GIB:.3f} GiB "
                f"(+{result['peak_over_baseline_bytes'] / MIB:.0f} MiB over the built "
                f"pipeline), {result['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            runs.append(result)

    payload = {
        "meta": {
            "device": args.device,
            "device_name": runs[0]["device_name"],
            "torch_threads": runs[0]["torch_threads"],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": date,
            "model": "tiny (storycli.weights.tiny, random weights)"
            if args.quick
            else "SDXL base UNet (benchmarks/sdxl_unet_config.json) and SDXL VAE architectures, "
            f"random weights; random CLIP text encoders ({TEXT_LAYERS} layers, hidden 768 and "
            "1280 + 1280 projection); storycli.weights.tiny tokenizers",
            "dtype": args.dtype,
            "size": args.size,
            "id_length": args.id_length,
            "frame_batch": runs[0]["story_loop"].get("frame_batch", args.frame_batch),
            "csa": args.csa,
            "scheduler": "euler",
            "guidance": 5.0,
            "isolation": args.isolate,
            "peak_metric": runs[0]["peak_metric"],
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "wall_seconds": time.perf_counter() - started,
        },
        "runs": runs,
        "summary": summarize(runs),
    }
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(payload))
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mark(value: float, limit: float) -> str:
    return f"{value:.3f} {'✅' if value <= limit else '❌'}"


def markdown(payload: dict[str, Any]) -> str:
    meta, summary = payload["meta"], payload["summary"]
    metric = (
        "CUDA max allocated (reset once the pipeline is built)"
        if meta["peak_metric"].startswith("cuda")
        else "process RSS high-water VmHWM (reset once the pipeline is built)"
    )
    lines = [
        f"# Story-loop memory benchmark — {meta['device']} — {meta['date']}",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, transformers "
        f"{meta['transformers']}, python {meta['python']}",
        f"- model: {meta['model']}, {meta['dtype']}",
        f"- story: one character, id_length {meta['id_length']}, {meta['size']}², guidance "
        f"{meta['guidance']}, {meta['scheduler']}, frame_batch {meta['frame_batch']}; CSA "
        f"settings: {meta['csa']}",
        f"- peak: {metric}; isolation: {meta['isolation']}; wall time {meta['wall_seconds']:.0f} s",
        f"- command: `{meta['command']}`",
        "",
        "Each row: the same story through `storycli.keyframes.loop.generate_keyframes`, stock "
        "(`consistency.method: none`) and CSA"
        + (
            ", each in its own process."
            if meta["isolation"] == "process"
            else ", all in one process (a smoke test: peaks include earlier runs' heap)."
        )
        + " *Story peak*: from the prompts to the last decoded frame. *Denoising peak*: up to "
        "the last denoising step (prompts and the story loop, before the VAE decode). *Over "
        "baseline*: story peak minus the memory of the built pipeline (the weights).",
        "",
        "| frames | steps | stock story peak GiB | CSA story peak GiB | × stock "
        "| stock denoising peak GiB | CSA denoising peak GiB | × stock "
        "| stock / CSA over baseline MiB | bank peak MiB | stock / CSA s per image |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary["stories"]:
        bank = s["peak_bank_bytes"]
        lines.append(
            f"| {s['frames']} | {s['steps']} | {s['stock_peak_bytes'] / GIB:.3f} "
            f"| {s['csa_peak_bytes'] / GIB:.3f} | {s['peak_ratio']:.3f} "
            f"| {s['stock_denoise_peak_bytes'] / GIB:.3f} "
            f"| {s['csa_denoise_peak_bytes'] / GIB:.3f} | {s['denoise_peak_ratio']:.3f} "
            f"| {s['stock_over_baseline_bytes'] / MIB:.0f} / "
            f"{s['csa_over_baseline_bytes'] / MIB:.0f} "
            f"| {'—' if bank is None else f'{bank / MIB:.1f}'} "
            f"| {s['stock_seconds_per_image']:.0f} / {s['csa_seconds_per_image']:.0f} |"
        )
    lines += [
        "",
        "Bank peak = `CSAState.peak_bank_bytes`, the largest bank the loop dropped (one step: "
        "every character's sampled keys and values). Seconds include text encoding and the "
        "VAE decode; stock and CSA ran one after the other, not interleaved, so their time "
        "ratio is indicative only (`benchmarks/csa.py` times forwards in alternating pairs).",
        "",
        "Peak against steps and frames (GiB; story peak, then denoising peak):",
        "",
        "| method | axis | story peak | last / first | denoising peak | last / first |",
        "|---|---|---|---:|---|---:|",
    ]
    for method, axes in summary["growth"].items():
        for axis, g in axes.items():
            if g is None:
                continue
            at = ", ".join(f"{k} {v}" for k, v in g["at"].items())
            name = "stock" if method == "none" else "CSA"

            def points(key: str, axis: str = axis, g: dict = g) -> str:
                return ", ".join(f"{x} {axis}: {p / GIB:.3f}" for x, p in g[key])

            lines.append(
                f"| {name} | {axis} ({at}) | {points('points')} | {g['ratio']:.4f} "
                f"| {points('denoise_points')} | {g['denoise_ratio']:.4f} |"
            )
    lines += ["", "## Targets", "", "| target | story | value |", "|---|---|---:|"]
    for s in summary["stories"]:
        where = f"{s['frames']} frames, {s['steps']} steps"
        lines.append(
            f"| story peak ≤ {PEAK_TARGET} × stock | {where} "
            f"| {_mark(s['peak_ratio'], PEAK_TARGET)} |"
        )
        lines.append(
            f"| denoising peak ≤ {PEAK_TARGET} × stock | {where} "
            f"| {_mark(s['denoise_peak_ratio'], PEAK_TARGET)} |"
        )
    csa = summary["growth"]["storydiffusion"]
    for axis in ("steps", "frames"):
        g = csa[axis]
        if g is None:
            lines.append(f"| no growth with {axis} | — | not measured (needs two) |")
            continue
        span = f"{g['points'][0][0]} → {g['points'][-1][0]} {axis}"
        within = f"within {GROWTH_TOLERANCE - 1:.0%}"
        lines.append(
            f"| no growth with {axis} (CSA story peak {within}) | {span} "
            f"| {_mark(g['ratio'], GROWTH_TOLERANCE)} |"
        )
        lines.append(
            f"| no growth with {axis} (CSA denoising peak {within}) | {span} "
            f"| {_mark(g['denoise_ratio'], GROWTH_TOLERANCE)} |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
