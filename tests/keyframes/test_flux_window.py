"""Window mode (`consistency.mode: window`) on FLUX.1 (issue 22), on the tiny random FLUX: the
windowed transformer call equals one joint call when a window covers the story and keeps frames
to their windows; through the loop, rate 0 is `method: none`, CSA moves the frames and runs
repeat bit-identically; a long window-mode story renders through the CLI.

(SDXL's counterparts: the sliding-window tests of `tests/consistency/test_csa.py`.)
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
from loop_runs import final_latents, latent_moves, plan_story, run_loop

from storycli.consistency.csa_dit import dit_csa_layers, installed_dit_csa
from storycli.consistency.csa_state import CSASettings, CSAState
from storycli.keyframes.backbones.flux import windowed_transformer
from storycli.keyframes.plan import Plan
from storycli.keyframes.schedule import RenderSize
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ALWAYS = CSASettings(sa32=0.5, sa64=0.5, warmup_steps=0, prob_early=1.0, prob_late=1.0)
FRAMES = [
    "walks on a beach",
    "reads a book",
    "[NC] an empty lighthouse",
    "drinks tea",
    "sings on a stage",
    "dances in the rain",
]
WINDOW = {
    "method": "storydiffusion",
    "mode": "window",
    "window": 3,
    "stride": 2,
    "warmup_steps": 0,
    "sa32": 0.5,
    "sa64": 0.5,
    "blocks": ["down", "mid", "up"],  # every block of the tiny FLUX: the biggest effect
}


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "dev-like"])
def pipe(request: pytest.FixtureRequest, one_thread: None) -> Any:
    return build_tiny_flux_pipeline(guidance_embeds=request.param)


# ------------------------------------------------------------------ the transformer call


def flux_inputs(transformer: Any, batch: int, seed: int = 0) -> dict[str, Any]:
    """A transformer call on `batch` rows of a 4 × 6 packed grid, 8 text tokens (and the
    embedded guidance of a dev-like one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, 6, 3)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(6)[None]
    guidance = torch.full((batch,), 3.5) if transformer.config.guidance_embeds else None
    return {
        "hidden_states": torch.randn(batch, 24, 64, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": guidance,
        "return_dict": False,
    }


def run_call(transformer: Any, state: CSAState, inputs: dict, phase: str, n: int) -> torch.Tensor:
    """One forward of a call of `n` frames (character "A" for a write call), seeded alike."""
    character = "A" if phase == "write" else None
    state.enter([state.open_call(phase, n, seed=3, character=character)])  # type: ignore[arg-type]
    with torch.no_grad():
        out = transformer(**inputs)[0]
    state.leave()
    return out


def test_window_covering_the_story_equals_joint_csa(pipe: Any) -> None:
    transformer = pipe.transformer
    n = 4
    inputs = flux_inputs(transformer, n, seed=6)
    layers = dit_csa_layers(transformer, ["double", "single"])
    joint_state = CSAState(ALWAYS, layers)
    with installed_dit_csa(transformer, joint_state):
        joint = run_call(transformer, joint_state, inputs, "write", n)
    state = CSAState(ALWAYS, layers)
    with (
        installed_dit_csa(transformer, state),
        windowed_transformer(transformer, state, frames=n, window=n + 2, stride=1),
    ):
        windowed = run_call(transformer, state, inputs, "window", n)
    assert torch.equal(windowed, joint)
    assert state.bank == {}  # windows keep no bank
    assert "forward" not in transformer.__dict__  # the transformer's own forward is back


def test_window_frames_only_see_their_windows(pipe: Any) -> None:
    transformer = pipe.transformer
    frames = 5
    inputs = flux_inputs(transformer, frames, seed=7)
    state = CSAState(ALWAYS, dit_csa_layers(transformer, ["double", "single"]))

    def run(batch: dict) -> torch.Tensor:
        with windowed_transformer(transformer, state, frames=frames, window=2, stride=1):
            return run_call(transformer, state, batch, "window", frames)

    moved_inputs = dict(inputs)
    hidden = inputs["hidden_states"].clone()
    hidden[0] += 1.0  # frame 0: in window [0, 1] only
    moved_inputs["hidden_states"] = hidden
    with installed_dit_csa(transformer, state):
        base, moved = run(inputs), run(moved_inputs)
    diff = (moved - base).abs().flatten(1).amax(1)
    assert diff[1] > 1e-4  # shares window [0, 1]
    assert torch.all(diff[2:] == 0)  # never in a window with frame 0


# ------------------------------------------------------------------ the loop


def window_story(**changes: Any) -> dict[str, Any]:
    story: dict[str, Any] = {
        "name": "fluxwin",
        "model": "tiny-flux",
        "identity": "a woman with red hair",
        "frames": FRAMES,
        "seed": 7,
        "width": 96,
        "height": 64,
        "steps": 3,
        "guidance": 3.5,
        "consistency": WINDOW,
        "noise": "per-frame",  # a frame's noise alike whichever call the plan puts it in
    }
    story.update(changes)
    return story


def plan_of(tmp_path: Path, name: str = "story", **changes: Any) -> tuple[Plan, RenderSize]:
    return plan_story(tmp_path / f"{name}.yaml", window_story(**changes), "tiny-flux")


def test_rate_zero_window_mode_is_method_none(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sa32: 0, sa64: 0` in window mode: windows run and overlaps are averaged, but no token is
    borrowed, so every frame is `method: none`'s within the ulps of batch composition (the
    tolerance of `test_flux_csa.py`'s rate-0 test)."""
    plan, size = plan_of(tmp_path, "off", consistency=WINDOW | {"sa32": 0.0, "sa64": 0.0})
    assert [c.phase for c in plan.calls] == ["window", "plain"]
    none_plan, _ = plan_of(tmp_path, "none", consistency={"method": "none"})
    ours = final_latents(pipe, plan, size, monkeypatch)
    plain = final_latents(pipe, none_plan, size, monkeypatch)
    assert ours.keys() == plain.keys() == set(range(len(FRAMES)))
    for index, latents in ours.items():
        torch.testing.assert_close(latents, plain[index], atol=1e-5, rtol=0)


def test_window_csa_moves_the_frames_and_repeats_bit_identically(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, size = plan_of(tmp_path, "csa")
    first, second = run_loop(pipe, plan, size), run_loop(pipe, plan, size)
    assert first.keys() == second.keys() == set(range(len(FRAMES)))
    assert all(np.array_equal(first[i], second[i]) for i in first)
    none_plan, _ = plan_of(tmp_path, "none", consistency={"method": "none"})
    moved = latent_moves(pipe, plan, none_plan, size, monkeypatch)
    assert all(moved[i] > 1e-2 for i in (0, 1, 3, 4, 5)), moved  # the window's frames
    assert moved[2] < 1e-5, moved  # the [NC] frame is in no window


# ------------------------------------------------------------------ the CLI


def test_long_window_story_renders_through_the_cli(tmp_path: Path) -> None:
    """`stories/long_walk.yaml` (a rolling-history story) switched to window mode: eight frames
    in windows of 4 every 2, on `--model tiny-flux`, twice to the same pixels."""
    example = Path(__file__).parents[2] / "stories" / "long_walk.yaml"
    story = yaml.safe_load(example.read_text(encoding="utf-8"))
    story["consistency"] = {"method": "storydiffusion", "mode": "window", "warmup_steps": 0}
    story["steps"] = 2
    path = write_story(tmp_path / "walk.yaml", story)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = run_cli("generate", path, "--model", "tiny-flux", "--out", out, "--json")
        summary = json.loads(result.stdout)
        assert summary["model"]["id"] == "tiny-flux"
        assert [f["status"] for f in summary["frames"]] == ["generated"] * 8
    for n in range(1, 9):
        name = f"long-walk/frame_0{n}.png"
        np.testing.assert_array_equal(pixels(outs[0] / name), pixels(outs[1] / name))
