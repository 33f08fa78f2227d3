"""FLUX.1 as the story loop's second backbone, on the tiny random FLUX (`weights.tiny_flux`).

The story loop on a `FluxPipeline` must give the pipeline's own frames (same noise, same
timesteps, same transformer inputs), the same frames twice and after a resume; the CLI runs it
with `--model tiny-flux`; a FLUX folder or hub snapshot loads by path or id; what FLUX cannot
run yet is refused in one line before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cli_runs import pixels, run_cli, write_story
from hub_repos import hub_repo, quiet_save
from loop_runs import plan_story, run_loop
from PIL import Image

from storycli.config import Configs
from storycli.keyframes.backbones.flux import FluxBackbone
from storycli.keyframes.backbones.select import backbone_for
from storycli.keyframes.checkpoints import LoopCheckpoint
from storycli.keyframes.models import load_pipeline, resolve_model
from storycli.keyframes.plan import Plan
from storycli.keyframes.schedule import RenderSize
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
FRAMES = ["a cat on a boat", "a dog in a park", "[NC] an empty lighthouse"]


def flux_story(**changes: Any) -> dict[str, Any]:
    story: dict[str, Any] = {
        "name": "fluxy",
        "model": "tiny-flux",
        "identity": "a small grey cat",
        "frames": FRAMES,
        "seed": 5,
        "width": 96,
        "height": 64,
        "steps": STEPS,
        "guidance": 3.5,
        "noise": "per-frame",
        "consistency": {"method": "none"},
    }
    story.update(changes)
    return story


def plan_of(tmp_path: Path, **changes: Any) -> tuple[Plan, RenderSize]:
    return plan_story(tmp_path / "story.yaml", flux_story(**changes), "tiny-flux")


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "dev-like"])
def pipe(request: pytest.FixtureRequest, one_thread: None) -> Any:
    return build_tiny_flux_pipeline(guidance_embeds=request.param)


# ------------------------------------------------------------------ the pipeline's own frames


def test_story_loop_equals_the_flux_pipeline(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`method: none`: each frame is what `FluxPipeline(...)` makes from the same seed (its
    final latents within float tolerance, its pixels within a rounding step)."""
    plan, size = plan_of(tmp_path)
    assert isinstance(backbone_for(pipe), FluxBackbone)
    final: list[torch.Tensor] = []
    decode = FluxBackbone.decode

    def recording(self: FluxBackbone, latents: torch.Tensor) -> list[Image.Image]:
        final.extend(latents)
        return decode(self, latents)

    monkeypatch.setattr(FluxBackbone, "decode", recording)
    ours = run_loop(pipe, plan, size)
    # Plain frames are decoded in story order: `final[i]` is frame i's.
    for row, frame in enumerate(plan.frames):
        call: dict[str, Any] = {
            "prompt": [frame.prompt] * (frame.noise_index + 1),
            "height": size.height,
            "width": size.width,
            "num_inference_steps": STEPS,
            "guidance_scale": 3.5,
            "max_sequence_length": pipe.tokenizer_2.model_max_length,
        }
        latents = pipe(
            **call, generator=torch.Generator().manual_seed(frame.seed), output_type="latent"
        ).images[frame.noise_index]
        image = pipe(**call, generator=torch.Generator().manual_seed(frame.seed)).images[
            frame.noise_index
        ]
        torch.testing.assert_close(final[row], latents, atol=1e-5, rtol=0)
        difference = np.abs(ours[frame.index].astype(int) - np.asarray(image).astype(int))
        assert difference.max() <= 1, frame.index


def test_same_story_twice_is_bit_identical(pipe: Any, tmp_path: Path) -> None:
    plan, size = plan_of(tmp_path, noise="shared")
    first, second = run_loop(pipe, plan, size), run_loop(pipe, plan, size)
    assert first.keys() == second.keys() == {0, 1, 2}
    assert all(np.array_equal(first[i], second[i]) for i in first)
    assert not np.array_equal(first[0], first[1])  # prompts matter


def test_resume_after_a_partial_run_gives_the_same_pixels(pipe: Any, tmp_path: Path) -> None:
    """Killed in step 2 (a checkpoint after every step), then run again: the very pixels of an
    uninterrupted run. A start picture's row is noised by flow matching's `scale_noise`."""
    picture = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(picture)
    plan, size = plan_of(tmp_path, start_image="start.png", steps=4)
    whole = run_loop(pipe, plan, size)

    class Killed(Exception):
        pass

    def kill_after_two(done: int, _steps: int) -> None:
        if done == 3:  # step 2 is done, before its checkpoint: step 1's is the last
            raise Killed

    checkpoint = LoopCheckpoint(tmp_path / ".story-loop.pt", "key", every_steps=1)
    with pytest.raises(Killed):
        run_loop(pipe, plan, size, checkpoint=checkpoint, on_step=kill_after_two)
    resumed_checkpoint = LoopCheckpoint(tmp_path / ".story-loop.pt", "key", every_steps=1)
    resumed = run_loop(pipe, plan, size, checkpoint=resumed_checkpoint)
    assert resumed_checkpoint.resumed_from == 1
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[i], whole[i]) for i in whole)


def test_flux_scheduler_keeps_the_pipelines_shifted_timesteps(pipe: Any, tmp_path: Path) -> None:
    _, size = plan_of(tmp_path)
    backbone = FluxBackbone(pipe)
    backbone.prepare_timesteps(STEPS, size)
    ours = backbone.scheduler.timesteps.clone()
    pipe(
        "x",
        height=size.height,
        width=size.width,
        num_inference_steps=STEPS,
        output_type="latent",
        max_sequence_length=64,
    )
    assert torch.equal(ours, pipe.scheduler.timesteps)


# ------------------------------------------------------------------ the CLI and loading


def test_cli_renders_a_story_on_tiny_flux(tmp_path: Path) -> None:
    story = write_story(tmp_path / "story.yaml", flux_story(model="tiny"))
    out = tmp_path / "out"
    result = run_cli("generate", story, "--model", "tiny-flux", "--out", out, "--json")
    summary = json.loads(result.stdout)
    assert summary["model"]["id"] == "tiny-flux" and summary["model"]["tiny_random_model"]
    assert [f["status"] for f in summary["frames"]] == ["generated"] * 3
    frames = [pixels(out / "fluxy" / f"frame_0{n}.png") for n in (1, 2, 3)]
    assert frames[0].shape == (48, 64, 3)  # long side 64 (the preset), aspect kept
    assert not np.array_equal(frames[0], frames[1])
    again = run_cli("generate", story, "--model", "tiny-flux", "--out", out, "--json")
    assert {f["status"] for f in json.loads(again.stdout)["frames"]} == {"skipped"}
    negative = write_story(tmp_path / "negative.yaml", flux_story(negative="blurry"))
    warned = run_cli("generate", negative, "--out", tmp_path / "out2")
    assert "warning: negative: FLUX.1 takes no negative prompt" in warned.stderr


@pytest.mark.parametrize(
    ("changes", "extra", "field"),
    [
        ({"freeu": {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.2}}, (), "freeu:"),
        ({"consistency": {"method": "one-prompt"}}, (), "consistency.method: one-prompt"),
        ({"ip_adapter": {"image": "face.png", "model": "tiny"}}, (), "ip_adapter:"),
    ],
)
def test_what_flux_cannot_run_yet_is_refused_in_one_line(
    tmp_path: Path, changes: dict[str, Any], extra: tuple[str, ...], field: str
) -> None:
    Image.new("RGB", (32, 32), "white").save(tmp_path / "face.png")
    story = write_story(tmp_path / "story.yaml", flux_story(**changes))
    result = run_cli("generate", story, "--out", tmp_path / "out", *extra, code=2)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    line = errors[0].removeprefix("error: ")
    # A story's field: refused as the story's checks refuse, at its `file:line:col`.
    assert line.startswith(f"{story}:"), line
    line = line.split(" ", 1)[1]
    assert line.startswith(field) and "FLUX.1" in line, line
    assert not (tmp_path / "out" / "fluxy" / "frame_01.png").exists()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flux")
    quiet_save(build_tiny_flux_pipeline(guidance_embeds=True), folder)
    return folder


def test_flux_folder_and_hub_snapshot_load(hub_cache: Path, flux_folder: Path) -> None:
    """A FLUX.1 folder (`model_index.json` naming `FluxPipeline`) loads by path, and its hub
    snapshot by id, offline; both give the built pipeline's numbers."""
    index = json.loads((flux_folder / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "FluxPipeline"
    built = build_tiny_flux_pipeline(guidance_embeds=True)
    hub_repo(hub_cache, "tiny-org/tiny-flux", flux_folder)
    for model in (str(flux_folder), "tiny-org/tiny-flux"):
        info = resolve_model(model, device="cpu")
        assert info.family == "flux" and not info.tiny
        loaded = load_pipeline(model, device="cpu")
        assert type(loaded.pipe).__name__ == "FluxPipeline" and loaded.family == "flux"
        assert loaded.pipe.tokenizer_2.model_max_length == 64
        call = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}
        got = loaded.pipe("a cat", generator=torch.Generator().manual_seed(0), **call).images
        want = built("a cat", generator=torch.Generator().manual_seed(0), **call).images
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_flux_presets() -> None:
    presets = Configs().presets
    assert presets["tiny-flux"].source == "tiny-flux" and presets["tiny-flux"].long_side
    assert presets["flux-schnell"].source == "black-forest-labs/FLUX.1-schnell"
    assert presets["flux-dev"].source == "black-forest-labs/FLUX.1-dev"
    info = resolve_model("tiny-flux", device="cpu")
    assert (info.family, info.tiny, info.dtype) == ("flux", True, "float32")
    raw = yaml.safe_load((Configs().root / "models.yaml").read_text(encoding="utf-8"))
    assert "Non-Commercial" in raw["flux-dev"]["description"]


# ------------------------------------------------------------------ the preset's T5 length


def test_a_presets_t5_tokens_set_the_prompt_length_and_the_frame_keys(tmp_path: Path) -> None:
    """schnell's convention: a preset's `t5_tokens` (256 for flux-schnell) under the tokenizer's
    own length; the plan carries it to the backbone and into the frame keys."""
    import dataclasses

    pipe = build_tiny_flux_pipeline()
    plan, size = plan_of(tmp_path)
    assert plan.t5_tokens is None  # tiny-flux sets none: the tokenizer's own length
    backbone = FluxBackbone(pipe)
    calls = [[plan.frames[0]]]
    full = backbone.conditioning(plan, calls, size, cfg=False).text
    assert full.shape[1] == pipe.tokenizer_2.model_max_length

    short = dataclasses.replace(plan, t5_tokens=16)
    assert backbone.conditioning(short, calls, size, cfg=False).text.shape[1] == 16
    model = {"id": "tiny-flux"}
    assert short.frame_key(0, model) != plan.frame_key(0, model)
    longer = dataclasses.replace(plan, t5_tokens=4096)  # never past the tokenizer's own
    assert backbone.sequence_length(longer) == pipe.tokenizer_2.model_max_length


def test_a_block_past_the_transformers_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    csa = {"method": "storydiffusion", "id_length": 1, "blocks": ["single.1-99"]}
    story = flux_story(consistency=csa)
    path = write_story(tmp_path / "story.yaml", story)
    result = run_cli("generate", path, "--out", tmp_path / "out", code=2)
    assert "consistency.blocks: DiT block 'single.1-99': the transformer has" in result.stderr
    assert not (tmp_path / "out").exists()
