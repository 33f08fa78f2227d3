"""Continuing a story from a picture: `start_image` (frame 1) and a character's `image` (its
first solo frame), written unchanged and carried into the character's bank at every step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_runs import pixels, run_cli
from per_call_schedule import one_call_a_forward
from PIL import Image

from storycli.config import Configs
from storycli.keyframes.plan import build_plan
from storycli.story.loader import load_story

pytestmark = pytest.mark.usefixtures("one_thread")

# CSA at every step and layer, one reference (the picture): the bank is the picture's.
CSA = {
    "method": "storydiffusion",
    "id_length": 1,
    "warmup_steps": 0,
    "prob_early": 1.0,
    "prob_late": 1.0,
}


def picture(path: Path, seed: int, size: tuple[int, int] = (128, 96)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def story(tmp_path: Path, name: str, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "model": "tiny",
        "identity": "a woman with red hair",
        "start_image": "start.png",
        "frames": [
            "stands by the sea #It began here.",
            "walks in the park",
            "[NC] an empty street",
            "drinks tea",
        ],
        "seed": 2,
        "width": 256,
        "height": 192,
        "steps": 3,
        "scheduler": "euler",
        "consistency": CSA,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data | changes, sort_keys=False), encoding="utf-8")
    return path


def test_start_image_is_frame_one_and_the_story_continues_it(tmp_path: Path) -> None:
    start = picture(tmp_path / "start.png", 0)
    out = tmp_path / "out"
    run_cli("generate", story(tmp_path, "a"), "--out", out)
    frames = [pixels(out / "a" / f"frame_0{i}.png") for i in range(1, 5)]
    # Frame 1 is the picture, unchanged (its own size; the others render at the story's).
    np.testing.assert_array_equal(frames[0], np.asarray(Image.open(start).convert("RGB")))
    assert frames[1].shape == (48, 64, 3)
    manifest = json.loads((out / "a" / "manifest.json").read_text())
    assert manifest["frames"][0]["picture"] == str(start.resolve())
    assert manifest["frames"][0]["caption"] == "It began here."

    # Another picture: the frames that read the character change, the [NC] frame does not.
    picture(tmp_path / "other.png", 1)
    run_cli("generate", story(tmp_path, "b", start_image="other.png"), "--out", out)
    other = [pixels(out / "b" / f"frame_0{i}.png") for i in range(1, 5)]
    assert not np.array_equal(other[1], frames[1]) and not np.array_equal(other[3], frames[3])
    np.testing.assert_array_equal(other[2], frames[2])

    # Keys follow the picture's content; a rerun after an edit of the picture remakes them.
    configs = Configs()
    before = build_plan(load_story(tmp_path / "a.yaml", configs), configs)
    picture(start, 5)
    after = build_plan(load_story(tmp_path / "a.yaml", configs), configs)
    model = {"id": "tiny"}
    assert [before.frame_key(i, model) == after.frame_key(i, model) for i in range(4)] == [
        False,
        False,
        True,
        False,
    ]
    # Resume: a deleted frame comes back (the picture still feeds the bank), the same up to
    # float rounding (it now runs alone, not in a micro-batch with frame 2).
    picture(start, 0)
    (out / "a" / "frame_04.png").unlink()
    result = run_cli("generate", tmp_path / "a.yaml", "--out", out, "--json")
    made = [f["frame"] for f in json.loads(result.stdout)["frames"] if f["status"] == "generated"]
    assert made == [4]
    again = pixels(out / "a" / "frame_04.png").astype(int)
    assert np.abs(again - frames[3].astype(int)).max() <= 1


def test_a_characters_image_is_its_first_solo_frame(tmp_path: Path) -> None:
    picture(tmp_path / "ann.png", 3)
    path = story(
        tmp_path,
        "pair",
        identity=None,
        start_image=None,
        characters={
            "Ann": {"description": "a woman with red hair", "image": "ann.png"},
            "Bob": "a man with a hat",
        },
        frames=["[Bob] reads", "[Ann] walks", "[Bob] sings", "[Ann] drinks tea"],
    )
    yaml_data = yaml.safe_load(path.read_text())
    del yaml_data["identity"], yaml_data["start_image"]
    path.write_text(yaml.safe_dump(yaml_data, sort_keys=False))
    run_cli("generate", path, "--out", tmp_path / "out")
    np.testing.assert_array_equal(
        pixels(tmp_path / "out" / "pair" / "frame_02.png"),
        np.asarray(Image.open(tmp_path / "ann.png").convert("RGB")),
    )
    # Ann's frame 4 reads the picture's bank; without the picture it is another frame.
    yaml_data["characters"]["Ann"] = "a woman with red hair"
    yaml_data["name"] = "pair-plain"
    path.write_text(yaml.safe_dump(yaml_data, sort_keys=False))
    run_cli("generate", path, "--out", tmp_path / "out")
    assert not np.array_equal(
        pixels(tmp_path / "out" / "pair" / "frame_04.png"),
        pixels(tmp_path / "out" / "pair-plain" / "frame_04.png"),
    )


def test_a_picture_row_in_the_shared_write_forward_equals_one_call_a_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ann's picture and Bob's references run in one write forward, her frames and his read
    frames and the [NC] frame in shared read forwards: the same frames (within float rounding)
    as every call in a forward of its own."""
    picture(tmp_path / "ann.png", 3)
    path = story(
        tmp_path,
        "pair",
        start_image=None,
        identity=None,
        characters={
            "Ann": {"description": "a woman with red hair", "image": "ann.png"},
            "Bob": "a man with a hat",
        },
        frames=[
            "[Bob] reads",
            "[Ann] walks",
            "[Ann] and [Bob] talk",
            "[NC] a street",
            "[Bob] sings",
        ],
    )
    data = yaml.safe_load(path.read_text())
    del data["identity"], data["start_image"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    run_cli("generate", path, "--out", tmp_path / "batched", "--frame-batch", "4")
    monkeypatch.setattr("storycli.keyframes.loop.story_chunks", one_call_a_forward)
    run_cli("generate", path, "--out", tmp_path / "alone", "--frame-batch", "4")
    for i in range(1, 6):
        batched = pixels(tmp_path / "batched" / "pair" / f"frame_0{i}.png").astype(int)
        alone = pixels(tmp_path / "alone" / "pair" / f"frame_0{i}.png").astype(int)
        assert np.abs(batched - alone).max() <= 2, i


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"start_image": "missing.png"}, "start_image", "picture 'missing.png' does not exist"),
        ({"start_image": "story.yaml"}, "start_image", "is not a readable image"),
        (
            {"frames": ["[NC] a street", "walks"]},
            "frames[0]",
            "frame 1 is the start_image, so it must show one character",
        ),
    ],
)
def test_bad_pictures_are_refused(
    tmp_path: Path, changes: dict[str, Any], field: str, message: str
) -> None:
    picture(tmp_path / "start.png", 0)
    (tmp_path / "story.yaml").write_text("not: a picture\n")
    result = run_cli("validate", story(tmp_path, "bad", **changes), code=2)
    assert f" {field}: " in result.stderr and message in result.stderr
