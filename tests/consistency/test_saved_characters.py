"""Saved characters: `generate --save-characters DIR` writes each character's bank step by
step; `characters: {Name: {bank: DIR/Name}}` reads it instead of running the references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_runs import pixels, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = ["[Ann] walks", "[Bob] reads", "[Ann] drinks tea", "[Bob] sings", "[Ann] dances"]


def story(tmp_path: Path, name: str, ann: Any = "a woman with red hair", **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "model": "tiny",
        "characters": {"Ann": ann, "Bob": "a man with a hat"},
        "frames": FRAMES,
        "seed": 6,
        "width": 256,
        "height": 192,
        "steps": 3,
        "scheduler": "euler",
        "consistency": {"method": "storydiffusion", "id_length": 2, "warmup_steps": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data | changes, sort_keys=False), encoding="utf-8")
    return path


def test_a_saved_character_gives_the_same_read_frames(tmp_path: Path) -> None:
    out, saved = tmp_path / "out", tmp_path / "characters"
    run_cli(
        "generate",
        story(tmp_path, "first"),
        "--out",
        out,
        "--save-characters",
        saved,
        "--frame-batch",
        "1",
    )
    meta = json.loads((saved / "Ann" / "character.json").read_text())
    assert meta["complete"] is True and meta["model"] == "tiny" and meta["steps"] == 3
    assert meta["description"] == "a woman with red hair" and meta["size"] == [64, 48]
    assert meta["banked_steps"] == [0, 1, 2]
    assert sorted(p.name for p in (saved / "Ann").glob("step_*")) == [
        "step_0000.safetensors",
        "step_0001.safetensors",
        "step_0002.safetensors",
    ]

    reuse = {"description": "a woman with red hair", "bank": str(saved / "Ann")}
    second = story(tmp_path, "second", ann=reuse)
    result = run_cli("generate", second, "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert plan["references"] == {"Bob": [2, 4]}  # Ann's references do not run
    run_cli("generate", second, "--out", out, "--frame-batch", "1")
    # Ann's read frame 5 reads the saved bank: pixel for pixel the frame the first run made.
    np.testing.assert_array_equal(
        pixels(out / "second" / "frame_05.png"), pixels(out / "first" / "frame_05.png")
    )
    # Bob's frames run as before.
    np.testing.assert_array_equal(
        pixels(out / "second" / "frame_04.png"), pixels(out / "first" / "frame_04.png")
    )

    # Another model, size, step count, scheduler or rate: refused, naming the mismatch.
    for change, named in [
        ({"steps": 4}, "steps: saved with 3, this story has 4"),
        ({"width": 128}, "size: saved with [64, 48]"),
        ({"scheduler": "ddim"}, "scheduler: saved with 'euler'"),
        (
            {"consistency": {"method": "storydiffusion", "id_length": 2, "sa32": 0.3}},
            "sa32: saved with 0.5, this story has 0.3",
        ),
        ({"guidance": 1.0}, "cfg: saved with True"),
    ]:
        path = story(tmp_path, "changed", ann=reuse, **change)
        result = run_cli("generate", path, "--out", out, code=2)
        assert "characters.Ann.bank" in result.stderr and named in result.stderr, result.stderr
        assert not (out / "changed").exists()
    # The model is part of it: a bank is only good for the weights that made it.
    meta["model"] = "stabilityai/stable-diffusion-xl-base-1.0"
    (saved / "Ann" / "character.json").write_text(json.dumps(meta))
    result = run_cli("generate", second, "--out", out, "--overwrite", code=2)
    assert "model: saved with 'stabilityai/stable-diffusion-xl-base-1.0'" in result.stderr


def test_broken_saved_characters_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli(
        "validate",
        story(tmp_path, "a", ann={"description": "x", "bank": str(tmp_path / "empty")}),
        code=2,
    )
    assert "characters.Ann.bank" in result.stderr and "is not a saved character" in result.stderr
    (tmp_path / "empty" / "character.json").write_text(json.dumps({"schema_version": 1}))
    result = run_cli(
        "validate",
        story(tmp_path, "b", ann={"description": "x", "bank": str(tmp_path / "empty")}),
        code=2,
    )
    assert "did not finish" in result.stderr
