"""FLUX.1's transformer pipeline as the story loop's backbone (the second `Backbone`, see
`base.py`).

`FluxBackbone` wraps a diffusers `FluxPipeline` and answers the loop's questions the way the
pipeline's own `__call__` does (diffusers `pipelines/flux/pipeline_flux.py`), so a frame equals
the pipeline's frame: prompts through CLIP (pooled) and T5 (per-token), with zero text ids and
the latent grid's image ids; latents packed in 2×2 patches (`_pack_latents`), each frame's noise
drawn unpacked as `prepare_latents` draws it; flow-matching timesteps shifted by the image's
token count (`calculate_shift`, `mu`); no classifier-free guidance (FLUX.1 is guidance
distilled: dev embeds `guidance` instead, schnell takes none); decoding unpacks and undoes the
VAE's scale and shift.

CSA goes in through its DiT half (`consistency/csa_dit.py`), window mode too
(`windowed_transformer`). What does not carry over to FLUX yet is refused before loading
(`support.refusal`): IP-Adapter photos, 1Prompt1Story, FreeU. `--compile` compiles the
transformer's repeated blocks as on SDXL (`base.compiled_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from PIL import Image, ImageOps

from storycli.consistency.csa import window_starts
from storycli.consistency.csa_dit import dit_csa_layers, installed_dit_csa
from storycli.consistency.csa_state import CSAState, LayerInfo
from storycli.consistency.ip_adapter import Photos
from storycli.errors import InvalidInput
from storycli.keyframes.backbones.base import compiled_blocks, forward_replaced, window_mean
from storycli.keyframes.backbones.support import refusal
from storycli.keyframes.plan import Plan, PlannedFrame
from storycli.keyframes.schedule import RenderSize
from storycli.keyframes.t5_budget import MAX_T5_TOKENS  # the plan counts against the same


@dataclass
class FluxConditioning:
    """One transformer forward's conditioning: what `FluxPipeline` passes its transformer
    besides the latents, timestep and guidance."""

    text: torch.Tensor  # encoder_hidden_states: T5's tokens, (rows, tokens, dim)
    pooled: torch.Tensor  # pooled_projections: CLIP's pooled output, (rows, dim)
    text_ids: torch.Tensor  # txt_ids: (tokens, 3), zeros
    image_ids: torch.Tensor  # img_ids: (patches, 3), the packed grid's positions

    @property
    def dtype(self) -> torch.dtype:
        return self.text.dtype


def calculate_shift(
    tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float
) -> float:
    """FLUX's `mu`: the shift, linear in the image's token count (diffusers'
    `pipeline_flux.calculate_shift`; not imported: that module pulls in image processors)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return tokens * slope + base_shift - slope * base_tokens


#: The transformer's inputs with one entry per row (batch first); the position ids
#: (`img_ids`, `txt_ids`) are per token, shared by every row, and pass whole.
_PER_ROW = ("encoder_hidden_states", "pooled_projections", "timestep", "guidance")


@contextmanager
def windowed_transformer(
    transformer: torch.nn.Module, state: CSAState, frames: int, window: int, stride: int
) -> Iterator[None]:
    """Sliding-window CSA on FLUX.1, as `sdxl.windowed_unet` on the UNet (the paper's
    Algorithm 1 at the level of the transformer call).

    While active, a transformer call on all `frames` frames' packed latents (times CFG groups,
    where used) runs as one forward per window of `window` consecutive frames, each frame's
    image queries attending to samples from its window (`csa_dit`'s window phase); a frame's
    prediction is the mean over the windows that cover it. The forward hooks of
    `installed_dit_csa` run once around the whole call (one step); `begin_window` draws each
    window's samples. Activations exist for one window at a time, so peak memory does not grow
    with the story's length.
    """
    original = transformer.forward
    starts = window_starts(frames, window, stride)
    size = min(window, frames)

    def forward(hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)

        def forward_rows(rows: torch.Tensor) -> torch.Tensor:
            # Named, not guessed by size: a token count (the ids' first axis) may equal the batch.
            picked = {
                k: v[rows] if k in _PER_ROW and isinstance(v, torch.Tensor) and v.ndim else v
                for k, v in kwargs.items()
            }
            return original(hidden_states[rows], return_dict=False, **picked)[0]

        result = window_mean(hidden_states, frames, starts, size, state, forward_rows)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=result)
        return (result,)

    with forward_replaced(transformer, forward):
        yield


class FluxBackbone:
    """A loaded FLUX.1 pipeline (`keyframes.models`) as the story loop's `Backbone`."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.device: torch.device = pipe._execution_device  # where the transformer runs
        self.size: RenderSize | None = None  # the story's render size (`prepare_timesteps`)

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def guided(self, guidance: float) -> bool:
        # FLUX.1 is guidance-distilled: never an unconditional half (dev embeds `guidance`).
        return False

    # -- text --------------------------------------------------------------------------------

    def sequence_length(self, plan: Plan) -> int:
        """T5's token budget: the tokenizer's own, at most 512, or the model preset's
        `t5_tokens` when less (schnell: 256)."""
        budget = getattr(self.pipe.tokenizer_2, "model_max_length", None) or MAX_T5_TOKENS
        return min(int(budget), MAX_T5_TOKENS, plan.t5_tokens or MAX_T5_TOKENS)

    def conditioning(
        self,
        plan: Plan,
        calls: Sequence[Sequence[PlannedFrame]],
        size: RenderSize,
        cfg: bool,
    ) -> FluxConditioning:
        self.text_encoder_on_device()
        texts, pooled, text_ids = [], [], None
        for frames in calls:  # each call alone: a frame's embedding depends only on its call
            text, pool, text_ids = self.pipe.encode_prompt(
                prompt=[f.prompt for f in frames],
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.sequence_length(plan),
            )
            texts.append(text)
            pooled.append(pool)
        height, width = self.packed_grid(size)
        image_ids = self.pipe._prepare_latent_image_ids(
            1, height, width, self.device, texts[0].dtype
        )
        return FluxConditioning(torch.cat(texts), torch.cat(pooled), text_ids, image_ids)

    def text_encoder_on_device(self) -> None:
        """T5 back where the pipeline runs, if an earlier story parked it (`text_encoded`)."""
        t5 = self.pipe.text_encoder_2
        if t5 is not None and getattr(t5, "_storycli_parked", False):
            t5.to(self.device)
            t5._storycli_parked = False  # type: ignore[attr-defined]

    def text_encoded(self) -> None:
        """Every prompt is encoded: on CUDA without offload hooks, T5 (≈9.5 GB in bf16) leaves
        the GPU for the rest of the story, room for the transformer's activations and the
        VAE. The next story's `conditioning` brings it back."""
        t5 = self.pipe.text_encoder_2
        if t5 is None or self.device.type != "cuda" or hasattr(t5, "_hf_hook"):
            return  # offload hooks already move it
        if next(t5.parameters()).device.type == "cuda":
            t5.to("cpu")
            t5._storycli_parked = True  # type: ignore[attr-defined]
            torch.cuda.empty_cache()

    def add_photos(
        self,
        conditioning: FluxConditioning,
        photos: Photos,
        shown: Sequence[Sequence[str]],
        cfg: bool,
        latent_size: tuple[int, int],
    ) -> None:
        raise NotImplementedError(
            "ip_adapter: IP-Adapter photos are not supported on FLUX.1 yet; remove `ip_adapter:`"
        )

    # -- latents -----------------------------------------------------------------------------

    def unpacked_shape(self, size: RenderSize) -> tuple[int, int, int]:
        """One frame's latent shape before packing, as `FluxPipeline.prepare_latents` has it:
        even sides, so that 2×2 patches tile it."""
        scale = self.pipe.vae_scale_factor
        channels = self.transformer.config.in_channels // 4
        return (
            channels,
            2 * (size.height // (scale * 2)),
            2 * (size.width // (scale * 2)),
        )

    def packed_grid(self, size: RenderSize) -> tuple[int, int]:
        """The packed latents' grid of 2×2 patches (rows, columns)."""
        _, height, width = self.unpacked_shape(size)
        return height // 2, width // 2

    def prepare_timesteps(self, steps: int, size: RenderSize) -> None:
        # As the pipeline: sigmas 1 → 1/steps, shifted by `mu` from the image's token count
        # (the scheduler's dynamic shifting), or the scheduler's own flow sigmas.
        self.size = size
        scheduler = self.scheduler
        sigmas: np.ndarray | None = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        rows, columns = self.packed_grid(size)
        config = scheduler.config
        mu = calculate_shift(
            rows * columns,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)

    def initial_noise(
        self, frames: Sequence[PlannedFrame], size: RenderSize, dtype: torch.dtype
    ) -> torch.Tensor:
        # For each seed, one CPU generator draws as many unpacked images as the frames need
        # (`noise_index` + 1), as `prepare_latents` draws a batch from one generator.
        shape = self.unpacked_shape(size)
        draws: dict[int, torch.Tensor] = {}
        for seed in {f.seed for f in frames}:
            count = 1 + max(f.noise_index for f in frames if f.seed == seed)
            generator = torch.Generator("cpu").manual_seed(seed)
            draws[seed] = randn_tensor((count, *shape), generator=generator, dtype=dtype)
        noise = torch.stack([draws[f.seed][f.noise_index] for f in frames])
        return self.pack(noise)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.to(self.device)  # flow matching starts from the noise itself (sigma 1)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(rows, C, H, W) → (rows, H/2·W/2, 4C), as `FluxPipeline._pack_latents`."""
        rows, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, rows, channels, height, width)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents → (rows, C, H, W), as `FluxPipeline._unpack_latents`."""
        assert self.size is not None, "prepare_timesteps sets the story's render size"
        size = self.size
        return self.pipe._unpack_latents(
            latents, size.height, size.width, self.pipe.vae_scale_factor
        )

    def encode_pictures(self, paths: list[str | None], size: RenderSize) -> list[torch.Tensor]:
        # The VAE's mean, shifted and scaled as decoding undoes it, then packed.
        if not paths:
            return []
        vae = self.pipe.vae
        device = get_module_execution_device(vae)
        dtype = next(iter(vae.encoder.parameters())).dtype
        out = []
        for path in paths:
            with Image.open(path) as picture:  # type: ignore[arg-type]
                image = ImageOps.fit(picture.convert("RGB"), (size.width, size.height))
            pixels = self.pipe.image_processor.preprocess(image).to(device, dtype)
            latents = vae.encode(pixels).latent_dist.mean
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            out.append(self.pack(latents)[0].to(self.transformer.dtype))
        return out

    def noise_pictures(
        self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        # Flow matching's forward process: sigma·noise + (1 − sigma)·clean at step t.
        return self.scheduler.scale_noise(clean, t, noise)

    def step_kwargs(self, generators: list[torch.Generator]) -> dict[str, Any]:
        return {}  # the pipeline steps its deterministic Euler scheduler without generators

    # -- the forward -------------------------------------------------------------------------

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: FluxConditioning,
        cfg: bool,
        guidance: float,
    ) -> torch.Tensor:
        rows = latents.shape[0]
        embedded = None
        if self.transformer.config.guidance_embeds:  # FLUX.1-dev: the guidance as an input
            embedded = torch.full([1], guidance, device=self.device, dtype=torch.float32)
            embedded = embedded.expand(rows)
        timestep = t.expand(rows).to(latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=embedded,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.text,
            txt_ids=conditioning.text_ids,
            img_ids=conditioning.image_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    # -- decoding ----------------------------------------------------------------------------

    def decoding(self) -> AbstractContextManager[None]:
        return nullcontext()  # FLUX's VAE decodes in the pipeline's dtype

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        latents = self.unpack(latents)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")

    def freeu(self, plan: Plan) -> AbstractContextManager[None]:
        if plan.story.freeu is not None:
            raise NotImplementedError(refusal("flux", plan.story))
        return nullcontext()

    def release(self) -> None:
        self.pipe.maybe_free_model_hooks()

    # -- Consistent Self-Attention -----------------------------------------------------------

    def csa_layers(self, blocks: Sequence[str]) -> list[LayerInfo]:
        try:
            return dit_csa_layers(self.transformer, blocks)
        except ValueError as exc:  # a block index past this transformer's (known only now)
            raise InvalidInput(f"consistency.blocks: {exc}") from exc

    def installed_csa(self, state: CSAState) -> AbstractContextManager[Any]:
        return installed_dit_csa(self.transformer, state)

    def windowed(
        self, state: CSAState, frames: int, window: int, stride: int
    ) -> AbstractContextManager[None]:
        return windowed_transformer(self.transformer, state, frames, window, stride)

    def compiled(self, backend: str) -> AbstractContextManager[None]:
        # Regional, as on SDXL: the 19 double- and 38 single-stream blocks share two compiled
        # kinds; CSA's DiT processor stays eager inside them (`torch.compiler.disable`).
        return compiled_blocks(self.transformer, backend)
