"""`storydiff animate --decoder wan`: Wan2.1 FLF2V transitions, CPU and offline, no mocks.

The tiny random Wan pipeline (`wan_tiny.py`) renders real videos in seconds; the real 14B model
cannot run here, so only its preset and its offline "missing weights" sentence are tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from storycli.cli import app
from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.wan import frame_note, load_wan_decoder, resample_indices
from storycli.motion.presets import VideoPresetError, load_video_presets, resolve_video_preset
from storycli.motion.video.io import probe_mp4

SIZE = (64, 48)
TRANSITIONS = ["transition_01_02.mp4", "transition_02_03.mp4"]
TINY = ["--decoder", "wan", "--model", "tiny"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str | Path, code: int = 0) -> Any:
    result = CliRunner().invoke(app, ["animate", *(str(a) for a in args)])
    assert result.exit_code == code, (
        f"exit {result.exit_code}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def one_line_error(result: Any, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def noise_image(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture
def drawings(tmp_path: Path) -> Path:
    """A plain folder of three 64x48 keyframes (no manifest)."""
    folder = tmp_path / "drawings"
    folder.mkdir()
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        noise_image(seed).save(folder / name)
    return folder


def test_tiny_wan_writes_transitions_notes_the_frame_count_and_resumes(drawings: Path) -> None:
    out = drawings / "video"
    first = run_cli(drawings, *TINY, "--frames", "6")
    stderr = " ".join(first.stderr.split())
    assert "note: wan renders 4k+1 frames" in stderr
    assert "rendered at 9 frames and resampled to the 6 asked for" in stderr
    for name in TRANSITIONS:
        info = probe_mp4(out / name)
        assert (info.frames, info.width, info.height) == (6, *SIZE)
    story = probe_mp4(out / "story.mp4")
    assert story.frames == 16 * 3 + 4 * 2  # hold 1 s at the preset's 16 fps, 4 interior frames
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    decoder = manifest["decoder"]
    assert (decoder["decoder"], decoder["preset"], decoder["model"]) == ("wan", "wan-tiny", "tiny")
    assert [t["file"] for t in manifest["transitions"]] == TRANSITIONS

    again = run_cli(drawings, *TINY, "--frames", "6")
    assert "0 transition(s) made, 2 unchanged" in " ".join(again.stderr.split())


def test_no_note_when_the_frame_count_is_4k_plus_1() -> None:
    assert frame_note(5) is None and frame_note(9) is None
    assert frame_note(2) is not None and "rendered at 5 frames" in str(frame_note(2))


def test_predictor_is_refused_in_one_line(drawings: Path, tmp_path: Path) -> None:
    result = run_cli(drawings, *TINY, "--predictor", tmp_path / "smp", code=2)
    one_line_error(result, "--predictor", "wan decoder")
    assert not (drawings / "video").exists()


@pytest.mark.parametrize(
    ("model", "repo"),
    [(None, "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers"), ("some/uncached-wan", "some/uncached-wan")],
)
def test_missing_real_model_offline_names_hf_download(
    drawings: Path, hub_offline: None, model: str | None, repo: str
) -> None:
    extra = [] if model is None else ["--model", model]
    result = run_cli(drawings, "--decoder", "wan", *extra, "--frames", "5", code=1)
    one_line_error(result, f"`hf download {repo}`")
    assert not (drawings / "video").exists()


def test_transition_gives_the_frames_asked_for_seeded_with_progress() -> None:
    decoder = load_wan_decoder("tiny", device="cpu")
    request = TransitionRequest(
        noise_image(0), noise_image(1), frames=3, start_prompt="a fox", end_prompt="a fox sleeps"
    )
    steps: list[tuple[int, int]] = []
    frames = decoder.transition(request, on_step=lambda done, total: steps.append((done, total)))
    assert len(frames) == 3 and all(f.size == SIZE and f.mode == "RGB" for f in frames)
    assert steps == [(1, 2), (2, 2)]
    again = decoder.transition(request)
    assert [np.asarray(f).tolist() for f in frames] == [np.asarray(f).tolist() for f in again]
    other = decoder.transition(TransitionRequest(request.start, request.end, frames=3, seed=1))
    assert not np.array_equal(np.asarray(frames[1]), np.asarray(other[1]))


def test_resampling_keeps_both_ends() -> None:
    assert resample_indices(9, 6) == [0, 2, 3, 5, 6, 8]
    assert resample_indices(5, 5) == [0, 1, 2, 3, 4]
    assert resample_indices(5, 2) == [0, 4]


def test_wan_presets() -> None:
    presets = load_video_presets()
    real = presets["wan"]
    assert (real.decoder, real.base) == ("wan", "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers")
    assert (real.steps, real.guidance, real.fps) == (50, 5.0, 16)
    assert resolve_video_preset("tiny", presets, decoder="wan") is presets["wan-tiny"]
    assert resolve_video_preset("tiny", {}, decoder="wan").tiny
    custom = resolve_video_preset("./models/wan", presets, decoder="wan")
    assert (custom.base, custom.decoder, custom.steps) == ("./models/wan", "wan", 50)
    with pytest.raises(VideoPresetError, match="for the wan decoder"):
        resolve_video_preset("wan", presets)
