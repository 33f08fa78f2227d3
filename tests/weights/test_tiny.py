"""Tests for the tiny offline SDXL pipeline (``storycli.weights.tiny``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storycli.weights.tiny import TINY_VAE_SCALE_FACTOR, build_tiny_sdxl_pipeline, build_tokenizer

PROMPT = "a photo of a cat"


def _image(pipe, seed: int = 0, **kwargs) -> Image.Image:
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return out.images[0]


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_sdxl_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_with_start_end_and_no_unknowns():
    tok = build_tokenizer()
    assert tok.model_max_length == 77
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id
    # The unknown token is <|endoftext|>: it must appear only as the final end token.
    assert tok.unk_token_id == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]
    assert tok.bos_token_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT


def test_tokenizer_has_learned_merges():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    assert len(vocab) > 512 + 2 + 100  # bytes, bytes</w>, specials, merges
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    # Merges make common words shorter than their character count.
    n_tokens = len(tok(PROMPT).input_ids) - 2
    assert n_tokens < len(PROMPT.replace(" ", ""))


@pytest.mark.parametrize(
    "text",
    ["café naïve über", "🐱 and 🎉 emoji", "日本語 ünïcödé", "ÆØÅ ß ñ"],
)
def test_tokenizer_any_text_round_trips(text: str):
    tok = build_tokenizer()
    ids = tok(text).input_ids
    assert tok.eos_token_id not in ids[1:-1]  # no unknown tokens
    decoded = tok.decode(ids, skip_special_tokens=True)
    # CLIP lowercases and decodes end-of-word as a space: compare modulo whitespace.
    assert decoded.split() == text.lower().split()


def test_tokenizer_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a("a brave knight 🐉").input_ids == b("a brave knight 🐉").input_ids


def test_pad_token_ids_differ():
    tok = build_tokenizer()
    tok_2 = build_tokenizer(pad_token="!")
    assert tok.pad_token_id == tok.eos_token_id
    assert tok_2.pad_token_id == tok_2.get_vocab()["!"]
    assert tok.pad_token_id != tok_2.pad_token_id
    padded = tok_2(PROMPT, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77
    assert padded[-1] == tok_2.pad_token_id
    # Vocabulary is shared; only the pad token differs.
    assert tok.get_vocab() == tok_2.get_vocab()


def test_bad_pad_token_rejected():
    with pytest.raises(ValueError):
        build_tokenizer(pad_token="<|not-a-token|>")


# --------------------------------------------------------------------------- build


def test_two_builds_are_bit_identical():
    torch.manual_seed(1)
    a = build_tiny_sdxl_pipeline()
    torch.manual_seed(2)  # the caller's RNG state must not matter
    b = build_tiny_sdxl_pipeline()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_build_leaves_global_rng_unchanged():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    build_tiny_sdxl_pipeline()
    assert torch.equal(torch.get_rng_state(), before)


def test_components_and_configs(pipe):
    assert pipe.vae_scale_factor == TINY_VAE_SCALE_FACTOR == 2
    assert pipe.vae.config.force_upcast is False
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        assert te.config.eos_token_id == tok.eos_token_id
    unet_cfg = pipe.unet.config
    assert unet_cfg.addition_embed_type == "text_time"
    assert unet_cfg.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert unet_cfg.projection_class_embeddings_input_dim == (
        6 * unet_cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sched.beta_schedule, sched.timestep_spacing, sched.steps_offset) == (
        "scaled_linear",
        "leading",
        1,
    )
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    assert 500_000 < n_params < 3_000_000


def test_unet_self_attention_layout(pipe):
    attn1 = [n for n, _ in pipe.unet.named_modules() if n.endswith(".attn1")]
    up0 = [n for n in attn1 if n.startswith("up_blocks.0.")]
    up1 = [n for n in attn1 if n.startswith("up_blocks.1.")]
    up2 = [n for n in attn1 if n.startswith("up_blocks.2.")]
    assert up0 and up1
    assert not up2
    # Two transformer layers per attention at the lowest resolution, one above (like SDXL's
    # deeper-at-low-resolution layout).
    assert len(up0) == 4
    assert len(up1) == 2


def test_dtype_cast():
    p = build_tiny_sdxl_pipeline(dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert all(t.dtype == torch.bfloat16 for t in getattr(p, name).parameters()), name


# --------------------------------------------------------------------------- inference


def test_pipeline_call_is_deterministic(pipe):
    img = _image(pipe, seed=0)
    assert isinstance(img, Image.Image)
    assert img.size == (64, 64)
    arr = np.asarray(img)
    assert arr.std() > 0  # not a constant image
    again = np.asarray(_image(pipe, seed=0))
    assert np.array_equal(arr, again)
    other = np.asarray(_image(pipe, seed=1))
    assert not np.array_equal(arr, other)


def test_pipeline_without_cfg(pipe):
    img = _image(pipe, seed=0, guidance_scale=1.0)
    assert img.size == (64, 64)
    assert np.array_equal(np.asarray(img), np.asarray(_image(pipe, seed=0, guidance_scale=1.0)))


def test_default_size_is_64(pipe):
    out = pipe(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)


def test_save_and_reload_round_trip(pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert loaded.tokenizer_2.pad_token_id == pipe.tokenizer_2.pad_token_id
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    assert np.array_equal(np.asarray(_image(loaded, seed=0)), np.asarray(_image(pipe, seed=0)))
