"""AnimateDiff + SparseCtrl (RGB) + IP-Adapter: transitions driven by per-frame CLIP embeddings.

The stack follows StoryDiffusion's video stage (arXiv 2405.01434, §3.2: the Semantic Motion
Predictor's per-frame image embeddings P_1..P_L condition a video diffusion model, each frame its
own): an SD1.5 base turned into a video UNet by the AnimateDiff motion adapter (arXiv
2307.04725); SparseCtrl RGB (arXiv 2311.16933) anchors the start and end keyframes at frames 0 and
L-1; every frame's spatial cross-attention sees its own text tokens (a lerp between the two
keyframes' prompts) and, through IP-Adapter's decoupled attention (arXiv 2308.06721), its own
image tokens made from P_i.

`--model` is a preset of configs/video_models.yaml, or an SD1.5 base (hub id or local diffusers
folder) combined with the default preset's other components; `tiny` builds a random stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.motion.decoders.base import StepCallback, TransitionRequest
from storycli.motion.decoders.components import (
    check_local,
    load_component,
    load_encoder_ref,
    pipeline_variant,
)
from storycli.motion.presets import (
    ComponentRef,
    VideoPreset,
    load_video_presets,
    resolve_video_preset,
)
from storycli.story.checks import local_model_path
from storycli.weights.devices import (
    Offload,
    check_offload,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)
from storycli.weights.hub import (
    ModelUnavailable,
    hub_revision,
)
from storycli.weights.image_encoder import ImageEncoder

# ------------------------------------------------------------------------------------ loading


def _hub_revisions(preset: VideoPreset, encoder: ImageEncoder) -> dict[str, str | None]:
    """The cached snapshot commit of each hub component (None: local, tiny or not cached)."""

    def revision(source: str | None, known_file: str) -> str | None:
        if not source or source == "tiny" or local_model_path(source, Path.cwd()) is not None:
            return None
        return hub_revision(source, known_file)

    ip = preset.ip_adapter
    ip_file = "/".join(p for p in (ip.subfolder, ip.weight_name) if p) if ip else ""
    return {
        "base_revision": revision(preset.base, "model_index.json"),
        "motion_adapter_revision": revision(preset.motion_adapter, "config.json"),
        "sparsectrl_revision": revision(preset.sparsectrl, "config.json"),
        "ip_adapter_revision": revision(ip.repo if ip else None, ip_file),
        "image_encoder_revision": encoder.revision,
    }


def _ip_adapter_fetch(ref: ComponentRef) -> str:
    file = "/".join(p for p in (ref.subfolder, ref.weight_name) if p)
    return f"{ref.repo} {file}"


def _check_ip_adapter_file(ref: ComponentRef) -> None:
    """The IP-Adapter is attached last; look for its file first so a miss is reported early."""
    from huggingface_hub import hf_hub_download

    local = local_model_path(ref.repo, Path.cwd())
    if local is not None:
        path = local / (ref.subfolder or "") / str(ref.weight_name)
        if not path.is_file():
            raise ModelUnavailable(
                f"The IP-Adapter file {path} does not exist; download it with "
                f"`hf download {_ip_adapter_fetch(ref)} --local-dir {local}` or fix the path."
            )
        return
    load_component(
        "IP-Adapter",
        ref.repo,
        lambda repo, local_only: hf_hub_download(
            repo,
            str(ref.weight_name),
            subfolder=ref.subfolder or None,
            local_files_only=local_only,
        ),
        _ip_adapter_fetch(ref),
        shown=ref.where,
    )


def _load_real_stack(preset: VideoPreset, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from diffusers import (
        AnimateDiffSparseControlNetPipeline,
        DDIMScheduler,
        MotionAdapter,
        SparseControlNetModel,
    )

    from storycli.motion.decoders.animatediff_tiny import quiet_diffusers_models

    ip, enc = preset.ip_adapter, preset.image_encoder
    assert preset.motion_adapter and preset.sparsectrl and ip and enc  # checked by presets.py
    for label, source in (
        ("base model", preset.base),
        ("motion adapter", preset.motion_adapter),
        ("SparseCtrl model", preset.sparsectrl),
        ("IP-Adapter", ip.repo),
        ("image encoder", enc.repo),
    ):
        check_local(label, source)
    _check_ip_adapter_file(ip)
    adapter = load_component(
        "motion adapter",
        preset.motion_adapter,
        lambda src, local_only: MotionAdapter.from_pretrained(
            src, dtype=dtype, local_files_only=local_only
        ),
    )
    controlnet = load_component(
        "SparseCtrl model",
        preset.sparsectrl,
        lambda src, local_only: SparseControlNetModel.from_pretrained(
            src, dtype=dtype, local_files_only=local_only
        ),
    )
    encoder = load_encoder_ref(enc, device, dtype)
    preferred = preset.variant if dtype == torch.float16 else None
    with quiet_diffusers_models():
        pipe = load_component(
            "base model",
            preset.base,
            lambda src, local_only: AnimateDiffSparseControlNetPipeline.from_pretrained(
                src,
                motion_adapter=adapter,
                controlnet=controlnet,
                image_encoder=encoder.model,
                feature_extractor=encoder.processor,
                dtype=dtype,
                variant=pipeline_variant(src, local_only, preferred),
                local_files_only=local_only,
            ),
        )
        load_component(
            "IP-Adapter",
            ip.repo,
            lambda src, local_only: pipe.load_ip_adapter(
                src,
                subfolder=ip.subfolder or "",
                weight_name=ip.weight_name,
                image_encoder_folder=None,  # ours is loaded above, through encoder.py
                local_files_only=local_only,
            ),
            _ip_adapter_fetch(ip),
            shown=ip.where,
        )
    # The AnimateDiff docs' sampler: DDIM with linear betas and no sample clipping.
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config,
        beta_schedule="linear",
        clip_sample=False,
        timestep_spacing="linspace",
        steps_offset=1,
    )
    return pipe, encoder


def _place(pipe: Any, device: str, offload: Offload) -> None:
    # The UNetMotionModel holds its own copy of the motion modules: the adapter is dead weight.
    pipe.register_modules(motion_adapter=None)
    place_pipeline(pipe, device, offload)
    pipe.vae.enable_slicing()


def load_animatediff_decoder(
    model: str = "animatediff",
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    steps: int | None = None,
    guidance: float | None = None,
    configs_dir: Path | None = None,
) -> AnimateDiffDecoder:
    """Load the AnimateDiff transition decoder for a preset, an SD1.5 base, or `tiny`.

    Raises `ModelUnavailable` (one sentence naming the component and the `hf download` fix) when
    weights are not on disk, and `VideoPresetError` for a bad configs/video_models.yaml.
    """
    preset = resolve_video_preset(model, load_video_presets(configs_dir))
    device = resolve_device(device)
    check_offload(offload, device)
    torch_dtype = resolve_dtype(dtype, device)
    if preset.tiny:
        from storycli.motion.decoders.animatediff_tiny import build_tiny_animatediff_stack

        pipe = build_tiny_animatediff_stack(torch_dtype)
        encoder = ImageEncoder(
            pipe.image_encoder, pipe.feature_extractor, "tiny", device, torch_dtype
        )
    else:
        pipe, encoder = _load_real_stack(preset, device, torch_dtype)
    pipe.set_ip_adapter_scale(preset.ip_scale)
    _place(pipe, device, offload)
    return AnimateDiffDecoder(pipe, encoder, preset, steps=steps, guidance=guidance)


# ----------------------------------------------------------------------------------- decoding


def render_size(size: tuple[int, int], long_side: int, multiple: int) -> tuple[int, int]:
    """(width, height) with `long_side` on the longer side, aspect kept, snapped to `multiple`."""
    width, height = size
    scale = long_side / max(width, height)

    def snap(value: int) -> int:
        return max(multiple, round(value * scale / multiple) * multiple)

    return snap(width), snap(height)


def lerp_frames(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """`frames` linear steps from `start` to `end` (both included), stacked on a new dim 0."""
    weights = torch.linspace(0.0, 1.0, frames, device=start.device, dtype=start.dtype)
    return torch.lerp(start.unsqueeze(0), end.unsqueeze(0), weights.view(-1, *[1] * start.ndim))


@dataclass
class _Conditioning:
    """Everything the denoising loop feeds the models, batch negative-first under CFG."""

    text: torch.Tensor  # [(2·)L, 77, D]: per-frame text embeddings
    image_embeds: torch.Tensor  # [(2·)L, D_img]: per-frame CLIP image embeddings (0 = negative)
    control: torch.Tensor  # [1, C, L, h, w]: keyframes at frames 0 and L-1, else 0
    control_mask: torch.Tensor  # [1, 1, L, h, w]
    # (width, height) in pixels the frames are rendered at. Not control's shape: that is latent
    # sized for the RGB SparseCtrl but pixel sized for image-space ones (scribble, 3 channels).
    size: tuple[int, int]


class AnimateDiffDecoder:
    """`TransitionDecoder` on an `AnimateDiffSparseControlNetPipeline` with an IP-Adapter.

    `transition` runs its own denoising loop instead of calling the pipeline: the stock
    `__call__` (and `UNetMotionModel.forward`) project ONE image embedding and repeat it over
    all frames, while here every frame i must see its own P_i. The loop reuses the pipeline's
    pieces (`encode_prompt`, `prepare_sparse_control_conditioning`, `prepare_latents`, ...).
    """

    name = "animatediff"
    baseline_embeddings = True

    def __init__(
        self,
        pipe: Any,
        image_encoder: ImageEncoder,
        preset: VideoPreset,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> None:
        self.pipe = pipe
        self.image_encoder = image_encoder
        self.preset = preset
        self.steps = steps or preset.steps
        self.guidance = preset.guidance if guidance is None else guidance
        self.fps = preset.fps
        self._check_ip_adapter()

    def _check_ip_adapter(self) -> None:
        from diffusers.models.embeddings import ImageProjection

        projection = self.pipe.unet.encoder_hid_proj
        layers = getattr(projection, "image_projection_layers", None)
        if layers is None or len(layers) != 1 or not isinstance(layers[0], ImageProjection):
            raise ValueError(
                "the animatediff decoder needs exactly one IP-Adapter with a plain image "
                "projection (ip-adapter_sd15-style, one pooled embedding per image)"
            )
        dim = layers[0].image_embeds.in_features
        if dim != self.image_encoder.dim:
            raise ValueError(
                f"IP-Adapter expects {dim}-d image embeddings but the image encoder "
                f"{self.image_encoder.name!r} gives {self.image_encoder.dim}-d ones"
            )

    def describe(self) -> dict[str, Any]:
        """What made the video, for manifests."""
        p = self.preset
        return {
            "decoder": self.name,
            "preset": p.name,
            "base": p.base,
            "motion_adapter": p.motion_adapter,
            "sparsectrl": p.sparsectrl,
            "ip_adapter": p.ip_adapter.where if p.ip_adapter else None,
            "image_encoder": self.image_encoder.name,
            **_hub_revisions(p, self.image_encoder),
            "steps": self.steps,
            "guidance": self.guidance,
            "size": p.size,
        }

    @property
    def max_frames(self) -> int:
        # The motion modules' positional encoding covers this many frames.
        return int(self.pipe.unet.config.motion_max_seq_length)

    def lerp_embeddings(self, request: TransitionRequest) -> torch.Tensor:
        """The semantic-lerp baseline: encode both keyframes, interpolate linearly (L, D)."""
        ends = self.image_encoder.encode([request.start, request.end])
        return lerp_frames(ends[0], ends[1], request.frames)

    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """`request.frames` RGB frames at the start image's size.

        `request.embeddings` (L, D) are P_1..P_L in the image encoder's space; None means the
        lerp baseline (`lerp_embeddings`). `on_step(done, total)` is called after every step.
        """
        self._check_request(request)
        embeddings = request.embeddings
        if embeddings is None:
            embeddings = self.lerp_embeddings(request)
        self._check_embeddings(embeddings, request.frames)
        vae_factor = self.pipe.vae_scale_factor
        width, height = render_size(request.start.size, self.preset.size, math.lcm(8, vae_factor))
        keyframes = [
            image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            for image in (request.start, request.end)
        ]
        try:
            # no_grad, not inference_mode: accelerate's sequential-offload hooks re-wrap
            # weights as Parameters, which fails on inference tensors.
            with torch.no_grad():
                cond = self._conditioning(request, keyframes, embeddings)
                latents = self._denoise(cond, request.frames, request.seed, on_step)
                frames = self._decode(latents)
        finally:
            self.pipe.maybe_free_model_hooks()  # re-arm CPU offload hooks (no-op without)
        size = request.start.size
        return [f if f.size == size else f.resize(size, Image.Resampling.LANCZOS) for f in frames]

    def _check_request(self, request: TransitionRequest) -> None:
        if not 2 <= request.frames <= self.max_frames:
            raise ValueError(
                f"animatediff renders 2..{self.max_frames} frames per transition, "
                f"got frames={request.frames}"
            )

    def _check_embeddings(self, embeddings: torch.Tensor, frames: int) -> None:
        expected = (frames, self.image_encoder.dim)
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"embeddings must have shape {expected} (frames, image-encoder dim), "
                f"got {tuple(embeddings.shape)}"
            )

    @property
    def _cfg(self) -> bool:
        return self.guidance > 1.0

    def _conditioning(
        self, request: TransitionRequest, keyframes: list[Image.Image], embeddings: torch.Tensor
    ) -> _Conditioning:
        device = self.pipe._execution_device
        frames = request.frames
        text = self._text(request.start_prompt, request.end_prompt, frames, device)
        image_embeds = embeddings.to(device, torch.float32)
        if self._cfg:
            # The negative half gets a zero image embedding, as the stock pipeline does.
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        control, mask = self._control(keyframes, frames, device)
        return _Conditioning(text, image_embeds, control, mask, keyframes[0].size)

    def _text(
        self, start: str | None, end: str | None, frames: int, device: torch.device
    ) -> torch.Tensor:
        """Per-frame text: lerp of the two keyframe prompts' CLIP text embeddings.

        A missing prompt takes the other one's place (so one known prompt holds throughout);
        with both missing, the empty prompt.
        """
        start_prompt = start if start is not None else (end or "")
        end_prompt = end if end is not None else start_prompt
        negative = self.preset.negative
        positive, negatives = self.pipe.encode_prompt(
            [start_prompt, end_prompt], device, 1, self._cfg, negative_prompt=[negative] * 2
        )
        text = lerp_frames(positive[0], positive[1], frames)
        if self._cfg:
            text = torch.cat([negatives[:1].expand(frames, -1, -1), text])
        return text

    def _control(
        self, keyframes: list[Image.Image], frames: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseCtrl input: the two keyframes at frames 0 and L-1, nothing in between."""
        pipe = self.pipe
        controlnet = pipe.controlnet
        width, height = keyframes[0].size
        images = pipe.control_image_processor.preprocess(keyframes, height=height, width=width)
        images = images.to(device, controlnet.dtype)  # [2, 3, H, W] in [0, 1]
        if controlnet.config.use_simplified_condition_embedding:
            # The RGB model takes VAE latents. `pipe.prepare_image` samples the posterior with
            # the global RNG; its mean keeps the transition a function of the seed alone.
            posterior = pipe.vae.encode((2 * images - 1).to(pipe.vae.dtype)).latent_dist
            images = posterior.mode() * pipe.vae.config.scaling_factor
        cond = images.to(controlnet.dtype).unsqueeze(0).permute(0, 2, 1, 3, 4)  # [1, C, 2, h, w]
        return pipe.prepare_sparse_control_conditioning(
            cond, frames, [0, frames - 1], device, controlnet.dtype
        )

    def _image_tokens(
        self, projection: torch.nn.Module, image_embeds: torch.Tensor
    ) -> list[torch.Tensor]:
        """Project P_i (one per frame) into IP-Adapter tokens [(2·)L, 1, tokens, dim].

        Computed where the projection's weights are (CPU under model offload; under sequential
        offload they are on `meta` and accelerate's hooks bring them to the input's device).
        """
        param = next(projection.parameters())
        device = image_embeds.device if param.device.type == "meta" else param.device
        tokens = projection([image_embeds.to(device, param.dtype)[:, None, :]])
        unet = self.pipe.unet
        return [t.to(image_embeds.device, unet.dtype) for t in tokens]

    def _denoise(
        self, cond: _Conditioning, frames: int, seed: int, on_step: StepCallback | None
    ) -> torch.Tensor:
        pipe, unet, scheduler = self.pipe, self.pipe.unet, self.pipe.scheduler
        device = cond.text.device
        # Noise from a CPU generator: the same seed gives the same video on any device.
        generator = torch.Generator("cpu").manual_seed(seed)
        width, height = cond.size
        latents = pipe.prepare_latents(  # pixel size in, latents of size / vae_scale_factor out
            1,
            unet.config.in_channels,
            frames,
            height,
            width,
            cond.text.dtype,
            device,
            generator,
        )
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        scheduler.set_timesteps(self.steps, device=device)
        timesteps = scheduler.timesteps
        # Where the predicted embeddings enter (StoryDiffusion §3.2: frame i is conditioned on
        # its own P_i): with `encoder_hid_proj` in place, UNetMotionModel would project one
        # image embedding per video and repeat it over frames. Detach it, project P_i
        # ourselves, and hand the UNet `(text, [ip_tokens])` with one row per frame.
        projection = unet.encoder_hid_proj
        unet.encoder_hid_proj = None
        try:
            context = (cond.text, self._image_tokens(projection, cond.image_embeds))
            for index, t in enumerate(timesteps):
                latents = self._step(latents, t, context, cond, extra)
                if on_step is not None:
                    on_step(index + 1, len(timesteps))
        finally:
            unet.encoder_hid_proj = projection
        return latents

    def _step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: tuple[torch.Tensor, list[torch.Tensor]],
        cond: _Conditioning,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        pipe = self.pipe
        model_input = torch.cat([latents] * 2) if self._cfg else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        down, mid = pipe.controlnet(
            model_input,
            t,
            encoder_hidden_states=cond.text,  # SparseCtrl has no IP-Adapter: text only
            controlnet_cond=cond.control,
            conditioning_mask=cond.control_mask,
            conditioning_scale=1.0,
            return_dict=False,
        )
        noise = pipe.unet(
            model_input,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        if self._cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + self.guidance * (text - uncond)
        return pipe.scheduler.step(noise, t, latents, **extra).prev_sample

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        video = self.pipe.decode_latents(latents)  # [1, 3, L, H, W], VAE-sliced per frame
        return self.pipe.video_processor.postprocess_video(video=video, output_type="pil")[0]
