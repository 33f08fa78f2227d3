"""A tiny, random-weight FLUX.1 pipeline built fully offline, in-process (`--model tiny-flux`).

FLUX.1's structure at a tiny width: a `FluxTransformer2DModel` with double-stream and
single-stream blocks, 3-axis RoPE and (for the dev variant) a guidance embedding; a 16-channel
VAE with FLUX's scaling and shift factors; CLIP (pooled) and T5 (per-token) text encoders; the
flow-matching Euler scheduler with FLUX.1-dev's resolution-dependent shift. Nothing is
downloaded: the CLIP tokenizer is `weights.tiny`'s, the T5 tokenizer a Unigram model built here
from the same word list (a `T5TokenizerFast` over it, so it saves and loads as tokenizer.json
like the real one, without sentencepiece). Two builds are bit-identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from storycli.weights.tiny import TINY_SEED, build_tokenizer, text_encoder_config
from storycli.weights.tiny_words import TINY_T5_LENGTH, t5_unigram

if TYPE_CHECKING:
    import diffusers
    import transformers

#: Downsampling factor of the tiny VAE (two blocks); packing 2×2 patches doubles it.
TINY_FLUX_VAE_SCALE_FACTOR = 2

_HIDDEN = 32  # T5 d_model = the transformer's joint_attention_dim
_HEADS = 2
_HEAD_DIM = 16  # = sum of the RoPE axes below
_ROPE_AXES = (4, 6, 6)
_LATENT_CHANNELS = 16  # as FLUX.1's VAE


def build_t5_tokenizer() -> transformers.T5TokenizerFast:
    """A small T5-style Unigram tokenizer built in code (`tiny_words.t5_unigram`) as a
    `T5TokenizerFast`, so it saves and loads as tokenizer.json like the real one."""
    from transformers import T5TokenizerFast

    tok = t5_unigram()
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=TINY_T5_LENGTH,
    )


def build_tiny_flux_pipeline(
    dtype: torch.dtype = torch.float32, guidance_embeds: bool = False
) -> diffusers.FluxPipeline:
    """A tiny random-weight `FluxPipeline`, offline and deterministic (weights drawn inside
    `torch.random.fork_rng` from `TINY_SEED`). `guidance_embeds`: FLUX.1-dev's guidance
    embedding (schnell has none)."""
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = _tiny_transformer(guidance_embeds)
        vae = _tiny_vae()
        text_encoder, text_encoder_2 = _tiny_text_encoders(tokenizer, tokenizer_2)
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    if dtype != torch.float32:  # (a float32 cast would only warn about fp32-kept modules)
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_transformer(guidance_embeds: bool) -> diffusers.FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # 2×2 packed latent patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=32,  # the tiny CLIP's hidden size (its pooled output)
        guidance_embeds=guidance_embeds,
        axes_dims_rope=_ROPE_AXES,
    ).eval()


def _tiny_vae() -> diffusers.AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,  # FLUX.1's VAE
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _tiny_text_encoders(
    tokenizer: transformers.CLIPTokenizer, tokenizer_2: transformers.T5TokenizerFast
) -> tuple[transformers.CLIPTextModel, transformers.T5EncoderModel]:
    from transformers import CLIPTextModel, T5EncoderModel

    t5 = tiny_t5_config(tokenizer_2, _HIDDEN)
    return CLIPTextModel(text_encoder_config(tokenizer)).eval(), T5EncoderModel(t5).eval()


def tiny_t5_config(
    tokenizer: transformers.T5TokenizerFast,
    d_model: int,
    config_class: type[transformers.T5Config] | None = None,
) -> transformers.T5Config:
    """The tiny T5 encoder every tiny pipeline's text tower uses (FLUX's, LTX-Video's; Wan's
    with `config_class` UMT5Config): 2 layers of `d_model`, gated GELU as T5 v1.1 / UMT5-XXL,
    sized to `tokenizer`."""
    from transformers import T5Config

    return (config_class or T5Config)(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _flux_scheduler() -> diffusers.FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: the shift grows with the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
