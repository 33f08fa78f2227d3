"""End-to-end tests of `storydiff animate` (stage two), CPU and offline, no mocks.

The keyframes come from a real tiny `storydiff generate` run (3 frames, 64x48); videos are real
H.264 encodes through ffmpeg, read back with `probe_mp4` / `read_frames`. Decoders: crossfade
(a pixel blend: the reference), the tiny random AnimateDiff stack, and a tiny motion predictor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from storycli.cli import app
from storycli.motion.animate import AnimateHooks, AnimateOptions, animate
from storycli.motion.predictor import MotionPredictor, PredictorConfig, save_predictor
from storycli.motion.video import probe_mp4, read_frames

KEYFRAME_FILES = ["frame_01.png", "frame_02.png", "frame_03.png"]
SIZE = (64, 48)  # the tiny preset renders 256x192 stories at 64 px on the long side
TRANSITIONS = ["transition_01_02.mp4", "transition_02_03.mp4"]
EMBED_DIM = 32  # the tiny image encoder's projection_dim
TINY_MAX_FRAMES = 32  # the tiny motion adapter's motion_max_seq_length


# ---------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str | Path, code: int = 0) -> Any:
    result = CliRunner().invoke(app, ["animate", *(str(a) for a in args)])
    assert result.exit_code == code, (
        f"exit {result.exit_code}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def run_json(*args: str | Path) -> dict[str, Any]:
    return json.loads(run_cli(*args, "--json").stdout)


def names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def decoded(path: Path, fps: int = 8) -> np.ndarray:
    """The frames of an MP4 as float arrays (L, H, W, 3), as stored (padding included)."""
    return np.stack([np.asarray(f, dtype=np.float32) for f in read_frames(path, fps, None)])


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def coarse(x: np.ndarray, k: int = 4) -> np.ndarray:
    """kxk block means: yuv420p halves the chroma resolution, so on the tiny model's pixel
    noise per-pixel errors are large (~18) while 4x4 blocks come back within ~2 levels."""
    h, w = x.shape[0] // k * k, x.shape[1] // k * k
    return x[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))


def codec_error(a: np.ndarray, b: np.ndarray) -> float:
    return mae(coarse(a), coarse(b))


CODEC_TOLERANCE = 2.5


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: os.replace gives a rewritten file a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth random colours (upscaled 8x8 noise): compresses well, differs per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def image_folder(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    for seed, (name, size) in enumerate(sizes.items()):
        noise_image(size, seed).save(folder / name)
    return folder


def copy_keyframes(src: Path, dst: Path) -> Path:
    """A generate folder of our own (without the shared run's video/)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("video"))
    return dst


def save_tiny_predictor(path: Path, dim: int = EMBED_DIM, random_head: bool = False) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MotionPredictor(PredictorConfig.tiny(dim=dim, encoder="tiny"))
        if random_head:  # a "trained" predictor: the zero-initialised head made non-zero
            torch.nn.init.normal_(model.head.weight, std=0.5)
            torch.nn.init.normal_(model.head.bias, std=0.5)
    save_predictor(model, path)
    return path


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny `generate` run: frame_01..03.png and manifest.json, 64x48."""
    from storycli.generate import GenerateOptions, generate_story

    root = tmp_path_factory.mktemp("generate")
    story = root / "story.yaml"
    story.write_text(
        yaml.safe_dump(
            {
                "name": "fox",
                "model": "tiny",
                "characters": {"Fox": "a small orange fox"},
                "frames": ["[Fox] runs in the snow", "[Fox] sits on a rock", "[Fox] sleeps"],
                "seed": 3,
                "noise": "per-frame",
                "width": 256,
                "height": 192,
                "steps": 2,
                "consistency": {"method": "none"},
            }
        ),
        encoding="utf-8",
    )
    result = generate_story(story, GenerateOptions(out=root / "out", model="tiny", device="cpu"))
    folder = result.folder
    assert sorted(p.name for p in folder.glob("frame_*.png")) == KEYFRAME_FILES
    return folder


@pytest.fixture
def drawings(tmp_path: Path) -> Path:
    """A plain folder of two 32x32 images (no manifest)."""
    return image_folder(tmp_path / "drawings", {"a.png": (32, 32), "b.png": (32, 32)})


@pytest.fixture(scope="module")
def crossfade_run(keyframes: Path) -> dict[str, Any]:
    result = run_cli(keyframes, "--decoder", "crossfade", "--frames", "6", "--fps", "8")
    result = run_cli(
        keyframes, "--decoder", "crossfade", "--frames", "6", "--fps", "8", "--hold", "0.5"
    )
    return {"result": result, "folder": keyframes / "video"}


@pytest.fixture(scope="module")
def animatediff_run(keyframes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AnimateDiff decoder without a predictor: the linear-baseline run."""
    out = tmp_path_factory.mktemp("animatediff") / "baseline"
    run_cli(keyframes, "--decoder", "animatediff", "--model", "tiny", "--frames", "8", "-o", out)
    return out


# ------------------------------------------------------------------- 1. crossfade, end to end


def test_crossfade_writes_transitions_story_and_manifest(crossfade_run: dict[str, Any]) -> None:
    folder = crossfade_run["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*TRANSITIONS, "story.mp4", "animate.json"]
    )  # no temp files (.-prefixed) left behind
    for name in TRANSITIONS:
        info = probe_mp4(folder / name)
        assert (info.frames, info.width, info.height, info.fps) == (6, *SIZE, 8.0)
    held, count, frames = round(0.5 * 8), len(KEYFRAME_FILES), 6
    story = probe_mp4(folder / "story.mp4")
    assert story.frames == held * count + (frames - 1) * (count - 1) == 22
    assert (story.width, story.height) == SIZE

    manifest = json.loads((folder / "animate.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is True
    assert manifest["keyframes"] == str(folder.parent.resolve())
    assert manifest["keyframe_files"] == KEYFRAME_FILES  # the generate manifest's order
    assert manifest["decoder"] == {"decoder": "crossfade"}
    assert (manifest["frames"], manifest["fps"], manifest["hold"]) == (6, 8, 0.5)
    assert [(t["file"], t["from"], t["to"]) for t in manifest["transitions"]] == [
        (TRANSITIONS[0], "frame_01.png", "frame_02.png"),
        (TRANSITIONS[1], "frame_02.png", "frame_03.png"),
    ]
    # The --hold 0.5 run replaced the --hold 1 one: same transitions, a new story.mp4.
    assert "0 transition(s) made, 2 unchanged" in " ".join(crossfade_run["result"].stderr.split())


def test_crossfade_frames_are_the_pixel_blend(crossfade_run: dict[str, Any]) -> None:
    folder = crossfade_run["folder"]
    start, end = (rgb(folder.parent / name) for name in KEYFRAME_FILES[:2])
    frames = decoded(folder / TRANSITIONS[0])
    assert frames.shape == (6, SIZE[1], SIZE[0], 3)
    blends = [np.rint(start + (end - start) * tau) for tau in np.linspace(0, 1, 6)]
    assert codec_error(start, end) > 10  # far enough apart for the blends to differ
    for i, frame in enumerate(frames):
        errors = [codec_error(frame, blend) for blend in blends]
        assert errors[i] < CODEC_TOLERANCE, f"frame {i}: {errors}"
        assert int(np.argmin(errors)) == i, f"frame {i}: {errors}"  # not some other τ
    middle = frames[3]  # τ = 0.6
    assert codec_error(middle, start) > 3 * CODEC_TOLERANCE
    assert codec_error(middle, end) > 2 * CODEC_TOLERANCE

    story = decoded(folder / "story.mp4")
    held = 4
    for index, keyframe in [(0, 0), (held - 1, 0), (held + 5, 1), (2 * held + 4, 1), (-1, 2)]:
        image = rgb(folder.parent / KEYFRAME_FILES[keyframe])
        assert codec_error(story[index], image) < CODEC_TOLERANCE, f"story frame {index}"
    # Right after the first hold comes the transition's second frame (its first is skipped),
    # read back from transition_01_02.mp4.
    assert codec_error(story[held], frames[1]) < CODEC_TOLERANCE
    assert int(np.argmin([codec_error(story[held], blend) for blend in blends])) == 1


# ---------------------------------------------------------------- 2-3. animatediff + predictor


def test_animatediff_tiny_writes_videos_and_records_the_decoder(
    animatediff_run: Path, keyframes: Path
) -> None:
    for name in TRANSITIONS:
        info = probe_mp4(animatediff_run / name)
        assert (info.frames, info.width, info.height) == (8, *SIZE)
    story = probe_mp4(animatediff_run / "story.mp4")
    assert story.frames == 8 * 3 + 7 * 2  # hold 1 s at the preset's 8 fps
    manifest = json.loads((animatediff_run / "animate.json").read_text(encoding="utf-8"))
    decoder = manifest["decoder"]
    assert (decoder["decoder"], decoder["preset"], decoder["image_encoder"]) == (
        "animatediff",
        "tiny",
        "tiny",
    )
    assert "predictor" not in decoder
    keys = [t["key"] for t in manifest["transitions"]]
    assert len(set(keys)) == 2 and all(len(k) == 16 for k in keys)
    assert [t["file"] for t in manifest["transitions"]] == TRANSITIONS
    assert all(t["frames"] == 8 for t in manifest["transitions"])
    assert len({t["seed"] for t in manifest["transitions"]}) == 2  # one seed per transition
    assert manifest["keyframes"] == str(keyframes.resolve())


def test_predictor_embeddings_reach_the_decoder(
    animatediff_run: Path, keyframes: Path, tmp_path: Path
) -> None:
    args = [keyframes, "--decoder", "animatediff", "--model", "tiny", "--frames", "8"]
    zero = save_tiny_predictor(tmp_path / "zero")
    trained = save_tiny_predictor(tmp_path / "trained", random_head=True)
    run_cli(*args, "--predictor", zero, "-o", tmp_path / "zero-run")
    run_cli(*args, "--predictor", trained / "predictor.safetensors", "-o", tmp_path / "run")

    for name in TRANSITIONS:
        baseline = decoded(animatediff_run / name)
        # An untrained predictor is exactly the linear baseline: the same frames, bit for bit.
        assert np.array_equal(decoded(tmp_path / "zero-run" / name), baseline)
        predicted = decoded(tmp_path / "run" / name)
        assert mae(predicted[1:-1], baseline[1:-1]) > 1.0, name

    manifest = json.loads((tmp_path / "run" / "animate.json").read_text(encoding="utf-8"))
    assert manifest["decoder"]["predictor"] == str((trained / "predictor.safetensors").resolve())
    assert len(manifest["decoder"]["predictor_sha256"]) == 64
    baseline_keys = json.loads((animatediff_run / "animate.json").read_text())["transitions"]
    assert {t["key"] for t in manifest["transitions"]}.isdisjoint(t["key"] for t in baseline_keys)


def test_crossfade_notes_that_it_ignores_a_predictor(drawings: Path, tmp_path: Path) -> None:
    checkpoint = save_tiny_predictor(tmp_path / "predictor")
    result = run_cli(drawings, "--frames", "3", "--predictor", checkpoint)
    assert "note: --predictor ignored: the crossfade decoder does not use embeddings" in (
        " ".join(result.stderr.split())
    )
    manifest = json.loads((drawings / "video" / "animate.json").read_text(encoding="utf-8"))
    assert manifest["decoder"] == {"decoder": "crossfade"}


# ----------------------------------------------------------------------------------- 4. resume


def test_resume_keeps_unchanged_transitions(keyframes: Path, tmp_path: Path) -> None:
    folder = copy_keyframes(keyframes, tmp_path / "kf")
    out = tmp_path / "out"
    args = [folder, "--frames", "4", "-o", out]
    first = run_json(*args)
    assert names(first["generated"]) == [*TRANSITIONS, "story.mp4"]
    before = stamps(out)

    # The same run again: nothing is made, and the progress bar still reaches 2/2.
    again = run_cli(*args)
    assert "0 transition(s) made, 2 unchanged" in " ".join(again.stderr.split())
    assert any("transitions" in line and "2/2" in line for line in again.stderr.splitlines())
    kept: list[str] = []
    written: list[str] = []
    hooks = AnimateHooks(
        on_kept=lambda p: kept.append(p.name), on_written=lambda p: written.append(p.name)
    )
    result = animate(AnimateOptions(folder, out=out, frames=4), hooks)
    assert (kept, written, result.generated) == (TRANSITIONS, [], [])
    after = stamps(out)
    for name in [*TRANSITIONS, "story.mp4"]:
        assert after[name] == before[name], name

    # A different image under the last keyframe's name: only the transition touching it.
    noise_image(SIZE, 99).save(folder / KEYFRAME_FILES[2])
    third = run_json(*args)
    assert names(third["generated"]) == [TRANSITIONS[1], "story.mp4"]
    now = stamps(out)
    assert now[TRANSITIONS[0]] == before[TRANSITIONS[0]]
    assert now[TRANSITIONS[1]] != before[TRANSITIONS[1]]
    assert now["story.mp4"] != before["story.mp4"]
    last = decoded(out / TRANSITIONS[1])[-1]
    assert codec_error(last, rgb(folder / KEYFRAME_FILES[2])) < CODEC_TOLERANCE

    everything = run_json(*args, "--overwrite")
    assert names(everything["generated"]) == [*TRANSITIONS, "story.mp4"]
    final = stamps(out)
    assert all(final[n] != now[n] for n in [*TRANSITIONS, "story.mp4"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- 5. any folder of images


def test_plain_folder_in_name_order_with_mixed_sizes(tmp_path: Path) -> None:
    # 40x30 is not a multiple of 16: the videos are padded to 48x32.
    folder = image_folder(
        tmp_path / "drawings", {"b.png": (40, 30), "a.png": (40, 30), "c.jpg": (64, 48)}
    )
    (folder / ".hidden.png").write_bytes(b"not an image")  # hidden files are not keyframes
    (folder / "notes.txt").write_text("not an image either", encoding="utf-8")
    result = run_cli(folder, "--frames", "4", "--hold", "0.25")
    assert "note: resized c.jpg to 40x30 (the first keyframe's size)" in result.stderr
    assert result.stdout == ""
    out = folder / "video"
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    assert manifest["keyframe_files"] == ["a.png", "b.png", "c.jpg"]
    assert manifest["size"] == [40, 30]
    for name in TRANSITIONS:
        info = probe_mp4(out / name)
        assert (info.frames, info.width, info.height) == (4, 48, 32)
    assert probe_mp4(out / "story.mp4").frames == 2 * 3 + 3 * 2
    first = decoded(out / TRANSITIONS[0])[0, :30, :40]  # the padding cropped off
    assert codec_error(first, rgb(folder / "a.png")) < CODEC_TOLERANCE


# --------------------------------------------------------------------------------- 6. bad input


def assert_refused(result: Any, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("setup", "needles"),
    [
        ("one-keyframe", ["drawings", "1 keyframe(s) found"]),
        ("corrupt-image", ["b.png", "not a readable image"]),
        ("listed-frame-missing", ["frame_02.png", "manifest.json", "storydiff generate"]),
    ],
)
def test_bad_keyframes_are_refused_and_nothing_is_written(
    drawings: Path, keyframes: Path, tmp_path: Path, setup: str, needles: list[str]
) -> None:
    folder = drawings
    if setup == "one-keyframe":
        (folder / "b.png").unlink()
    elif setup == "corrupt-image":
        (folder / "b.png").write_bytes(np.random.default_rng(0).bytes(2000))
    else:
        folder = copy_keyframes(keyframes, tmp_path / "kf")
        (folder / "frame_02.png").unlink()
    before = tree(folder)
    assert_refused(run_cli(folder, code=2), *needles)
    assert tree(folder) == before and not (folder / "video").exists()


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    assert_refused(run_cli(missing, "-o", tmp_path / "out", code=2), str(missing))
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_predictor_of_another_width_is_refused(drawings: Path, tmp_path: Path) -> None:
    checkpoint = save_tiny_predictor(tmp_path / "narrow", dim=16)
    args = ["--decoder", "animatediff", "--model", "tiny", "--frames", "4"]
    result = run_cli(drawings, *args, "--predictor", checkpoint, code=2)
    assert_refused(result, "narrow", "16-d", f"{EMBED_DIM}-d")
    assert not (drawings / "video").exists()


@pytest.mark.parametrize("decoder", [["crossfade"], ["animatediff", "--model", "tiny"]])
def test_missing_predictor_is_refused_for_any_decoder(
    drawings: Path, tmp_path: Path, decoder: list[str]
) -> None:
    # Checked before the decoder loads, also for crossfade (which would ignore a predictor).
    missing = tmp_path / "no-such-predictor"
    result = run_cli(drawings, "--decoder", *decoder, "--predictor", missing, code=2)
    assert_refused(result, str(missing), "train-predictor")
    assert not (drawings / "video").exists()


def test_uncached_vae_is_missing_weights(drawings: Path, tmp_path: Path, hub_offline: None) -> None:
    result = run_cli(drawings, "--decoder", "latent-slerp", "--model", "some/uncached-vae", code=1)
    assert_refused(result, "some/uncached-vae", "`hf download some/uncached-vae`")
    assert not (drawings / "video").exists()


def test_output_of_other_keyframes_is_not_replaced(
    drawings: Path, keyframes: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shared"
    run_cli(drawings, "--frames", "3", "-o", out)
    before = tree(out)
    result = run_cli(keyframes, "--frames", "3", "-o", out, code=2)
    assert_refused(result, str(out), "other keyframes", "--overwrite")
    assert tree(out) == before


def test_unreadable_animate_manifest_is_not_replaced(drawings: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "animate.json").write_text("{", encoding="utf-8")
    assert_refused(run_cli(drawings, "-o", out, code=2), "animate.json", "--overwrite")
    assert tree(out) == {"animate.json": b"{"}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--decoder", "nope"], ["--decoder nope", "crossfade"]),
        (
            ["--decoder", "animatediff", "--model", "tiny", "--frames", "40"],
            ["--frames 40", f"at most {TINY_MAX_FRAMES}"],
        ),
        (["--offload", "half"], ["--offload half"]),
    ],
)
def test_bad_options_are_refused(drawings: Path, args: list[str], needles: list[str]) -> None:
    assert_refused(run_cli(drawings, *args, code=2), *needles)
    assert not (drawings / "video").exists()


# ------------------------------------------------------------------------------------ 7. --json


def test_json_summary_on_stdout_only(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "drawings", {"a.png": (32, 32), "b.png": (48, 48)})
    result = run_cli(folder, "--frames", "3", "--json")
    summary = json.loads(result.stdout)  # stdout is the JSON document and nothing else
    out = folder / "video"
    assert summary["folder"] == str(out)
    assert summary["decoder"] == {"decoder": "crossfade"}
    assert summary["transitions"] == [str(out / "transition_01_02.mp4")]
    assert summary["generated"] == [str(out / "transition_01_02.mp4"), str(out / "story.mp4")]
    assert summary["story"] == str(out / "story.mp4")
    assert summary["seconds"] >= 0
    # Notes still go to stderr; no progress bars, no "done" line.
    assert result.stderr.strip() == "note: resized b.png to 32x32 (the first keyframe's size)"
