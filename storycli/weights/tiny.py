"""A tiny, random-weight SDXL pipeline built fully offline, in-process.

Used by the test-suite and by ``--model tiny`` smoke runs.  Nothing is downloaded: the
tokenizers are hand-made byte-level BPE tokenizers learned in code from a fixed word list,
and every model is constructed from a config with a fixed seed, so two builds give
bit-identical weights.

The UNet mirrors SDXL's *structure* (three resolution levels; a plain ``DownBlock2D`` first,
then two cross-attention levels; ``text_time`` additional embeddings; two concatenated text
encoders, the second one with a projection) at a tiny width, so code that hooks SDXL's
self-attention layers (``up_blocks.0`` / ``up_blocks.1`` ``attn1``) can be exercised on CPU.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from storycli.story.tokens import bytes_to_unicode
from storycli.weights.tiny_words import WORDS

if TYPE_CHECKING:
    import diffusers
    import transformers

__all__ = [
    "TINY_SEED",
    "TINY_VAE_SCALE_FACTOR",
    "build_tiny_sdxl_pipeline",
    "build_tokenizer",
    "sdxl_euler_scheduler",
]

#: Seed used (inside a forked RNG) for the tiny models' random weights.
TINY_SEED: int = 20240611

#: Downsampling factor of the tiny VAE (two blocks: ``2 ** (2 - 1)``).
TINY_VAE_SCALE_FACTOR: int = 2

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_EOW = "</w>"
_MAX_LENGTH = 77
_NUM_MERGES = 240

# Text-encoder / UNet sizes.
_TE_HIDDEN = 32
_TE_PROJECTION = 32
_TIME_EMBED_DIM = 8


def _learn_merges(words: tuple[str, ...], num_merges: int) -> list[tuple[str, str]]:
    """Learn ``num_merges`` BPE merges over ``words`` deterministically (CLIP-style ``</w>``)."""
    byte_map = bytes_to_unicode()
    freqs: Counter[tuple[str, ...]] = Counter()
    for word in words:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] = chars[-1] + _EOW
        freqs[tuple(chars)] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in freqs.items():
            for pair in pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_freqs: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in freqs.items():
            if best[0] not in symbols or best[1] not in symbols:
                new_freqs[symbols] += freq
                continue
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_freqs[tuple(out)] += freq
        freqs = new_freqs
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """The tiny tokenizer's vocabulary (as ordered items) and merges, computed once."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + _EOW for c in byte_chars]
    merges = _learn_merges(WORDS, _NUM_MERGES)
    tokens += ["".join(m) for m in merges]
    tokens += [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return tuple(vocab.items()), tuple(merges)


def build_tokenizer(pad_token: str = _EOS) -> transformers.CLIPTokenizer:
    """Build a small byte-level BPE ``CLIPTokenizer`` entirely in code (no files, no hub).

    The vocabulary is the 256 GPT-2 byte characters, the same 256 with ``</w>`` appended,
    the tokens of ~240 merges learned from a built-in English word list, then
    ``<|startoftext|>`` and ``<|endoftext|>``.  Because every byte is in the vocabulary, any
    text (accents, emoji, ...) tokenizes without unknown tokens.

    Args:
        pad_token: The padding token.  SDXL's first tokenizer pads with ``<|endoftext|>``
            (the default); its second tokenizer pads with ``"!"``.

    Returns:
        A ``CLIPTokenizer`` with ``model_max_length`` 77.
    """
    from transformers import CLIPTokenizer

    vocab_items, merges = _vocab_and_merges()
    vocab = dict(vocab_items)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the tiny vocabulary")
    # transformers 5's CLIPTokenizer hands `merges` straight to tokenizers' BPE, which
    # needs (a, b) tuples, not "a b" strings.
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=_EOS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=pad_token,
        model_max_length=_MAX_LENGTH,
    )


def text_encoder_config(
    tokenizer: transformers.CLIPTokenizer,
) -> transformers.CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TE_HIDDEN,
        intermediate_size=4 * _TE_HIDDEN,
        projection_dim=_TE_PROJECTION,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl_pipeline(
    dtype: torch.dtype = torch.float32,
) -> diffusers.StableDiffusionXLPipeline:
    """Build a tiny random-weight ``StableDiffusionXLPipeline``, offline and deterministically.

    Weights are drawn inside ``torch.random.fork_rng`` from a fixed seed (:data:`TINY_SEED`),
    so two builds are bit-identical and the caller's global (CPU) RNG state is left unchanged.

    Architecture (SDXL's structure at tiny width):

    * UNet: down blocks ``DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D``, up blocks
      ``CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D``, channels ``(16, 32, 64)``,
      transformer layers ``(1, 1, 2)``, ``text_time`` added conditioning, cross-attention
      dim 64 (= 32 + 32), so self-attention (``attn1``) lives in ``up_blocks.0`` and
      ``up_blocks.1``, as in SDXL.
    * Two CLIP text encoders (hidden 32, 3 layers, 4 heads); the second has a projection (32).
    * VAE with two blocks (``vae_scale_factor`` = :data:`TINY_VAE_SCALE_FACTOR` = 2), so the
      default 64x64 image uses 32x32 latents.
    * ``EulerDiscreteScheduler`` with SDXL's config.

    Args:
        dtype: Floating dtype the models are cast to after construction.

    Returns:
        The assembled pipeline (on CPU).
    """
    from diffusers import StableDiffusionXLPipeline

    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer(pad_token="!")
    # One forked RNG, the models drawn in this order: the order is part of the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder, text_encoder_2 = _tiny_text_encoders(tokenizer, tokenizer_2)
    scheduler = sdxl_euler_scheduler()
    for module in (unet, vae, text_encoder, text_encoder_2):
        # Plain nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even when
        # (as here) no module needs to stay in float32.
        torch.nn.Module.to(module, dtype=dtype)
        module.eval()

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def _tiny_unet() -> diffusers.UNet2DConditionModel:
    """SDXL's UNet structure at tiny width (weights from the caller's RNG)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=2 * _TE_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _TE_PROJECTION,
    )


def _tiny_vae() -> diffusers.AutoencoderKL:
    """A two-block VAE (scale factor 2; weights from the caller's RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def _tiny_text_encoders(
    tokenizer: transformers.CLIPTokenizer, tokenizer_2: transformers.CLIPTokenizer
) -> tuple[transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection]:
    """SDXL's two text encoders, the second with a projection (first one drawn first)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(tokenizer_2))
    return text_encoder, text_encoder_2


def sdxl_euler_scheduler() -> diffusers.EulerDiscreteScheduler:
    """``EulerDiscreteScheduler`` with SDXL's config (no weights, no RNG)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
