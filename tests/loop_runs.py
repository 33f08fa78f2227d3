"""Running the story loop from the tests: a story written, planned at the tiny preset's size, and
its frames collected as `generate_keyframes` hands them over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runs import write_story
from PIL import Image

from storycli.config import Configs
from storycli.keyframes.backbones.flux import FluxBackbone
from storycli.keyframes.loop import generate_keyframes
from storycli.keyframes.plan import Plan, build_plan
from storycli.keyframes.schedule import RenderSize, render_size
from storycli.story.loader import load_story


def plan_story(path: Path, story: dict[str, Any], preset: str) -> tuple[Plan, RenderSize]:
    """Write `story` to `path` and plan it at `preset`'s render size."""
    configs = Configs()
    plan = build_plan(load_story(write_story(path, story), configs), configs)
    return plan, render_size(plan, configs.presets[preset].long_side)


def run_loop(pipe: Any, plan: Plan, size: RenderSize, **kwargs: Any) -> dict[int, np.ndarray]:
    """Every frame of `plan` through the story loop: frame index → its pixels."""
    out: dict[int, np.ndarray] = {}

    def on_frame(index: int, image: Image.Image, _seconds: float) -> None:
        out[index] = np.asarray(image).copy()

    generate_keyframes(pipe, plan, range(len(plan.frames)), size, on_frame, **kwargs)
    return out


def final_latents(
    pipe: Any, plan: Plan, size: RenderSize, monkeypatch: pytest.MonkeyPatch
) -> dict[int, torch.Tensor]:
    """Each frame's final latents through the FLUX backbone, by frame index (decoded call by
    call, in plan order)."""
    final: list[torch.Tensor] = []
    decode = FluxBackbone.decode

    def recording(self: FluxBackbone, latents: Any) -> list[Image.Image]:
        final.extend(latents.clone())
        return decode(self, latents)

    with monkeypatch.context() as patch:
        patch.setattr(FluxBackbone, "decode", recording)
        run_loop(pipe, plan, size)
    order = [i for call in plan.calls for i in call.frames]
    return dict(zip(order, final, strict=True))


def latent_moves(
    pipe: Any, plan: Plan, baseline: Plan, size: RenderSize, monkeypatch: pytest.MonkeyPatch
) -> dict[int, float]:
    """How far each frame's final latents under `plan` lie from `baseline`'s (largest absolute
    difference), by frame index: FLUX's tiny random VAE could hide a change in pixels."""
    ours = final_latents(pipe, plan, size, monkeypatch)
    theirs = final_latents(pipe, baseline, size, monkeypatch)
    return {i: (ours[i] - theirs[i]).abs().max().item() for i in ours}
