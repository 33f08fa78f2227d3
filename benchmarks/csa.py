#!/usr/bin/env python
"""Benchmark Consistent Self-Attention against stock SDXL attention, per UNet denoising step.

Builds the real SDXL base UNet architecture (``sdxl_unet_config.json``, 2.57 B parameters) with
random weights — nothing is downloaded — and measures UNet forwards the way a storydiff story runs
them, with CSA driven exactly as ``storycli.keyframes`` drives it (``CSAState`` +
``installed_csa`` + ``begin_call``).

What a story of F frames with R reference frames (``--id-length``) costs per denoising step:

* CSA (reference mode): one *write* forward of batch 2R (the R reference frames, CFG doubles the
  batch) + (F - R) *read* forwards of batch 2 (one frame each, attending to the bank).
* ``stock``: the same batching without CSA: one forward of batch 2R + (F - R) of batch 2.
* ``stock-single``: every frame on its own: F forwards of batch 2.

Read frames are identical work, so each forward kind is measured once (median of ``--repeats``
after ``--warmup``) and story totals are composed: seconds per image-step = total / F. Peak memory
is measured over one story step (write, then reads with that step's bank resident); the bank of a
whole story (every denoising step is banked) is projected from the bank of one step.

Usage::

    python benchmarks/csa.py --device cuda                 # 768² and 1024², frames 4 … 100
    python benchmarks/csa.py --device cpu                  # 512², frames 4 and 8, bf16
    python benchmarks/csa.py --quick --out /tmp/bench      # tiny UNet, seconds (CI smoke test)

Results go to ``<out>/<device>-<date>.{json,md,png}`` (``<device>-quick-<date>`` for --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import inspect
import json
import os
import platform
import re
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


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "stock" | "csa"
    description: str
    impl: str | None = None  # CSASettings.impl
    placement: str | None = None  # BankSettings placement
    window: bool = False


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "stock",
            "stock",
            "stock SDXL attention, batched like CSA: one batch of R frames, then one frame each",
        ),
        Mode("stock-single", "stock", "stock SDXL attention, one frame (batch 2 with CFG) each"),
        Mode("csa", "csa", "CSA reference mode, fast impl, bank on the device", "fast", "device"),
        Mode(
            "csa-bank-cpu",
            "csa",
            "CSA reference mode, fast impl, bank in host memory",
            "fast",
            "cpu",
        ),
        Mode(
            "csa-reference",
            "csa",
            "CSA reference mode, straightforward reference impl (per-image loop), bank on device",
            "reference",
            "device",
        ),
        Mode(
            "csa-window",
            "csa",
            "CSA window mode: all frames in one call, one forward per window of --window frames "
            "every --stride frames, predictions averaged over overlaps, no bank",
            "fast",
            window=True,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# What the installed storycli offers (it is being extended; detect, never assume)
# --------------------------------------------------------------------------------------------


def csa_capabilities() -> dict[str, Any]:
    from storycli.consistency import csa

    settings_fields = {f.name for f in dataclasses.fields(csa.CSASettings)}
    bank_cls = getattr(csa, "BankSettings", None)
    bank_fields = {f.name for f in dataclasses.fields(bank_cls)} if bank_cls else set()
    state_params = set(inspect.signature(csa.CSAState.__init__).parameters)
    placement_field = next((f for f in ("placement", "device") if f in bank_fields), None)
    return {
        "settings_fields": settings_fields,
        "bank": bank_cls is not None and "bank" in state_params and placement_field is not None,
        "placement_field": placement_field,
        "impl": "impl" in settings_fields,
        "window": hasattr(csa, "windowed_unet") and hasattr(csa.CSAState, "begin_window"),
    }


def unavailable_reason(mode: Mode, caps: dict[str, Any]) -> str | None:
    """Why `mode` cannot run against the installed storycli, or None when it can."""
    if mode.kind == "stock":
        return None
    if mode.window and not caps["window"]:
        return "storycli has no windowed_unet / CSAState.begin_window: window mode not there yet"
    if mode.impl == "reference" and not caps["impl"]:
        return "CSASettings has no `impl` field: no reference implementation to compare"
    if mode.placement == "cpu" and not caps["bank"]:
        return "no BankSettings / CSAState(bank=...): bank placement cannot be chosen"
    return None


def csa_objects(mode: Mode, caps: dict[str, Any]) -> tuple[Any, Any]:
    """(CSASettings, BankSettings or None) for `mode`: CSA on in every replaced layer."""
    from storycli.consistency import csa

    kwargs: dict[str, Any] = {"warmup_steps": 0, "prob_early": 1.0, "prob_late": 1.0}
    if caps["impl"] and mode.impl:
        kwargs["impl"] = mode.impl
    settings = csa.CSASettings(**kwargs)
    bank = None
    if caps["bank"] and mode.placement:
        bank = csa.BankSettings(**{caps["placement_field"]: mode.placement})
    return settings, bank


def banked_steps(steps: int) -> int:
    """How many of a story's `steps` denoising steps production CSA banks (default settings)."""
    from storycli.consistency import csa

    settings = csa.CSASettings()
    bank = csa.BankSettings() if hasattr(csa, "BankSettings") else None
    last = steps
    if bank is not None and getattr(bank, "max_step", None) is not None:
        last = min(steps, bank.max_step)
    return max(0, last - settings.warmup_steps)


# --------------------------------------------------------------------------------------------
# Memory and device helpers
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else 0


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak memory of the device the UNet runs on: CUDA max allocated, or process RSS on CPU."""

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
        else:
            self.resettable = _reset_rss_peak() and self.resettable

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024


# --------------------------------------------------------------------------------------------
# Worker: build one UNet, measure the forwards of one mode group at one resolution
# --------------------------------------------------------------------------------------------

_UNET_CACHE: dict[tuple, tuple[Any, int]] = {}


def build_unet(model: str, dtype_name: str, device_name_: str, seed: int) -> tuple[Any, int]:
    """(UNet, VAE scale factor): random weights from `seed`, eval, no grad, on the device."""
    key = (model, dtype_name, device_name_, seed)
    if key in _UNET_CACHE:
        return _UNET_CACHE[key]
    import torch

    dtype = getattr(torch, dtype_name)
    device = torch.device(device_name_)
    if model == "tiny":
        from storycli.tiny import TINY_VAE_SCALE_FACTOR, build_tiny_sdxl_pipeline

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
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure every forward kind of one mode group (see `plan_groups`) at one resolution."""
    import torch

    from storycli.consistency import CSAState, csa_layers, installed_csa
    from storycli.models import device_description

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    unet, scale = build_unet(spec["model"], spec["dtype"], spec["device"], spec["seed"])
    build_s = time.perf_counter() - t0
    pixels, r = spec["resolution"], spec["id_length"]
    latent = pixels // scale
    inputs = {b: unet_inputs(unet, b, latent, pixels, dtype, device) for b in {2, 2 * r}}
    memory = Memory(device)
    baseline = memory.now()
    log = spec.get("log", True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward(batch: int) -> float:
        sync()
        start = time.perf_counter()
        unet(**inputs[batch])
        sync()
        return time.perf_counter() - start

    def say(text: str) -> None:
        if log:
            print(f"    [{spec['group']} {pixels}px] {text}", file=sys.stderr, flush=True)

    import hashlib

    from storycli.consistency import csa as csa_module

    source = Path(csa_module.__file__).read_bytes()
    out: dict[str, Any] = {
        "device_name": device_description(str(device)),
        "csa_source_sha1": hashlib.sha1(source).hexdigest()[:12],
        "build_seconds": build_s,
        "baseline_bytes": baseline,
        "peak_metric": memory.metric,
        "forwards": {},
        "loadavg_before": os.getloadavg(),
    }
    n_runs = spec["warmup"] + spec["repeats"]

    def measure(kind: str, batch: int, call: Any = None, check: Any = None) -> None:
        memory.reset()
        raw = []
        for i in range(n_runs):
            if call is not None:
                call(i)
            raw.append(forward(batch))
            if check is not None:
                check()
            if call is not None:
                state.end_call()
            warm = " (warm-up)" if i < spec["warmup"] else ""
            say(f"{kind} forward, batch {batch}: {raw[-1]:.3f} s{warm}")
        timed = raw[spec["warmup"] :]
        out["forwards"][kind] = {
            "batch": batch,
            "seconds": statistics.median(timed),
            "raw_seconds": raw,
            "peak_bytes": memory.peak(),
        }

    with torch.inference_mode():
        for i in range(spec["prime"]):  # process-level first-call costs (allocator, kernels)
            say(f"prime forward {i + 1}/{spec['prime']}: {forward(2):.3f} s (untimed)")

        if spec["kind"] == "stock":
            state = None
            # The single-frame forward first: its peak must not include a larger earlier batch.
            measure("single", 2)
            if spec["need_batch"]:
                measure("batch", 2 * r)
        else:
            caps = csa_capabilities()
            mode = MODES[spec["group"]]
            settings, bank = csa_objects(mode, caps)
            layers = csa_layers(unet, ["up"])
            state = CSAState(settings, layers, bank=bank) if bank else CSAState(settings, layers)
            out["csa_settings"] = repr(settings)
            out["bank_settings"] = repr(bank) if bank else None
            out["csa_layers"] = len(layers)
            if mode.window:
                from storycli.consistency.csa import windowed_unet

                w = spec["window"]
                inputs[2 * w] = unet_inputs(unet, 2 * w, latent, pixels, dtype, device)
                # Bytes a story holds per extra frame and CFG group for a windowed call: its
                # inputs, plus the wrapper's accumulated and averaged predictions.
                row = sum(
                    t[0].numel() * t.element_size()
                    for t in (*inputs[2].values(), *inputs[2]["added_cond_kwargs"].values())
                    if isinstance(t, torch.Tensor) and t.ndim
                )
                out["window_row_bytes"] = row + 2 * inputs[2]["sample"][0].numel() * (
                    inputs[2]["sample"].element_size()
                )

                def window(i: int) -> None:
                    state.begin_call("window", n_images=w, seed=spec["seed"] + i)

                def drew_tokens() -> None:
                    # Sanity check on private state (skipped if it is renamed): CSA engaged.
                    if getattr(state, "_draws", None) == {}:
                        raise RuntimeError("the window forward drew no tokens: CSA did not engage")

                # frames == window: exactly one window forward, through the production wrapper.
                with installed_csa(unet, state), windowed_unet(unet, state, w, w, spec["stride"]):
                    measure("window", 2 * w, window, check=drew_tokens)
                    out["bank_bytes_per_step"] = state.bank_bytes()
                out["loadavg_after"] = os.getloadavg()
                out["rss_peak_resettable"] = memory.resettable
                out["worker_seconds"] = time.perf_counter() - t0
                return out
            with installed_csa(unet, state):

                def write(i: int) -> None:
                    state.begin_call("write", n_images=r, seed=spec["seed"] + i, character="A")

                def read(i: int) -> None:
                    state.begin_call(
                        "read", n_images=1, seed=spec["seed"] + 100 + i, read_characters=["A"]
                    )

                measure("write", 2 * r, write)
                out["bank_bytes_per_step"] = state.bank_bytes()
                if out["bank_bytes_per_step"] <= 0:
                    raise RuntimeError("the write forward banked nothing: CSA did not engage")
                measure("read", 2, read)  # with the bank of one step resident
    out["rss_peak_resettable"] = memory.resettable
    out["loadavg_after"] = os.getloadavg()
    out["worker_seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh Python process, so its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)]
        proc = subprocess.run([*cmd, str(result_path)], check=False)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"worker for {spec['group']} @ {spec['resolution']} failed")
        return json.loads(result_path.read_text())


def plan_groups(modes: list[str]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """Worker groups: (group name, modes it serves, extra spec). Stock modes share one worker."""
    groups: list[tuple[str, list[str], dict[str, Any]]] = []
    stock = [m for m in modes if MODES[m].kind == "stock"]
    if stock:
        groups.append(("stock", stock, {"kind": "stock", "need_batch": "stock" in stock}))
    groups += [(m, [m], {"kind": "csa"}) for m in modes if MODES[m].kind == "csa"]
    return groups


def compose(
    mode: Mode, measured: dict[str, Any], frames: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Story totals for `frames` frames from per-forward medians (one record's numbers)."""
    r, steps, cuda = args.id_length, args.steps, args.device == "cuda"
    fw = measured["forwards"]
    extra: dict[str, Any] = {}
    if mode.window:
        from storycli.consistency.csa import window_starts

        counts = {"window": len(window_starts(frames, args.window, args.stride))}
        extra = {"window": args.window, "stride": args.stride}
    elif mode.name == "stock-single":
        counts = {"single": frames}
    elif mode.kind == "stock":
        counts = {"batch": 1, "single": frames - r}
    else:
        counts = {"write": 1, "read": frames - r}
    counts = {k: n for k, n in counts.items() if n > 0}
    total = sum(fw[k]["seconds"] * n for k, n in counts.items())
    peak = max(fw[k]["peak_bytes"] for k in counts)
    bank_step = measured.get("bank_bytes_per_step", 0)
    projected_bank = bank_step * banked_steps(steps)
    bank_on_measured_device = not (cuda and mode.placement == "cpu")
    projected_peak = peak + (projected_bank - bank_step if bank_on_measured_device else 0)
    if mode.window:  # the windowed call holds every frame's inputs and predictions
        projected_peak += 2 * max(0, frames - args.window) * measured["window_row_bytes"]
    return {
        **extra,
        "seconds_per_image_step": total / frames,
        "seconds_per_story_step": total,
        "seconds_per_forward": {k: fw[k]["seconds"] for k in counts},
        "forward_batch": {k: fw[k]["batch"] for k in counts},
        "forward_count": counts,
        "raw_seconds": {k: fw[k]["raw_seconds"] for k in counts},
        "peak_bytes": peak,
        "peak_bytes_by_forward": {k: fw[k]["peak_bytes"] for k in counts},
        "baseline_bytes": measured["baseline_bytes"],
        "peak_over_baseline_bytes": peak - measured["baseline_bytes"],
        "bank_bytes_per_step": bank_step,
        "projected_bank_bytes": projected_bank,
        "projected_peak_bytes": projected_peak,
        "bank_on_measured_device": bank_on_measured_device if mode.kind == "csa" else None,
    }


def default_args(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device == "cuda"
    quick = args.quick
    defaults = {
        "resolutions": [64] if quick else ([768, 1024] if cuda else [512]),
        "frames": [4, 8] if quick or not cuda else [4, 8, 16, 32, 64, 100],
        "dtype": "float32" if quick else ("float16" if cuda else "bfloat16"),
        "repeats": 2 if quick or not cuda else 5,
        "warmup": 1 if quick or not cuda else 2,
        "prime": 0 if quick else 1,
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
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults depend on --device (cpu: 512², frames 4 8, bf16, 1 warm-up + 2 repeats; "
        "cuda: 768² 1024², frames 4 … 100, fp16, 2 warm-up + 5 repeats).",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--resolutions", type=int, nargs="+", help="square image sizes in pixels")
    p.add_argument("--frames", type=int, nargs="+", help="story lengths")
    p.add_argument("--id-length", type=int, default=4, help="reference frames per character (R)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="default: all")
    p.add_argument("--repeats", type=int, help="timed forwards per kind (median is reported)")
    p.add_argument("--warmup", type=int, help="untimed forwards per kind before the timed ones")
    p.add_argument("--prime", type=int, help="untimed plain forwards per worker process first")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--window", type=int, default=4, help="window mode: frames per window")
    p.add_argument("--stride", type=int, default=2, help="window mode: frames between windows")
    p.add_argument("--steps", type=int, default=50, help="denoising steps, for the bank projection")
    p.add_argument("--seed", type=int, default=0, help="weights and CSA draws")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="tiny UNet at 64 px: a smoke test")
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="process (default): each mode in a fresh process, so peak memory is its own; "
        "none: one process (default for --quick)",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only rewrite the .md and .png of a results .json",
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

    from storycli.models import device_description

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    caps = csa_capabilities()
    date = dt.date.today().isoformat()
    stem = f"{args.device}-quick-{date}" if args.quick else f"{args.device}-{date}"
    if not args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = "tiny" if args.quick else "sdxl"

    runnable = [m for m in args.modes if unavailable_reason(MODES[m], caps) is None]
    skipped = {m: unavailable_reason(MODES[m], caps) for m in args.modes if m not in runnable}
    for m, why in skipped.items():
        print(f"skip {m}: {why}", file=sys.stderr)
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    device_label = None
    workers: list[dict[str, Any]] = []
    for res in args.resolutions:
        for group, served, extra in plan_groups(runnable):
            spec = {
                "group": group,
                "device": args.device,
                "dtype": args.dtype,
                "model": model,
                "resolution": res,
                "id_length": args.id_length,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "prime": args.prime,
                "seed": args.seed,
                "window": args.window,
                "stride": args.stride,
                **extra,
            }
            t = time.perf_counter()
            print(f"== {group} ({', '.join(served)}) at {res}px", file=sys.stderr, flush=True)
            result = run_isolated(spec) if args.isolate == "process" else run_worker(spec)
            print(f"   done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            device_label = result["device_name"]
            workers.append(
                {
                    "group": group,
                    "resolution": res,
                    "seconds": time.perf_counter() - t,
                    "build_seconds": result["build_seconds"],
                    "loadavg_before": result["loadavg_before"],
                    "loadavg_after": result["loadavg_after"],
                }
            )
            for m in served:
                measured[(m, res)] = result

    common = {
        "device_name": device_label or device_description(args.device),
        "device": args.device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": date,
        "model": "tiny (storycli.tiny, random weights)"
        if args.quick
        else "SDXL base UNet architecture (benchmarks/sdxl_unet_config.json), random weights",
        "dtype": args.dtype,
        "id_length": args.id_length,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prime": args.prime,
        "isolation": args.isolate,
    }
    records = []
    for res in args.resolutions:
        for m in args.modes:
            mode = MODES[m]
            for frames in args.frames:
                rec = {**common, "mode": m, "frames": frames, "resolution": res}
                if m in skipped:
                    rec.update(status="skipped", notes=skipped[m])
                    records.append(rec)
                    continue
                result = measured[(m, res)]
                rec.update(status="ok", **compose(mode, result, frames, args))
                rec["peak_metric"] = result["peak_metric"]
                rec["csa_settings"] = result.get("csa_settings")
                rec["bank_settings"] = result.get("bank_settings")
                rec["loadavg"] = [result["loadavg_before"], result["loadavg_after"]]
                rec["csa_source_sha1"] = result["csa_source_sha1"]
                rec["notes"] = notes_for(mode, result, frames, args)
                records.append(rec)

    payload = {
        "meta": {
            **common,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "wall_seconds": time.perf_counter() - started,
            "modes": {m: MODES[m].description for m in args.modes},
            "skipped": skipped,
            "workers": workers,
            "composition": COMPOSITION,
        },
        "records": records,
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
    fresh = {(r["mode"], r["resolution"]) for r in new["records"]}
    records = [r for r in old["records"] if (r["mode"], r["resolution"]) not in fresh]
    records += new["records"]
    order = list(MODES)
    records.sort(key=lambda r: (r["resolution"], order.index(r["mode"]), r["frames"]))
    om, nm = old["meta"], new["meta"]
    measured_now = {m for m, _ in fresh if m not in nm["skipped"]}
    meta = {
        **om,
        "command": f"{om['command']} && {nm['command']}",
        "wall_seconds": om["wall_seconds"] + nm["wall_seconds"],
        "modes": {**om["modes"], **nm["modes"]},
        "skipped": {
            **{m: why for m, why in om["skipped"].items() if m not in measured_now},
            **nm["skipped"],
        },
        "workers": om["workers"] + nm["workers"],
        "composition": nm["composition"],
    }
    return {"meta": meta, "records": records}


COMPOSITION = (
    "Per denoising step, a story of F frames with R reference frames runs: CSA reference mode: "
    "one write forward (batch 2R) + (F-R) read forwards (batch 2); CSA window mode: one forward "
    "of batch 2W per window (windows of W frames every S frames, the last one ending on the last "
    "frame); stock: one forward of batch 2R + (F-R) of batch 2; stock-single: F forwards of "
    "batch 2. Each forward kind is measured (median of repeats after warm-up) and story totals "
    "are composed from those medians: read frames, and windows, are identical work. "
    "seconds_per_image_step = story-step total / F. peak_bytes is the peak over the forwards the "
    "story uses, with one step's bank resident during reads; projected_bank_bytes = "
    "bank_bytes_per_step x the steps production CSA banks (steps - warmup_steps); "
    "projected_peak_bytes adds the rest of that bank when it lives in the measured memory, and "
    "in window mode the inputs and predictions of the frames beyond one window."
)


def notes_for(mode: Mode, result: dict[str, Any], frames: int, args: argparse.Namespace) -> str:
    parts = []
    reads = frames - args.id_length
    if mode.window:
        from storycli.consistency.csa import window_starts

        n = len(window_starts(frames, args.window, args.stride))
        parts.append(
            f"composed: {n} window forwards (batch {2 * args.window}) = {n} x the measured median; "
            f"projected peak adds the inputs and predictions of the {max(0, frames - args.window)} "
            "frames beyond one window (the windowed call holds all of them)"
        )
    elif reads > 1:
        what = "read" if mode.kind == "csa" else "batch-2"
        parts.append(f"composed: {reads} {what} forwards = {reads} x the measured median")
    if args.device == "cpu":
        parts.append("peak = process RSS high-water (VmHWM, reset per forward kind)")
        if not result.get("rss_peak_resettable", True):
            parts.append("VmHWM could not be reset: peak is since process start")
        if args.isolate == "none":
            parts.append("one process for all modes: RSS peaks may reuse freed memory")
    if mode.placement == "cpu" and args.device == "cpu":
        parts.append("bank placement cpu is the device itself here")
    if mode.placement == "cpu" and args.device == "cuda":
        parts.append("bank in pinned host memory; projected_bank_bytes is host memory")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _ok(records: list[dict], **match: Any) -> dict | None:
    for rec in records:
        if rec["status"] == "ok" and all(rec[k] == v for k, v in match.items()):
            return rec
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "—"


def markdown(payload: dict[str, Any]) -> str:
    meta, records = payload["meta"], payload["records"]
    lines = [
        f"# CSA benchmark — {meta['device']} — {meta['date']}",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, python {meta['python']}",
        f"- model: {meta['model']}, {meta['dtype']}",
        f"- id_length (R) {meta['id_length']}; {meta['repeats']} timed repeats after "
        f"{meta['warmup']} warm-up per forward kind ({meta['prime']} priming forward per "
        f"process); isolation: {meta['isolation']}; wall time {meta['wall_seconds']:.0f} s",
        f"- command: `{meta['command']}`",
        f"- CSA settings: every replaced (up-block) self-attention layer applies CSA at every "
        f"step (warmup_steps=0, prob 1.0: the worst case); projections use {meta['steps']} "
        "steps",
        "",
        meta["composition"],
        "",
        "Modes: " + "; ".join(f"**{m}** — {d}" for m, d in meta["modes"].items()) + ".",
        "",
    ]
    if meta["workers"]:
        lines.append(
            "Worker processes (1-minute load average before → after each; load beyond the "
            "worker's own threads means other work competed for the CPUs):"
        )
        lines.append("")
        for w in meta["workers"]:
            lines.append(
                f"- {w['group']} @ {w['resolution']}px: {w['seconds']:.0f} s "
                f"(UNet build {w['build_seconds']:.0f} s), load "
                f"{w['loadavg_before'][0]:.2f} → {w['loadavg_after'][0]:.2f}"
            )
        lines.append("")
    for m, why in meta["skipped"].items():
        lines.append(f"- **{m}** skipped: {why}")
    if meta["skipped"]:
        lines.append("")
    steps = meta["steps"]
    resolutions = sorted({r["resolution"] for r in records})
    for res in resolutions:
        lines += [
            f"## {res}×{res}",
            "",
            "| mode | frames | s / image-step | × stock | × stock-single | peak GiB | × stock "
            f"| projected {steps}-step story peak GiB | × stock | bank MiB / step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for rec in records:
            if rec["resolution"] != res or rec["status"] != "ok":
                continue
            stock = _ok(records, mode="stock", frames=rec["frames"], resolution=res)
            single = _ok(records, mode="stock-single", frames=rec["frames"], resolution=res)
            s = rec["seconds_per_image_step"]
            lines.append(
                f"| {rec['mode']} | {rec['frames']} | {s:.4g} "
                f"| {_ratio(s, stock and stock['seconds_per_image_step'])} "
                f"| {_ratio(s, single and single['seconds_per_image_step'])} "
                f"| {rec['peak_bytes'] / GIB:.3f} "
                f"| {_ratio(rec['peak_bytes'], stock and stock['peak_bytes'])} "
                f"| {rec['projected_peak_bytes'] / GIB:.3f} "
                f"| {_ratio(rec['projected_peak_bytes'], stock and stock['peak_bytes'])} "
                f"| {rec['bank_bytes_per_step'] / MIB:.1f} |"
            )
        lines += [
            "",
            "Per forward (median seconds; peak over that forward kind; baseline = memory once "
            "the UNet is built — read forwards run after the write, with its bank resident):",
            "",
        ]
        lines += ["| mode | forward | batch | seconds | peak GiB | over baseline MiB |"]
        lines += ["|---|---|---:|---:|---:|---:|"]
        seen = set()
        for rec in records:
            if rec["resolution"] != res or rec["status"] != "ok":
                continue
            for kind, sec in rec["seconds_per_forward"].items():
                key = (rec["mode"] if rec["mode"] != "stock-single" else "stock", kind)
                if key in seen:
                    continue
                seen.add(key)
                peak = rec["peak_bytes_by_forward"][kind]
                lines.append(
                    f"| {key[0]} | {kind} | {rec['forward_batch'][kind]} | {sec:.4g} "
                    f"| {peak / GIB:.3f} | {(peak - rec['baseline_bytes']) / MIB:.0f} |"
                )
        lines.append("")
    lines += targets(records, meta)
    return "\n".join(lines) + "\n"


def targets(records: list[dict], meta: dict[str, Any]) -> list[str]:
    """The issue's targets, checked where measured."""
    lines = [
        "## Targets",
        "",
        f"CSA (id_length {meta['id_length']}, {meta['steps']} steps) against `stock` with the "
        "same batching, at the largest story length measured. Memory: the measured one-step "
        "peak, and the projected whole-story peak (reference mode: every step banked; window "
        "mode: every frame's inputs held).",
        "",
        "| resolution | mode | frames | time × stock (≤ 1.15) | peak × stock (≤ 1.10) "
        "| projected peak × stock (≤ 1.10) |",
        "|---:|---|---:|---:|---:|---:|",
    ]

    def mark(value: float, limit: float) -> str:
        return f"{value:.3f} {'✅' if value <= limit else '❌'}"

    for res in sorted({r["resolution"] for r in records}):
        frames = max((r["frames"] for r in records if r["resolution"] == res), default=0)
        stock = _ok(records, mode="stock", frames=frames, resolution=res)
        for m in ("csa", "csa-bank-cpu", "csa-window"):
            rec = _ok(records, mode=m, frames=frames, resolution=res)
            if not rec or not stock:
                continue
            t = rec["seconds_per_image_step"] / stock["seconds_per_image_step"]
            p = rec["peak_bytes"] / stock["peak_bytes"]
            pp = rec["projected_peak_bytes"] / stock["peak_bytes"]
            lines.append(
                f"| {res} | {m} | {frames} | {mark(t, 1.15)} | {mark(p, 1.10)} | {mark(pp, 1.10)} |"
            )
    lines.append("")
    why = {
        "csa": "by construction, not a separate measurement: both stories run the same "
        "forwards (read frames are separate batch-2 forwards sharing one bank); the bank grows "
        "with steps, not frames",
        "csa-window": "projected: one window's measured peak plus every extra frame's inputs "
        "and predictions, which the windowed call holds",
    }
    for m, note in why.items():
        done = [r for r in records if r["status"] == "ok" and r["mode"] == m]
        for res in sorted({r["resolution"] for r in done}):
            by_frames = {r["frames"]: r for r in done if r["resolution"] == res}
            if 8 in by_frames and 100 in by_frames:
                ratio = (
                    by_frames[100]["projected_peak_bytes"] / by_frames[8]["projected_peak_bytes"]
                )
                lines.append(
                    f"- {m} {res}²: 100-frame story peak / 8-frame peak = {ratio:.3f} (≤ 1.05 "
                    f"{'✅' if ratio <= 1.05 else '❌'}); {note}."
                )
            else:
                lines.append(f"- {m} {res}²: 100 vs 8 frames not measured (needs --frames 8 100)")
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
    meta, records = payload["meta"], payload["records"]
    ok = [r for r in records if r["status"] == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series = sorted({(r["mode"], r["resolution"]) for r in ok}, key=lambda s: (s[1], s[0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (mode, res) in enumerate(series):
        rows = sorted(
            (r for r in ok if (r["mode"], r["resolution"]) == (mode, res)),
            key=lambda r: r["frames"],
        )
        x = [r["frames"] for r in rows]
        color = colors[i % len(colors)]
        label = f"{mode} {res}²"
        ax_t.plot(x, [r["seconds_per_image_step"] for r in rows], "o-", color=color, label=label)
        ax_m.plot(x, [r["peak_bytes"] / GIB for r in rows], "o-", color=color, label=label)
        if MODES[mode].kind == "csa":
            what = "all frames' inputs" if MODES[mode].window else f"{meta['steps']}-step bank"
            ax_m.plot(
                x,
                [r["projected_peak_bytes"] / GIB for r in rows],
                "x--",
                color=color,
                label=f"{label}, projected ({what})",
            )
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        xs = sorted({r["frames"] for r in ok})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("story length (frames)")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("seconds per image-step")
    ax_t.set_title("time per image per denoising step")
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title(
        "peak memory ("
        + ("CUDA max allocated" if meta["device"] == "cuda" else "process RSS")
        + ")"
    )
    ax_m.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"CSA vs stock SDXL UNet — {meta['device_name']} — {meta['dtype']}, R={meta['id_length']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
