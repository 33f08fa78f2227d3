"""`storydiff evaluate` on real tiny runs (CPU, offline): the numbers against a hand computation
with the same tiny CLIP, the edge cases that define the metrics (identical frames, a still
video), the optional metrics' plumbing, and bad input.

One tiny generate run (2 characters, 5 frames, 2 steps, 64x48) and its crossfade video are
made once for the module; tests that change files work on copies.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cli_runs import run_cli
from PIL import Image

from storycli.evaluate import metrics as m
from storycli.evaluate.clip import build_tiny_clip
from storycli.evaluate.run_scores import EvaluateOptions, evaluate_run
from storycli.motion.video.io import read_frames

pytestmark = pytest.mark.usefixtures("one_thread")

STORY = {
    "name": "pair",
    "model": "tiny",
    "characters": {"Ann": "a woman with red hair", "Bob": "a man with a blue hat"},
    "frames": [
        "[Ann] walks in the park",
        "[Bob] reads a book",
        "[NC] an empty street at night",
        "[Ann] drinks tea",
        "[Ann] and [Bob] share a meal",
    ],
    "seed": 3,
    "width": 256,
    "height": 192,
    "steps": 2,
    "consistency": {"method": "storydiffusion", "id_length": 1},
}


def evaluate_json(folder: Path, *extra: str) -> dict[str, Any]:
    return json.loads(run_cli("evaluate", folder, "--clip", "tiny", "--json", *extra).stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A tiny generate run with its crossfade video/ folder."""
    root = tmp_path_factory.mktemp("evaluate")
    story = root / "pair.yaml"
    story.write_text(yaml.safe_dump(STORY), encoding="utf-8")
    run_cli("generate", story, "--out", root / "out", "-q")
    folder = root / "out" / "pair"
    run_cli("animate", folder, "--frames", "4", "-q")
    return folder


def copy_run(run: Path, dst: Path, video: bool = True) -> Path:
    ignore = None if video else shutil.ignore_patterns("video")
    shutil.copytree(run, dst, ignore=ignore)
    (dst / "evaluation.json").unlink(missing_ok=True)
    return dst


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------- pure metrics


def test_metric_functions_on_known_values() -> None:
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert m.clip_t(e[:2], e[:2]) == pytest.approx([1.0, 1.0])
    assert m.clip_score(0.4) == pytest.approx(1.0)  # 2.5 x cos
    assert m.clip_score(-0.3) == 0.0  # clamped, as CLIPScore
    # Pairs (0,1): 0, (0,2) and (1,2): 1/sqrt(2).
    assert m.mean_pairwise_cosine(e) == pytest.approx(2 / np.sqrt(2) / 3)
    assert m.mean_pairwise_cosine(e[:1]) is None  # one frame: no pair, not a zero
    assert m.clipsim_first(e) == pytest.approx((0 + 1 / np.sqrt(2)) / 2)
    assert m.clipsim_frames(e) == pytest.approx((0 + 1 / np.sqrt(2)) / 2)
    still = [np.full((4, 4, 3), 90, np.uint8)] * 3
    assert m.motion_magnitude(still) == 0.0
    flicker = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    assert m.motion_magnitude(flicker) == pytest.approx(1.0)  # in [0, 1]


# ------------------------------------------------------------------- a generate run, by hand


def test_clip_metrics_equal_a_hand_computation(run: Path) -> None:
    folder = copy_run(run, run.parent / "by-hand", video=False)
    document = evaluate_json(folder)
    assert json.loads((folder / "evaluation.json").read_text()) == document
    assert document["kind"] == "generate" and document["video"] is None
    frames = manifest(folder)["frames"]

    # The same tiny CLIP, through CLIPModel.forward (its own normalised projections): another
    # path than evaluate's towers + projections.
    model, tokenizer, processor = build_tiny_clip()
    texts = ["A photo depicts " + f["prompt"] for f in frames]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = processor(images=[rgb(folder / f["file"]) for f in frames], return_tensors="pt")
    with torch.inference_mode():
        out = model(**tokens, pixel_values=pixels.pixel_values)
    image, text = out.image_embeds.double(), out.text_embeds.double()
    cos = (image * text).sum(-1).tolist()

    scored = document["keyframes"]
    for f, row, c in zip(frames, scored["frames"], cos, strict=True):
        # The prompt the text encoder saw: tags replaced by descriptions, [NC] dropped.
        assert row["text"] == "A photo depicts " + f["prompt"]
        assert "[" not in row["text"]
        assert row["clip_t_cos"] == pytest.approx(c, abs=1e-5)
        assert row["clip_t"] == pytest.approx(2.5 * max(c, 0.0), abs=1e-5)
    assert scored["clip_t_cos"] == pytest.approx(np.mean(cos), abs=1e-5)

    def pairs(rows: list[int]) -> list[float]:
        return [float(image[i] @ image[j]) for i, j in combinations(rows, 2)]

    ann, bob = [0, 3, 4], [1, 4]  # frame 5 shows both; frame 3 ([NC]) nobody
    assert scored["characters"]["Ann"] == {
        "frames": [1, 4, 5],
        "pairs": 3,
        "clip_i": pytest.approx(np.mean(pairs(ann)), abs=1e-5),
    }
    assert scored["characters"]["Bob"]["clip_i"] == pytest.approx(pairs(bob)[0], abs=1e-5)
    assert scored["clip_i"] == pytest.approx(np.mean(pairs(ann) + pairs(bob)), abs=1e-5)
    assert scored["dreamsim"] == {"status": "not installed"}


def test_identical_frames_score_clip_i_one(run: Path, tmp_path: Path) -> None:
    folder = copy_run(run, tmp_path / "same", video=False)
    first = (folder / "frame_01.png").read_bytes()
    for f in manifest(folder)["frames"]:
        (folder / f["file"]).write_bytes(first)
    scored = evaluate_json(folder)["keyframes"]
    assert scored["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert all(c["clip_i"] == pytest.approx(1.0, abs=1e-6) for c in scored["characters"].values())


# ----------------------------------------------------------------------------- video runs


def test_animate_run_scores_transitions(run: Path) -> None:
    """The shared run with video/: both sections; end fidelity and motion by hand."""
    document = evaluate_json(run)
    assert document["kind"] == "generate+animate"
    video = document["video"]
    animate = json.loads((run / "video" / "animate.json").read_text())
    assert [t["file"] for t in video["transitions"]] == [t["file"] for t in animate["transitions"]]
    model, _, processor = build_tiny_clip()
    first = video["transitions"][0]
    decoded = read_frames(run / "video" / first["file"], 8, None)
    assert first["frames"] == len(decoded) == 4
    pixels = processor(images=[decoded[-1], rgb(run / first["to"])], return_tensors="pt")
    with torch.inference_mode():
        embeds = model.get_image_features(pixel_values=pixels.pixel_values)
    embeds = getattr(embeds, "pooler_output", embeds).double()
    assert first["end_fidelity"] == pytest.approx(m.cosine(embeds[0], embeds[1]), abs=1e-5)
    arrays = [np.asarray(f) for f in decoded]
    assert first["motion"] == pytest.approx(m.motion_magnitude(arrays), abs=1e-6)
    assert 0.0 <= video["motion"] <= 1.0
    assert video["lpips"] == {"status": "not installed"}


def noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((64, 48), Image.Resampling.BILINEAR)


def test_still_video_has_zero_motion_and_a_moving_one_more(tmp_path: Path) -> None:
    still, moving = tmp_path / "still", tmp_path / "moving"
    for folder, seeds in ((still, (1, 1)), (moving, (1, 2))):
        folder.mkdir()
        for i, seed in enumerate(seeds):
            noise_image(seed).save(folder / f"k{i}.png")
        run_cli("animate", folder, "--frames", "6", "--quality", "10", "-q")
    calm = evaluate_json(still / "video")["video"]  # the video folder itself
    assert calm["motion"] == pytest.approx(0.0, abs=1e-9)
    assert calm["clipsim_first"] == pytest.approx(1.0, abs=1e-6)
    busy = evaluate_json(moving / "video")["video"]
    assert busy["motion"] > 0.01
    assert (still / "video" / "evaluation.json").is_file()


# ------------------------------------------------------------------------ optional metrics


def test_optional_metrics_are_used_when_installed(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-ins for the dreamsim and lpips packages (the real ones need torchvision): their
    distances reach evaluation.json, pair for pair."""

    def gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() - b.float()).abs().mean()

    dreamsim = types.ModuleType("dreamsim")

    def load_dreamsim(pretrained: bool, device: str, cache_dir: str) -> Any:
        def preprocess(image: Image.Image) -> torch.Tensor:
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)

        return gap, preprocess

    dreamsim.dreamsim = load_dreamsim  # type: ignore[attr-defined]
    lpips = types.ModuleType("lpips")

    class LPIPS(torch.nn.Module):
        def __init__(self, net: str, verbose: bool) -> None:
            super().__init__()

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return gap(a, b)

    lpips.LPIPS = LPIPS  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dreamsim", dreamsim)
    monkeypatch.setitem(sys.modules, "lpips", lpips)
    folder = copy_run(run, tmp_path / "extras")
    document = evaluate_run(EvaluateOptions(folder, clip="tiny", device="cpu"))
    ds = document["keyframes"]["dreamsim"]
    frames = [
        np.asarray(rgb(folder / f["file"]), dtype=np.float64) / 255
        for f in manifest(folder)["frames"]
    ]
    bob = float(np.abs(frames[1] - frames[4]).mean())
    assert ds["status"] == "ok"
    assert ds["characters"]["Bob"] == pytest.approx(bob, abs=1e-6)
    lp = document["video"]["lpips"]
    assert lp["status"] == "ok" and lp["frames"] is not None and lp["end"] is not None


# ------------------------------------------------------------------------------ bad input


def test_bad_folders_are_one_sentence_and_write_nothing(run: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", tmp_path, "--clip", "tiny", code=2)
    assert "not a storydiff run folder" in result.stderr
    result = run_cli("evaluate", tmp_path / "nope", "--clip", "tiny", code=2)
    assert "no such folder" in result.stderr

    missing = copy_run(run, tmp_path / "missing", video=False)
    (missing / "frame_02.png").unlink()
    result = run_cli("evaluate", missing, "--clip", "tiny", code=2)
    assert "frame_02.png: listed in manifest.json but missing" in result.stderr

    corrupt = copy_run(run, tmp_path / "corrupt", video=False)
    (corrupt / "frame_03.png").write_bytes(b"not a png")
    result = run_cli("evaluate", corrupt, "--clip", "tiny", code=2)
    assert "frame_03.png: not a readable image" in result.stderr

    unfinished = copy_run(run, tmp_path / "unfinished", video=False)
    data = manifest(unfinished) | {"complete": False}
    (unfinished / "manifest.json").write_text(json.dumps(data))
    result = run_cli("evaluate", unfinished, "--clip", "tiny", code=2)
    assert "complete: false" in result.stderr

    broken_video = copy_run(run, tmp_path / "broken-video")
    (broken_video / "video" / "transition_01_02.mp4").write_bytes(b"\0" * 100)
    result = run_cli("evaluate", broken_video, "--clip", "tiny", code=2)
    assert "transition_01_02.mp4: not a readable video" in result.stderr
    for folder in (missing, corrupt, unfinished, broken_video):
        assert not (folder / "evaluation.json").exists()
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("hub_offline")
def test_clip_weights_missing_offline_say_how_to_fetch_them(run: Path) -> None:
    result = run_cli("evaluate", run, "--clip", "openai/clip-vit-base-patch32", code=1)
    assert "hf download openai/clip-vit-base-patch32" in result.stderr
    result = run_cli("evaluate", run, "--clip", "./no-such-clip", code=1)
    assert "does not exist" in result.stderr
