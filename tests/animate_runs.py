"""Running `storydiff animate` from the tests as a user's process would: a subprocess that can
be SIGKILLed mid-video (`kill_while_encoding`) and rerun (`rerun`), and the tiny motion predictor
checkpoint the animate tests feed it (`save_tiny_predictor`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from storycli.motion.predictor.model import MotionPredictor, PredictorConfig, save_predictor

EMBED_DIM = 32  # the tiny image encoder's projection_dim


def save_tiny_predictor(path: Path, dim: int = EMBED_DIM, random_head: bool = False) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MotionPredictor(PredictorConfig.tiny(dim=dim, encoder="tiny"))
        if random_head:  # a "trained" predictor: the zero-initialised head made non-zero
            torch.nn.init.normal_(model.head.weight, std=0.5)
            torch.nn.init.normal_(model.head.bias, std=0.5)
    save_predictor(model, path)
    return path


ANIMATE_COMMAND = [sys.executable, "-c", "from storycli.cli import main; main()", "animate"]


def noise_keyframes(folder: Path, count: int, size: tuple[int, int] = (192, 144)) -> Path:
    """Pixel noise: the slowest content for x264, so an encode lasts long enough to be caught."""
    folder.mkdir(parents=True)
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"key_{seed}.png")
    return folder


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def animate_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}


def holds_data(folder: Path, pattern: str) -> bool:
    for path in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):  # renamed onto its target meanwhile
            if path.stat().st_size > 0:
                return True
    return False


def kill_while_encoding(
    args: list[str], out: Path, temp_glob: str, log: Path, ready: Callable[[], bool] | None = None
) -> None:
    """Start `storydiff animate`, SIGKILL it once `temp_glob` (the temp file of an MP4 being
    encoded) holds data, or once `ready()` when given, then wait until the ffmpeg it leaves
    behind has exited too."""
    with log.open("wb") as stream:
        proc = subprocess.Popen(
            [*ANIMATE_COMMAND, *args],
            stdout=stream,
            stderr=stream,
            env=animate_env(),
            start_new_session=True,  # its own process group: the orphaned ffmpeg is findable
        )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if ready() if ready else out.is_dir() and holds_data(out, temp_glob):
                break
            time.sleep(0.005)
        assert proc.poll() is None, (
            f"animate ended before {temp_glob} was caught:\n{log.read_text()}"
        )
        os.kill(proc.pid, signal.SIGKILL)  # only the Python process, as the OOM killer would
        proc.wait()
        # ffmpeg sees EOF on its stdin and finishes the temp file. Bounded: where no init
        # reaps orphans it lingers as a zombie, and the rerun must cope with it either way.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL


def rerun(args: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*ANIMATE_COMMAND, *args], capture_output=True, text=True, env=animate_env(), timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    return result
