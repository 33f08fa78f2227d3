"""The tiny random Wan2.1 first-last-frame-to-video pipeline: offline, deterministic, real layout.

Everything runs on the CPU at 32×32 (the smallest side with 2×2 latent patches), 2 steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import assert_same_weights

from storycli.motion.decoders.wan_tiny import (
    WAN_SIZE_MULTIPLE,
    build_tiny_wan_flf2v_pipeline,
    wan_pipeline_class,
    wan_prompt_embeds,
)
from storycli.weights.hub import quiet_loading

SIZE = 2 * WAN_SIZE_MULTIPLE  # 32: a 4×4 latent, 2×2 transformer patches
FRAMES = 9  # 4k+1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread: None) -> Iterator[Any]:
    yield build_tiny_wan_flf2v_pipeline()


def _keyframe(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _video(pipe: Any, first: Image.Image, last: Image.Image, frames: int = FRAMES) -> np.ndarray:
    """One FLF2V call with classifier-free guidance, prompts encoded without ftfy."""
    return pipe(
        image=first,
        last_image=last,
        prompt_embeds=wan_prompt_embeds(pipe, ["a fox walks through the forest"]),
        negative_prompt_embeds=wan_prompt_embeds(pipe, [""]),
        height=SIZE,
        width=SIZE,
        num_frames=frames,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames


def test_flf2v_runs_on_cpu(pipe: Any) -> None:
    assert pipe.transformer.config.image_dim == pipe.image_encoder.config.hidden_size
    assert pipe.transformer.config.pos_embed_seq_len is not None  # the FLF2V layout
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    for frames in (5, FRAMES):
        video = _video(pipe, _keyframe(1), _keyframe(2), frames)
        assert video.shape == (1, frames, SIZE, SIZE, 3)
        assert np.isfinite(video).all() and video.std() > 0


def test_two_builds_are_identical(pipe: Any) -> None:
    state = torch.random.get_rng_state()
    other = build_tiny_wan_flf2v_pipeline()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert_same_weights(pipe, other)
    first, last = _keyframe(1), _keyframe(2)
    np.testing.assert_array_equal(_video(pipe, first, last), _video(other, first, last))


def test_last_image_changes_the_video(pipe: Any) -> None:
    first = _keyframe(1)
    a, b = _video(pipe, first, _keyframe(2)), _video(pipe, first, _keyframe(3))
    assert not np.array_equal(a, b)
    # Both ends condition the video: the CLIP tokens and the condition latents.
    embeds = pipe.encode_image([first, _keyframe(2)], torch.device("cpu"))
    assert embeds.shape[0] * embeds.shape[1] == pipe.transformer.config.pos_embed_seq_len


def test_save_and_load_gives_the_same_video(pipe: Any, tmp_path: Path) -> None:
    with quiet_loading():  # (transformers' "Writing model shards" bars)
        pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    with quiet_loading():
        loaded = wan_pipeline_class().from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, loaded)
    first, last = _keyframe(1), _keyframe(2)
    # Same weights, bit for bit; the loaded ones sit elsewhere in memory, which may change a
    # BLAS kernel's summation order in the last bits (seen: 5e-7 on the image cross-attention).
    np.testing.assert_allclose(_video(pipe, first, last), _video(loaded, first, last), atol=1e-5)


def test_build_and_call_print_nothing() -> None:
    """A fresh process (import notices are logged once per process): no bars, no warnings."""
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from PIL import Image\n"
        "from storycli.motion.decoders.wan_tiny import build_tiny_wan_flf2v_pipeline as b, "
        "wan_prompt_embeds as e\n"
        "p = b(); k = Image.new('RGB', (32, 32))\n"
        "p(image=k, last_image=k, prompt_embeds=e(p, ['a']), negative_prompt_embeds=e(p, ['']), "
        "height=32, width=32, num_frames=5, num_inference_steps=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert (done.stdout, done.stderr) == ("", "")
