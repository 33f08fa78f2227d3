"""A FLUX.1 transformer file as a story's `model:` (issue 22): BFL's `.safetensors` layout or a
Q8_0 `.gguf`, the rest of the pipeline (VAE, text encoders, tokenizers, scheduler) from the
config repo's hub-cache snapshot (FLUX.1-schnell's for a file without a guidance embedding),
offline; the story checks take `.gguf`; a missing config repo is one line naming `hf download`.

The files are the tiny random FLUX.1 (schnell-like) transformer written by `flux_checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_runs import pixels, run_cli, write_story
from flux_checkpoints import write_flux_gguf, write_flux_safetensors
from hub_repos import hub_repo, quiet_save

from storycli.config import Configs
from storycli.keyframes.flux_files import FLUX_SCHNELL_REPO
from storycli.keyframes.models import load_pipeline, resolve_model
from storycli.story.checks import check_model
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    """The tiny schnell-like FLUX.1 as a diffusers folder, and its transformer as files."""
    folder = tmp_path_factory.mktemp("tiny-flux-schnell")
    pipe = build_tiny_flux_pipeline(guidance_embeds=False)
    quiet_save(pipe, folder / "pipeline")
    return {
        "pipeline": folder / "pipeline",
        "safetensors": write_flux_safetensors(
            pipe.transformer, folder / "flux1-schnell.safetensors"
        ),
        "gguf": write_flux_gguf(pipe.transformer, folder / "flux1-schnell-Q8_0.gguf"),
    }


def file_story(model: Path | str) -> dict[str, Any]:
    return {
        "name": "fluxfile",
        "model": str(model),
        "identity": "a small grey cat",
        "frames": ["a cat on a boat", "a cat in a park", "a cat on a roof"],
        "seed": 5,
        "width": 96,
        "height": 64,
        "steps": 2,
        "guidance": 0.0,
        # CSA on: its processors run in the file's transformer (GGUF layers included).
        "consistency": {"method": "storydiffusion", "id_length": 2, "warmup_steps": 0},
    }


def render(tmp_path: Path, model: Path | str, out: str) -> list[np.ndarray]:
    story = write_story(tmp_path / f"{out}.yaml", file_story(model))
    result = run_cli("generate", story, "--out", tmp_path / out, "--device", "cpu", "--json")
    summary = json.loads(result.stdout)
    assert [f["status"] for f in summary["frames"]] == ["generated"] * 3
    return [pixels(tmp_path / out / "fluxfile" / f"frame_0{n}.png") for n in (1, 2, 3)]


def test_flux_files_are_flux_models(hub_cache: Path, schnell: dict[str, Path]) -> None:
    for kind in ("safetensors", "gguf"):
        assert check_model(str(schnell[kind]), Configs(), hub_cache) is None
        info = resolve_model(str(schnell[kind]), device="cpu")
        assert info.family == "flux" and not info.tiny
        assert info.model_id == str(schnell[kind].resolve())


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_flux_file_renders_through_the_cli(
    hub_cache: Path, schnell: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """The file's transformer in FLUX.1-schnell's cached pipeline: the .safetensors one makes
    the very pixels of the tiny pipeline itself, the Q8_0 one pixels close to them."""
    hub_repo(hub_cache, FLUX_SCHNELL_REPO, schnell["pipeline"])
    loaded = load_pipeline(str(schnell[kind]), device="cpu")
    assert type(loaded.pipe).__name__ == "FluxPipeline" and loaded.family == "flux"
    quantized = type(loaded.pipe.transformer.x_embedder.weight).__name__ == "GGUFParameter"
    assert quantized == (kind == "gguf")
    ours = render(tmp_path, schnell[kind], "file")
    folder = render(tmp_path, schnell["pipeline"], "folder")
    if kind == "safetensors":
        assert all(np.array_equal(a, b) for a, b in zip(ours, folder, strict=True))
    else:  # Q8_0 rounds the weights: near, not equal
        for a, b in zip(ours, folder, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
    assert not np.array_equal(ours[0], ours[1])


def test_a_missing_config_repo_offline_is_one_line(
    hub_cache: Path, schnell: dict[str, Path], tmp_path: Path
) -> None:
    story = write_story(tmp_path / "story.yaml", file_story(schnell["safetensors"]))
    result = run_cli("generate", story, "--out", tmp_path / "out", "--device", "cpu", code=1)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert f"`hf download {FLUX_SCHNELL_REPO} --exclude" in errors[0]
    assert "flux1-schnell.safetensors" in errors[0]
    assert not (tmp_path / "out" / "fluxfile" / "frame_01.png").exists()


def test_a_flux_file_is_flux_before_it_loads(
    hub_cache: Path, schnell: dict[str, Path], tmp_path: Path
) -> None:
    """Told FLUX.1 by its header: FLUX.1's refusals come before the (here impossible) load."""
    story = file_story(schnell["gguf"]) | {"freeu": {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.2}}
    path = write_story(tmp_path / "story.yaml", story)
    result = run_cli("generate", path, "--out", tmp_path / "out", "--device", "cpu", code=2)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: freeu:"), result.stderr
