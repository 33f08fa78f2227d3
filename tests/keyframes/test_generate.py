"""End-to-end tests of `storydiff generate` with the tiny random SDXL model (CPU, offline).

Every run here is real: story file → plan → tiny diffusers pipeline with Consistent
Self-Attention → PNG frames with metadata, grid.png and manifest.json. Stories are small
(3 steps, at most 6 frames; the tiny preset renders at 64 px on the long side), so a run
takes well under a second once torch is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_runs import offline_env, pixels, run_cli, storydiff_command, write_story
from PIL import Image
from typer.testing import CliRunner

import storycli
from storycli.cli import app
from storycli.config import Configs
from storycli.render import read_png_metadata
from storycli.story.loader import load_story

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "stories"

ANN = "a woman with red hair"
BOB = "a man with a blue hat"
NEGATIVE = "blurry"
SEED = 3

# Ann's first two solo frames (1, 3) and Bob's (2, 4) are the references; 5 reads Ann, 6 Bob.
PAIR_FRAMES: list[dict[str, Any]] = [
    {"prompt": "[Ann] walks in the park", "caption": "one"},
    {"prompt": "[Bob] reads a book", "caption": None},
    {"prompt": "[Ann] drinks tea", "caption": None},
    {"prompt": "[Bob] sleeps under a tree", "caption": None},
    {"prompt": "[Ann] sings a song", "caption": "five"},
    {"prompt": "[Bob] runs by the river", "caption": None},
]
PAIR_EXPANDED = [
    f"{ANN} walks in the park",
    f"{BOB} reads a book",
    f"{ANN} drinks tea",
    f"{BOB} sleeps under a tree",
    f"{ANN} sings a song",
    f"{BOB} runs by the river",
]
PAIR_ROLES = [
    ("reference", "Ann"),
    ("reference", "Bob"),
    ("reference", "Ann"),
    ("reference", "Bob"),
    ("read", None),
    ("read", None),
]
PAIR_FILES = [f"frame_{i:02d}.png" for i in range(1, 7)]
RENDER_SIZE = (64, 48)  # 256x192 with the tiny preset's long side of 64


# ---------------------------------------------------------------------------------- helpers


def pair_story(**changes: Any) -> dict[str, Any]:
    story: dict[str, Any] = {
        "name": "pair",
        "model": "tiny",
        "style": "comic",
        "characters": {"Ann": ANN, "Bob": BOB},
        "frames": [dict(f) for f in PAIR_FRAMES],
        "negative": NEGATIVE,
        "seed": SEED,
        "noise": "per-frame",
        "width": 256,
        "height": 192,
        "steps": 3,
        "guidance": 5.0,
        "scheduler": "euler",
        "consistency": {"method": "storydiffusion", "id_length": 2, "late_from_step": 2},
    }
    story.update(changes)
    return story


def generate_json(story: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("generate", story, "--out", out, "--json", *extra)
    return json.loads(result.stdout)


def statuses(summary: dict[str, Any]) -> dict[int, str]:
    return {entry["frame"]: entry["status"] for entry in summary["frames"]}


def generated(summary: dict[str, Any]) -> set[int]:
    return {n for n, status in statuses(summary).items() if status == "generated"}


def frames_of(folder: Path) -> dict[str, np.ndarray]:
    return {name: pixels(folder / name) for name in PAIR_FILES}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full CLI run of the two-character story, shared by the read-only checks."""
    root = tmp_path_factory.mktemp("base")
    story = write_story(root / "pair.yaml", pair_story())
    out = root / "out"
    result = run_cli("generate", story, "--out", out)
    folder = out / "pair"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return {"story": story, "out": out, "folder": folder, "result": result, "manifest": manifest}


@pytest.fixture
def fresh(tmp_path: Path) -> dict[str, Any]:
    """A story file of our own and a finished first run of it (for tests that change things)."""
    story = write_story(tmp_path / "story" / "pair.yaml", pair_story())
    out = tmp_path / "out"
    summary = generate_json(story, out)
    assert generated(summary) == set(range(1, 7))
    folder = out / "pair"
    return {"story": story, "out": out, "folder": folder, "frames": frames_of(folder)}


# ------------------------------------------------------------------------ 1. CLI end to end


def test_cli_writes_frames_grid_and_manifest(base_run: dict[str, Any]) -> None:
    folder = base_run["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*PAIR_FILES, "grid.png", "manifest.json", "page_01.png", "comic.pdf"]
    )
    manifest = base_run["manifest"]
    assert manifest["size"] == list(RENDER_SIZE)
    assert manifest["model"]["render_size"] == list(RENDER_SIZE)
    for name in PAIR_FILES:
        with Image.open(folder / name) as img:
            assert img.format == "PNG"
            assert img.size == RENDER_SIZE
    with Image.open(folder / "grid.png") as grid:
        assert grid.format == "PNG"
        # 6 frames → 3 columns x 2 rows, plus gaps and caption bands.
        assert grid.width > 3 * RENDER_SIZE[0]
        assert grid.height > 2 * RENDER_SIZE[1]


def test_cli_console_output(base_run: dict[str, Any]) -> None:
    result = base_run["result"]
    assert "tiny random model" in result.stderr
    # Rich wraps the summary line at the console width; compare with whitespace collapsed.
    assert "6 frame(s) generated, 0 unchanged" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""  # human output goes to stderr


def test_manifest_contents(base_run: dict[str, Any]) -> None:
    manifest = base_run["manifest"]
    story_path = base_run["story"]

    assert manifest["story_file"] == str(story_path.resolve())
    resolved = load_story(story_path, Configs()).model_dump(mode="json")
    assert manifest["story"] == resolved
    # Resolved means defaults filled in, not just what the file says.
    defaults = Configs().defaults["consistency"]
    assert manifest["story"]["consistency"]["warmup_steps"] == defaults["warmup_steps"]
    assert manifest["story"]["consistency"]["blocks"] == defaults["blocks"]
    assert manifest["story"]["consistency"]["id_length"] == 2

    model = manifest["model"]
    assert model["id"] == "tiny"
    assert model["preset"] == "tiny"
    assert model["tiny_random_model"] is True
    assert model["device"] == "cpu"

    import diffusers
    import torch

    assert manifest["storydiff_version"] == storycli.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["diffusers"] == diffusers.__version__

    assert isinstance(manifest["peak_memory_bytes"], int)
    assert manifest["peak_memory_bytes"] > 0
    assert manifest["references"] == {"Ann": [1, 3], "Bob": [2, 4]}
    assert manifest["grid"] == "grid.png"

    comic = Configs().styles["comic"]
    assert len(manifest["frames"]) == 6
    for i, entry in enumerate(manifest["frames"]):
        assert entry["frame"] == i + 1
        assert entry["file"] == PAIR_FILES[i]
        assert entry["prompt"] == comic.apply(PAIR_EXPANDED[i])
        assert "[" not in entry["prompt"]
        assert entry["caption"] == PAIR_FRAMES[i]["caption"]
        assert entry["seed"] == SEED + i  # noise: per-frame
        assert (entry["role"], entry["reference_of"]) == PAIR_ROLES[i]
        assert isinstance(entry["seconds"], (int, float))
        assert not isinstance(entry["seconds"], bool)
        assert entry["seconds"] >= 0
        assert entry["generated_this_run"] is True
        assert entry["negative"].endswith(NEGATIVE)
    assert manifest["frames"][4]["characters"] == ["Ann"]
    assert manifest["frames"][5]["characters"] == ["Bob"]


# ------------------------------------------------------------- 2. the shipped two-character story


def test_two_friends_example_with_tiny_model(tmp_path: Path) -> None:
    result = run_cli("generate", STORIES / "two_friends.yaml", "--out", tmp_path, "--model", "tiny")
    # `make demo`'s story: no token warnings (the tiny model's toy tokenizer is not SDXL's).
    assert "warning" not in result.stderr and "drops" not in result.stderr, result.stderr
    summary = generate_json(STORIES / "two_friends.yaml", tmp_path, "--model", "tiny")
    folder = tmp_path / "two-friends"
    names = [f"frame_{i:02d}.png" for i in range(1, 10)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*names, "grid.png", "manifest.json", "page_01.png", "comic.pdf"]
    )
    assert set(statuses(summary).values()) == {"skipped"}  # made by the first run
    assert summary["size"] == [64, 48]  # 1024x768 scaled to the tiny long side
    for name in names:
        with Image.open(folder / name) as img:
            assert img.size == (64, 48)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["story"]["steps"] == 30
    assert manifest["story"]["model"] == "tiny"
    assert manifest["model"]["tiny_random_model"] is True
    assert manifest["references"] == {"Mara": [1, 3], "Ollie": [2, 4]}
    roles = [f["role"] for f in manifest["frames"]]
    assert roles == ["reference"] * 4 + ["read", "read", "plain", "read", "read"]
    assert manifest["frames"][7]["characters"] == ["Mara", "Ollie"]
    assert manifest["frames"][0]["prompt"].startswith("children's storybook illustration, a girl")


# ---------------------------------------------------------------------------- 3. determinism


def test_same_story_and_seed_give_identical_pixels(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    story = base_run["story"]
    generate_json(story, tmp_path / "a")
    generate_json(story, tmp_path / "b")
    reference = frames_of(base_run["folder"])
    for out in ("a", "b"):
        again = frames_of(tmp_path / out / "pair")
        for name in PAIR_FILES:
            np.testing.assert_array_equal(again[name], reference[name], err_msg=name)
    # The frames are not all the same picture.
    assert not np.array_equal(reference["frame_01.png"], reference["frame_02.png"])

    summary = generate_json(story, tmp_path / "c", "--seed", "4")
    other = frames_of(tmp_path / "c" / "pair")
    for name in PAIR_FILES:
        assert not np.array_equal(other[name], reference[name]), name
    manifest = json.loads((tmp_path / "c" / "pair" / "manifest.json").read_text("utf-8"))
    assert manifest["story"]["seed"] == 4
    assert [f["seed"] for f in manifest["frames"]] == [4 + i for i in range(6)]
    assert generated(summary) == set(range(1, 7))


# ---------------------------------------------------------------------------------- 4. resume


def test_rerun_without_changes_skips_everything(fresh: dict[str, Any]) -> None:
    folder = fresh["folder"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("frame_*.png")}
    summary = generate_json(fresh["story"], fresh["out"])
    assert set(statuses(summary).values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("frame_*.png")} == before
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert all(f["generated_this_run"] is False for f in manifest["frames"])
    # Timings of skipped frames are carried over from the previous manifest.
    assert all(isinstance(f["seconds"], (int, float)) for f in manifest["frames"])


@pytest.mark.parametrize("number", [6, 2], ids=["read-frame", "reference-frame"])
def test_deleted_frame_is_regenerated_identically(fresh: dict[str, Any], number: int) -> None:
    folder = fresh["folder"]
    name = PAIR_FILES[number - 1]
    (folder / name).unlink()
    before = mtimes(folder)

    summary = generate_json(fresh["story"], fresh["out"])

    assert generated(summary) == {number}
    assert statuses(summary) == {n: "generated" if n == number else "skipped" for n in range(1, 7)}
    np.testing.assert_array_equal(pixels(folder / name), fresh["frames"][name])
    after = mtimes(folder)
    for other in PAIR_FILES:
        if other != name:
            assert after[other] == before[other], other
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert [f["generated_this_run"] for f in manifest["frames"]] == [
        n == number for n in range(1, 7)
    ]


def test_editing_a_read_frame_regenerates_only_that_frame(fresh: dict[str, Any]) -> None:
    folder = fresh["folder"]
    story = pair_story()
    story["frames"][4]["prompt"] = "[Ann] dances in the rain"
    write_story(fresh["story"], story)
    before = mtimes(folder)

    summary = generate_json(fresh["story"], fresh["out"])

    assert generated(summary) == {5}
    after = frames_of(folder)
    assert not np.array_equal(after["frame_05.png"], fresh["frames"]["frame_05.png"])
    now = mtimes(folder)
    for name in PAIR_FILES:
        if name != "frame_05.png":
            assert now[name] == before[name], name
            np.testing.assert_array_equal(after[name], fresh["frames"][name], err_msg=name)
    _, meta = read_png_metadata(folder / "frame_05.png")
    assert meta is not None
    assert meta["prompt"] == Configs().styles["comic"].apply(f"{ANN} dances in the rain")


def test_editing_a_caption_refreshes_metadata_without_regenerating(fresh: dict[str, Any]) -> None:
    folder = fresh["folder"]
    story = pair_story()
    story["frames"][0]["caption"] = "eins"
    write_story(fresh["story"], story)

    summary = generate_json(fresh["story"], fresh["out"])

    assert generated(summary) == set()
    np.testing.assert_array_equal(pixels(folder / "frame_01.png"), fresh["frames"]["frame_01.png"])
    _, meta = read_png_metadata(folder / "frame_01.png")
    assert meta is not None and meta["caption"] == "eins"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["frames"][0]["caption"] == "eins"


def test_editing_a_reference_regenerates_that_characters_frames_only(
    fresh: dict[str, Any],
) -> None:
    folder = fresh["folder"]
    story = pair_story()
    story["frames"][0]["prompt"] = "[Ann] climbs a hill"
    write_story(fresh["story"], story)
    before = mtimes(folder)

    summary = generate_json(fresh["story"], fresh["out"])

    # Ann's references (1, 3) and the frame reading Ann (5); Bob's 2, 4, 6 untouched.
    assert generated(summary) == {1, 3, 5}
    after = frames_of(folder)
    assert not np.array_equal(after["frame_01.png"], fresh["frames"]["frame_01.png"])
    now = mtimes(folder)
    for name in ("frame_02.png", "frame_04.png", "frame_06.png"):
        assert now[name] == before[name], name
        np.testing.assert_array_equal(after[name], fresh["frames"][name], err_msg=name)


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_corrupt_frame_is_regenerated(fresh: dict[str, Any], damage: str) -> None:
    folder = fresh["folder"]
    target = folder / "frame_03.png"
    if damage == "random-bytes":
        target.write_bytes(np.random.default_rng(0).bytes(2000))
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        read_png_metadata(target)

    summary = generate_json(fresh["story"], fresh["out"])

    assert generated(summary) == {3}
    np.testing.assert_array_equal(pixels(target), fresh["frames"]["frame_03.png"])
    _, meta = read_png_metadata(target)
    assert meta is not None and meta["frame"] == 3


# ------------------------------------------------------------------ 5. overwrite and ownership


def test_overwrite_regenerates_everything(fresh: dict[str, Any]) -> None:
    summary = generate_json(fresh["story"], fresh["out"], "--overwrite")
    assert generated(summary) == set(range(1, 7))
    manifest = json.loads((fresh["folder"] / "manifest.json").read_text(encoding="utf-8"))
    assert all(f["generated_this_run"] is True for f in manifest["frames"])
    again = frames_of(fresh["folder"])
    for name in PAIR_FILES:
        np.testing.assert_array_equal(again[name], fresh["frames"][name], err_msg=name)


def test_another_story_with_the_same_name_needs_overwrite(fresh: dict[str, Any]) -> None:
    folder = fresh["folder"]
    other = pair_story()
    other["frames"] = [{"prompt": f["prompt"] + " at night"} for f in PAIR_FRAMES]
    other_path = write_story(fresh["story"].parent.parent / "other" / "pair.yaml", other)
    before = snapshot(folder)

    result = run_cli("generate", other_path, "--out", fresh["out"], code=2)

    assert "--overwrite" in result.stderr
    assert "error:" in result.stderr
    assert str(fresh["story"].resolve()) in result.stderr  # names the owner
    assert "Traceback" not in result.output
    assert snapshot(folder) == before

    summary = generate_json(other_path, fresh["out"], "--overwrite")
    assert generated(summary) == set(range(1, 7))
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["story_file"] == str(other_path.resolve())
    assert manifest["frames"][0]["prompt"] == Configs().styles["comic"].apply(
        f"{ANN} walks in the park at night"
    )
    assert not np.array_equal(pixels(folder / "frame_01.png"), fresh["frames"]["frame_01.png"])


def test_interrupted_first_run_resumes(tmp_path: Path) -> None:
    from storycli.keyframes.generate import GenerateOptions, Hooks, generate_story

    story = write_story(tmp_path / "pair.yaml", pair_story())
    out = tmp_path / "out"
    saved: list[int] = []

    def stop_after_two(index: int, path: Path) -> None:
        saved.append(index)
        if len(saved) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    with pytest.raises(KeyboardInterrupt):
        generate_story(story, GenerateOptions(out=out), hooks=Hooks(on_frame=stop_after_two))
    folder = out / "pair"
    assert sorted(p.name for p in folder.glob("frame_*.png")) == ["frame_01.png", "frame_03.png"]

    # The CLI says "finished files are kept; run the same command to resume".
    summary = generate_json(story, out)
    assert generated(summary) == {2, 4, 5, 6}
    # The result is the same as that of an uninterrupted run.
    generate_json(story, tmp_path / "clean")
    clean = frames_of(tmp_path / "clean" / "pair")
    resumed = frames_of(folder)
    for name in PAIR_FILES:
        np.testing.assert_array_equal(resumed[name], clean[name], err_msg=name)


def test_overwrite_with_a_shorter_story_removes_its_extra_frames(fresh: dict[str, Any]) -> None:
    other = pair_story()
    other["frames"] = other["frames"][:4]
    other_path = write_story(fresh["story"].parent.parent / "other" / "pair.yaml", other)
    generate_json(other_path, fresh["out"], "--overwrite")
    assert sorted(p.name for p in fresh["folder"].iterdir()) == sorted(
        [*PAIR_FILES[:4], "grid.png", "manifest.json", "page_01.png", "comic.pdf"]
    )


# ------------------------------------------------------------------------- 6. PNG metadata


def test_png_metadata_round_trip(base_run: dict[str, Any]) -> None:
    manifest = base_run["manifest"]
    entry = manifest["frames"][4]
    parameters, meta = read_png_metadata(base_run["folder"] / entry["file"])

    assert parameters is not None
    assert parameters.startswith(entry["prompt"] + "\n")
    assert f"\nNegative prompt: {entry['negative']}\n" in parameters
    assert "Steps: 3" in parameters
    assert f"Seed: {entry['seed']}" in parameters
    assert "Size: 64x48" in parameters
    assert "CFG scale: 5.0" in parameters

    assert meta is not None
    assert meta["key"] == entry["key"]
    assert meta["prompt"] == entry["prompt"]
    assert meta["seed"] == entry["seed"] == SEED + 4
    assert meta["model"]["id"] == "tiny"
    assert meta["model"]["tiny_random_model"] is True
    assert meta["frame"] == 5
    assert meta["role"] == "read"
    assert meta["size"] == list(RENDER_SIZE)
    assert meta["storydiff_version"] == storycli.__version__


# ------------------------------------------------------------------------------- 7. --json


def test_json_output_is_one_document(tmp_path: Path) -> None:
    story = write_story(tmp_path / "pair.yaml", pair_story())
    result = run_cli("generate", story, "--out", tmp_path / "out", "--json")
    summary = json.loads(result.stdout)  # the whole of stdout, nothing else
    assert summary["schema_version"] == 1
    assert summary["name"] == "pair"
    assert Path(summary["folder"]) == tmp_path / "out" / "pair"
    assert summary["size"] == list(RENDER_SIZE)
    assert summary["model"]["tiny_random_model"] is True
    assert summary["peak_memory_bytes"] > 0
    assert isinstance(summary["seconds"], (int, float))
    assert [Path(f["file"]).name for f in summary["frames"]] == PAIR_FILES
    assert all(Path(f["file"]).is_file() for f in summary["frames"])
    assert Path(summary["grid"]).is_file()
    assert Path(summary["manifest"]).is_file()
    # No progress or "done" line with --json.
    assert "done" not in result.stderr
    assert "tiny random model" not in result.stderr


# --------------------------------------------------------- 8. default model, offline, uncached


def test_default_model_offline_fails_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [*storydiff_command(), "generate", str(STORIES / "lighthouse.yaml"), "--out", str(out)],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    assert "stabilityai/stable-diffusion-xl-base-1.0" in error_lines[0]
    assert "hf download" in error_lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert list(tmp_path.rglob("*.png")) == []
    assert not (out / "lighthouse").exists() or not any((out / "lighthouse").iterdir())


# ------------------------------------------------------------------------ 9. guidance 1 (no CFG)


def test_guidance_one_without_cfg_in_a_subprocess(tmp_path: Path) -> None:
    story = write_story(
        tmp_path / "solo.yaml",
        {
            "name": "solo",
            "model": "tiny",
            "identity": "a lighthouse keeper in a yellow coat",
            "frames": [
                "climbs the stairs #up",
                "rows a boat",
                "[NC] a lantern in the rain #light",
            ],
            "seed": 11,
            "width": 256,
            "height": 256,
            "steps": 4,
            "guidance": 1.0,
            "scheduler": "euler",
            "consistency": {"method": "storydiffusion", "id_length": 2, "late_from_step": 2},
        },
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [*storydiff_command(), "generate", str(story), "--out", str(out), "--json"],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # a real process's stdout: one JSON document
    assert generated(summary) == {1, 2, 3}
    assert summary["size"] == [64, 64]
    folder = out / "solo"
    for name in ("frame_01.png", "frame_02.png", "frame_03.png", "grid.png", "manifest.json"):
        assert (folder / name).is_file(), name
    for i in (1, 2, 3):
        with Image.open(folder / f"frame_{i:02d}.png") as img:
            assert img.size == (64, 64)
        parameters, _ = read_png_metadata(folder / f"frame_{i:02d}.png")
        assert parameters is not None and "CFG scale: 1.0" in parameters
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["story"]["guidance"] == 1.0
    assert manifest["references"] == {"identity": [1, 2]}
    assert [(f["role"], f["reference_of"]) for f in manifest["frames"]] == [
        ("reference", "identity"),
        ("reference", "identity"),
        ("plain", None),
    ]
    assert (
        manifest["frames"][0]["prompt"] == "a lighthouse keeper in a yellow coat, climbs the stairs"
    )
    assert manifest["frames"][2]["prompt"] == "a lantern in the rain"
    assert manifest["frames"][0]["seed"] == 11  # noise: shared (the default)
    assert manifest["frames"][2]["seed"] == 11


# ------------------------------------------------------------------------------- 10. --dry-run


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The default sdxl model is not available offline here, so a model load would fail.
    result = run_cli("generate", STORIES / "lighthouse.yaml", "--out", out, "--dry-run")
    assert "lighthouse" in result.stdout
    assert "6 frames" in result.stdout
    assert not out.exists()

    result = run_cli(
        "generate",
        STORIES / "lighthouse.yaml",
        "--out",
        out,
        "--dry-run",
        "--json",
        "--model",
        "tiny",
        "--seed",
        "5",
    )
    plan = json.loads(result.stdout)
    assert plan["name"] == "lighthouse"
    assert len(plan["frames"]) == 6
    assert plan["references"] == {"identity": [1, 2, 3]}
    assert {f["seed"] for f in plan["frames"]} == {5}
    assert not out.exists()


def test_dry_run_does_not_import_torch_or_diffusers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from storycli.cli import app\n"
        f"app(['generate', {str(STORIES / 'lighthouse.yaml')!r}, '--out', {str(out)!r},"
        " '--dry-run'], standalone_mode=False)\n"
        "loaded = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('LOADED', loaded)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
    assert not out.exists()


# ------------------------------------------------------------------- 11. missing local model


def test_missing_local_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    story = write_story(tmp_path / "pair.yaml", pair_story())
    monkeypatch.chdir(tmp_path)
    result = run_cli("generate", story, "--out", tmp_path / "out", "--model", "./nope", code=2)
    assert "error:" in result.stderr
    assert str(tmp_path / "nope") in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_local_folder_that_is_not_a_diffusers_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    story = write_story(tmp_path / "pair.yaml", pair_story())
    (tmp_path / "empty-model").mkdir()
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "generate", story, "--out", tmp_path / "out", "--model", "./empty-model", code=2
    )
    assert "model_index.json" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- bad options and output places


def test_shortened_story_removes_only_its_own_stale_frames(fresh: dict[str, Any]) -> None:
    folder = fresh["folder"]
    foreign = folder / "frame_09.png"  # looks like a frame, but storydiff never wrote it
    Image.new("RGB", (8, 8)).save(foreign)
    story = pair_story()
    story["frames"] = story["frames"][:4]
    write_story(fresh["story"], story)

    summary = generate_json(fresh["story"], fresh["out"])

    assert summary["removed"] == [str(folder / "frame_05.png"), str(folder / "frame_06.png")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*PAIR_FILES[:4], "frame_09.png", "grid.png", "manifest.json", "page_01.png", "comic.pdf"]
    )
    assert generated(summary) == set()  # the four kept frames are unchanged


@pytest.mark.parametrize(
    ("option", "value", "needles"),
    [
        ("--dtype", "float8", ["error: --dtype float8", "float32, float16, bfloat16"]),
        ("--device", "gpu", ["error: --device gpu", "cpu, cuda, cuda:N", "mps"]),
        ("--offload", "all", ["error: --offload all", "none, model, sequential"]),
    ],
)
def test_bad_hardware_options_exit_2_naming_the_values(
    tmp_path: Path, option: str, value: str, needles: list[str]
) -> None:
    story = write_story(tmp_path / "pair.yaml", pair_story())
    result = run_cli("generate", story, "--out", tmp_path / "out", option, value, code=2)
    assert all(n in result.stderr for n in needles), result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cuda_device_without_a_gpu_is_invalid(tmp_path: Path) -> None:
    if torch_cuda_available():
        pytest.xfail("this machine has a GPU")
    story = write_story(tmp_path / "pair.yaml", pair_story())
    result = run_cli("generate", story, "--out", tmp_path / "out", "--device", "cuda", code=2)
    assert "no CUDA GPU" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "out").exists()


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_unwritable_out_fails_before_loading_the_model(tmp_path: Path, where: str) -> None:
    story = write_story(tmp_path / "pair.yaml", pair_story(model="sdxl"))
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        needle = "is a file, not a folder"
    else:
        out = Path("/sys/storydiff-test-out")  # read-only even for root
        needle = "cannot write there"
    # The sdxl preset is not cached offline: reaching the model load would say so instead.
    result = run_cli("generate", story, "--out", out, code=2)
    assert needle in result.stderr and "--out" in result.stderr, result.stderr
    assert "not in the local Hugging Face cache" not in result.stderr
    assert "Traceback" not in result.output


def test_help_shows_plain_flags_as_flags() -> None:
    for command in ("generate", "validate", "animate", "train-predictor"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        verbose = [line for line in text.splitlines() if "--verbose" in line]
        assert "<bool>" not in text and "<int>" not in "".join(verbose), text
        assert verbose or command == "validate"
        assert "--no-overwrite" not in text and "--no-json" not in text
        assert "--json" in text and "--help" in text


def test_verbose_shows_storydiff_detail_but_no_library_debug_lines(tmp_path: Path) -> None:
    story = write_story(
        tmp_path / "pair.yaml",
        pair_story(steps=1, frames=PAIR_FRAMES[:1], consistency={"method": "none"}),
    )
    proc = subprocess.run(
        [*storydiff_command(), "generate", str(story), "--out", str(tmp_path / "out"), "-v"],
        capture_output=True,
        text=True,
        env=offline_env(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG PIL" not in proc.stderr, proc.stderr[:2000]


def test_warnings_reach_the_console_even_with_json(tmp_path: Path) -> None:
    """Plan warnings (a prompt over 77 CLIP tokens), the model's own tokenizer cutting more, and
    caption characters no font draws: each one line on stderr; stdout stays one JSON document."""
    frames = [dict(f) for f in PAIR_FRAMES]
    frames[4]["prompt"] = "[Ann] " + " ".join(["sings a long song"] * 25)
    frames[0]["caption"] = "private \ue000 glyph"
    story = write_story(tmp_path / "pair.yaml", pair_story(frames=frames, width=64, height=64))
    # The tiny model saved as a folder: no longer the `tiny` preset (whose toy tokenizer's cuts
    # are not reported), so what its tokenizer cuts is.
    from storycli.weights.tiny import build_tiny_sdxl_pipeline

    model = tmp_path / "model"
    build_tiny_sdxl_pipeline().save_pretrained(model)
    result = run_cli("generate", story, "--out", tmp_path / "out", "--json", "--model", model)
    json.loads(result.stdout)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("frames[4]: prompt is" in w and "dropped" in w for w in warnings), warnings
    assert any("frames[4]: this model's text encoder reads at most" in w for w in warnings)
    assert any("grid.png: no font" in w and "\ue000" in w for w in warnings), warnings
    quiet = run_cli("generate", story, "--out", tmp_path / "out2", "-q")
    assert "warning:" not in quiet.stderr


def test_validate_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    story = pair_story(characters={"Ann": ANN, "ann": BOB})
    story["frames"] = [{"prompt": p["prompt"].replace("[Bob]", "[ann]")} for p in PAIR_FRAMES]
    path = write_story(tmp_path / "pair.yaml", story)
    result = run_cli("validate", path)
    assert "warning:" in result.stderr and "differ only in case" in result.stderr
    data = json.loads(run_cli("validate", path, "--json").stdout)
    assert any("differ only in case" in w for w in data["stories"][0]["warnings"])


def test_killed_run_resumes_from_its_checkpoint_with_identical_pixels(tmp_path: Path) -> None:
    """SIGKILL mid-loop (a real subprocess), then the same command: it continues after the last
    saved step and gives the very pixels of an uninterrupted run; the checkpoint then goes."""
    import signal
    import time

    story = write_story(
        tmp_path / "pair.yaml",
        pair_story(steps=40, scheduler="dpmpp-2m-karras", frames=PAIR_FRAMES[:5]),
    )
    whole = tmp_path / "whole"
    run_cli("generate", story, "--out", whole, "-q")

    out = tmp_path / "killed"
    command = [*storydiff_command(), "generate", str(story), "--out", str(out), "-q"]
    command += ["--checkpoint-every", "3"]
    checkpoint = out / "pair" / ".story-loop.pt"
    proc = subprocess.Popen(command, env=offline_env(tmp_path), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint.exists() and not (out / "pair" / "frame_01.png").exists()

    summary = generate_json(story, out)
    manifest = json.loads((out / "pair" / "manifest.json").read_text(encoding="utf-8"))
    resumed = manifest["story_loop"]["checkpoint"]["resumed_from_step"]
    assert resumed is not None and resumed >= 2, manifest["story_loop"]
    # Only the steps this run made are timed; the uninterrupted run timed all 40.
    steps_timed = manifest["story_loop"]["step_seconds"]
    assert len(steps_timed) == 40 - (resumed + 1) and min(steps_timed) > 0
    whole_loop = json.loads((whole / "pair" / "manifest.json").read_text())["story_loop"]
    assert len(whole_loop["step_seconds"]) == 40
    assert generated(summary) == set(range(1, 6))
    assert not checkpoint.exists()
    for name in PAIR_FILES[:5]:
        assert np.array_equal(pixels(out / "pair" / name), pixels(whole / "pair" / name)), name
    assert not [p.name for p in (out / "pair").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------ nothing to do: no model load


def test_rerun_with_nothing_to_do_loads_no_model(
    fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import storycli.keyframes.models

    loads: list[str] = []
    real = storycli.keyframes.models.load_pipeline

    def refuse(model: str, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pipeline was loaded for frames that are written")

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", refuse)
    folder = fresh["folder"]
    (folder / "grid.png").unlink()  # still rewritten, as are the manifest and the pages
    before = mtimes(folder)
    result = run_cli("generate", fresh["story"], "--out", fresh["out"], "--json")
    summary = json.loads(result.stdout)
    assert set(statuses(summary).values()) == {"skipped"}
    assert summary["model"]["id"] == "tiny" and summary["model_reused"] is False
    assert (folder / "grid.png").is_file()
    after = mtimes(folder)
    assert all(after[name] == before[name] for name in PAIR_FILES)
    assert after["manifest.json"] != before["manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] is True and manifest["model"] == summary["model"]
    human = run_cli("generate", fresh["story"], "--out", fresh["out"])
    assert "0 frame(s) generated, 6 unchanged" in " ".join(human.stderr.split())

    # A changed frame loads the model, once.
    def counted(model: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", counted)
    story = pair_story()
    story["frames"][5]["prompt"] = "[Bob] swims in the river"
    write_story(fresh["story"], story)
    assert generated(generate_json(fresh["story"], fresh["out"])) == {6}
    assert loads == ["tiny"]


def test_rerun_with_nothing_to_do_imports_no_model_stack(fresh: dict[str, Any]) -> None:
    """The no-op rerun decides from the manifest without importing diffusers (seconds of
    imports: the rerun is meant to take about as long as starting Python and torch)."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('stack:', sorted(m for m in ('diffusers', 'transformers')"
        " if m in sys.modules)))\n"
        "sys.argv = ['storydiff', *sys.argv[1:]]\n"
        "from storycli.cli import main\n"
        "main()\n"
    )
    args = ["generate", str(fresh["story"]), "--out", str(fresh["out"])]
    result = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "stack: []" in result.stdout
    assert "0 frame(s) generated, 6 unchanged" in " ".join(result.stderr.split())


def test_python_dash_m_storycli_is_the_storydiff_command(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "storycli"]
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "Usage: storydiff" in usage.stdout
    story = tmp_path / "s.yaml"
    story.write_text("identity: a fox\nframes: [runs]\nmodel: tiny\nconsistency: {id_length: 1}\n")
    checked = subprocess.run([*run, "validate", story], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    bad = subprocess.run(
        [*run, "validate", tmp_path / "missing.yaml"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
