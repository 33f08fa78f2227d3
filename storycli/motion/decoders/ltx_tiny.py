"""A tiny, random-weight LTX-Video condition pipeline (`LTXConditionPipeline`), built offline.

It mirrors the layout of `Lightricks/LTX-Video-0.9.5` (the first release the condition pipeline
targets) at toy width, so transition code can run
`LTXConditionPipeline(conditions=[LTXVideoCondition(image=first, frame_index=0),
LTXVideoCondition(image=last, frame_index=num_frames - 1)])` end to end on a CPU in seconds:

* an `LTXVideoTransformer3DModel` with 1×1×1 patches (the VAE already folds 32×32×8 pixels into
  one latent token) and the T5 width as its caption width;
* an `AutoencoderKLLTXVideo` with 0.9.5's block types and LTX's compression: a 4×4 patchify,
  then spatial, temporal and two spatio-temporal 2× downsamples (32× spatial, 8× temporal:
  videos of 8k+1 frames, sides multiple of 32), a timestep-conditioned decoder with 0.9.5's
  residual 2× upsamplers;
* a `T5EncoderModel` with the offline T5 tokenizer of `storycli.weights.tiny_flux`;
* `FlowMatchEulerDiscreteScheduler` as 0.9.5's (no dynamic shifting: the condition pipeline
  passes its own linear-quadratic sigmas and no `mu`).

Weights are drawn inside `torch.random.fork_rng` from `TINY_SEED`: two builds are bit-identical
and the caller's RNG state is untouched. Its videos are noise, not art.

Unlike Wan's, LTX's text path needs no `ftfy`: the pipeline takes `prompt=` directly; pass
`max_sequence_length=TINY_LTX_TEXT_LENGTH` (its default of 256 only pads the tiny T5 longer).
Every call logs a scheduler warning about custom timesteps (the pipeline always passes them):
call it inside `quiet_ltx_schedule()` to drop that one message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from storycli.motion.decoders.animatediff_tiny import settle_tiny_pipeline
from storycli.weights.tiny import TINY_SEED
from storycli.weights.tiny_flux import build_t5_tokenizer, tiny_t5_config
from storycli.weights.tiny_words import TINY_T5_LENGTH

if TYPE_CHECKING:
    import diffusers
    import transformers

__all__ = [
    "LTX_MIN_STEPS",
    "LTX_SIZE_MULTIPLE",
    "LTX_TEMPORAL_FACTOR",
    "TINY_LTX_TEXT_LENGTH",
    "build_tiny_ltx_condition_pipeline",
    "quiet_ltx_schedule",
]

#: LTX's VAE keeps the first frame and folds every following 8 into one latent frame.
LTX_TEMPORAL_FACTOR: int = 8
#: Frame sides must be multiples of this: the VAE's 32× (the transformer's patches are 1×1).
LTX_SIZE_MULTIPLE: int = 32
#: With one step the schedule is the single sigma 1.0, which `shift_terminal`'s stretch
#: divides by zero: a NaN video (as with the real 0.9.5 config). Two steps is the least.
LTX_MIN_STEPS: int = 2
#: The tiny T5's sequence length (the real LTX tokenizer's is 128; the pipeline pads to 256).
TINY_LTX_TEXT_LENGTH: int = TINY_T5_LENGTH

_TEXT_DIM = 32  # T5 d_model = the transformer's caption_channels
_HEADS = 2
_HEAD_DIM = 16  # inner dim 32; LTX's RoPE pads what 3 axes × sin/cos do not fill
_LATENT_CHANNELS = 8  # the real VAE has 128
_SCHEDULER_LOGGER = "diffusers.schedulers.scheduling_flow_match_euler_discrete"
_TIMESTEPS_NOTICE = "`timesteps` were passed without `sigmas`"


def build_tiny_ltx_condition_pipeline(
    dtype: torch.dtype = torch.float32,
) -> diffusers.LTXConditionPipeline:
    """Build the tiny random `LTXConditionPipeline`.

    Everything is on the CPU, progress bars off. Call it with `conditions=` (first keyframe at
    frame 0, last at `num_frames - 1`), sides multiple of `LTX_SIZE_MULTIPLE`, 8k+1 frames.
    """
    from diffusers import LTXConditionPipeline

    tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 30)
        transformer = _tiny_transformer()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(tokenizer)
    pipe = LTXConditionPipeline(
        scheduler=_ltx_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return settle_tiny_pipeline(pipe, dtype)


def _tiny_transformer() -> diffusers.LTXVideoTransformer3DModel:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        cross_attention_dim=_HEADS * _HEAD_DIM,
        num_layers=2,
        caption_channels=_TEXT_DIM,
    )


def _tiny_vae() -> diffusers.AutoencoderKLLTXVideo:
    from diffusers import AutoencoderKLLTXVideo

    # 0.9.5's layout: 4×4 patchify (×4), then spatial, temporal, spatio-temporal ×2 downsamples
    # (×8 spatial, ×8 temporal); the decoder undoes it with three residual 2× upsamplers. The
    # ratios are given explicitly, as in 0.9.5's config: the default formula assumes
    # every scaling block is spatio-temporal.
    return AutoencoderKLLTXVideo(
        latent_channels=_LATENT_CHANNELS,
        block_out_channels=(4, 8, 16, 32, 32),
        down_block_types=("LTXVideo095DownBlock3D",) * 4,
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        spatial_compression_ratio=LTX_SIZE_MULTIPLE,
        temporal_compression_ratio=LTX_TEMPORAL_FACTOR,
    )


def _tiny_text_encoder(tokenizer: transformers.T5TokenizerFast) -> transformers.T5EncoderModel:
    from transformers import T5EncoderModel

    return T5EncoderModel(tiny_t5_config(tokenizer, _TEXT_DIM))  # as t5-v1_1-xxl


def _ltx_scheduler() -> diffusers.FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # LTX-Video 0.9.5's scheduler config. Dynamic shifting must stay off: the condition
    # pipeline sets custom timesteps without the `mu` it would need.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


@contextmanager
def quiet_ltx_schedule() -> Iterator[None]:
    """Drop the scheduler's "timesteps were passed without sigmas" warning while inside.

    `LTXConditionPipeline.__call__` always hands the scheduler its linear-quadratic timesteps
    (it has no `sigmas=`), so every call would log it; the schedule is the one LTX-Video uses.
    Other scheduler messages still pass.
    """

    def drop_timesteps_notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TIMESTEPS_NOTICE)

    log = logging.getLogger(_SCHEDULER_LOGGER)
    log.addFilter(drop_timesteps_notice)  # one per call: nested uses stay right
    try:
        yield
    finally:
        log.removeFilter(drop_timesteps_notice)
