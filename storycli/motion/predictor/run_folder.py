"""A `train-predictor` run folder (OUT): claiming it, recognising an earlier run, checkpoints,
run.json and metrics.json.

OUT is claimed through storycli.outputs (lock, leftovers of killed writes); this module adds
what is particular to training: which files make a run, which run may be continued (the same
options, or any with --resume), and checkpoint folders that are always complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from storycli.atomic import atomic_write_bytes, remove_temp_files
from storycli.motion.predictor.dataset import EmbeddingSet
from storycli.motion.predictor.model import MotionPredictor, PredictorConfig, save_predictor
from storycli.motion.predictor.options import TrainError, TrainHooks, TrainOptions
from storycli.outputs import RunFolder, discard, read_json, write_json

METRICS_NAME = "metrics.json"
RUN_NAME = "run.json"
STATE_NAME = "state.pt"
CHECKPOINTS = "checkpoints"
# What this module writes into OUT; run.json last, so a half-cleared folder is still recognised.
_OUT_NAMES = (METRICS_NAME, CHECKPOINTS, "predictor.safetensors", "predictor.json", RUN_NAME)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_OLD_TEMP_STEP = re.compile(r"^\.tmp-step_\d{6,}-[0-9a-f]{8}$")  # temp folders of earlier versions
# What a checkpoint's data and model depend on: resuming with other values is an error.
_FINGERPRINT = ("encoder", "frames", "fps", "short_side")
# Options that do not make a different run: the rest must match to continue one unasked.
_NOT_THE_RUN = ("resume", "overwrite")


def train_folder(out: Path) -> RunFolder:
    """OUT as storycli.outputs owns it: run.json its manifest, `_OUT_NAMES` its files (their
    temp files, and those of `discard`, are a killed run's leftovers)."""
    return RunFolder(out, RUN_NAME, owns=lambda name: name in _OUT_NAMES, error=TrainError)


def _run_files(out: Path) -> list[Path]:
    return [out / n for n in _OUT_NAMES if (out / n).exists()]


def clear_run(out: Path) -> None:
    """Delete the files of an earlier run (only those this module writes)."""
    for path in _run_files(out):
        discard(path)


def _remove_leftovers(out: Path) -> None:
    """Remove what killed runs leave in OUT: atomic-write temp files, temp and discarded
    checkpoint folders. Only names this module writes; the caller holds OUT's lock."""
    train_folder(out).remove_leftovers()
    root = out / CHECKPOINTS
    if root.is_dir():
        remove_temp_files(root, lambda name: _STEP_DIR.match(name) is not None)
        for path in root.iterdir():
            if _OLD_TEMP_STEP.match(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def checkpoint_steps(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in OUT, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(out: Path, step: int, state: dict, ema: MotionPredictor, keep: int) -> Path:
    """Write into a temp folder, then rename: a checkpoint folder is always complete."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.{secrets.token_hex(6)}.tmp"  # as atomic.py names temp files
    tmp.mkdir()
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(tmp / STATE_NAME, buffer.getvalue())
        save_predictor(ema, tmp)
        if final.exists():  # left by an earlier attempt that was resumed from before it
            discard(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_steps(out)[:-keep]:
        with contextlib.suppress(OSError):  # pruning is housekeeping: never fail the run
            discard(old)
    return final


def load_latest_state(out: Path, hooks: TrainHooks) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; a broken one is reported and the one before used."""
    for step, path in reversed(checkpoint_steps(out)):
        try:
            state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            hooks.note(f"checkpoint {path.name} is unreadable ({exc}); trying an older one")
            continue
        if state.get("step") == step:
            return state, path
    return None


def _read_run_info(out: Path) -> dict[str, Any]:
    return train_folder(out).read_manifest() or {}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.json's records; [] when there is none or it is unreadable."""
    data = read_json(out / METRICS_NAME)
    return data if isinstance(data, list) else []


def write_metrics(out: Path, records: list[dict[str, Any]]) -> None:
    write_json(out / METRICS_NAME, records, indent=1, ensure_ascii=True)


def fingerprint(options: TrainOptions) -> dict[str, Any]:
    """The options a checkpoint's data and model depend on (checked on resume)."""
    return {name: getattr(options, name) for name in _FINGERPRINT}


def _check_fingerprint(saved: dict[str, Any], options: TrainOptions, path: Path) -> None:
    current = fingerprint(options)
    diff = [
        f"{k} {saved.get(k)!r} -> {current[k]!r}"
        for k in _FINGERPRINT
        if saved.get(k) != current[k]
    ]
    if diff:
        raise TrainError(
            f"{path}: cannot resume with different settings ({'; '.join(diff)}); use the "
            "checkpoint's settings or a new output folder"
        )


def _options_json(options: TrainOptions) -> dict[str, Any]:
    return {f.name: _plain(getattr(options, f.name)) for f in fields(options)}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _check_size(config: PredictorConfig, options: TrainOptions, path: Path) -> None:
    """A predictor size given on resume must be the checkpoint's (None: take it from there)."""
    names = ("width", "layers", "heads", "dropout")
    diff = [
        f"{k} {getattr(config, k)!r} -> {getattr(options, k)!r}"
        for k in names
        if getattr(options, k) is not None and getattr(options, k) != getattr(config, k)
    ]
    if diff:
        raise TrainError(
            f"{path}: cannot resume with a different predictor size ({'; '.join(diff)}); "
            "leave the size options out or use a new output folder"
        )


def _check_same_unfinished_run(out: Path, existing: list[Path], options: TrainOptions) -> None:
    """Without --resume/--overwrite, OUT may only hold an unfinished run of these same options.

    That run is continued, as `generate` continues a story: rerunning the command that was
    interrupted is how a user resumes. Anything else could be another experiment: refused.
    """
    info = _read_run_info(out)
    status = info.get("status")
    if status != "running":
        what = "a finished training run" if status == "finished" else "a training run"
        further = " and a higher --max-steps" if status == "finished" else ""
        raise TrainError(
            f"{out} already holds {what} ({', '.join(p.name for p in existing)}); continue it "
            f"with --resume{further}, start over with --overwrite, or pick another folder"
        )
    saved = info.get("options") if isinstance(info.get("options"), dict) else {}
    current = _options_json(options)
    diff = [
        f"{k} {saved.get(k)!r} -> {v!r}"
        for k, v in current.items()
        if k not in _NOT_THE_RUN and saved.get(k) != v
    ]
    if diff:
        raise TrainError(
            f"{out} already holds an unfinished training run with other settings "
            f"({'; '.join(diff)}); continue it with --resume, start over with --overwrite, or "
            "pick another folder"
        )


def prepare_out(options: TrainOptions, hooks: TrainHooks) -> tuple[dict, Path] | None:
    """Check OUT against resume/overwrite; the checkpoint state to resume from, if any.

    Nothing is deleted here: an earlier run is cleared only once the data has loaded.
    """
    out = options.out
    existing = _run_files(out)
    resume = options.resume
    if existing and not (options.resume or options.overwrite):
        _check_same_unfinished_run(out, existing, options)
        resume = True
        hooks.note(f"{out} holds an unfinished run with these settings: continuing it")
    if options.overwrite:
        return None
    loaded = load_latest_state(out, hooks) if resume else None
    if loaded is None:
        if resume and existing:
            hooks.note(f"no usable checkpoint in {out}: starting a new run")
        return None
    state, path = loaded
    _check_fingerprint(state.get("fingerprint", {}), options, path)
    _check_size(PredictorConfig.from_dict(state["config"]), options, path)
    if state["step"] > options.max_steps:
        raise TrainError(
            f"{path}: the checkpoint is at step {state['step']}, past max_steps "
            f"{options.max_steps}; raise max_steps to continue"
        )
    return loaded


def claim_out(claim: contextlib.ExitStack, out: Path) -> None:
    """Lock OUT for this process (until `claim` closes) and clear killed runs' leftovers."""
    train_folder(out).lock(
        claim,
        "train-predictor",
        busy=(
            f"{out} is in use by another train-predictor run; wait for it to end or pick "
            "another folder"
        ),
    )
    _remove_leftovers(out)


def write_run_info(
    options: TrainOptions, config: PredictorConfig, data: EmbeddingSet, split: dict, status: str
) -> None:
    info = {
        "status": status,
        "options": _options_json(options),
        "predictor": asdict(config),
        "counts": data.counts,
        "skipped": [asdict(s) for s in data.skipped],
        "split": split,
    }
    train_folder(options.out).write_manifest(info, indent=1, ensure_ascii=True)
