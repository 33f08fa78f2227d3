"""End-to-end tests of `storydiff animate` (stage two), CPU and offline, no mocks.

The keyframes come from a real tiny `storydiff generate` run (3 frames, 64x48); videos are real
H.264 encodes through ffmpeg, read back with `probe_mp4` / `read_frames`. Decoders: crossfade
(a pixel blend: the reference), the tiny random AnimateDiff stack, and a tiny motion predictor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from animate_runs import (
    EMBED_DIM,
    kill_while_encoding,
    noise_keyframes,
    rerun,
    save_tiny_predictor,
    temp_files,
)
from PIL import Image
from typer.testing import CliRunner

from storycli.atomic import _open_temp
from storycli.cli import app
from storycli.motion.animate import AnimateError, AnimateHooks, AnimateOptions, animate
from storycli.motion.video.io import _reserve_temp, probe_mp4, read_frames

KEYFRAME_FILES = ["frame_01.png", "frame_02.png", "frame_03.png"]
SIZE = (64, 48)  # the tiny preset renders 256x192 stories at 64 px on the long side
TRANSITIONS = ["transition_01_02.mp4", "transition_02_03.mp4"]
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


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny `generate` run: frame_01..03.png and manifest.json, 64x48."""
    from storycli.keyframes.generate import GenerateOptions, generate_story

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
    # Each keyframe held, each transition's interior frames between them.
    assert story.frames == held * count + (frames - 2) * (count - 1) == 20
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
    second = held + 4  # keyframe 2's hold starts after the 4 interior frames
    for index, keyframe in [(0, 0), (held - 1, 0), (second, 1), (second + held - 1, 1), (-1, 2)]:
        image = rgb(folder.parent / KEYFRAME_FILES[keyframe])
        assert codec_error(story[index], image) < CODEC_TOLERANCE, f"story frame {index}"
    # Right after the first hold comes the transition's second frame (its first is the keyframe
    # just held, so it is skipped), read back from transition_01_02.mp4.
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
    assert story.frames == 8 * 3 + 6 * 2  # hold 1 s at the preset's 8 fps, 6 interior frames
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
    assert probe_mp4(out / "story.mp4").frames == 2 * 3 + 2 * 2
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


def test_json_summary_carries_schema_version(drawings: Path) -> None:
    summary = run_json(drawings, "--frames", "2", "--hold", "0")
    assert summary["schema_version"] == 1  # like generate's summary
    assert summary["removed"] == []


# ------------------------------------------------------------------ 8. resume after a SIGKILL


def test_killed_during_the_first_transition_resumes(tmp_path: Path) -> None:
    folder = noise_keyframes(tmp_path / "kf", 2)
    out = tmp_path / "out"
    args = [str(folder), "--frames", "40", "--hold", "0", "-o", str(out)]
    kill_while_encoding(args, out, ".transition_01_02.mp4.*.tmp.mp4", tmp_path / "log")
    assert temp_files(out), "the kill left no temp file: nothing was tested"
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is False  # written before the first transition: claims the folder

    result = rerun(args)
    assert "leftover temp file" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["transition_01_02.mp4", "story.mp4", "animate.json"]
    )
    assert probe_mp4(out / "transition_01_02.mp4").frames == 40
    assert probe_mp4(out / "story.mp4").frames == 2 + 38
    assert json.loads((out / "animate.json").read_text(encoding="utf-8"))["complete"] is True


def test_killed_after_the_first_transition_keeps_it_and_leaves_no_temp_files(
    tmp_path: Path,
) -> None:
    folder = noise_keyframes(tmp_path / "kf", 3)
    out = tmp_path / "out"
    args = [str(folder), "--frames", "30", "--hold", "0", "-o", str(out)]
    kill_while_encoding(args, out, ".transition_02_03.mp4.*.tmp.mp4", tmp_path / "log")
    assert temp_files(out), "the kill left no temp file: nothing was tested"
    first = stamps(out)["transition_01_02.mp4"]

    summary = json.loads(rerun([*args, "--json"]).stdout)
    assert names(summary["generated"]) == ["transition_02_03.mp4", "story.mp4"]
    assert stamps(out)["transition_01_02.mp4"] == first  # kept, not remade
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*TRANSITIONS, "story.mp4", "animate.json"]
    )
    assert probe_mp4(out / "story.mp4").frames == 3 + 2 * 28


def test_rerun_removes_only_its_own_temp_files(drawings: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [drawings, "--frames", "2", "-o", out]
    run_cli(*args)
    ours = [
        _reserve_temp(out / "transition_01_02.mp4"),  # motion/video/io.py's pattern
        _reserve_temp(out / "story.mp4"),
    ]
    fd, manifest_temp = _open_temp(out / "animate.json")  # atomic.py's pattern
    os.close(fd)
    ours.append(manifest_temp)
    theirs = [
        _reserve_temp(out / "holiday.mp4"),  # not a name animate writes
        out / ".transition_01_02.mp4.nothexnothex.tmp.mp4",
        out / ".transition_01_02.mp4.0123456789abc.tmp.mp4",  # 13 hex digits
        out / ".story.mp4.0123456789ab.tmp",  # story.mp4 is never written by atomic.py
        out / ".animate.json.0123456789ab.tmp.mp4",
        out / "notes.0123456789ab.tmp",
    ]
    for path in theirs[1:]:
        path.write_bytes(b"someone else's")
    (out / ".transition_02_03.mp4.0123456789ab.tmp.mp4").mkdir()  # a folder, not a temp file
    result = run_cli(*args)
    assert not any(p.exists() for p in ours)
    assert all(p.is_file() for p in theirs)
    assert (out / ".transition_02_03.mp4.0123456789ab.tmp.mp4").is_dir()
    text = " ".join(result.stderr.split())
    assert "removed 3 leftover temp file(s) of an interrupted run" in text, text

    # Killed while writing the very first animate.json: only its temp file is there.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fd, _ = _open_temp(fresh / "animate.json")
    os.close(fd)
    run_cli(drawings, "--frames", "2", "-o", fresh)
    assert sorted(p.name for p in fresh.iterdir()) == [
        "animate.json",
        "story.mp4",
        "transition_01_02.mp4",
    ]


# -------------------------------------------------------------- 9. story.mp4 shows every keyframe


@pytest.mark.parametrize(
    ("frames", "hold", "held"), [(2, 0, 1), (3, 0, 1), (4, 0.25, 2), (5, 0.01, 1)]
)
def test_story_shows_every_keyframe_in_order(
    tmp_path: Path, frames: int, hold: float, held: int
) -> None:
    files = ["a.png", "b.png", "c.png", "d.png"]
    folder = image_folder(tmp_path / "drawings", dict.fromkeys(files, (32, 32)))
    run_cli(folder, "--frames", frames, "--hold", hold, "--fps", "8")
    story = decoded(folder / "video" / "story.mp4")
    count = len(files)
    assert len(story) == count * held + (count - 1) * (frames - 2)
    images = [rgb(folder / name) for name in files]
    shown = [k * (held + frames - 2) for k in range(count)]  # each keyframe's first frame
    assert shown[0] == 0 and shown[-1] + held == len(story)  # first and last frames: keyframes
    for k, start in enumerate(shown):
        for index in range(start, start + held):
            errors = [codec_error(story[index], image) for image in images]
            assert int(np.argmin(errors)) == k and errors[k] < CODEC_TOLERANCE, (index, errors)


# -------------------------------------------------------------- 10. mixed sizes keep their aspect


def banded_portrait(path: Path) -> None:
    """30x40: a red band on top, a blue band at the bottom (6 rows each), green between."""
    pixels = np.zeros((40, 30, 3), np.uint8)
    pixels[:6, :, 0] = 255
    pixels[6:34, :, 1] = 255
    pixels[34:, :, 2] = 255
    Image.fromarray(pixels).save(path)


def test_mixed_aspect_keyframes_are_cropped_or_letterboxed(tmp_path: Path) -> None:
    folder = tmp_path / "drawings"
    folder.mkdir()
    Image.new("RGB", (40, 30), (128, 128, 128)).save(folder / "a.png")  # sets the video size
    banded_portrait(folder / "b.png")
    out = tmp_path / "out"
    assert AnimateOptions(folder).fit == "crop"
    notes: list[str] = []
    hooks = AnimateHooks(on_note=notes.append)
    animate(AnimateOptions(folder, out=out, frames=2, hold=0), hooks)
    assert any("centre-cropped b.png (30x40) to fill 40x30" in n for n in notes), notes
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    assert manifest["fit"] == "crop"
    last = decoded(out / "transition_01_02.mp4")[-1, :30, :40]
    # Crop: the middle of the portrait fills the frame, its red and blue bands are cut off.
    assert last[..., 1].mean() > 200 and last[..., 0].max() < 80 and last[..., 2].max() < 80

    notes.clear()
    result = animate(AnimateOptions(folder, out=out, frames=2, hold=0, fit="letterbox"), hooks)
    assert any("letterboxed b.png (30x40) into 40x30" in n for n in notes), notes
    assert names([str(p) for p in result.generated]) == ["transition_01_02.mp4", "story.mp4"]
    assert json.loads((out / "animate.json").read_text(encoding="utf-8"))["fit"] == "letterbox"
    last = decoded(out / "transition_01_02.mp4")[-1, :30, :40]
    # Letterbox: the whole portrait, scaled to 30 rows, between black bars.
    assert last[:, :6].max() < 30 and last[:, -6:].max() < 30
    top, middle, bottom = (
        last[:4, 14:26].mean((0, 1)),
        last[12:18, 14:26].mean((0, 1)),
        last[-3:, 14:26].mean((0, 1)),
    )
    assert top[0] > 150 and middle[1] > 150 and bottom[2] > 150, (top, middle, bottom)

    with pytest.raises(AnimateError, match="--fit stretch"):
        animate(AnimateOptions(folder, out=out, fit="stretch"))


def test_non_keyframe_images_are_skipped_with_a_note(drawings: Path) -> None:
    Image.new("RGB", (32, 32)).save(drawings / "anim.gif")
    Image.new("RGB", (32, 32)).save(drawings / "scan.tiff")
    Image.new("RGB", (32, 32)).save(drawings / ".hidden.gif")
    (drawings / "notes.txt").write_text("not an image", encoding="utf-8")
    result = run_cli(drawings, "--frames", "2")
    text = " ".join(result.stderr.split())
    assert "note: skipped anim.gif, scan.tiff:" in text, text
    assert "animated GIFs are not keyframes" in text and "convert them to PNG" in text
    assert "notes.txt" not in text and ".hidden.gif" not in text
    manifest = json.loads((drawings / "video" / "animate.json").read_text(encoding="utf-8"))
    assert manifest["keyframe_files"] == ["a.png", "b.png"]


# ------------------------------------------------------------- 11. stale transitions are removed


def test_shortened_keyframes_remove_stale_transitions(tmp_path: Path) -> None:
    files = ["a.png", "b.png", "c.png", "d.png"]
    folder = image_folder(tmp_path / "drawings", dict.fromkeys(files, (32, 32)))
    out = tmp_path / "out"
    args = [folder, "--frames", "2", "--hold", "0", "-o", out]
    run_cli(*args)
    assert (out / "transition_03_04.mp4").is_file()
    # Files animate did not write stay, whatever their names, and a manifest naming a file
    # outside the folder does not make it animate's.
    (out / "transition_07_08.mp4").write_bytes(b"the user's")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "outside.mp4").write_bytes(b"not animate's")
    manifest = json.loads((out / "animate.json").read_text(encoding="utf-8"))
    manifest["transitions"].append({"file": "../outside.mp4", "key": "x"})
    (out / "animate.json").write_text(json.dumps(manifest), encoding="utf-8")

    (folder / "d.png").unlink()
    result = run_cli(*args, "--json")
    summary = json.loads(result.stdout)
    assert summary["removed"] == [str(out / "transition_03_04.mp4")]
    assert "removed transition_03_04.mp4" in " ".join(result.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*TRANSITIONS, "story.mp4", "animate.json", "transition_07_08.mp4", "notes.txt"]
    )
    assert (tmp_path / "outside.mp4").is_file()

    # A run that fails after the transitions still remembers the stale file for the next one.
    noise_image((32, 32), 3).save(folder / "d.png")
    run_cli(*args)
    (folder / "d.png").unlink()
    (out / "story.mp4").unlink()
    (out / "story.mp4").mkdir()  # story.mp4 cannot be written: the run fails at the end
    run_cli(*args, code=1)
    assert (out / "transition_03_04.mp4").is_file()
    (out / "story.mp4").rmdir()
    assert names(run_json(*args)["removed"]) == ["transition_03_04.mp4"]
    assert not (out / "transition_03_04.mp4").exists()


# --------------------------------------------------------------------- 12. truthful progress


def test_progress_shows_encoding_and_story_assembly(tmp_path: Path) -> None:
    folder = image_folder(
        tmp_path / "drawings", {"a.png": (32, 32), "b.png": (32, 32), "c.png": (32, 32)}
    )
    out = tmp_path / "out"
    events: list[tuple[Any, ...]] = []
    hooks = AnimateHooks(
        on_step=lambda done, total: events.append(("step", done, total)),
        on_phase=lambda phase, done, total: events.append(
            (phase, done, total, (out / phase.split()[-1]).exists())
        ),
        on_written=lambda path: events.append(("written", path.name)),
    )
    animate(AnimateOptions(folder, out=out, frames=4, hold=0), hooks)
    first = events[: events.index(("written", "transition_01_02.mp4")) + 1]
    # The blend is counted per frame, then every frame sent to ffmpeg; the MP4 exists only
    # once the encode is finished and checked.
    assert first == [
        *[("step", i, 4) for i in range(1, 5)],
        *[("encoding transition_01_02.mp4", i, 4, False) for i in range(5)],
        ("written", "transition_01_02.mp4"),
    ]
    rest = events[events.index(("written", "transition_02_03.mp4")) + 1 :]
    story = 3 + 2 * 2
    assert rest == [
        *[("assembling story.mp4", i, 2, False) for i in range(3)],
        *[("encoding story.mp4", i, story, False) for i in range(story + 1)],
        ("written", "story.mp4"),
    ]

    shutil.rmtree(out)
    stderr = run_cli(folder, "--frames", "4", "-o", out).stderr
    assert "encoding story.mp4" in stderr, stderr
