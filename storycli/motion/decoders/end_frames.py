"""What the first-and-last-frame video decoders share (Wan2.1 FLF2V, LTX-Video condition).

Both models take the two keyframes as the video's end frames natively. They render only some
frame counts (`factor`·k + 1: the VAE keeps the first frame and folds each `factor` following
ones into one latent frame) at sides of a fixed multiple, so a transition is rendered at the
next such count and resampled (nearest frame, first and last kept) to the count asked for, at
the preset's pixel area with the keyframes' aspect kept, then scaled back to the keyframes'
size. Memory on real cards: the VAE decodes tiled, GPUs too small for the whole pipeline get
model CPU offload, and without offload the text encoder (T5-XXL / UMT5-XXL, about 10 GB in
bf16) waits on the CPU between prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.motion.decoders.base import StepCallback, TransitionRequest
from storycli.motion.decoders.components import check_local, load_component, pipeline_variant
from storycli.motion.decoders.ltx_tiny import LTX_TEMPORAL_FACTOR
from storycli.motion.decoders.wan_tiny import WAN_TEMPORAL_FACTOR
from storycli.motion.presets import VideoPreset, load_video_presets, resolve_video_preset
from storycli.story.checks import local_model_path
from storycli.weights.devices import (
    InvalidOption,
    Offload,
    check_offload,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)
from storycli.weights.hub import hub_revision

# `--decoder` name → its temporal factor: renders `factor`·k + 1 frames.
FRAME_FACTORS = {"wan": WAN_TEMPORAL_FACTOR, "ltx": LTX_TEMPORAL_FACTOR}


def end_frames_count(frames: int, factor: int) -> int:
    """The smallest `factor`·k + 1 frame count ≥ `frames` (and ≥ factor + 1)."""
    k = max(1, -(-(max(frames, 2) - 1) // factor))
    return factor * k + 1


def frame_note(decoder: str, frames: int) -> str | None:
    """The note animate shows when `decoder` cannot render `frames` as asked (None: it can, or
    the decoder renders any count)."""
    factor = FRAME_FACTORS.get(decoder)
    if factor is None:
        return None
    render = end_frames_count(frames, factor)
    if render == frames:
        return None
    return (
        f"{decoder} renders {factor}k+1 frames: each transition is rendered at {render} frames "
        f"and resampled to the {frames} asked for"
    )


def resample_indices(rendered: int, frames: int) -> list[int]:
    """`frames` indices into `rendered` frames, evenly spread, first and last included."""
    if frames == 1:
        return [0]
    return [round(i * (rendered - 1) / (frames - 1)) for i in range(frames)]


def area_size(size: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels with `size`'s aspect, sides snapped to `multiple`
    (Wan's and LTX's own examples size their videos this way, by area)."""
    width, height = size
    scale = math.sqrt(area / (width * height))

    def snap(value: float) -> int:
        return max(multiple, round(value * scale / multiple) * multiple)

    return snap(width), snap(height)


def load_real_pipeline(label: str, pipeline: Any, preset: VideoPreset, dtype: torch.dtype) -> Any:
    """A real end-frames diffusers pipeline of class `pipeline`: a local folder, or the hub cache
    first (offline: one sentence naming `hf download <repo>`); the preset's `variant` files in
    half precision when they are there."""
    check_local(label, preset.base)
    preferred = preset.variant if dtype in (torch.float16, torch.bfloat16) else None
    return load_component(
        label,
        preset.base,
        lambda src, local_only: pipeline.from_pretrained(
            src,
            dtype=dtype,
            variant=pipeline_variant(src, local_only, preferred),
            local_files_only=local_only,
        ),
    )


def prepare_real_pipeline(pipe: Any, device: str, offload: Offload) -> Offload:
    """Settings for a real (not tiny) end-frames pipeline before it is placed: the VAE decodes
    in tiles (a 720p video's decode alone would take tens of GB), and on a GPU too small for
    the whole pipeline (see `fits_in_memory`) `--offload none`, the default, becomes model CPU
    offload. Returns the offload mode to place the pipeline with."""
    pipe.vae.enable_tiling()
    if offload == "none" and torch.device(device).type == "cuda":
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        if not fits_in_memory(pipe, total):
            return "model"
    return offload


def fits_in_memory(pipe: Any, total_bytes: int) -> bool:
    """Whether all of the pipeline's weights, plus a quarter for activations and 4 GiB for the
    VAE's tiles, fit in `total_bytes` (a rule of thumb until the benchmarks measure it: Wan2.1
    FLF2V in bf16 is about 46 GB of weights with UMT5-XXL and CLIP, LTX-Video 0.9.5 with
    T5-XXL about 16 GB)."""
    weights = sum(
        p.numel() * p.element_size()
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
        for p in module.parameters()
    )
    return weights * 1.25 + 4 * 2**30 <= total_bytes


def load_end_frames_decoder(
    decoder: type[EndFramesDecoder],
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    steps: int | None = None,
    guidance: float | None = None,
    configs_dir: Path | None = None,
) -> Any:
    """Load `decoder` (WanDecoder, LtxDecoder) for a preset, a diffusers repo or folder, or
    `tiny`. Raises `ModelUnavailable` when the weights are not on disk and the hub cannot be
    reached, `InvalidOption` for settings the model cannot run with."""
    preset = resolve_video_preset(model, load_video_presets(configs_dir), decoder=decoder.name)
    if (steps or preset.steps) < decoder.min_steps:
        raise InvalidOption(f"the {decoder.name} decoder needs --steps {decoder.min_steps} or more")
    device = resolve_device(device)
    check_offload(offload, device)
    torch_dtype = resolve_dtype(dtype, device)
    if preset.tiny:
        pipe = decoder.tiny_pipeline(torch_dtype)
    else:
        pipe = load_real_pipeline(decoder.label, decoder.pipeline_class(), preset, torch_dtype)
        offload = prepare_real_pipeline(pipe, device, offload)
    place_pipeline(pipe, device, offload)
    return decoder(pipe, preset, steps=steps, guidance=guidance)


class EndFramesDecoder:
    """`TransitionDecoder` on a pipeline that takes a first and a last frame; subclasses say
    which pipeline (`pipeline_class`, `tiny_pipeline`), how prompts are encoded (`_encode`) and
    how the pipeline is called (`_render`)."""

    name: str = ""
    label: str = ""  # in messages: "The <label> folder ... does not exist"
    size_multiple: int = 16
    min_steps: int = 1
    image_encoder: Any = None  # decoders that can take the predictor's P_i override this
    baseline_embeddings = False  # without a predictor: the model's own image conditioning
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
        self._prompts: dict[str, Any] = {}  # encoded prompts by text, on the CPU

    @staticmethod
    def pipeline_class() -> Any:
        """The diffusers pipeline class real weights are loaded with."""
        raise NotImplementedError

    @staticmethod
    def tiny_pipeline(dtype: torch.dtype) -> Any:
        """The tiny random pipeline `--model tiny` builds."""
        raise NotImplementedError

    @property
    def area(self) -> int:
        return self.preset.area or self.preset.size**2

    @property
    def factor(self) -> int:
        return FRAME_FACTORS[self.name]

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
            "area": self.area,
        }

    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """`request.frames` RGB frames at the start image's size; `on_step(done, total)` after
        every denoising step."""
        if request.frames < 2:
            raise ValueError(
                f"{self.name} needs at least 2 frames per transition, got {request.frames}"
            )
        render = end_frames_count(request.frames, self.factor)
        width, height = area_size(request.start.size, self.area, self.size_multiple)
        first, last = (
            image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            for image in (request.start, request.end)
        )

        def step_end(pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1, self.steps)
            return {}

        call = {
            "height": height,
            "width": width,
            "num_frames": render,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            # A CPU generator: the same seed gives the same video on any device.
            "generator": torch.Generator("cpu").manual_seed(request.seed),
            "output_type": "pil",
            "callback_on_step_end": step_end,
        }
        try:
            with torch.no_grad():
                video = self._render(first, last, request, call)
        finally:
            self.pipe.maybe_free_model_hooks()  # re-arm CPU offload hooks (no-op without)
        size = request.start.size
        frames = [video[i] for i in resample_indices(len(video), request.frames)]
        return [f if f.size == size else f.resize(size, Image.Resampling.LANCZOS) for f in frames]

    def _render(
        self, first: Image.Image, last: Image.Image, request: TransitionRequest, call: dict
    ) -> list[Image.Image]:
        """The pipeline's frames for `first` → `last` (`call`: the shared call arguments)."""
        raise NotImplementedError

    def _encode(self, text: str) -> Any:
        """One prompt encoded by the pipeline's text encoder (tensors on its device)."""
        raise NotImplementedError

    def prompts(self, request: TransitionRequest) -> tuple[Any, Any]:
        """The encoded prompt and negative prompt (None without classifier-free guidance, i.e.
        guidance ≤ 1). The prompt is one for the whole clip: the two keyframes' prompts in order
        (one, if they are the same or one is unknown)."""
        text = " ".join(dict.fromkeys(p for p in (request.start_prompt, request.end_prompt) if p))
        if self.guidance <= 1.0:
            return self.encoded(text)[0], None
        positive, negative = self.encoded(text, self.preset.negative)
        return positive, negative

    def encoded(self, *texts: str) -> list[Any]:
        """`_encode(text)` of each text, once per text: kept on the CPU, moved to the pipeline's
        device when used. Without CPU offload on a GPU the text encoder is parked on the CPU
        between uses (and moved once for all the new texts)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._prompts]
        if new:
            with self._text_encoder_ready():
                for text in new:
                    self._prompts[text] = _to(self._encode(text), "cpu")
        device = self.pipe._execution_device
        return [_to(self._prompts[text], device) for text in texts]

    @contextmanager
    def _text_encoder_ready(self) -> Iterator[None]:
        encoder = self.pipe.text_encoder
        if hasattr(encoder, "_hf_hook"):  # CPU offload: its hooks move it (and back) already
            yield
            return
        home = self.pipe._execution_device
        encoder.to(home)
        try:
            yield
        finally:
            if home.type != "cpu":
                encoder.to("cpu")  # 10 GB the transformer can use


def _to(value: Any, device: Any) -> Any:
    """Tensors (alone or in a tuple) moved to `device`; None stays None."""
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return None if value is None else value.to(device)
