"""`storydiff bench consistory-plus` and `storydiff bench vistorybench` (CPU, offline): the
converters on the real ConsiStory+ sets and a hand-written ViStoryBench fixture, both benches
end to end on the tiny model, resume, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_runs import run_cli
from PIL import Image

import storycli.keyframes.models
from storycli.config import Configs
from storycli.keyframes.plan import build_plan
from storycli.story.loader import load_story
from storycli.suites import BENCH_METHODS
from storycli.suites.common import BenchOptions, story_yaml
from storycli.suites.consistory import load_sets, set_story
from storycli.suites.vistorybench import (
    load_vistory,
    output_folder,
    tagged_characters,
    vistory_story,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vistorybench"


def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed benchmark must not even load the pipeline."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pipeline was loaded for work that was done")

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", refuse)


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


# ------------------------------------------------------------------------------- ConsiStory+


def test_every_consistory_set_converts_to_a_valid_story(tmp_path: Path) -> None:
    sets = load_sets()
    assert len(sets) == 192  # as shipped by 1Prompt1Story (the paper says 200)
    assert len({s.id for s in sets}) == 192
    counts: dict[str, int] = {}
    for s in sets:
        counts[s.category] = counts.get(s.category, 0) + 1
    assert counts == {
        "animals": 21,
        "fairy_tales": 40,
        "fantasy": 22,
        "foods": 20,
        "humans": 21,
        "inanimate": 18,
        "nature": 41,
        "technoledge": 9,
    }
    configs = Configs()
    options = BenchOptions(out=tmp_path)
    for s in sets:
        for method in BENCH_METHODS:
            path = tmp_path / f"{s.id}-{method}.yaml"
            path.write_text(story_yaml(set_story(s, method, options), "test"), encoding="utf-8")
            plan = build_plan(load_story(path, configs), configs)
            assert len(plan.frames) == len(s.settings)
            assert plan.story.consistency.methods == (() if method == "none" else (method,))
            if method != "one-prompt":  # (whose frames encode a consolidated prompt)
                # Frame prompt = identity (style + subject), then the setting, as the paper's.
                expected = [f"{s.identity}, {x}" for x in s.settings]
                assert [f.prompt for f in plan.frames] == expected
    first = sets[0]
    assert first.id == "animals-01"
    assert (
        first.identity
        == "A fiery and majestic illustration of A phoenix with bright orange feathers"
    )
    assert set_story(first, "one-prompt", options) | {"frames": None} == {
        "name": "animals-01",
        "model": "sdxl",
        "identity": first.identity,
        "frames": None,
        "negative": "",
        "seed": 42,
        "width": 1024,
        "height": 1024,
        "steps": 50,
        "guidance": 5.0,
        "scheduler": "euler",
        "noise": "identical",
        "consistency": {"method": "one-prompt"},
    }


def test_consistory_bench_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cp"
    args = ("bench", "consistory-plus", "--model", "tiny", "--clip", "tiny", "--limit", "2")
    results = json.loads(run_cli(*args, "--steps", "2", "--out", out, "--json").stdout)
    assert results["sets"] == ["animals-01", "animals-02"]
    assert list(results["methods"]) == list(BENCH_METHODS)
    for row in results["methods"].values():
        assert row["sets"] == 2 and row["images"] == 10 and row["steps"] == 2
        assert 0.0 <= row["clip_t"] <= 2.5 and -1.0 <= row["clip_i"] <= 1.0
        assert row["dreamsim"] is None  # not installed here
        assert row["seconds_per_image"] > 0 and row["peak_memory_gb"] > 0
    for record in results["records"]:
        run = Path(record["run"])
        assert (run / "evaluation.json").is_file() and (run / "manifest.json").is_file()
        assert not record["kept"]
    # CLIP-T scores each frame against its own prompt (identity, setting), also for one-prompt,
    # whose frames are encoded from a consolidated prompt.
    first = load_sets()[0]
    scored = json.loads(
        (out / "runs" / "one-prompt" / "animals-01" / "evaluation.json").read_text()
    )
    assert [f["text"] for f in scored["keyframes"]["frames"]] == [
        f"A photo depicts {first.identity}, {x}" for x in first.settings
    ]
    assert json.loads((out / "consistory_plus.json").read_text()) == results
    table = (out / "consistory_plus.md").read_text()
    assert "| storydiff storydiffusion |" in table
    assert "| 1Prompt1Story | 0.8942 | 0.9117 | 0.1993 | 50 | 18.70 | 23.20 |" in table
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # A second run: every set is done; nothing is generated, no model is even loaded.
    no_model_loads(monkeypatch)
    again = json.loads(run_cli(*args, "--steps", "2", "--out", out, "--json").stdout)
    assert all(r["kept"] for r in again["records"])
    assert again["methods"] == results["methods"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


def test_consistory_bad_options(tmp_path: Path) -> None:
    result = run_cli("bench", "consistory-plus", "--methods", "none,magic", code=2)
    assert "--methods magic: choose from none, storydiffusion, one-prompt" in result.stderr
    result = run_cli("bench", "consistory-plus", "--size", "big", code=2)
    assert "--size big" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ("bench", "consistory-plus", "--model", "tiny", "--clip", "tiny", "--out", blocker)
    result = run_cli(*args, code=2)
    assert "--out" in result.stderr


# ------------------------------------------------------------------------------ ViStoryBench


def test_vistory_story_maps_shots_to_prompts(tmp_path: Path) -> None:
    story = load_vistory(FIXTURE / "ViStory" / "01")
    options = BenchOptions(out=tmp_path, model="tiny")
    # Old Owl never appears alone: under CSA it cannot have a reference, so it is written as
    # text; without CSA both are characters.
    assert tagged_characters(story, "storydiffusion") == ["Little Fox"]
    assert tagged_characters(story, "none") == ["Little Fox", "Old Owl"]
    document = vistory_story(story, "storydiffusion", options)
    assert document["characters"] == {"Little Fox": "a small red fox with a white-tipped tail"}
    assert [f["prompt"] for f in document["frames"]] == [
        "Wide shot, eye level; The fox wakes up hungry; The fox stretches outside its den; "
        "Little Fox is [Little Fox]; a snowy forest at dawn",
        "[NC] Long shot, high angle; The river is frozen; Ice covers the whole river; "
        "a frozen river under grey clouds",
        "Medium shot; The owl shares its berries; The owl hands the fox a berry; Little Fox is "
        "[Little Fox] and Old Owl is a grey owl with round spectacles; a hollow oak tree",
        "Close-up; The fox sleeps, full and warm; The fox curls up asleep; Little Fox is "
        "[Little Fox]; the den at night",
    ]
    assert document["consistency"] == {"method": "storydiffusion", "id_length": 1}
    assert (document["width"], document["height"], document["seed"]) == (1344, 768, 42)
    configs = Configs()
    for method in BENCH_METHODS:
        path = tmp_path / f"{method}.yaml"
        path.write_text(story_yaml(vistory_story(story, method, options), "t"), encoding="utf-8")
        plan = build_plan(load_story(path, configs), configs)
        assert [f.characters for f in plan.frames][1] == ()  # the [NC] shot
        assert "a small red fox with a white-tipped tail" in plan.frames[0].prompt
        if method == "one-prompt":  # frames encode the identity, then the frame texts
            assert "; Little Fox and Old Owl; a hollow oak tree" in plan.frames[0].prompt
        else:
            assert plan.frames[0].prompt.startswith("Wide shot, eye level; The fox wakes up")
    chinese = load_vistory(FIXTURE / "ViStory" / "01", "ch")
    assert vistory_story(chinese, "none", options)["frames"][0]["prompt"].startswith("远景")
    assert output_folder(Path("o"), "storydiffusion", "en", "20250101-000000", "01") == Path(
        "o/outputs/storydiff/storydiffusion/en/20250101-000000/01/shots"
    )


def scorer_view(outputs: Path, method: str, mode: str, lang: str) -> dict[str, dict[str, Any]]:
    """What ViStoryBench's loader (vistorybench/dataset_loader/read_outputs.py) finds: story ids
    (int-sorted folders) under each timestamp, a story's shot images in its shots/ subfolder,
    keyed by the number in the file name (the evaluators then take `shots[int(shot["index"])]`).
    """
    found: dict[str, dict[str, Any]] = {}
    for stamp in sorted((outputs / method / mode / lang).iterdir()):
        for story in sorted(stamp.iterdir(), key=lambda p: int(p.name)):
            images = [p for p in (story / "shots").iterdir() if p.suffix.lower() == ".png"]
            shots = {int(re.sub(r"\D", "", p.stem)): p for p in images}
            found[story.name] = {"stamp": stamp.name, "shots": shots}
    return found


def scored_pairs(view: dict[str, dict[str, Any]]) -> dict[str, list[tuple[int, Path | None]]]:
    """Each dataset shot's `index` and the image the evaluators score its text against (None:
    skipped), as `shots[int(shot["index"])]` finds it."""
    pairs = {}
    for sid, found in view.items():
        data = json.loads((FIXTURE / "ViStory" / sid / "story.json").read_text("utf-8-sig"))
        indices = [int(shot["index"]) for shot in data["Shots"]]
        pairs[sid] = [(i, found["shots"].get(i)) for i in indices]
    return pairs


def test_vistorybench_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "vb"
    args = ("bench", "vistorybench", "--dataset", FIXTURE, "--model", "tiny", "--steps", "2")
    state = json.loads(run_cli(*args, "--out", out, "--json").stdout)
    stamp = state["timestamps"]["storydiffusion/en"]
    assert state["failed"] == []
    view = scorer_view(out / "outputs", "storydiff", "storydiffusion", "en")
    assert {sid: found["stamp"] for sid, found in view.items()} == {"01": stamp, "02": stamp}
    # Every shot of the dataset finds its own frame (shot k is frame k), and no image is unused.
    runs = out / "runs" / "storydiffusion" / "en"
    for sid, pairs in scored_pairs(view).items():
        assert [i for i, image in pairs if image is None] == []
        assert len(pairs) == len(view[sid]["shots"])
        for position, (_, image) in enumerate(pairs, start=1):
            frame = runs / f"vistory-{sid}" / f"frame_{position:02d}.png"
            assert pixels(image) == pixels(frame)
    shots = out / "outputs" / "storydiff" / "storydiffusion" / "en" / stamp / "01" / "shots"
    assert sorted(p.name for p in shots.iterdir()) == ["01.png", "02.png", "03.png", "04.png"]
    run = runs / "vistory-01"
    frames = json.loads((run / "manifest.json").read_text())["frames"]
    assert frames[1]["characters"] == [] and frames[2]["characters"] == ["Little Fox"]
    assert "--method storydiff --mode storydiffusion --language en" in state["score_with"][0]

    # Resume: the same timestamp folder, nothing generated, no model loaded.
    no_model_loads(monkeypatch)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "outputs").rglob("*.png")}
    again = json.loads(run_cli(*args, "--out", out, "--json").stdout)
    assert again["timestamps"] == state["timestamps"]
    assert {p: p.stat().st_mtime_ns for p in (out / "outputs").rglob("*.png")} == mtimes

    # An output folder of the earlier layout (shot files by position from 00.png) is laid out
    # again from the run folders on resume: renamed, nothing rendered, no stale image left.
    for image in sorted(shots.iterdir()):
        image.unlink()
    for position in range(4):
        (shots / f"{position:02d}.png").write_bytes(
            (run / f"frame_{position + 1:02d}.png").read_bytes()
        )
    resumed = json.loads(run_cli(*args, "--out", out, "--json").stdout)
    assert resumed["failed"] == []
    assert sorted(p.name for p in shots.iterdir()) == ["01.png", "02.png", "03.png", "04.png"]
    view = scorer_view(out / "outputs", "storydiff", "storydiffusion", "en")
    for position, (_, image) in enumerate(scored_pairs(view)["01"], start=1):
        assert pixels(image) == pixels(run / f"frame_{position:02d}.png")


def test_vistorybench_bad_datasets_name_file_and_field(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ("bench", "vistorybench", "--model", "tiny", "--out", out)
    result = run_cli(*base, "--dataset", tmp_path / "none", code=2)
    assert "no such folder" in result.stderr and "hf download ViStoryBench" in result.stderr
    result = run_cli(*base, "--dataset", tmp_path, code=2)
    assert "no story folders" in result.stderr
    result = run_cli(*base, "--dataset", FIXTURE, "--stories", "01,99", code=2)
    assert "--stories: 99 not in" in result.stderr

    bad = tmp_path / "bad" / "ViStory" / "07"
    bad.mkdir(parents=True)
    story = json.loads((FIXTURE / "ViStory" / "02" / "story.json").read_text())
    del story["Shots"][1]["Static Shot Description"]
    (bad / "story.json").write_text(json.dumps(story))
    result = run_cli(*base, "--dataset", tmp_path / "bad", code=2)
    assert f'{bad / "story.json"}: Shots[1] lacks "Static Shot Description"' in result.stderr
    story["Shots"][1]["Static Shot Description"] = {"en": "x", "ch": "x"}
    story["Shots"][0]["Characters Appearing"]["en"] = ["Ghost"]
    (bad / "story.json").write_text(json.dumps(story))
    result = run_cli(*base, "--dataset", tmp_path / "bad", code=2)
    assert "Shots[0].Characters Appearing.en names 'Ghost'" in result.stderr
    (bad / "story.json").write_text("{not json")
    result = run_cli(*base, "--dataset", tmp_path / "bad", code=2)
    assert "not a readable story.json" in result.stderr
    assert not out.exists()  # every story is checked before anything is written
    result = run_cli(*base, "--dataset", FIXTURE, "--timestamp", "yesterday", code=2)
    assert "YYYYMMDD-HHMMSS" in result.stderr


def test_vistorybench_shot_indices_must_be_distinct(tmp_path: Path) -> None:
    # The scorer finds a shot's image by its `index`: two shots of one index would share a file.
    bad = tmp_path / "ViStory" / "03"
    bad.mkdir(parents=True)
    story = json.loads((FIXTURE / "ViStory" / "02" / "story.json").read_text("utf-8-sig"))
    story["Shots"][1]["index"] = story["Shots"][0]["index"]
    (bad / "story.json").write_text(json.dumps(story))
    result = run_cli(
        "bench", "vistorybench", "--dataset", tmp_path, "--out", tmp_path / "o", code=2
    )
    assert "Shots[1].index 1 is negative or repeats another shot's" in result.stderr
    story["Shots"][1]["index"] = "two"
    (bad / "story.json").write_text(json.dumps(story))
    result = run_cli(
        "bench", "vistorybench", "--dataset", tmp_path, "--out", tmp_path / "o", code=2
    )
    assert "Shots[1].index must be a whole number" in result.stderr


# ----------------------------------------------------------- issue 20: models checked up front


def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.usefixtures("hub_offline")
def test_consistory_checks_the_scorer_before_generating(tmp_path: Path) -> None:
    out = tmp_path / "cp"
    args = ("bench", "consistory-plus", "--model", "tiny", "--limit", "1", "--steps", "1")
    result = run_cli(*args, "--out", out, code=1)  # the default CLIP is not cached
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "CLIP model 'openai/clip-vit-base-patch32'" in lines[0]
    assert "hf download openai/clip-vit-base-patch32" in lines[0]
    assert "Traceback" not in result.output
    assert list(out.rglob("*.png")) == [] and not (out / "runs").exists()


@pytest.mark.usefixtures("hub_offline")
def test_consistory_error_after_progress_started_is_the_last_line(tmp_path: Path) -> None:
    # The generation model fails after the items bar appeared: the bars are erased, so the
    # error is the only thing on stderr (not followed by a stale progress line).
    out = tmp_path / "cp"
    args = ("bench", "consistory-plus", "--model", "sdxl", "--clip", "tiny", "--limit", "1")
    result = run_cli(*args, "--steps", "1", "--out", out, code=1)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "not in the local Hugging Face cache" in lines[0]
    assert list(out.rglob("*.png")) == []
