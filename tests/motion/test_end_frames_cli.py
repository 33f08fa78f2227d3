"""`storydiff animate --decoder wan|ltx` from the command line, on the tiny random pipelines:
transitions, the frame-count note, resume (also after a SIGKILL), the manifest, bad input.

The real Wan2.1 14B and LTX-Video models cannot run here: their presets and their offline
"missing weights" sentences are tested; the same code paths load them on a user's machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from animate_runs import kill_while_encoding, noise_keyframes, temp_files
from cli_runs import run_cli
from PIL import Image

from storycli.motion.presets import load_video_presets, resolve_video_preset
from storycli.motion.video.io import probe_mp4

SIZE = (64, 48)
TRANSITIONS = ["transition_01_02.mp4", "transition_02_03.mp4"]
DECODERS = pytest.mark.parametrize(
    ("decoder", "render", "fps"), [("wan", 9, 16), ("ltx", 9, 24)], ids=["wan", "ltx"]
)
REAL = {"wan": "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", "ltx": "Lightricks/LTX-Video-0.9.5"}

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(result, *needles: str) -> None:
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


@DECODERS
def test_tiny_writes_transitions_notes_the_frame_count_and_resumes(
    drawings: Path, decoder: str, render: int, fps: int
) -> None:
    out = drawings / "video"
    first = run_cli("animate", drawings, "--decoder", decoder, "--model", "tiny", "--frames", "6")
    stderr = " ".join(first.stderr.split())
    assert f"rendered at {render} frames and resampled to the 6 asked for" in stderr
    for name in TRANSITIONS:
        info = probe_mp4(out / name)
        assert (info.frames, info.width, info.height, info.fps) == (6, *SIZE, fps)
    story = probe_mp4(out / "story.mp4")
    assert story.frames == fps * 3 + 4 * 2  # each keyframe held 1 s, 4 interior frames each
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    described = manifest["decoder"]
    assert (described["decoder"], described["preset"], described["model"]) == (
        decoder,
        f"{decoder}-tiny",
        "tiny",
    )
    assert [t["file"] for t in manifest["transitions"]] == TRANSITIONS
    for record in manifest["transitions"]:  # on the CPU the process's peak stands in
        assert record["peak_memory_kind"] == "process_peak_rss"
        assert record["peak_memory_bytes"] > 10 * 2**20

    again = run_cli("animate", drawings, "--decoder", decoder, "--model", "tiny", "--frames", "6")
    assert "0 transition(s) made, 2 unchanged" in " ".join(again.stderr.split())

    # `storydiff evaluate` scores these videos as any decoder's.
    scores = json.loads(run_cli("evaluate", out, "--clip", "tiny", "--json").stdout)["video"]
    assert scores["decoder"]["decoder"] == decoder
    assert [t["file"] for t in scores["transitions"]] == TRANSITIONS
    for key in ("clipsim_first", "clipsim_frames", "start_fidelity", "end_fidelity"):
        assert -1.0 <= scores[key] <= 1.0, key
    assert scores["motion"] > 0  # the frames change


def lists_first(out: Path) -> bool:
    try:
        manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not there yet (it is replaced atomically: never partial)
        return False
    return any(t["file"] == "transition_01_02.mp4" for t in manifest["transitions"])


@DECODERS
def test_killed_while_writing_resumes_with_the_same_command(
    tmp_path: Path, decoder: str, render: int, fps: int
) -> None:
    folder = noise_keyframes(tmp_path / "kf", 3)
    out = tmp_path / "out"
    args = [str(folder), "--decoder", decoder, "--model", "tiny", "--frames", "9", "-o", str(out)]
    args += ["--hold", "0"]
    # Killed once the manifest lists the first transition: the second is being made or
    # written (or, the tiny models being fast, already written, with story.mp4 to come).
    kill_while_encoding(args, out, "", tmp_path / "log", ready=lambda: lists_first(out))
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is False
    done = [t["file"] for t in manifest["transitions"]]
    assert done[0] == "transition_01_02.mp4"
    first = (out / "transition_01_02.mp4").stat().st_mtime_ns

    # The same command again (in process: the kill above was of a real process).
    summary = json.loads(run_cli("animate", *args, "--json").stdout)
    remade = [Path(p).name for p in summary["generated"]]
    assert remade == [*(t for t in TRANSITIONS if t not in done), "story.mp4"]
    assert (out / "transition_01_02.mp4").stat().st_mtime_ns == first  # kept, not remade
    assert not temp_files(out)
    assert probe_mp4(out / "story.mp4").frames == 3 + 2 * 7
    assert json.loads((out / "animate.json").read_text(encoding="utf-8"))["complete"] is True


@pytest.mark.parametrize("decoder", ["wan", "ltx"])
@pytest.mark.parametrize("model", [None, "some/uncached-model"])
def test_missing_real_model_offline_names_hf_download(
    drawings: Path, hub_offline: None, decoder: str, model: str | None
) -> None:
    repo = model or REAL[decoder]
    extra = [] if model is None else ["--model", model]
    result = run_cli("animate", drawings, "--decoder", decoder, *extra, "--frames", "9", code=1)
    one_line_error(result, f"`hf download {repo}`")
    assert not (drawings / "video").exists()


@pytest.mark.parametrize("decoder", ["wan", "ltx"])
def test_missing_local_folder_is_named(drawings: Path, decoder: str) -> None:
    result = run_cli(
        "animate", drawings, "--decoder", decoder, "--model", "./no/such/model", "--frames", "9",
        code=1,
    )  # fmt: skip
    one_line_error(result, "'./no/such/model' does not exist", "hf download")
    assert not (drawings / "video").exists()


def test_ltx_refuses_a_single_step(drawings: Path) -> None:
    args = ["--decoder", "ltx", "--model", "tiny", "--steps", "1", "--frames", "9"]
    result = run_cli("animate", drawings, *args, code=2)
    one_line_error(result, "--steps 2 or more")
    assert not (drawings / "video").exists()


def test_presets_of_the_real_models() -> None:
    presets = load_video_presets()
    wan, ltx = presets["wan"], presets["ltx"]
    assert (wan.decoder, wan.base, wan.area) == ("wan", REAL["wan"], 1280 * 720)
    assert (wan.steps, wan.guidance, wan.fps) == (50, 5.0, 16)
    assert (ltx.decoder, ltx.base, ltx.area) == ("ltx", REAL["ltx"], 768 * 512)
    assert (ltx.steps, ltx.guidance, ltx.fps) == (40, 3.0, 24)
    for decoder in ("wan", "ltx"):
        assert resolve_video_preset("tiny", presets, decoder=decoder) is presets[f"{decoder}-tiny"]
        custom = resolve_video_preset("./models/x", presets, decoder=decoder)
        assert (custom.base, custom.decoder, custom.area) == (
            "./models/x",
            decoder,
            presets[decoder].area,
        )


@pytest.mark.parametrize(("decoder", "label"), [("wan", "Wan model"), ("ltx", "LTX-Video model")])
def test_a_folder_without_a_pipeline_is_refused_in_one_line(
    drawings: Path, tmp_path: Path, decoder: str, label: str
) -> None:
    broken = tmp_path / "half-download"
    (broken / "transformer").mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json", encoding="utf-8")
    args = ["--decoder", decoder, "--model", str(broken), "--frames", "9"]
    result = run_cli("animate", drawings, *args, code=1)
    one_line_error(result, f"Cannot load the {label} from {broken}")
    assert not (drawings / "video").exists()


def test_a_preset_of_the_other_decoder_is_refused(drawings: Path) -> None:
    result = run_cli(
        "animate", drawings, "--decoder", "ltx", "--model", "wan", "--frames", "9", code=2
    )
    one_line_error(result, "video preset 'wan' is for the wan decoder", "--decoder wan")
