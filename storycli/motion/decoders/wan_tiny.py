"""A tiny, random-weight Wan2.1 first-last-frame-to-video (FLF2V) pipeline, built offline.

It mirrors the layout of `Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers` at toy width, so the
transition code can run `WanImageToVideoPipeline(image=first, last_image=last)` end to end on a
CPU in seconds:

* a `WanTransformer3DModel` taking 36 input channels (16 noisy latent + 4 frame mask + 16
  keyframe-condition latent channels), with `image_dim` and `added_kv_proj_dim` set (CLIP image
  tokens are cross-attended through their own key/value projections) and FLF2V's
  `pos_embed_seq_len` = 2 × the CLIP token count, the learned position embedding that tells
  the first keyframe's tokens from the last one's;
* an `AutoencoderKLWan` with Wan2.1's compression (8× spatial, 4× temporal: videos of 4k+1
  frames, sides multiple of 16 with the transformer's 2×2 patches) and its 16 latent channels'
  mean/std;
* a `UMT5EncoderModel` with the offline T5 tokenizer of `storycli.weights.tiny_flux`;
* a `CLIPVisionModel` whose tower is the tiny image encoder's
  (`storycli.weights.image_encoder.build_tiny_image_encoder`), with its processor: the real
  pipeline takes `hidden_states[-2]` of a plain `CLIPVisionModel`, not projected embeddings;
* `UniPCMultistepScheduler` with flow sigmas and Wan's FLF2V shift.

Weights are drawn inside `torch.random.fork_rng` from `TINY_SEED`: two builds are bit-identical
and the caller's RNG state is untouched. Its videos are noise, not art.

diffusers' Wan pipelines clean prompts with `ftfy`, which is not a dependency of this project:
`wan_prompt_embeds` encodes prompts the way the pipeline does, without it, and the pipeline is
then called with `prompt_embeds=` / `negative_prompt_embeds=`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from storycli.motion.decoders.animatediff_tiny import settle_tiny_pipeline
from storycli.weights.image_encoder import TINY_IMAGE_SIZE, build_tiny_image_encoder
from storycli.weights.tiny import TINY_SEED
from storycli.weights.tiny_flux import build_t5_tokenizer, tiny_t5_config

if TYPE_CHECKING:
    import diffusers
    import transformers

__all__ = [
    "WAN_SIZE_MULTIPLE",
    "WAN_TEMPORAL_FACTOR",
    "WAN_TEXT_LENGTH",
    "build_tiny_wan_flf2v_pipeline",
    "wan_pipeline_class",
    "wan_prompt_embeds",
]

#: Wan's VAE keeps the first frame and folds every following 4 into one latent frame.
WAN_TEMPORAL_FACTOR: int = 4
#: Frame sides must be multiples of this: the VAE's 8× times the transformer's 2×2 patches.
WAN_SIZE_MULTIPLE: int = 16
#: Wan2.1's UMT5 sequence length. Its attention processor takes the last 512 context tokens as
#: the text and the ones before as the image's (hard-coded), so the tiny model encodes 512 too.
WAN_TEXT_LENGTH: int = 512
#: Wan2.1's own generate.py samples FLF2V with shift 16 (I2V 720P: 5, 480P: 3).
WAN_FLF2V_FLOW_SHIFT: float = 16.0

_TEXT_DIM = 32  # UMT5 d_model = the transformer's text_dim
_HEADS = 2
_HEAD_DIM = 12  # RoPE splits it into t/h/w axes of 4 each (h = w = 2 * (12 // 6))
_LATENT_CHANNELS = 16  # z_dim, as Wan2.1's VAE (its latents_mean / latents_std have 16 entries)
# CLIP tokens per image: the class token plus one per patch (257 for the real ViT-H/14).
_CLIP_PATCH = 8
_CLIP_TOKENS = (TINY_IMAGE_SIZE // _CLIP_PATCH) ** 2 + 1


def wan_pipeline_class() -> type[diffusers.WanImageToVideoPipeline]:
    """`diffusers.WanImageToVideoPipeline`, imported without transformers' torchvision notice.

    Its module imports `transformers.CLIPImageProcessor`, which without torchvision resolves to
    `CLIPImageProcessorPil` (what `clip_image_processor_class` gives anyway) and logs a warning
    saying so; the notice is dropped for the import only.
    """
    log = logging.getLogger("transformers.utils.import_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from diffusers import WanImageToVideoPipeline
    finally:
        log.setLevel(level)
    return WanImageToVideoPipeline


def build_tiny_wan_flf2v_pipeline(
    dtype: torch.dtype = torch.float32,
) -> diffusers.WanImageToVideoPipeline:
    """Build the tiny random `WanImageToVideoPipeline` set up for first-last-frame-to-video.

    Everything is on the CPU, progress bars off. Call it with `image=` (first keyframe),
    `last_image=` (last keyframe), sides multiple of `WAN_SIZE_MULTIPLE` and 4k+1 frames.
    """
    tokenizer = build_t5_tokenizer()
    tower, processor = build_tiny_image_encoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 20)
        transformer = _tiny_transformer(image_dim=int(tower.config.hidden_size))
        _wake_image_position(transformer)
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(tokenizer)
        image_encoder = _plain_clip_vision(tower)
    pipe = wan_pipeline_class()(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_wan_scheduler(),
        image_processor=processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    return settle_tiny_pipeline(pipe, dtype)


def _tiny_transformer(image_dim: int) -> diffusers.WanTransformer3DModel:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        # noisy latents + the 4-channel frame mask + the keyframes' condition latents
        in_channels=2 * _LATENT_CHANNELS + WAN_TEMPORAL_FACTOR,
        out_channels=_LATENT_CHANNELS,
        text_dim=_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        # The image tokens get their own key/value projections in every cross-attention (as
        # Wan2.1 I2V/FLF2V's `added_kv_proj_dim` = its inner width); without them they would be
        # read as more text.
        added_kv_proj_dim=_HEADS * _HEAD_DIM,
        rope_max_seq_len=32,
        # FLF2V: the first and last keyframes' CLIP tokens side by side, each position learned.
        pos_embed_seq_len=2 * _CLIP_TOKENS,
    )


def _wake_image_position(transformer: torch.nn.Module) -> None:
    """Give FLF2V's image position embedding small random values.

    It starts at zeros (trained from there), which would make swapping the keyframes'
    CLIP tokens invisible to the model; random ones keep the first/last distinction observable.
    """
    pos_embed = transformer.condition_embedder.image_embedder.pos_embed
    torch.nn.init.normal_(pos_embed, std=0.02)


def _tiny_vae() -> diffusers.AutoencoderKLWan:
    from diffusers import AutoencoderKLWan

    # Four levels, three spatial downsamples (8×), temporal downsampling in the last two (4×):
    # Wan2.1's compression at a tiny width.
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        scale_factor_temporal=WAN_TEMPORAL_FACTOR,
        scale_factor_spatial=8,
    )


def _tiny_text_encoder(tokenizer: transformers.T5TokenizerFast) -> transformers.UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(tiny_t5_config(tokenizer, _TEXT_DIM, UMT5Config))  # as umt5-xxl


def _plain_clip_vision(tower: Any) -> transformers.CLIPVisionModel:
    """The tiny encoder's vision tower as the `CLIPVisionModel` the Wan pipeline expects.

    Same weights as `build_tiny_image_encoder()`'s (minus the projection Wan does not use), so
    the decoder's image tokens come from the motion predictor's encoder, as in the real stack
    where both are CLIP ViT-H/14.
    """
    from transformers import CLIPVisionModel

    assert tower.config.patch_size == _CLIP_PATCH  # _CLIP_TOKENS assumes it
    model = CLIPVisionModel(tower.config)
    # (transformers 5's CLIPVisionModel holds the tower's modules directly: same keys.)
    model.load_state_dict(tower.vision_model.state_dict())
    return model


def _wan_scheduler() -> diffusers.UniPCMultistepScheduler:
    from diffusers import UniPCMultistepScheduler

    # The Wan2.1 diffusers repos' scheduler: UniPC on shifted flow-matching sigmas.
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=WAN_FLF2V_FLOW_SHIFT,
        solver_order=2,
    )


@torch.no_grad()
def wan_prompt_embeds(
    pipe: diffusers.WanImageToVideoPipeline,
    prompts: list[str],
    max_sequence_length: int = WAN_TEXT_LENGTH,
) -> torch.Tensor:
    """Encode prompts as `WanImageToVideoPipeline._get_t5_prompt_embeds` does, without ftfy.

    The pipeline cleans every prompt with `ftfy.fix_text` (a NameError when ftfy is not
    installed); here only whitespace is normalised. Padding positions are zeroed as there.
    """
    cleaned = [re.sub(r"\s+", " ", text).strip() for text in prompts]
    inputs = pipe.tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = pipe.text_encoder.device
    mask = inputs.attention_mask.to(device)
    hidden = pipe.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
    # The real pipeline trims each sequence to its length and zero-pads it back.
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)
