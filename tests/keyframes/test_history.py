"""Rolling history (`consistency.history: K`): a read frame also reads samples of the K read
frames before it, at the same step of the story loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_runs import pixels, run_cli

from storycli.batch.shard import Shard
from storycli.config import Configs
from storycli.keyframes.plan import build_plan
from storycli.keyframes.schedule import calls_needed, story_chunks
from storycli.keyframes.split import frames_of_shard
from storycli.story.loader import load_story

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = ["walks", "reads", "drinks tea in a cafe", "sings on a stage", "dances"]


def story(tmp_path: Path, name: str, history: int, frames: list[str] = FRAMES) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "model": "tiny",
        "identity": "a woman with red hair",
        "frames": frames,
        "seed": 8,
        "width": 256,
        "height": 192,
        "steps": 3,
        "scheduler": "euler",
        "consistency": {
            "method": "storydiffusion",
            "id_length": 2,
            "warmup_steps": 0,
            "prob_early": 1.0,
            "prob_late": 1.0,
            "history": history,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def frames_of(out: Path, name: str) -> list[np.ndarray]:
    return [pixels(out / name / f"frame_0{i}.png") for i in range(1, 6)]


@pytest.mark.parametrize("history", [0, 1])
def test_a_frame_depends_on_the_one_before_only_with_history(tmp_path: Path, history: int) -> None:
    out = tmp_path / "out"
    edited = [*FRAMES[:2], "flies a red kite", *FRAMES[3:]]  # frame 3 (a read frame) changed
    run_cli("generate", story(tmp_path, "a", history), "--out", out)
    run_cli("generate", story(tmp_path, "b", history, edited), "--out", out)
    a, b = frames_of(out, "a"), frames_of(out, "b")
    assert not np.array_equal(a[2], b[2])
    # Frame 4 reads frame 3's samples with history 1, and through it so does frame 5.
    assert np.array_equal(a[3], b[3]) == (history == 0)
    assert np.array_equal(a[4], b[4]) == (history == 0)
    np.testing.assert_array_equal(a[0], b[0])  # references do not read history

    # Keys say the same: with history, frame 4's key depends on frame 3's prompt.
    configs = Configs()
    plans = [build_plan(load_story(tmp_path / f"{n}.yaml", configs), configs) for n in "ab"]
    keys = [[p.frame_key(i, {"id": "tiny"}) for i in range(5)] for p in plans]
    assert [x == y for x, y in zip(*keys, strict=True)] == [
        True,
        True,
        False,
        history == 0,
        history == 0,
    ]


def test_history_resumes_exactly_and_runs_in_story_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = story(tmp_path, "h", 2)
    run_cli("generate", path, "--out", out)
    before = frames_of(out, "h")
    (out / "h" / "frame_05.png").unlink()
    result = run_cli("generate", path, "--out", out, "--json")
    made = [f["frame"] for f in json.loads(result.stdout)["frames"] if f["status"] == "generated"]
    assert made == [5]  # frames 3 and 4 run again (frame 5 reads them) but are not rewritten
    np.testing.assert_array_equal(pixels(out / "h" / "frame_05.png"), before[4])

    configs = Configs()
    plan = build_plan(load_story(path, configs), configs)
    assert plan.history_before(4) == (2, 3)  # the two read frames before frame 5
    assert [c.frames for c in calls_needed(plan, [4])] == [(0, 1), (2,), (3,), (4,)]
    # Each read frame in a forward of its own, in story order, whatever the micro-batch.
    assert [len(c.rows) for c in story_chunks(plan, plan.calls, 4)] == [2, 1, 1, 1]
    # Not shared over processes: every read frame needs the one before it at the same step.
    assert frames_of_shard(plan, 2, Shard(0, 2)) == set(range(5))
    assert frames_of_shard(plan, 2, Shard(1, 2)) == set()


def test_history_needs_csa_in_reference_mode(tmp_path: Path) -> None:
    path = story(tmp_path, "bad", 1)
    data = yaml.safe_load(path.read_text())
    data["consistency"]["mode"] = "window"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("validate", path, code=2)
    assert "consistency.history" in result.stderr and "reference mode" in result.stderr


def test_history_with_two_characters_and_nc_frames_renders(tmp_path: Path) -> None:
    """Two characters' references share the write forward and `[NC]` frames share a plain
    one: only read calls bank history (a history key on every call refused those forwards)."""
    data = yaml.safe_load(story(tmp_path, "pair", 1).read_text(encoding="utf-8"))
    del data["identity"]
    data["characters"] = {"Ann": "a woman with red hair", "Bob": "a man with a hat"}
    data["frames"] = [
        "[Ann] walks",
        "[Bob] reads",
        "[Ann] drinks tea",
        "[NC] an empty street",
        "[Bob] sings",
        "[NC] a quiet harbour",
        "[Ann] dances",
    ]
    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    run_cli("generate", path, "--out", tmp_path / "out", "--frame-batch", "2")
    assert len(list((tmp_path / "out" / "pair").glob("frame_0*.png"))) == 7
