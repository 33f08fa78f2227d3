#!/usr/bin/env python
"""Benchmark training the Semantic Motion Predictor on synthetic videos.

Writes a folder of synthetic moving-shape videos (``storycli.motion.video.synthetic``), encodes it
with
the offline ``tiny`` CLIP tower (random weights, 32-d: nothing is downloaded) and trains the
predictor with ``storycli.motion.predictor.train.train_predictor``, exactly as ``storydiff`` does.
Reports:

* validation gain over the linear baseline, 1 − MSE_pred / MSE_lerp, against the training step;
* validation error against the position in the clip (τ) for the predictor, lerp and slerp;
* training throughput (clips/s on cached embeddings: sampling + forward + backward + AdamW +
  EMA), from the runs and from a sweep over batch sizes;
* encode throughput (frames/s: decode + tiny encoder + cache write; and the encoder alone).

Usage::

    python benchmarks/motion.py                          # tiny + mid predictors, CPU, ≈ 3 min
    python benchmarks/motion.py --quick --out-dir /tmp/b  # seconds: smoke test
    python benchmarks/motion.py --report benchmarks/results/motion-cpu-2026-11-21.json

Results go to ``<out-dir>/motion-<device>-<date>.{json,md,png}`` (``motion-<device>-quick-<date>``
for --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Predictor sizes on the tiny encoder's 32-d embeddings: (width, layers, heads, lr).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "layers": 2, "heads": 4, "lr": 1e-3},
    "mid": {"width": 256, "layers": 4, "heads": 8, "lr": 5e-4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default 64)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each video")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--sweep", type=int, nargs="*", default=None, help="batch sizes to time")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are small, more threads mostly add "
        "synchronisation; 0 = torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="keep the dataset here (else a temp)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="12 videos, 40 steps, tiny only")
    p.add_argument("--report", type=Path, default=None, help="rewrite .md/.png of a results file")
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (40 if quick else 600)
    args.videos = args.videos or (12 if quick else 64)
    args.models = args.models or (["tiny"] if quick else ["tiny", "mid"])
    args.sweep = args.sweep if args.sweep is not None else ([32] if quick else [32, 128, 512])
    return args


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def encoder_throughput(device: str, frames: int = 256) -> dict[str, Any]:
    """The tiny encoder alone on 64×64 frames (no decoding, no cache)."""
    from storycli.motion.video.synthetic import synthetic_clip
    from storycli.weights.image_encoder import load_image_encoder

    encoder = load_image_encoder("tiny", device)
    images = synthetic_clip(0, frames)
    encoder.encode(images[:32])  # warm-up
    started = time.perf_counter()
    encoder.encode(images)
    seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": seconds, "frames_per_second": frames / seconds}


def train_run(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One train_predictor run; its metrics history and throughput."""
    from storycli.motion.predictor.model import load_predictor
    from storycli.motion.predictor.train import TrainHooks, TrainOptions, train_predictor

    size = MODELS[name]
    options = TrainOptions(
        data=data,
        out=out,
        encoder="tiny",
        device=args.device,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=size["lr"],
        warmup_steps=max(1, args.steps // 10),
        eval_every=max(1, args.steps // 10),
        checkpoint_every=args.steps,
        val_fraction=0.25,
        val_clips=256,
        max_clip_seconds=min(4.0, args.seconds - 0.5),
        seed=args.seed,
        width=size["width"],
        layers=size["layers"],
        heads=size["heads"],
    )

    def on_eval(record: dict[str, Any]) -> None:
        say(f"   {name} step {record['step']:>5}: gain {record['gain']:+.4f}")

    started = time.perf_counter()
    result = train_predictor(options, TrainHooks(on_eval=on_eval, on_note=lambda m: say(f"   {m}")))
    history = json.loads(result.metrics_path.read_text())
    model = load_predictor(result.predictor_path)
    return {
        "model": name,
        "config": dataclasses.asdict(result.config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "batch_size": args.batch_size,
        "lr": size["lr"],
        "seconds": time.perf_counter() - started,
        "clips_per_second": result.clips_per_second,
        "encode_frames_per_second": result.encode_frames_per_second,
        "counts": result.counts,
        "history": [{k: v for k, v in r.items() if k != "val_mse_by_position"} for r in history],
        "final": history[-1],
    }


def throughput_sweep(
    data: Path, run: dict[str, Any], batches: list[int], device: str, budget: float = 4.0
) -> list[dict[str, Any]]:
    """Clips/s of training steps on the cached embeddings at several batch sizes.

    After 2 warm-up steps, as many timed steps as fit in `budget` seconds (3 to 20).
    """
    import numpy as np
    import torch

    from storycli.motion.predictor.dataset import ClipSampler, ClipSettings, build_embedding_cache
    from storycli.motion.predictor.model import MotionPredictor, PredictorConfig
    from storycli.motion.predictor.train import predictor_loss
    from storycli.weights.image_encoder import load_image_encoder

    cached = build_embedding_cache(data, load_image_encoder("tiny", device), min_frames=16)
    # As training does for the tiny encoder: no cut/static checks (its cosines are all ≈ 0.99).
    settings = ClipSettings(max_seconds=2.5, cut_cos=-1.0, static_cos=1.0)
    sampler = ClipSampler([v.embeddings for v in cached.videos], settings)
    config = PredictorConfig(**run["config"])
    rows = []
    for batch in batches:
        model = MotionPredictor(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)

        def step(model=model, optimizer=optimizer, rng=rng, batch=batch) -> None:
            clips = sampler.sample(batch, rng)
            pred = model(clips.start.to(device), clips.end.to(device), config.frames)
            loss = predictor_loss(pred, clips.target.to(device), config.scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        steps = max(3, min(20, math.ceil(budget / (time.perf_counter() - started))))
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - started) / steps
        rows.append(
            {
                "model": run["model"],
                "batch_size": batch,
                "timed_steps": steps,
                "seconds_per_step": seconds,
                "clips_per_second": batch / seconds,
            }
        )
        say(f"   {run['model']} batch {batch}: {batch / seconds:,.0f} clips/s")
    return rows


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        payload = json.loads(args.report.read_text())
        write_reports(payload, args.report)
        return 0
    import torch

    from storycli.motion.video.synthetic import write_synthetic_dataset
    from storycli.weights.devices import device_description

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    date = dt.date.today().isoformat()
    stem = f"motion-{args.device}-quick-{date}" if args.quick else f"motion-{args.device}-{date}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), loadavg()
    with tempfile.TemporaryDirectory(prefix="storydiff-motion-bench-") as tmp:
        data = args.data or Path(tmp) / "videos"
        t = time.perf_counter()
        write_synthetic_dataset(data, args.videos, seconds=args.seconds, fps=8, seed=args.seed)
        write_seconds = time.perf_counter() - t
        say(f"== {args.videos} synthetic videos written in {write_seconds:.1f} s")
        encoder = encoder_throughput(args.device)
        say(f"== tiny encoder alone: {encoder['frames_per_second']:.0f} frames/s")
        runs, sweep = [], []
        for name in args.models:
            say(f"== training {name} for {args.steps} steps")
            runs.append(train_run(name, data, Path(tmp) / f"run-{name}", args))
            sweep += throughput_sweep(data, runs[-1], args.sweep, args.device)
    payload = {
        "meta": {
            "device": args.device,
            "device_name": device_description(args.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": date,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "threads": torch.get_num_threads(),
            "loadavg": [load_before, loadavg()],
            "wall_seconds": time.perf_counter() - started,
            "dataset": {
                "videos": args.videos,
                "seconds": args.seconds,
                "fps": 8,
                "size": [64, 64],
                "seed": args.seed,
                "write_seconds": write_seconds,
            },
            "encoder": "tiny (random 32-d CLIP vision tower, storycli.motion.encoder)",
            "encode": {
                # The first run encodes every video (the later ones hit the cache).
                "decode_encode_frames_per_second": runs[0]["encode_frames_per_second"],
                "encoder_only": encoder,
            },
            "frames": 16,
            "batch_size": args.batch_size,
        },
        "runs": runs,
        "throughput": sweep,
    }
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    written = write_reports(payload, json_path)
    say(f"wrote {', '.join(str(p) for p in written)}; total {time.perf_counter() - started:.0f} s")
    return 0


def write_reports(payload: dict[str, Any], json_path: Path) -> list[Path]:
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(payload))
    png_path = json_path.with_suffix(".png")
    return [json_path, md_path] + ([png_path] if plot(payload, png_path) else [])


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    meta, runs = payload["meta"], payload["runs"]
    ds, enc = meta["dataset"], meta["encode"]
    lines = [
        f"# Motion predictor training benchmark — {meta['device']} — {meta['date']}",
        "",
        f"- device: {meta['device_name']}",
        f"- torch {meta['torch']}, python {meta['python']}; "
        f"1-minute load average {_f(meta['loadavg'][0], 2)} → {_f(meta['loadavg'][1], 2)}",
        f"- data: {ds['videos']} synthetic videos × {ds['seconds']:g} s at {ds['fps']} fps, "
        f"{ds['size'][0]}×{ds['size'][1]} px (seed {ds['seed']}), 25 % of the videos held out",
        f"- encoder: {meta['encoder']}",
        f"- clips: {meta['frames']} frames over 1–{min(4.0, ds['seconds'] - 0.5):g} s, "
        f"batch {meta['batch_size']}; metrics on 256 fixed validation clips, interior frames",
        f"- command: `{meta['command']}`; wall time {meta['wall_seconds']:.0f} s",
        "",
        "## Result per predictor",
        "",
        "| predictor | width × layers | parameters | steps | lr | gain vs lerp | best gain (step) "
        "| gain of slerp | val MSE pred | val MSE lerp | val cos pred | val cos lerp "
        "| train clips/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        f, c = run["final"], run["config"]
        best = max(run["history"], key=lambda h: h["gain"])
        lines.append(
            f"| {run['model']} | {c['width']} × {c['layers']} | {run['parameters']:,} "
            f"| {run['steps']} | {run['lr']:g} | {f['gain']:+.4f} "
            f"| {best['gain']:+.4f} ({best['step']}) | {f['gain_slerp']:+.4f} "
            f"| {f['val_mse_predictor']:.4g} | {f['val_mse_lerp']:.4g} "
            f"| {f['val_cos_predictor']:.5f} | {f['val_cos_lerp']:.5f} "
            f"| {_f(run['clips_per_second'], 0)} |"
        )
    lines += ["", "## Gain vs step", "", "| step | " + " | ".join(r["model"] for r in runs) + " |"]
    lines.append("|---:|" + "---:|" * len(runs))
    steps = sorted({h["step"] for r in runs for h in r["history"]})
    for step in steps:
        cells = [_gain_at(r, step) for r in runs]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += _position_table(runs)
    lines += [
        "",
        "## Throughput",
        "",
        f"- encode (decode with ffmpeg + tiny encoder + cache write): "
        f"{_f(enc['decode_encode_frames_per_second'], 0)} frames/s; tiny encoder alone "
        f"{enc['encoder_only']['frames_per_second']:.0f} frames/s (64 px frames)",
        "",
        "Training steps on cached embeddings (clip sampling + forward + backward + AdamW; "
        "3–20 timed steps after 2 warm-up):",
        "",
        "| predictor | batch | timed steps | s / step | clips/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in payload["throughput"]:
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row.get('timed_steps', 20)} "
            f"| {row['seconds_per_step']:.4f} | {row['clips_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def _position_table(runs: list[dict[str, Any]]) -> list[str]:
    """Validation MSE by τ for each predictor, lerp and slerp (from the final records)."""
    first = runs[0]["final"]["val_mse_by_position"]
    header = " | ".join(f"{r['model']}" for r in runs)
    lines = [
        "",
        "## Validation MSE by position in the clip (final step)",
        "",
        f"| τ | {header} | lerp | slerp |",
        "|---:|" + "---:|" * (len(runs) + 2),
    ]
    for i, tau in enumerate(first["tau"]):
        cells = [f"{r['final']['val_mse_by_position']['predictor'][i]:.4g}" for r in runs]
        cells += [f"{first['lerp'][i]:.4g}", f"{first['slerp'][i]:.4g}"]
        lines.append(f"| {tau:.3f} | " + " | ".join(cells) + " |")
    return lines


def _gain_at(run: dict[str, Any], step: int) -> str:
    for h in run["history"]:
        if h["step"] == step:
            return f"{h['gain']:+.4f}"
    return "–"


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def plot(payload: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    meta, runs = payload["meta"], payload["runs"]
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(12, 4.8))
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        ax_g.plot(steps, [h["gain"] for h in run["history"]], "o-", label=run["model"])
        by = run["final"]["val_mse_by_position"]
        ax_p.plot(by["tau"], by["predictor"], "o-", label=f"predictor ({run['model']})")
    ax_g.plot(
        [h["step"] for h in runs[0]["history"]],
        [h["gain_slerp"] for h in runs[0]["history"]],
        "k:",
        label="slerp",
    )
    by = runs[0]["final"]["val_mse_by_position"]
    ax_p.plot(by["tau"], by["lerp"], "k--", label="lerp")
    ax_p.plot(by["tau"], by["slerp"], "k:", label="slerp")
    ax_g.axhline(0.0, color="grey", lw=0.8)
    ax_g.set_xlabel("training step")
    ax_g.set_ylabel("gain = 1 − MSE_pred / MSE_lerp")
    ax_g.set_title("validation gain over lerp")
    ax_p.set_xlabel("τ (position in the clip)")
    ax_p.set_ylabel("validation MSE (raw embedding units)")
    ax_p.set_title("error by position, final step")
    for ax in (ax_g, ax_p):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Motion predictor on synthetic videos, tiny encoder — {meta['device_name']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
