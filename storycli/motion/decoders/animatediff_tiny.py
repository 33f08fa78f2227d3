"""A tiny, random-weight AnimateDiff + SparseCtrl + IP-Adapter stack, built offline in-process.

It mirrors the real `animatediff` decoder stack's *structure* at toy width, so the transition
code runs end to end on a CPU in seconds: an SD1.5-shaped UNet (a cross-attention level, then a
plain one) merged with a `MotionAdapter` into a `UNetMotionModel`, a `SparseControlNetModel`
configured like `guoyww/animatediff-sparsectrl-rgb` (keyframes VAE-encoded to 4 channels, plus
the mask channel; optionally like the scribble model: 3-channel images in pixel space), a small
VAE (downsampling factor 4), a CLIP text encoder with the offline tokenizer of
`storycli.weights.tiny`,
a DDIM scheduler set up as in the AnimateDiff docs, and an
IP-Adapter loaded through `load_ip_adapter` from a random state dict in the original file
format, so the projection and attention processors are exactly the objects a real checkpoint
gives. The image encoder is `storycli.weights.image_encoder.build_tiny_image_encoder()` (32-d).

Weights are drawn inside `torch.random.fork_rng` from fixed seeds: two builds are bit-identical
and the caller's RNG state is untouched. Its videos are noise, not art.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from storycli.consistency.ip_adapter import ip_adapter_state_dict
from storycli.weights.image_encoder import build_tiny_image_encoder
from storycli.weights.tiny import TINY_SEED, build_tokenizer

if TYPE_CHECKING:
    import diffusers

__all__ = ["TINY_VIDEO_VAE_SCALE_FACTOR", "build_tiny_animatediff_stack", "quiet_diffusers_models"]

#: Downsampling factor of the tiny VAE (three blocks: ``2 ** (3 - 1)``).
TINY_VIDEO_VAE_SCALE_FACTOR: int = 4

_CHANNELS = (32, 64)  # UNet / adapter / SparseCtrl widths, one per level
_TEXT_DIM = 32  # text hidden size = the UNet's cross_attention_dim
_HEADS = 4
_GROUPS = 8
_WAKE_STD = 0.05  # std for the layers ControlNets zero-initialise (see _wake_zero_layers)


@contextmanager
def quiet_diffusers_models() -> Iterator[None]:
    """Silence diffusers' model warnings for a moment.

    Building a `UNetMotionModel` from a 2D UNet and `load_ip_adapter` both cast the UNet to its
    own dtype with `ModelMixin.to`, which warns about "modules that should be kept in float32"
    even when that list is empty.
    """
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _tiny_unet() -> diffusers.UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=_CHANNELS,
        layers_per_block=1,
        norm_num_groups=_GROUPS,
        attention_head_dim=_HEADS,
        cross_attention_dim=_TEXT_DIM,
    )


def _tiny_motion_adapter() -> diffusers.MotionAdapter:
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=_CHANNELS,
        motion_layers_per_block=1,
        motion_norm_num_groups=_GROUPS,
        motion_num_attention_heads=_HEADS,
        motion_max_seq_length=32,
        use_motion_mid_block=False,
    )


def _tiny_sparsectrl(image_condition: bool = False) -> diffusers.SparseControlNetModel:
    from diffusers import SparseControlNetModel

    if image_condition:
        # The scribble/sketch SparseCtrl layout: 3-channel images in pixel space (plus the mask
        # channel) through a strided conv stack. Two stride-2 stages (three widths) bring them
        # down by 4, the tiny VAE's factor, as the real stack's three stages match SD1.5's 8.
        layout: dict[str, Any] = {
            "conditioning_channels": 3,
            "use_simplified_condition_embedding": False,
            "conditioning_embedding_out_channels": (8, 16, 32),
        }
    else:
        # The RGB SparseCtrl: keyframes enter as 4-channel VAE latents through a single conv
        # (`use_simplified_condition_embedding`), with the keyframe mask concatenated as a 5th.
        layout = {"conditioning_channels": 4, "use_simplified_condition_embedding": True}
    return SparseControlNetModel(
        in_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        block_out_channels=_CHANNELS,
        layers_per_block=1,
        norm_num_groups=_GROUPS,
        cross_attention_dim=_TEXT_DIM,
        attention_head_dim=_HEADS,
        motion_num_attention_heads=_HEADS,
        motion_max_seq_length=32,
        concat_conditioning_mask=True,
        **layout,
    )


def _tiny_vae() -> diffusers.AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_GROUPS,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=4 * _TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _tiny_scheduler() -> diffusers.DDIMScheduler:
    from diffusers import DDIMScheduler

    # The AnimateDiff docs' DDIM settings (linear betas, no clipping, linspace spacing).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="linspace",
    )


def _wake_zero_layers(controlnet: torch.nn.Module) -> None:
    """Give the ControlNet's zero-initialised layers small random weights.

    A freshly built ControlNet outputs exact zeros (its input and output convs start at zero,
    so training begins from the plain UNet); random ones make the keyframe path observable.
    """
    for name in ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block"):
        for param in getattr(controlnet, name).parameters():
            torch.nn.init.normal_(param, std=_WAKE_STD)


def build_tiny_animatediff_stack(
    dtype: torch.dtype = torch.float32, image_condition: bool = False
) -> diffusers.AnimateDiffSparseControlNetPipeline:
    """Build the tiny random `AnimateDiffSparseControlNetPipeline` with an IP-Adapter loaded.

    The pipeline's `image_encoder` / `feature_extractor` are the tiny CLIP vision tower and its
    processor (the embedding space of the per-frame image tokens). Everything is on the CPU.
    `image_condition=True` gives SparseCtrl the scribble model's layout (conditioning images in
    pixel space, `use_simplified_condition_embedding=False`) instead of the RGB model's latents.
    """
    from diffusers import AnimateDiffSparseControlNetPipeline

    tokenizer = build_tokenizer()
    image_encoder, processor = build_tiny_image_encoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 10)
        unet = _tiny_unet()
        adapter = _tiny_motion_adapter()
        controlnet = _tiny_sparsectrl(image_condition)
        _wake_zero_layers(controlnet)
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(tokenizer)
        # The pipeline merges unet + adapter into a fresh UNetMotionModel (random init, then
        # every weight copied over): kept inside the forked RNG all the same.
        with quiet_diffusers_models():
            pipe = AnimateDiffSparseControlNetPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                motion_adapter=adapter,
                controlnet=controlnet,
                scheduler=_tiny_scheduler(),
                feature_extractor=processor,
                image_encoder=image_encoder,
            )
        state_dict = ip_adapter_state_dict(pipe.unet, image_encoder.config.projection_dim)
    # The real loader, fed a state dict: the same ImageProjection + IPAdapterAttnProcessor2_0.
    with quiet_diffusers_models():
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    return settle_tiny_pipeline(pipe, dtype)


def settle_tiny_pipeline(pipe: Any, dtype: torch.dtype) -> Any:
    """A freshly built tiny video pipeline in `dtype`, in eval mode, without progress bars."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # Plain nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast.
            torch.nn.Module.to(module, dtype=dtype)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
