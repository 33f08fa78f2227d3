"""The per-call schedule: one full `pipe(...)` denoising loop per plan call, each call's bank
kept for all its steps. It is how stories were made before the story loop, and the reference
`storycli.keyframes.loop.generate_keyframes` is tested against
 (same frames within float rounding)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from storycli.consistency.csa_state import CSAState
from storycli.keyframes.backbones.sdxl import (
    csa_layers,
    freeu_enabled,
    initial_noise,
    installed_csa,
    windowed_unet,
)
from storycli.keyframes.loop import (
    FrameCallback,
    StepCallback,
    bank_settings,
    csa_settings,
)
from storycli.keyframes.plan import Plan
from storycli.keyframes.schedule import Chunk, RenderSize, calls_needed, describe_call


def generate_keyframes_per_call(
    pipe: Any,
    plan: Plan,
    todo: Iterable[int],
    size: RenderSize,
    on_frame: FrameCallback,
    on_step: StepCallback | None = None,
    on_call: Callable[[str], None] | None = None,
) -> None:
    """The per-call schedule: one full `pipe(...)` denoising loop per plan call, the bank kept
    for every step until the story is done. The reference `generate_keyframes` is tested
    against (same frames within float tolerance); not used to make stories."""
    todo = set(todo)
    calls = calls_needed(plan, todo)
    story = plan.story
    state: CSAState | None = None
    guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if story.uses_csa:
        state = CSAState(
            csa_settings(plan),
            csa_layers(pipe.unet, story.consistency.blocks),
            bank_settings(plan),
        )
        guard = installed_csa(pipe.unet, state)
    with guard, freeu_enabled(pipe, plan), torch.inference_mode():
        for call in calls:
            frames = [plan.frames[i] for i in call.frames]
            if on_call is not None:
                on_call(describe_call(call))
            window: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if state is not None:
                state.begin_call(
                    "off" if call.phase == "plain" else call.phase,
                    n_images=len(frames),
                    seed=call.csa_seed,
                    character=call.character,
                    read_characters=frames[0].characters if call.phase == "read" else (),
                )
            if state is not None and call.phase == "window":
                c = story.consistency
                window = windowed_unet(pipe.unet, state, len(frames), c.window, c.stride)
                pipe.vae.enable_slicing()  # decode a long story one frame at a time

            def step_end(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step + 1, story.steps)
                return kwargs

            started = time.perf_counter()
            with window:
                images = pipe(
                    prompt=[f.prompt for f in frames],
                    # All-empty negatives → None, so SDXL uses zeroed negative embeddings as usual.
                    negative_prompt=[f.negative for f in frames]
                    if any(f.negative for f in frames)
                    else None,
                    width=size.width,
                    height=size.height,
                    num_inference_steps=story.steps,
                    guidance_scale=story.guidance,
                    generator=[torch.Generator("cpu").manual_seed(f.seed) for f in frames],
                    latents=initial_noise(pipe, frames, size, pipe.unet.dtype),
                    callback_on_step_end=step_end,
                    output_type="pil",
                ).images
            seconds = (time.perf_counter() - started) / len(frames)
            if state is not None:
                state.end_call()
            for frame, image in zip(frames, images, strict=True):
                if frame.index in todo:
                    on_frame(frame.index, image, seconds)


def one_call_a_forward(plan: Plan, calls: Iterable[Any], frame_batch: int) -> list[Chunk]:
    """`story_chunks` as it was before forwards were batched across characters: every plan
    call in a forward of its own (monkeypatch `storycli.keyframes.loop.story_chunks` with it). The
    batched schedule is tested against it where the per-call schedule lacks a feature
    (pictures, IP-Adapter photos)."""
    calls = list(calls)
    rows = {index: row for row, index in enumerate(i for c in calls for i in c.frames)}
    return [Chunk((call,), tuple(rows[i] for i in call.frames)) for call in calls]
