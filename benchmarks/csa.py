#!/usr/bin/env python
"""Benchmark Consistent Self-Attention against stock SDXL attention, per UNet forward.

Builds the real SDXL base UNet architecture (``sdxl_unet_config.json``, 2.57 B parameters) with
random weights — nothing is downloaded — and times the UNet forwards a storydiff story runs,
with CSA driven exactly as the story loop
(``storycli.keyframes.loop.generate_keyframes``) drives it:
``CSAState.open_call`` once per plan call, ``enter(streams)`` / ``leave()`` around each forward,
``drop_step`` once every frame has read the step's bank.

What a story of F frames with R reference frames (``--id-length``) runs per denoising step:

* CSA: one *write* forward of batch 2R (the R references; CFG doubles the batch), which banks
  the sampled tokens' keys and values, then the F − R *read* frames in micro-batches of m
  (``frame_batch``): a read forward of micro-batch m is ``state.enter([m one-frame read
  calls])`` on a batch of 2m, each frame attending to its own tokens plus the bank.
* stock: the same batching with diffusers' attention: one forward of batch 2R, then forwards
  of batch 2m.

Timing discipline: one process and one UNet for everything. Each CSA forward is paired with a
stock forward of the same batch on the same inputs, run back to back, the order alternating
between rounds (stock first in even rounds, CSA first in odd ones), so a change in the machine's
speed (other processes, clocks) hits both sides of a pair alike. The ratio of a forward kind is
the median of its pairs' ratios; story totals are composed from the per-kind medians (read
frames are identical work). The whole-story *memory* of the story loop is measured by
``benchmarks/story_loop.py``, not here.

Usage::

    python benchmarks/csa.py --device cuda                 # 768² and 1024²
    python benchmarks/csa.py --device cpu --modes csa      # 512², float32
    python benchmarks/csa.py --quick --out /tmp/bench      # tiny UNet, seconds (CI smoke test)

Results go to ``<out>/<device>-<date>.{json,md,png}`` (``<device>-quick-<date>`` for --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SDXL_CONFIG = HERE / "sdxl_unet_config.json"
GIB, MIB = 2**30, 2**20

# The targets on CPU (time per image, CSA / stock).
TARGETS = {"write": 1.08, "read": 1.10, "story": 1.10}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    description: str
    impl: str = "fast"  # CSASettings.impl
    window: bool = False


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "csa",
            "CSA reference mode (fast impl): a write forward of the R references, then read "
            "forwards of micro-batch m",
        ),
        Mode(
            "csa-reference",
            "as csa with impl=reference (the per-image write loop; its read forward is csa's)",
            impl="reference",
        ),
        Mode(
            "csa-window",
            "CSA window mode: one forward of batch 2W per window of --window frames every "
            "--stride frames, predictions averaged over overlaps, no bank",
            window=True,
        ),
    )
}

# Modes earlier versions of this script had, and why they are gone.
REMOVED: dict[str, str] = {
    "csa-bank-cpu": "removed with BankSettings.placement: the story loop keeps one step's bank, "
    "next to the UNet, and drops it once every frame has read it",
    "stock-single": "removed: stock is timed with the same batching as CSA (stock forwards of "
    "batch 2 are its micro-batch-1 reads)",
}


# --------------------------------------------------------------------------------------------
# Worker: build one UNet, time stock and CSA forwards in alternating pairs
# --------------------------------------------------------------------------------------------

_UNET_CACHE: dict[tuple, tuple[Any, int]] = {}


def build_unet(model: str, dtype_name: str, device_name: str, seed: int) -> tuple[Any, int]:
    """(UNet, VAE scale factor): random weights from `seed`, eval, no grad, on the device."""
    key = (model, dtype_name, device_name, seed)
    if key in _UNET_CACHE:
        return _UNET_CACHE[key]
    import torch

    dtype = getattr(torch, dtype_name)
    device = torch.device(device_name)
    if model == "tiny":
        from storycli.weights.tiny import TINY_VAE_SCALE_FACTOR, build_tiny_sdxl_pipeline

        unet = build_tiny_sdxl_pipeline(dtype=dtype).unet
        scale = TINY_VAE_SCALE_FACTOR
    else:
        from diffusers import UNet2DConditionModel

        config = json.loads(SDXL_CONFIG.read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        previous = torch.get_default_dtype()
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no fp32 copy
        try:
            with torch.device(device):
                unet = UNet2DConditionModel(**config)
        finally:
            torch.set_default_dtype(previous)
        scale = 8
    unet.eval().requires_grad_(False)
    torch.nn.Module.to(unet, device=device, dtype=dtype)
    _UNET_CACHE[key] = (unet, scale)
    return unet, scale


def unet_inputs(unet: Any, batch: int, latent: int, pixels: int, dtype: Any, device: Any) -> dict:
    import torch

    cfg = unet.config
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    g = torch.Generator().manual_seed(1234 + batch)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
    return {
        "sample": randn(batch, cfg.in_channels, latent, latent),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, 77, cfg.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(batch, text_dim),
            "time_ids": time_ids.repeat(batch, 1).to(device=device, dtype=dtype),
        },
        "return_dict": False,
    }


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of UNet forward a story runs: what it is, and the frames it denoises."""

    name: str  # "write", "read-<m>", "window"
    frames: int  # frames per forward (CFG doubles the batch)

    @property
    def batch(self) -> int:
        return 2 * self.frames


def mode_kinds(mode: Mode, id_length: int, micro_batches: list[int], window: int) -> list[Kind]:
    """The forward kinds of `mode`, in the order a story step runs them (write before reads)."""
    if mode.window:
        return [Kind("window", window)]
    kinds = [Kind("write", id_length)]
    if mode.impl == "fast":  # a read forward does not depend on impl: timed once, for csa
        kinds += [Kind(f"read-{m}", m) for m in micro_batches]
    return kinds


def csa_settings(mode: Mode) -> Any:
    """CSA in every replaced (up-block) layer at every step: the worst case."""
    try:
        from storycli.consistency import csa_state as csa
    except ImportError:  # checkouts before the state left csa.py
        from storycli.consistency import csa  # type: ignore[no-redef]

    return csa.CSASettings(warmup_steps=0, prob_early=1.0, prob_late=1.0, impl=mode.impl)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time every forward kind of `spec["modes"]` at one resolution, stock and CSA in pairs."""
    import torch

    from storycli.consistency import csa as csa_module
    from storycli.weights.devices import device_description

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    unet, scale = build_unet(spec["model"], spec["dtype"], spec["device"], spec["seed"])
    build_s = time.perf_counter() - t0
    pixels, r = spec["resolution"], spec["id_length"]
    latent = pixels // scale
    inputs: dict[int, dict] = {}
    log = spec.get("log", True)

    def say(text: str) -> None:
        if log:
            print(f"    [{pixels}px] {text}", file=sys.stderr, flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(batch: int) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        out = unet(**inputs[batch])[0]
        sync()
        return time.perf_counter() - start, out

    # The processor and, where it lives apart (since the backbone seam), CSA's per-call state.
    folder = Path(csa_module.__file__).parent
    source = b"".join(
        (folder / name).read_bytes()
        for name in ("csa.py", "csa_state.py")
        if (folder / name).is_file()
    )
    out: dict[str, Any] = {
        "device_name": device_description(str(device)),
        "csa_source_sha1": hashlib.sha1(source).hexdigest()[:12],
        "build_seconds": build_s,
        "loadavg_before": os.getloadavg(),
        "forwards": [],
    }
    stock_processors = dict(unet.attn_processors)
    kinds = {
        name: mode_kinds(MODES[name], r, spec["micro_batches"], spec["window"])
        for name in spec["modes"]
    }
    for batch in sorted({k.batch for ks in kinds.values() for k in ks}):
        inputs[batch] = unet_inputs(unet, batch, latent, pixels, dtype, device)
    with torch.inference_mode():
        # Process-level first-call costs (the allocator growing to the largest batch's needs).
        for _ in range(spec["prime"]):
            batch = max(inputs)
            say(f"prime forward, batch {batch}: {timed(batch)[0]:.3f} s (untimed)")
        for name in spec["modes"]:
            mode = MODES[name]
            samples, bank = time_pairs(unet, mode, kinds[name], spec, timed, stock_processors, say)
            out["forwards"] += [
                summarize(name, kind, samples[kind.name], spec["warmup"], bank)
                for kind in kinds[name]
            ]
    out["loadavg_after"] = os.getloadavg()
    out["worker_seconds"] = time.perf_counter() - t0
    return out


def time_pairs(
    unet: Any,
    mode: Mode,
    kinds: list[Kind],
    spec: dict[str, Any],
    timed: Any,
    stock_processors: dict[str, Any],
    say: Any,
) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Every round: each kind's stock and CSA forwards back to back (order alternating between
    rounds), then the step's bank dropped, as the story loop does. Returns the seconds of every
    forward by kind and side, and the largest bank of one step."""
    import torch

    try:
        from storycli.consistency.csa_state import CSAState
        from storycli.keyframes.backbones.sdxl import csa_layers, installed_csa, windowed_unet
    except ImportError:  # checkouts before the backbone seam
        from storycli.consistency.csa import (  # type: ignore[no-redef]
            CSAState,
            csa_layers,
            installed_csa,
            windowed_unet,
        )

    r, rounds = spec["id_length"], spec["warmup"] + spec["repeats"]
    state = CSAState(csa_settings(mode), csa_layers(unet, ["up"]))
    samples: dict[str, dict[str, list[float]]] = {k.name: {"stock": [], "csa": []} for k in kinds}

    def stock(kind: Kind) -> tuple[float, Any]:
        # diffusers' own processors; CSA's hooks stay registered, but with no call entered
        # they only advance an unused step counter.
        unet.set_attn_processor(dict(stock_processors))
        return timed(kind.batch)

    def consistent(kind: Kind, n: int) -> tuple[float, Any]:
        unet.set_attn_processor(dict(csa_processors))
        seed = spec["seed"] + 1000 * n
        if kind.name == "write":
            streams = [state.open_call("write", r, seed, character="A")]
        elif kind.name == "window":
            streams = [state.open_call("window", kind.frames, seed)]
        else:  # a micro-batch of one-frame read calls, each with its own draws
            streams = [
                state.open_call("read", 1, seed + j, read_characters=["A"])
                for j in range(kind.frames)
            ]
        state.enter(streams)
        if kind.name == "window":  # frames == window: exactly one window forward
            with windowed_unet(unet, state, kind.frames, kind.frames, spec["stride"]):
                result = timed(kind.batch)
        else:
            result = timed(kind.batch)
        state.leave()
        return result

    with installed_csa(unet, state):
        csa_processors = dict(unet.attn_processors)
        for n in range(rounds):
            order = ("csa", "stock") if n % 2 else ("stock", "csa")
            warm = " (warm-up)" if n < spec["warmup"] else ""
            for kind in kinds:
                pair = {}
                for side in order:
                    pair[side] = stock(kind) if side == "stock" else consistent(kind, n)
                    samples[kind.name][side].append(pair[side][0])
                if torch.equal(pair["stock"][1], pair["csa"][1]):
                    raise RuntimeError(f"{mode.name} {kind.name}: CSA did not engage")
                say(
                    f"{mode.name} {kind.name} (batch {kind.batch}) round {n + 1}/{rounds}: "
                    f"stock {pair['stock'][0]:.3f} s, CSA {pair['csa'][0]:.3f} s{warm}"
                )
            state.drop_step(0)  # every kind of this round ran at its calls' step 0
    return samples, state.peak_bank_bytes


def summarize(
    mode: str, kind: Kind, samples: dict[str, list[float]], warmup: int, bank: int
) -> dict[str, Any]:
    """One forward kind's record: every sample, medians and ratios of the timed rounds."""
    stock, csa = samples["stock"][warmup:], samples["csa"][warmup:]
    pairs = [c / s for c, s in zip(csa, stock, strict=True)]
    return {
        "mode": mode,
        "kind": kind.name,
        "frames_per_forward": kind.frames,
        "batch": kind.batch,
        "stock_seconds": statistics.median(stock),
        "csa_seconds": statistics.median(csa),
        "ratio": statistics.median(pairs),
        "ratio_of_medians": statistics.median(csa) / statistics.median(stock),
        "pair_ratios": pairs,
        "raw_seconds": samples,  # every round, warm-up first
        "warmup": warmup,
        "bank_bytes_per_step": bank if kind.name == "write" else 0,
    }


# --------------------------------------------------------------------------------------------
# Story composition
# --------------------------------------------------------------------------------------------


def read_chunks(reads: int, micro_batch: int) -> list[int]:
    """The sizes of the read forwards of `reads` frames in micro-batches (the last may be
    smaller), as `storycli.keyframes.loop.story_chunks` groups them."""
    full, rest = divmod(reads, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def compose(
    forwards: dict[str, dict[str, Any]], mode: str, frames: int, micro_batch: int, args: Any
) -> dict[str, Any] | None:
    """A story's step totals (stock and CSA) from the per-kind medians of `mode`."""
    counts: dict[str, int] = {}
    scaled = []
    if MODES[mode].window:
        from storycli.consistency.csa import window_starts

        window = forwards.get("window")
        if window is None:
            return None
        n = len(window_starts(frames, args.window, args.stride))
        csa = n * window["csa_seconds"]
        # Stock denoises every frame once, in batches of W.
        stock = frames / args.window * window["stock_seconds"]
        counts = {"window": n}
    else:
        write = forwards.get("write")
        if write is None or f"read-{micro_batch}" not in forwards:
            return None  # reads not timed in this mode
        stock, csa = write["stock_seconds"], write["csa_seconds"]
        counts["write"] = 1
        for size in read_chunks(frames - args.id_length, micro_batch):
            rec = forwards.get(f"read-{size}")
            factor = 1.0
            if rec is None:  # an unmeasured remainder: scaled from the micro-batch's time
                rec, factor = forwards[f"read-{micro_batch}"], size / micro_batch
                scaled.append(size)
            stock += factor * rec["stock_seconds"]
            csa += factor * rec["csa_seconds"]
            counts[f"read-{size}"] = counts.get(f"read-{size}", 0) + 1
    return {
        "mode": mode,
        "frames": frames,
        "micro_batch": None if MODES[mode].window else micro_batch,
        "forward_count": counts,
        "stock_seconds_per_image_step": stock / frames,
        "csa_seconds_per_image_step": csa / frames,
        "ratio": csa / stock,
        "notes": f"remainder read forwards of {scaled} frames scaled from read-{micro_batch}"
        if scaled
        else "",
    }


COMPOSITION = (
    "Per denoising step, a story of F frames with R reference frames runs: CSA reference mode: "
    "one write forward (batch 2R) + the F-R read frames in micro-batches of m: ceil((F-R)/m) "
    "read forwards of batch 2m (the last one smaller when m does not divide F-R); stock: the "
    "same forwards with diffusers' attention. Window mode: one forward of batch 2W per window "
    "(windows of W frames every S frames, the last one ending on the last frame), against stock "
    "denoising every frame once in batches of W. Each forward kind is timed in stock/CSA pairs "
    "(same inputs, back to back, order alternating between rounds); story totals are composed "
    "from the per-kind medians. seconds per image-step = story-step total / F."
)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh Python process (no heap or caches from earlier work)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)]
        proc = subprocess.run([*cmd, str(result_path)], check=False)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"worker at {spec['resolution']} px failed")
        return json.loads(result_path.read_text())


def default_args(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device == "cuda"
    quick = args.quick
    defaults = {
        "resolutions": [64] if quick else ([768, 1024] if cuda else [512]),
        "frames": [4, 8] if quick else ([4, 8, 16, 32, 64, 100] if cuda else [4, 8, 16, 100]),
        "dtype": "float16" if cuda and not quick else "float32",
        "repeats": 2 if quick or not cuda else 5,
        "warmup": 2 if cuda else (1 if quick else 0),
        "prime": 1 if cuda or not quick else 0,
        "isolate": "none" if quick else "process",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.modes is None:
        args.modes = list(MODES)
    bad = [f for f in args.frames if f < args.id_length]
    if bad:
        raise SystemExit(f"--frames {bad} are shorter than --id-length {args.id_length}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults depend on --device (cpu: 512², fp32, 1 untimed forward of the largest "
        "batch, then 2 timed rounds; cuda: 768² 1024², fp16, 1 untimed forward and 2 warm-up "
        "rounds, then 5 timed rounds).",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--resolutions", type=int, nargs="+", help="square image sizes in pixels")
    p.add_argument("--frames", type=int, nargs="+", help="story lengths to compose")
    p.add_argument("--id-length", type=int, default=4, help="reference frames per character (R)")
    p.add_argument(
        "--micro-batches",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="read frames per forward (the story loop's frame_batch) to time",
    )
    p.add_argument(
        "--modes", nargs="+", choices=[*MODES, *REMOVED], help=f"default: {' '.join(MODES)}"
    )
    p.add_argument("--repeats", type=int, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed rounds of pairs first")
    p.add_argument(
        "--prime", type=int, help="untimed stock forwards of the largest batch, before the rounds"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="cpu: float32 (what storydiff uses there; bfloat16 convolutions are ~250x slower "
        "on CPUs without AVX-512 BF16), cuda: float16",
    )
    p.add_argument("--window", type=int, default=4, help="window mode: frames per window")
    p.add_argument("--stride", type=int, default=2, help="window mode: frames between windows")
    p.add_argument("--seed", type=int, default=0, help="weights and CSA draws")
    p.add_argument("--threads", type=int, help="torch threads in the worker (default: torch's)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="tiny UNet at 64 px: a smoke test")
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="process (default): each resolution in a fresh process; none: in this process "
        "(default for --quick)",
    )
    p.add_argument(
        "--report", type=Path, metavar="JSON", help="only rewrite the .md and .png of a .json"
    )
    p.add_argument(
        "--merge",
        type=Path,
        metavar="JSON",
        help="add this run's modes to an existing results .json (replacing the same mode and "
        "resolution) and rewrite its .md and .png",
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
        args.report.with_suffix(".md").write_text(markdown(payload))
        plot(payload, args.report.with_suffix(".png"))
        return 0
    args = default_args(args)

    import diffusers
    import torch

    from storycli.weights.devices import device_description

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    date = dt.date.today().isoformat()
    stem = f"{args.device}-quick-{date}" if args.quick else f"{args.device}-{date}"
    if not args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = "tiny" if args.quick else "sdxl"
    modes = [m for m in args.modes if m in MODES]
    skipped = {m: REMOVED[m] for m in args.modes if m in REMOVED}
    for m, why in skipped.items():
        print(f"skip {m}: {why}", file=sys.stderr)

    forwards: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    device_label = None
    for res in args.resolutions:
        spec = {
            "device": args.device,
            "dtype": args.dtype,
            "model": model,
            "resolution": res,
            "id_length": args.id_length,
            "micro_batches": args.micro_batches,
            "modes": modes,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "prime": args.prime,
            "seed": args.seed,
            "window": args.window,
            "stride": args.stride,
            "threads": args.threads,
        }
        t = time.perf_counter()
        print(f"== {', '.join(modes)} at {res}px", file=sys.stderr, flush=True)
        result = run_isolated(spec) if args.isolate == "process" else run_worker(spec)
        print(f"   done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        device_label = result["device_name"]
        workers.append(
            {
                "resolution": res,
                "seconds": time.perf_counter() - t,
                "build_seconds": result["build_seconds"],
                "loadavg_before": result["loadavg_before"],
                "loadavg_after": result["loadavg_after"],
                "csa_source_sha1": result["csa_source_sha1"],
            }
        )
        forwards += [{**f, "resolution": res} for f in result["forwards"]]

    stories = []
    for res in args.resolutions:
        for mode in modes:
            by_kind = {
                f["kind"]: f for f in forwards if f["resolution"] == res and f["mode"] == mode
            }
            for frames in args.frames:
                # Window mode has no micro-batches; a story of references only has no reads.
                batches = args.micro_batches if frames > args.id_length else args.micro_batches[:1]
                for m in [None] if MODES[mode].window else batches:
                    rec = compose(by_kind, mode, frames, m or 1, args)
                    if rec is not None:
                        stories.append({**rec, "resolution": res})

    payload = {
        "meta": {
            "device_name": device_label or device_description(args.device),
            "device": args.device,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "date": date,
            "model": "tiny (storycli.weights.tiny, random weights)"
            if args.quick
            else "SDXL base UNet architecture (benchmarks/sdxl_unet_config.json), random weights",
            "dtype": args.dtype,
            "id_length": args.id_length,
            "micro_batches": args.micro_batches,
            "window": args.window,
            "stride": args.stride,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "prime": args.prime,
            "isolation": args.isolate,
            "csa_settings": "warmup_steps=0, prob_early=prob_late=1.0: CSA in every up-block "
            "self-attention layer at every step (the worst case)",
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "wall_seconds": time.perf_counter() - started,
            "modes": {m: MODES[m].description for m in modes},
            "skipped": skipped,
            "workers": workers,
            "composition": COMPOSITION,
        },
        "forwards": forwards,
        "stories": stories,
    }
    json_path = args.out / f"{stem}.json"
    if args.merge:
        payload = merge(json.loads(args.merge.read_text()), payload)
        json_path = args.merge
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(payload))
    png_path = json_path.with_suffix(".png")
    plotted = plot(payload, png_path)
    print(f"wrote {json_path}, {md_path}" + (f", {png_path}" if plotted else ""), file=sys.stderr)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` results with the (mode, resolution) pairs measured in `new` replaced by new ones."""
    fresh = {(r["mode"], r["resolution"]) for r in new["forwards"]}
    order = list(MODES)

    def combined(key: str, sort: Any) -> list[dict[str, Any]]:
        kept = [r for r in old[key] if (r["mode"], r["resolution"]) not in fresh]
        return sorted(kept + new[key], key=sort)

    om, nm = old["meta"], new["meta"]
    meta = {
        **om,
        "command": f"{om['command']} && {nm['command']}",
        "wall_seconds": om["wall_seconds"] + nm["wall_seconds"],
        "modes": {**om["modes"], **nm["modes"]},
        "skipped": {**om["skipped"], **nm["skipped"]},
        "workers": om["workers"] + nm["workers"],
        "composition": nm["composition"],
    }
    return {
        "meta": meta,
        "forwards": combined("forwards", lambda r: (r["resolution"], order.index(r["mode"]))),
        "stories": combined(
            "stories",
            lambda r: (r["resolution"], order.index(r["mode"]), r["frames"], r["micro_batch"] or 0),
        ),
    }


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _mark(value: float, limit: float) -> str:
    return f"{value:.3f} {'✅' if value <= limit else '❌'}"


def target_of(kind: str) -> float | None:
    if kind == "write":
        return TARGETS["write"]
    if kind.startswith("read-"):
        return TARGETS["read"]
    return None


def markdown(payload: dict[str, Any]) -> str:
    meta, forwards, stories = payload["meta"], payload["forwards"], payload["stories"]
    lines = [
        f"# CSA benchmark — {meta['device']} — {meta['date']}",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, python {meta['python']}",
        f"- model: {meta['model']}, {meta['dtype']}",
        f"- id_length (R) {meta['id_length']}; read micro-batches {meta['micro_batches']}; "
        f"{meta['repeats']} timed rounds after {meta['prime']} untimed forward(s) of the largest "
        f"batch and {meta['warmup']} warm-up round(s), stock and CSA alternating in one process "
        f"per resolution; wall time {meta['wall_seconds']:.0f} s",
        f"- command: `{meta['command']}`",
        f"- CSA settings: {meta['csa_settings']}",
        "",
        meta["composition"],
        "",
        "Modes: " + "; ".join(f"**{m}** — {d}" for m, d in meta["modes"].items()) + ".",
        "",
    ]
    for m, why in meta["skipped"].items():
        lines.append(f"- **{m}** skipped: {why}")
    if meta["skipped"]:
        lines.append("")
    if meta["workers"]:
        lines.append(
            "Worker processes (1-minute load average before → after; load beyond the worker's "
            "own threads means other work competed for the CPUs):"
        )
        lines.append("")
        for w in meta["workers"]:
            lines.append(
                f"- {w['resolution']}px: {w['seconds']:.0f} s (UNet build "
                f"{w['build_seconds']:.0f} s), load {w['loadavg_before'][0]:.2f} → "
                f"{w['loadavg_after'][0]:.2f}"
            )
        lines.append("")
    for res in sorted({f["resolution"] for f in forwards}):
        lines += [
            f"## {res}×{res}",
            "",
            "Per forward (median seconds of the timed rounds; × stock = median of the pairs' "
            "ratios, then the ratio of the medians):",
            "",
            "| mode | forward | batch | stock s | CSA s | × stock | ratio of medians "
            "| pair ratios | target |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for f in forwards:
            if f["resolution"] != res:
                continue
            limit = target_of(f["kind"])
            pairs = ", ".join(f"{p:.3f}" for p in f["pair_ratios"])
            lines.append(
                f"| {f['mode']} | {f['kind']} | {f['batch']} | {f['stock_seconds']:.4g} "
                f"| {f['csa_seconds']:.4g} | {f['ratio']:.3f} | {f['ratio_of_medians']:.3f} "
                f"| {pairs} | {_mark(f['ratio'], limit) if limit else '—'} |"
            )
        banks = [f["bank_bytes_per_step"] for f in forwards if f["resolution"] == res]
        if any(banks):
            lines += ["", f"Bank of one step (keys and values): {max(banks) / MIB:.1f} MiB."]
        lines += [
            "",
            "Per story (composed; micro-batch m = the story loop's `frame_batch`):",
            "",
            "| mode | frames | micro-batch | stock s / image-step | CSA s / image-step "
            "| × stock | target |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in stories:
            if s["resolution"] != res:
                continue
            m = "—" if s["micro_batch"] is None else s["micro_batch"]
            target = _mark(s["ratio"], TARGETS["story"]) if s["mode"] != "csa-window" else "—"
            lines.append(
                f"| {s['mode']} | {s['frames']} | {m} | {s['stock_seconds_per_image_step']:.4g} "
                f"| {s['csa_seconds_per_image_step']:.4g} | {s['ratio']:.3f} | {target} |"
            )
        lines.append("")
    lines += targets(forwards, stories)
    return "\n".join(lines) + "\n"


def targets(forwards: list[dict], stories: list[dict]) -> list[str]:
    """The issue's time targets for `csa`, checked where measured."""
    lines = [
        "## Targets",
        "",
        f"Time per image, CSA / stock: write ≤ {TARGETS['write']}, read ≤ {TARGETS['read']}, "
        f"whole story ≤ {TARGETS['story']} (mode `csa`; stories at the longest length measured "
        "and at 8 frames).",
        "",
        "| resolution | what | micro-batch | × stock | target |",
        "|---:|---|---:|---:|---:|",
    ]
    for res in sorted({f["resolution"] for f in forwards}):
        for f in forwards:
            if f["resolution"] != res or f["mode"] != "csa":
                continue
            limit = target_of(f["kind"])
            m = f["frames_per_forward"] if f["kind"] != "write" else "—"
            lines.append(
                f"| {res} | {f['kind'].split('-')[0]} forward | {m} | {f['ratio']:.3f} "
                f"| {_mark(f['ratio'], limit)} |"
            )
        mine = [s for s in stories if s["resolution"] == res and s["mode"] == "csa"]
        lengths = sorted({s["frames"] for s in mine})
        for frames in sorted({x for x in lengths if x == 8} | set(lengths[-1:])):
            for s in mine:
                if s["frames"] == frames:
                    lines.append(
                        f"| {res} | {frames}-frame story | {s['micro_batch']} | {s['ratio']:.3f} "
                        f"| {_mark(s['ratio'], TARGETS['story'])} |"
                    )
    lines.append("")
    return lines


def plot(payload: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    meta, stories = payload["meta"], payload["stories"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = sorted({(s["mode"], s["resolution"], s["micro_batch"] or 0) for s in stories})
    for mode, res, m in series:
        rows = sorted(
            (
                s
                for s in stories
                if (s["mode"], s["resolution"], s["micro_batch"] or 0) == (mode, res, m)
            ),
            key=lambda s: s["frames"],
        )
        label = f"{mode} {res}²" + (f", micro-batch {m}" if m else "")
        ax.plot([s["frames"] for s in rows], [s["ratio"] for s in rows], "o-", label=label)
    ax.axhline(TARGETS["story"], color="gray", ls="--", lw=1, label="target")
    ax.set_xscale("log", base=2)
    xs = sorted({s["frames"] for s in stories})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("story length (frames)")
    ax.set_ylabel("time per image, × stock")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(
        f"CSA vs stock SDXL UNet — {meta['device_name']} — {meta['dtype']}, R={meta['id_length']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
