"""SDXL's UNet pipeline as the story loop's backbone (the first `Backbone`, see `base.py`).

`SDXLBackbone` wraps a diffusers `StableDiffusionXLPipeline` and answers the loop's questions the
way the pipeline's own `__call__` does, so a frame equals the pipeline's frame: prompts through
both text encoders with SDXL's added conditioning (pooled text, size ids), latents of
`unet.in_channels` at 1/`vae_scale_factor` of the render size, both CFG halves in one UNet
forward, the VAE's decoder upcast where SDXL's VAE overflows in float16.

The UNet-specific half of Consistent Self-Attention lives here too: which `attn1` layers of the
UNet's blocks CSA replaces and at which resolution level (`csa_layers`), the forward hooks that
make each forward's draws (`installed_csa`), sliding-window forwards (`windowed_unet`) and
regional compiling around CSA's eager processor (`compiled_blocks`). The processor and its state
are network-agnostic (`storycli.consistency.csa`, `storycli.consistency.csa_state`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from PIL import Image, ImageOps

from storycli.consistency.csa import ConsistentSelfAttnProcessor, window_starts
from storycli.consistency.csa_state import CSAState, LayerInfo
from storycli.consistency.ip_adapter import Photos
from storycli.consistency.one_prompt import one_prompt_conditioning
from storycli.keyframes.backbones.base import compiled_blocks, forward_replaced, window_mean
from storycli.keyframes.plan import Plan, PlannedFrame
from storycli.keyframes.schedule import RenderSize

# A call's or a forward's text inputs: prompt embeddings, `added_cond_kwargs`, text mask.
TextInputs = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]


@dataclass
class SDXLConditioning:
    """One UNet forward's conditioning: what `StableDiffusionXLPipeline` passes its UNet besides
    the latents and timestep, unconditional rows first under CFG."""

    text: torch.Tensor  # encoder_hidden_states
    added: dict[str, torch.Tensor]  # added_cond_kwargs: pooled text, size ids (IP-Adapter embeds)
    text_mask: torch.Tensor | None  # encoder_attention_mask (None: all of the text)
    attention_kwargs: dict[str, Any] | None = None  # cross_attention_kwargs (IP-Adapter masks)

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype


class SDXLBackbone:
    """A loaded SDXL pipeline (`keyframes.models`) as the story loop's `Backbone`."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.device: torch.device = pipe._execution_device  # where the UNet runs

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def guided(self, guidance: float) -> bool:
        # A guidance-distilled UNet (`time_cond_proj_dim`, e.g. LCM) takes no unconditional half.
        return guidance > 1 and self.unet.config.time_cond_proj_dim is None

    def conditioning(
        self,
        plan: Plan,
        calls: Sequence[Sequence[PlannedFrame]],
        size: RenderSize,
        cfg: bool,
    ) -> SDXLConditioning:
        text, added, mask = chunk_inputs(
            [text_conditioning(self.pipe, plan, list(frames), size, cfg) for frames in calls], cfg
        )
        return SDXLConditioning(text, added, mask)

    def text_encoded(self) -> None:
        pass  # SDXL's text encoders are small: they stay where they are

    def prepare_timesteps(self, steps: int, size: RenderSize) -> None:
        # One scheduler for the batch (multistep schedulers keep per-sample history).
        self.scheduler.set_timesteps(steps, device=self.device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

    def add_photos(
        self,
        conditioning: SDXLConditioning,
        photos: Photos,
        shown: Sequence[Sequence[str]],
        cfg: bool,
        latent_size: tuple[int, int],
    ) -> None:
        # Each chunk's image embeddings, and masks where characters' photos condition only the
        # rows that show them.
        conditioning.added["image_embeds"], conditioning.attention_kwargs = photos.forward_inputs(
            shown, cfg, latent_size
        )

    def initial_noise(
        self, frames: Sequence[PlannedFrame], size: RenderSize, dtype: torch.dtype
    ) -> torch.Tensor:
        return initial_noise(self.pipe, list(frames), size, dtype)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.to(self.device) * self.scheduler.init_noise_sigma

    def encode_pictures(self, paths: list[str | None], size: RenderSize) -> list[torch.Tensor]:
        return encode_pictures(self.pipe, paths, size)

    def noise_pictures(
        self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.scheduler.add_noise(clean, noise, t)

    def step_kwargs(self, generators: list[torch.Generator]) -> dict[str, Any]:
        return self.pipe.prepare_extra_step_kwargs(generators, 0.0)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: SDXLConditioning,
        cfg: bool,
        guidance: float,
    ) -> torch.Tensor:
        # As the pipeline's denoising loop: the rows twice under CFG (unconditional half first,
        # the order of the conditioning), scaled, one forward, the halves combined.
        x = torch.cat([latents] * 2) if cfg else latents
        x = self.scheduler.scale_model_input(x, t)
        pred = self.unet(
            x,
            t,
            encoder_hidden_states=conditioning.text,
            encoder_attention_mask=conditioning.text_mask,
            added_cond_kwargs=conditioning.added,
            cross_attention_kwargs=conditioning.attention_kwargs,
            return_dict=False,
        )[0]
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        return pred

    def decoding(self) -> AbstractContextManager[None]:
        return vae_upcast(self.pipe.vae, "decoder")

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return decode_latents(self.pipe, latents)

    def freeu(self, plan: Plan) -> AbstractContextManager[None]:
        return freeu_enabled(self.pipe, plan)

    def release(self) -> None:
        self.pipe.maybe_free_model_hooks()

    def csa_layers(self, blocks: Sequence[str]) -> list[LayerInfo]:
        return csa_layers(self.unet, blocks)

    def installed_csa(self, state: CSAState) -> AbstractContextManager[CSAState]:
        return installed_csa(self.unet, state)

    def windowed(
        self, state: CSAState, frames: int, window: int, stride: int
    ) -> AbstractContextManager[None]:
        return windowed_unet(self.unet, state, frames, window, stride)

    def compiled(self, backend: str) -> AbstractContextManager[None]:
        return compiled_blocks(self.unet, backend)


# ------------------------------------------------------------------------------ the pipeline


@contextmanager
def freeu_enabled(pipe: Any, plan: Plan) -> Iterator[None]:
    """The story's `freeu:` settings on the UNet for the duration (diffusers' FreeU)."""
    freeu = plan.story.freeu
    if freeu is None:
        yield
        return
    pipe.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)
    try:
        yield
    finally:
        pipe.disable_freeu()


def text_conditioning(
    pipe: Any, plan: Plan, frames: list[PlannedFrame], size: RenderSize, cfg: bool
) -> TextInputs:
    """The UNet's text inputs for a batch of frames, as the SDXL pipeline builds them: prompt
    embeddings, `added_cond_kwargs` (pooled embeddings, size ids), unconditional rows first
    under CFG, and the text's attention mask (None: all of it). All-empty negatives become
    SDXL's zeroed negative embeddings, as in diffusers. With 1Prompt1Story the frames'
    embeddings are reweighted and carry the identity tokens (`consistency.one_prompt`)."""
    negative = [f.negative for f in frames] if any(f.negative for f in frames) else None
    text, negative_text, pooled, negative_pooled = pipe.encode_prompt(
        prompt=[f.prompt for f in frames],
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative,
    )
    projection = (
        int(pooled.shape[-1])
        if pipe.text_encoder_2 is None
        else pipe.text_encoder_2.config.projection_dim
    )
    time_ids = pipe._get_add_time_ids(
        (size.height, size.width),
        (0, 0),
        (size.height, size.width),
        dtype=text.dtype,
        text_encoder_projection_dim=projection,
    )
    if cfg:
        text = torch.cat([negative_text, text])
        pooled = torch.cat([negative_pooled, pooled])
    ids = time_ids.to(text.device).repeat(text.shape[0], 1)
    mask = None
    if plan.story.uses_one_prompt:
        consolidated = [plan.consolidated.get(f.index) for f in frames]
        settings = plan.story.consistency.one_prompt
        text, mask = one_prompt_conditioning(pipe, consolidated, text, cfg, settings)
    return text, {"text_embeds": pooled, "time_ids": ids}, mask


def chunk_inputs(calls: list[TextInputs], cfg: bool) -> TextInputs:
    """The text inputs of the calls sharing a forward, as one batch: under CFG each call's
    unconditional rows, then each call's conditional rows (the order of the latents)."""

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        if not cfg:
            return torch.cat(parts)
        halves = [part.chunk(2) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    text = join([c[0] for c in calls])
    added = {key: join([c[1][key] for c in calls]) for key in calls[0][1]}
    masks = [c[2] for c in calls]
    mask = None if any(m is None for m in masks) else join(masks)  # type: ignore[arg-type]
    return text, added, mask


def initial_noise(
    pipe: Any, frames: list[PlannedFrame], size: RenderSize, dtype: torch.dtype
) -> torch.Tensor:
    """The frames' starting noise (unscaled, on the CPU): for each seed, one CPU generator draws
    as many images as the frames need (`noise_index` + 1), as diffusers' `randn_tensor` does
    for one generator and a batch, and each frame takes its position's image."""
    shape = (
        pipe.unet.config.in_channels,
        size.height // pipe.vae_scale_factor,
        size.width // pipe.vae_scale_factor,
    )
    draws: dict[int, torch.Tensor] = {}
    for seed in {f.seed for f in frames}:
        count = 1 + max(f.noise_index for f in frames if f.seed == seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        draws[seed] = randn_tensor((count, *shape), generator=generator, dtype=dtype)
    return torch.stack([draws[f.seed][f.noise_index] for f in frames])


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std (SDXL's VAE has none), shaped like `like`."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (
        torch.tensor(mean).view(1, 4, 1, 1).to(like.device, like.dtype),
        torch.tensor(std).view(1, 4, 1, 1).to(like.device, like.dtype),
    )


@contextmanager
def vae_upcast(vae: Any, side: Literal["decoder", "encoder"]) -> Iterator[None]:
    """One side of a float16 VAE whose config asks for it (`force_upcast`: SDXL's own VAE
    overflows in float16) in float32 for the duration, float16 again after (the pipeline is
    reused). Diffusers' SDXL pipeline casts the whole VAE; only these parts run, so the pixels
    are the same. An fp16-safe VAE (`force_upcast: false`) is left alone; so is a side already
    upcast by an enclosing call."""
    names = ("post_quant_conv", "decoder") if side == "decoder" else ("encoder", "quant_conv")
    parts = [part for name in names if (part := getattr(vae, name)) is not None]
    upcast = bool(vae.config.force_upcast) and next(parts[0].parameters()).dtype == torch.float16
    if not upcast:
        yield
        return
    for part in parts:
        part.to(torch.float32)
    try:
        yield
    finally:
        for part in parts:
            part.to(torch.float16)


def encode_pictures(pipe: Any, paths: list[str | None], size: RenderSize) -> list[torch.Tensor]:
    """Pictures → their clean latents at the render size (centre-cropped to its aspect ratio),
    the VAE's mean as diffusers' img2img takes it, scaled as `decode_latents` unscales."""
    if not paths:
        return []
    vae = pipe.vae
    device = get_module_execution_device(vae)
    out = []
    with vae_upcast(vae, "encoder"):
        dtype = next(iter(vae.encoder.parameters())).dtype
        for path in paths:
            with Image.open(path) as picture:  # type: ignore[arg-type]
                image = ImageOps.fit(picture.convert("RGB"), (size.width, size.height))
            pixels = pipe.image_processor.preprocess(image).to(device, dtype)
            latents = vae.encode(pixels).latent_dist.mean
            stats = latent_stats(vae, latents)
            if stats is not None:
                mean, std = stats
                latents = (latents - mean) * vae.config.scaling_factor / std
            else:
                latents = latents * vae.config.scaling_factor
            out.append(latents[0].to(pipe.unet.dtype))
    return out


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents → PIL images exactly as the SDXL pipeline decodes them (the decoder in float32
    when the VAE asks for it, see `vae_upcast`; latent mean/std when the VAE has them;
    watermark when installed)."""
    vae = pipe.vae
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    with vae_upcast(vae, "decoder"):
        latents = latents.to(next(iter(first.parameters())).dtype)
        stats = latent_stats(vae, latents)
        if stats is not None:
            mean, std = stats
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")


# ------------------------------------------------------------------------------ CSA in the UNet

_BLOCK_RE = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


def csa_layers(unet: torch.nn.Module, blocks: Sequence[str] = ("up",)) -> list[LayerInfo]:
    """The self-attention layers CSA replaces, with their resolution level.

    The level comes from the layer's place in the UNet, not from its token count: a layer in
    `down_blocks.i` runs on a grid downsampled i times, `mid_block` on the coarsest grid, and
    `up_blocks.j` on a grid downsampled (num_up - 1 - j) times. Layers on the coarsest grid that
    has self-attention get `sa32` (SDXL: H/32 × W/32), finer ones `sa64` (SDXL: H/16 × W/16).
    """
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    found: list[tuple[tuple[int, int], str, int]] = []  # (forward order, name, downsample)
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        match = _BLOCK_RE.match(name)
        if not name.endswith("attn1") or match is None:
            continue
        if match.group(2) is not None:
            kind, block, downsample = "down", (0, int(match.group(2))), int(match.group(2))
        elif match.group(3) is not None:
            up = int(match.group(3))
            kind, block, downsample = "up", (2, up), n_up - 1 - up
        else:
            kind, block, downsample = "mid", (1, 0), n_down - 1
        if kind in blocks:
            found.append((block, name, downsample))
    if not found:
        return []
    # `attn_processors` lists down, up, then mid blocks (the order the UNet registers them);
    # layers are indexed in the order the forward runs them: down, mid, up. (A stable sort:
    # within a block, module order is forward order.)
    found.sort(key=lambda entry: entry[0])
    coarsest = max(downsample for _, _, downsample in found)
    return [
        LayerInfo(name, i, "sa32" if downsample == coarsest else "sa64", downsample)
        for i, (_, name, downsample) in enumerate(found)
    ]


@contextmanager
def installed_csa(unet: torch.nn.Module, state: CSAState) -> Iterator[CSAState]:
    """Swap CSA processors into `unet` for the duration of the block, then restore."""
    saved = unet.attn_processors
    by_name = {layer.name + ".processor": layer for layer in state.layers}
    processors = {
        name: ConsistentSelfAttnProcessor(state, by_name[name]) if name in by_name else proc
        for name, proc in saved.items()
    }

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.begin_step(sample.shape[-2], sample.shape[-1], sample.device)

    def post_hook(_module: torch.nn.Module, _args: tuple, _output: object) -> None:
        state.end_step()

    unet.set_attn_processor(processors)
    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(saved)
        state.clear()


@contextmanager
def windowed_unet(
    unet: torch.nn.Module, state: CSAState, frames: int, window: int, stride: int
) -> Iterator[None]:
    """Sliding-window CSA (the paper's Algorithm 1, at the level of the UNet call).

    While active, a UNet call on all `frames` frames (times CFG groups) runs as one forward per
    window of `window` consecutive frames, each frame attending to samples from its window; a
    frame's noise prediction is the mean over the windows that cover it. Activations exist for
    one window at a time, so peak memory does not grow with the story's length.
    """
    original = unet.forward
    starts = window_starts(frames, window, stride)
    size = min(window, frames)

    def forward(sample: torch.Tensor, timestep: torch.Tensor, *args: object, **kwargs: object):
        batch = sample.shape[0]

        def take(value: object, rows: torch.Tensor) -> object:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value[rows]
            if isinstance(value, dict):
                return {k: take(v, rows) for k, v in value.items()}
            if isinstance(value, list):  # IP-Adapter image embeddings, one per adapter
                return [take(v, rows) for v in value]
            return value

        return_dict = kwargs.pop("return_dict", True)
        result = window_mean(
            sample,
            frames,
            starts,
            size,
            state,
            lambda rows: original(
                sample[rows],
                take(timestep, rows),
                *[take(a, rows) for a in args],
                return_dict=False,
                **{k: take(v, rows) for k, v in kwargs.items()},
            )[0],
        )
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    with forward_replaced(unet, forward):
        yield
