"""Wan2.1 first-last-frame-to-video (FLF2V): transitions with both keyframes as end frames.

`WanImageToVideoPipeline` is called with `image=` the start keyframe and `last_image=` the end
keyframe; the text is the keyframes' prompts. Wan renders 4k+1 frames at sides multiple of 16:
the video is rendered at `wan_frame_count(frames)` frames and resampled (nearest frame, first
and last kept) to the count asked for, and keyframes are resized to the preset's long side.

The decoder uses no per-frame image embeddings yet (`image_encoder` is None): conditioning Wan
on the motion predictor's P_i is the next step. `--model` is a preset of
configs/video_models.yaml (`wan`, `wan-tiny`), `tiny`, or a Wan FLF2V diffusers repo / folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.motion.decoders.animatediff import render_size
from storycli.motion.decoders.base import StepCallback, TransitionRequest
from storycli.motion.decoders.components import check_local, load_component
from storycli.motion.decoders.wan_tiny import (
    TINY_WAN_TEXT_LENGTH,
    WAN_SIZE_MULTIPLE,
    build_tiny_wan_flf2v_pipeline,
    wan_frame_count,
    wan_pipeline_class,
    wan_prompt_embeds,
)
from storycli.motion.presets import VideoPreset, load_video_presets, resolve_video_preset
from storycli.story.checks import local_model_path
from storycli.weights.devices import (
    Offload,
    check_offload,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)
from storycli.weights.hub import hub_revision

WAN_TEXT_LENGTH = 512  # Wan2.1's UMT5 sequence length


def frame_note(frames: int) -> str | None:
    """The note animate shows when Wan cannot render `frames` frames as asked (None: it can)."""
    render = wan_frame_count(frames)
    if render == frames:
        return None
    return (
        f"wan renders 4k+1 frames: each transition is rendered at {render} frames and "
        f"resampled to the {frames} asked for"
    )


def _load_real(preset: VideoPreset, dtype: torch.dtype) -> Any:
    """The Wan FLF2V diffusers pipeline: a local folder, or the hub cache first (offline: one
    sentence naming `hf download <repo>`)."""
    check_local("Wan model", preset.base)
    pipeline = wan_pipeline_class()
    return load_component(
        "Wan model",
        preset.base,
        lambda src, local_only: pipeline.from_pretrained(
            src, dtype=dtype, local_files_only=local_only
        ),
    )


def load_wan_decoder(
    model: str = "wan",
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    steps: int | None = None,
    guidance: float | None = None,
    configs_dir: Path | None = None,
) -> WanDecoder:
    """Load the Wan FLF2V transition decoder for a preset, a Wan diffusers repo, or `tiny`.

    On a GPU the real model defaults to model CPU offload (`--offload none` is read as `model`):
    the 14B transformer, UMT5-XXL and CLIP do not fit most cards at once. Raises
    `ModelUnavailable` when the weights are not on disk and the hub cannot be reached.
    """
    preset = resolve_video_preset(model, load_video_presets(configs_dir), decoder="wan")
    device = resolve_device(device)
    check_offload(offload, device)
    torch_dtype = resolve_dtype(dtype, device)
    if preset.tiny:
        pipe = build_tiny_wan_flf2v_pipeline(torch_dtype)
    else:
        pipe = _load_real(preset, torch_dtype)
        if offload == "none" and torch.device(device).type != "cpu":
            offload = "model"
    place_pipeline(pipe, device, offload)
    return WanDecoder(pipe, preset, steps=steps, guidance=guidance)


class WanDecoder:
    """`TransitionDecoder` on a `WanImageToVideoPipeline` (first and last frame given)."""

    name = "wan"
    image_encoder = None  # P_i conditioning is not wired to Wan yet
    max_frames = None

    def __init__(
        self,
        pipe: Any,
        preset: VideoPreset,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> None:
        self.pipe = pipe
        self.preset = preset
        self.steps = steps or preset.steps
        self.guidance = preset.guidance if guidance is None else guidance
        self.fps = preset.fps
        self.text_length = TINY_WAN_TEXT_LENGTH if preset.tiny else WAN_TEXT_LENGTH

    def describe(self) -> dict[str, Any]:
        """What made the video, for manifests."""
        base = self.preset.base
        hub = not self.preset.tiny and local_model_path(base, Path.cwd()) is None
        return {
            "decoder": self.name,
            "preset": self.preset.name,
            "model": base,
            "model_revision": hub_revision(base, "model_index.json") if hub else None,
            "steps": self.steps,
            "guidance": self.guidance,
            "size": self.preset.size,
        }

    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """`request.frames` RGB frames at the start image's size; `on_step(done, total)` after
        every denoising step."""
        if request.frames < 2:
            raise ValueError(f"wan needs at least 2 frames per transition, got {request.frames}")
        render = wan_frame_count(request.frames)
        width, height = render_size(request.start.size, self.preset.size, WAN_SIZE_MULTIPLE)
        first, last = (
            image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            for image in (request.start, request.end)
        )

        def step_end(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1, self.steps)
            return {}

        try:
            with torch.no_grad():
                positive, negative = self._prompts(request)
                video = self.pipe(
                    image=first,
                    last_image=last,
                    prompt_embeds=positive,
                    negative_prompt_embeds=negative,
                    height=height,
                    width=width,
                    num_frames=render,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    # A CPU generator: the same seed gives the same video on any device.
                    generator=torch.Generator("cpu").manual_seed(request.seed),
                    output_type="pil",
                    callback_on_step_end=step_end,
                ).frames[0]
        finally:
            self.pipe.maybe_free_model_hooks()  # re-arm CPU offload hooks (no-op without)
        size = request.start.size
        frames = [video[i] for i in resample_indices(len(video), request.frames)]
        return [f if f.size == size else f.resize(size, Image.Resampling.LANCZOS) for f in frames]

    def _prompts(self, request: TransitionRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoded without ftfy (see `wan_prompt_embeds`). Wan takes one prompt for the whole
        clip: the two keyframes' prompts in order (one, if they are the same or one is unknown).
        The negative is encoded only under classifier-free guidance (guidance > 1)."""
        prompts = [p for p in (request.start_prompt, request.end_prompt) if p]
        text = " ".join(dict.fromkeys(prompts))
        positive = wan_prompt_embeds(self.pipe, [text], self.text_length)
        if self.guidance <= 1.0:
            return positive, None
        return positive, wan_prompt_embeds(self.pipe, [self.preset.negative], self.text_length)


def resample_indices(rendered: int, frames: int) -> list[int]:
    """`frames` indices into `rendered` frames, evenly spread, first and last included."""
    if frames == 1:
        return [0]
    return [round(i * (rendered - 1) / (frames - 1)) for i in range(frames)]
