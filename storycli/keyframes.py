"""Stage one: run a story plan through an SDXL pipeline with Consistent Self-Attention."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .consistency import CSAState, csa_layers, installed_csa
from .consistency.csa import BankSettings, CSASettings, compiled_unet, windowed_unet
from .plan import GenerationCall, Plan

StepCallback = Callable[[int, int], None]  # (steps done in this call, total steps)
FrameCallback = Callable[[int, Image.Image, float], None]  # (frame index, image, seconds)


@dataclass(frozen=True)
class RenderSize:
    width: int
    height: int


def render_size(plan: Plan, long_side: int | None) -> RenderSize:
    """The story's size, or scaled so the longer side is `long_side` (tiny model)."""
    width, height = plan.story.width, plan.story.height
    if long_side is None or max(width, height) <= long_side:
        return RenderSize(width, height)
    scale = long_side / max(width, height)
    return RenderSize(
        max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)
    )


def calls_needed(plan: Plan, todo: Iterable[int]) -> list[GenerationCall]:
    """The pipeline calls that must run to produce the frames in `todo`.

    A reference frame needs its character's write call; so does any frame that reads that
    character's bank, even when the references themselves are already on disk.
    """
    todo = set(todo)
    readers = {c for i in todo for c in plan.frames[i].characters}
    return [
        call
        for call in plan.calls
        if todo.intersection(call.frames) or (call.phase == "write" and call.character in readers)
    ]


def describe_call(call: GenerationCall) -> str:
    numbers = ", ".join(str(i + 1) for i in call.frames)
    if call.phase == "write":
        return f"references of {call.character} (frames {numbers})"
    if len(call.frames) > 1:
        return f"frames {numbers}"
    return f"frame {numbers}"


def csa_settings(plan: Plan) -> CSASettings:
    c = plan.story.consistency
    return CSASettings(
        sa32=c.sa32,
        sa64=c.sa64,
        warmup_steps=c.warmup_steps,
        prob_early=c.prob_early,
        prob_late=c.prob_late,
        late_from_step=c.late_from_step,
        impl=c.impl,
        sampling=c.sampling,
    )


def bank_settings(plan: Plan, device: torch.device) -> BankSettings:
    bank = plan.story.consistency.bank
    placement = bank.placement
    if placement == "auto":
        # On a GPU the bank (steps × layers × references) would outgrow the UNet itself.
        placement = "cpu" if device.type == "cuda" else "device"
    return BankSettings(
        placement=placement,
        dtype=None if bank.dtype == "auto" else getattr(torch, bank.dtype),
        levels=tuple(bank.levels),
        max_step=bank.max_step,
    )


def generate_keyframes(
    pipe: Any,
    plan: Plan,
    todo: Iterable[int],
    size: RenderSize,
    on_frame: FrameCallback,
    on_step: StepCallback | None = None,
    on_call: Callable[[str], None] | None = None,
    compile_backend: str | None = None,
) -> None:
    """Generate the frames in `todo`, calling `on_frame` as each one is ready.

    Frames outside `todo` are generated only when a needed frame depends on them (references),
    and are then not reported. `compile_backend` (e.g. "inductor") runs the UNet through
    `torch.compile`.
    """
    todo = set(todo)
    calls = calls_needed(plan, todo)
    story = plan.story
    state: CSAState | None = None
    guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if story.uses_consistency:
        state = CSAState(
            csa_settings(plan),
            csa_layers(pipe.unet, story.consistency.blocks),
            bank_settings(plan, getattr(pipe, "_execution_device", pipe.device)),
            compiled=compile_backend is not None,
        )
        guard = installed_csa(pipe.unet, state)
    compiling: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if compile_backend is not None:
        compiling = compiled_unet(pipe.unet, compile_backend)

    with guard, compiling, torch.inference_mode():
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
                    callback_on_step_end=step_end,
                    output_type="pil",
                ).images
            seconds = (time.perf_counter() - started) / len(frames)
            if state is not None:
                state.end_call()
            for frame, image in zip(frames, images, strict=True):
                if frame.index in todo:
                    on_frame(frame.index, image, seconds)
