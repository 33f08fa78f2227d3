"""The GPU check's runs that are benchmark scripts of their own, each in a fresh process killed at
its timeout, and the targets read from their results (`benchmarks/gpu_check.py` runs them between
its `storydiff generate` runs):

- ``dit``: issue 22's FLUX.1 DiT benchmark, ``benchmarks/csa_dit.py`` (per-forward CSA / stock,
  whole-story peaks in bfloat16 and with a Q8_0 GGUF transformer); its ``csa-dit-*.json`` /
  ``.md`` go to the check's ``--out`` beside its own files;
- ``forward``: issue 19's per-forward CSA / stock on SDXL's UNet at 1024², R = 4, CSA in every
  up-block layer, ``benchmarks/csa.py``;
- ``consistory``: issue 19's ConsiStory+ protocol, stock and CSA seconds per image,
  ``storydiff bench consistory-plus --limit 1`` on the check's random-weight SDXL folder (CLIP
  scores from the tiny CLIP: with random weights only the time and the peak mean anything).

The last two write into the check's work folder; what the targets need is kept in the check's
own JSON (the device tool brings back at most 8 files). Also here: the process helpers the
check's `generate` runs share.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = "import sys; sys.argv[0]='storydiff'; from storycli.cli import main; main()"
GIB = 2**30
TINY_CAP = 120  # seconds any run may take in --tiny mode

# Issue 22's targets (FLUX.1 DiT).
DIT_TIME = 1.15  # CSA / stock time per image, FLUX.1 size, 1024²
DIT_GGUF_GIB = 17.0  # story peak with a Q8_0 GGUF transformer
DIT_OFFLOAD_BYTES = 16e9  # the same with --offload model: fits a 16 GB card
# Issue 19's targets read from scripts.
FORWARD_RATIO = 1.10  # per-forward CSA / stock at 1024², R = 4, every layer, each kind
FORWARD_KINDS = ("write", "read-1", "read-2", "read-4")
CONSISTORY_RATIO = 1.12  # ConsiStory+ protocol: CSA / stock seconds per image


@dataclass(frozen=True)
class Script:
    """A benchmark script the check runs: what `--only` calls it, its log label, the seconds
    it may take on the GPU (cap) and the least budget left to start it."""

    name: str
    label: str
    cap: float
    min_start: float


# On the H200 (estimated, not measured): the DiT ≈ 60 s in bfloat16 (12 B built on the GPU ≈ 5 s,
# the forwards ≈ 15 s, four 1024² stories ≈ 20 s, imports ≈ 10 s) + the Q8_0 GGUF part ≈ 60-90 s
# (a 13 GB file drawn on the GPU, written to /dev/shm, loaded; four stories); csa.py ≈ 40 s
# (a UNet built, 5 rounds of 4 kinds × 2 sides); ConsiStory+ with 1 set × 5 images × 50 steps
# × 2 methods ≈ 2 s an image + a model load per method ≈ 45 s.
SCRIPTS = {
    "dit": Script("dit", "FLUX.1 DiT (csa_dit.py)", cap=270, min_start=90),
    "forward": Script("forward", "SDXL per forward (csa.py)", cap=150, min_start=45),
    "consistory": Script(
        "consistory", "ConsiStory+ (bench consistory-plus)", cap=150, min_start=45
    ),
}


def log(t0: float, message: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {message}", flush=True)


def tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def target(
    name: str, limit: str, measured: Any, met: bool | None, detail: str = ""
) -> dict[str, Any]:
    return {"target": name, "limit": limit, "measured": measured, "met": met, "detail": detail}


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", TERMINAL_WIDTH="200")
    return env


def storydiff(args: list[str], timeout: float, log: Path) -> tuple[int | None, float, str, str]:
    """Run `storydiff ARGS` in a fresh process (its own process group, killed whole at the
    timeout): exit code (None: timed out), wall seconds, stdout, stderr."""
    return python(["-c", CLI, *args], timeout, log)


def python(args: list[str], timeout: float, log: Path) -> tuple[int | None, float, str, str]:
    """Run `python ARGS` as `storydiff` runs (see there)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_file, err_file = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    started = time.perf_counter()
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=cli_env(),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # compile workers included
            proc.wait()
            code = None
    wall = time.perf_counter() - started
    return code, wall, out_file.read_text(errors="replace"), err_file.read_text(errors="replace")


# --------------------------------------------------------------------------------------------
# Running a script
# --------------------------------------------------------------------------------------------


def run_script(
    script: Script,
    command: Callable[[float], list[str]],
    results: tuple[Path, str],
    args: argparse.Namespace,
    work: Path,
    deadline: float,
    t0: float,
    keep: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: data,
) -> dict[str, Any]:
    """`python COMMAND(timeout)` in its own process, unless the budget is spent; then the
    newest file matching `results` (folder, glob) that it wrote, read and passed through `keep`.
    Returns what the check records: status, wall, timeout, arguments, stderr tail (when it did
    not exit 0) and the results (whatever it saved if it was killed)."""
    left = deadline - time.perf_counter()
    record: dict[str, Any] = {"status": "not run", "label": script.label}
    if left < (5 if args.tiny else script.min_start):
        return record | {"note": f"budget spent ({args.budget_s:g} s)"}
    timeout = min(TINY_CAP if args.tiny else script.cap, left)
    argv = command(timeout)
    log(t0, f"{script.label} (timeout {timeout:.0f} s) …")
    started = time.time()
    code, wall, _, stderr = python(argv, timeout, work / "logs" / script.name)
    status = "ok" if code == 0 else "timed out" if code is None else "failed"
    record |= {"status": status, "wall_s": round(wall, 1), "timeout_s": round(timeout, 1)}
    record["args"] = argv
    if code != 0:
        record["stderr_tail"] = tail(stderr)
    folder, pattern = results
    found = [p for p in folder.glob(pattern) if p.stat().st_mtime >= started - 1]
    if found:
        path = max(found, key=lambda p: p.stat().st_mtime)
        record["results_file"] = path.name
        try:
            record["results"] = keep(json.loads(path.read_text()))
        except (ValueError, KeyError) as exc:  # a stale or half-written file
            record["note"] = f"unreadable results: {exc!r}"
    log(t0, f"{script.label}: {status}, wall {wall:.1f} s, results {record.get('results_file')}")
    return record


def run_dit(
    args: argparse.Namespace, device: str, work: Path, deadline: float, t0: float
) -> dict[str, Any]:
    """`benchmarks/csa_dit.py` (the real-size FLUX.1 transformer, or the tiny one with --tiny);
    its JSON and .md go to `--out` beside the check's."""
    out = args.out.resolve()  # the process runs in the checkout's root

    def command(timeout: float) -> list[str]:
        # It starts no story in its last 30 s (a 1024² story ≈ 5-10 s), so it ends by itself.
        argv = [str(HERE / "csa_dit.py"), "--out", str(out)]
        argv += ["--budget-s", f"{max(timeout - 30, 1):.0f}"]
        return argv + (["--tiny"] if args.tiny else ["--device", device])

    return run_script(SCRIPTS["dit"], command, (out, "csa-dit-*.json"), args, work, deadline, t0)


def run_forward(args: argparse.Namespace, work: Path, deadline: float, t0: float) -> dict[str, Any]:
    """`benchmarks/csa.py` in CSA mode: SDXL's UNet at 1024², R = 4, 3 timed rounds on the
    first GPU, csa.py's only CUDA choice (--tiny: its `--quick` smoke test on the tiny UNet)."""
    out = work / "forward"

    def command(_timeout: float) -> list[str]:
        argv = [str(HERE / "csa.py"), "--modes", "csa", "--out", str(out)]
        if args.tiny:
            return [*argv, "--quick"]
        return [*argv, "--device", "cuda", "--resolutions", "1024", "--repeats", "3"]

    return run_script(SCRIPTS["forward"], command, (out, "*.json"), args, work, deadline, t0)


def run_consistory(
    args: argparse.Namespace,
    device: str,
    model: str,
    work: Path,
    deadline: float,
    t0: float,
) -> dict[str, Any]:
    """`storydiff bench consistory-plus` on `model`, stock and CSA, the first set (5 images) at
    the protocol's settings (50 steps, 1024², CFG 5; --tiny: 2 steps, 64²), scored with the
    tiny CLIP; the methods' summaries are kept."""
    out = work / "consistory"

    def command(_timeout: float) -> list[str]:
        argv = ["-c", CLI, "bench", "consistory-plus", "--model", model, "--clip", "tiny"]
        argv += ["--methods", "none,storydiffusion", "--out", str(out), "--overwrite"]
        argv += ["--device", device]
        if args.tiny:
            return [*argv, "--limit", "1", "--steps", "2", "--size", "64x64"]
        return [*argv, "--limit", "1", "--dtype", "float16"]

    def keep(data: dict[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in ("model", "device", "sets", "methods")}

    script = SCRIPTS["consistory"]
    results = (out, "consistory_plus.json")
    return run_script(script, command, results, args, work, deadline, t0, keep)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def on_gpu(meta: dict[str, Any]) -> bool:
    """Whether the check's numbers are GPU numbers (verdicts are given only then)."""
    return not meta.get("tiny") and str(meta.get("device", "")).startswith("cuda")


def status_of(record: dict[str, Any]) -> str:
    return record["status"] + (f": {record['note']}" if record.get("note") else "")


def dit_targets(dit: dict[str, Any] | None, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 22's targets from csa_dit.py's results; verdicts only from a GPU run."""
    if not dit:
        return []
    results = dit.get("results") or {}
    gpu, status = on_gpu(meta), status_of(dit)
    size = (results.get("meta") or {}).get("size", "?")
    label = f"FLUX.1 DiT, {size}²" + (" (tiny)" if meta.get("tiny") else "")
    rows = []
    forward = results.get("forward") or {}
    stories = forward.get("stories") or []
    longest = [s for s in stories if s["frames"] == max(x["frames"] for x in stories)]
    time_label = f"{label}: CSA / stock time per image"
    if longest:
        # At the story loop's GPU read micro-batch (4) when measured, else the largest.
        best = max(longest, key=lambda s: (s["micro_batch"] == 4, s["micro_batch"]))
        detail = f"{best['frames']} frames, read micro-batch {best['micro_batch']}"
        value = round(best["ratio"], 3)
        met = best["ratio"] <= DIT_TIME if gpu else None
        rows.append(target(time_label, f"≤ {DIT_TIME}", value, met, detail))
    else:
        rows.append(target(time_label, f"≤ {DIT_TIME}", None, None, status))
    summary = (results.get("story") or {}).get("summary") or {}
    peak, limit = summary.get("csa_longest_peak_bytes"), summary.get("peak_limit_bytes")
    peak_label = f"{label}: CSA story peak ≤ transformer weights + 4 GiB"
    if peak is not None and limit:
        detail = f"{summary['csa_longest_frames']} frames; limit {limit / GIB:.2f} GiB"
        met = peak <= limit if gpu else None
        rows.append(
            target(peak_label, f"≤ {limit / GIB:.2f} GiB", round(peak / GIB, 3), met, detail)
        )
    else:
        rows.append(target(peak_label, "weights + 4 GiB", None, None, status))
    growth = (summary.get("growth") or {}).get("storydiffusion")
    flat_label = f"{label}: CSA story peak flat in frames (longest / shortest)"
    if growth:
        detail = f"{growth['frames'][0]} → {growth['frames'][1]} frames"
        met = growth["ratio"] <= 1.01 if gpu else None
        rows.append(target(flat_label, "≤ 1.01", round(growth["ratio"], 4), met, detail))
    else:
        rows.append(target(flat_label, "≤ 1.01", None, None, status))
    gguf = results.get("gguf") or {}
    gguf_peak = (gguf.get("summary") or {}).get("csa_longest_peak_bytes")
    gguf_label = f"{label}: Q8_0 GGUF transformer, CSA story peak"
    if gguf_peak is not None:
        detail = f"{gguf['summary']['csa_longest_frames']} frames"
        met = gguf_peak <= DIT_GGUF_GIB * GIB if gpu else None
        rows.append(
            target(gguf_label, f"≤ {DIT_GGUF_GIB:g} GiB", round(gguf_peak / GIB, 3), met, detail)
        )
    else:
        rows.append(
            target(gguf_label, f"≤ {DIT_GGUF_GIB:g} GiB", None, None, gguf.get("note", status))
        )
    offload = gguf.get("offload_model")
    offload_label = f"{label}: Q8_0 GGUF with --offload model, CSA story peak"
    if offload:
        peak = offload["peak_bytes"]
        met = peak <= DIT_OFFLOAD_BYTES if gpu else None
        detail = f"{offload['frames']} frames ({peak / 1e9:.2f} GB)"
        rows.append(target(offload_label, "≤ 16 GB", round(peak / GIB, 3), met, detail))
    else:
        rows.append(target(offload_label, "≤ 16 GB", None, None, gguf.get("note", status)))
    return rows


def forward_targets(record: dict[str, Any] | None, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-forward CSA / stock of each kind at the largest resolution csa.py measured (the
    median of its stock/CSA pairs' ratios)."""
    if not record:
        return []
    forwards = [f for f in (record.get("results") or {}).get("forwards", []) if f["mode"] == "csa"]
    limit = f"≤ {FORWARD_RATIO:.2f}"
    if not forwards:
        return [target("SDXL per forward: CSA / stock", limit, None, None, status_of(record))]
    size = max(f["resolution"] for f in forwards)
    r = (record["results"].get("meta") or {}).get("id_length", "?")
    tiny = " (tiny)" if meta.get("tiny") else ""
    rows = []
    for f in forwards:
        if f["resolution"] != size or f["kind"] not in FORWARD_KINDS:
            continue
        label = f"SDXL per forward, {size}², R = {r}{tiny}: CSA / stock, {f['kind']}"
        detail = f"stock {f['stock_seconds']:.4g} s, CSA {f['csa_seconds']:.4g} s (medians)"
        met = f["ratio"] <= FORWARD_RATIO if on_gpu(meta) else None
        rows.append(target(label, limit, round(f["ratio"], 3), met, detail))
    return rows


def consistory_targets(record: dict[str, Any] | None, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """ConsiStory+ protocol: CSA / stock seconds per image."""
    if not record:
        return []
    methods = (record.get("results") or {}).get("methods") or {}
    stock, csa = methods.get("none"), methods.get("storydiffusion")
    label = "ConsiStory+ protocol" + (" (tiny)" if meta.get("tiny") else "")
    label += ": CSA / stock seconds per image"
    limit = f"≤ {CONSISTORY_RATIO:.2f}"
    if not (stock and csa and stock.get("seconds_per_image")):
        return [target(label, limit, None, None, status_of(record))]
    value = csa["seconds_per_image"] / stock["seconds_per_image"]
    detail = (
        f"{stock['images']} images each; stock {stock['seconds_per_image']} s "
        f"({stock['peak_memory_gb']} GB), CSA {csa['seconds_per_image']} s "
        f"({csa['peak_memory_gb']} GB); methods run one after the other"
    )
    met = value <= CONSISTORY_RATIO if on_gpu(meta) else None
    return [target(label, limit, round(value, 3), met, detail)]
