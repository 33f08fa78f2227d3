"""The tiny random LTX-Video condition pipeline: offline, deterministic, real layout.

Everything runs on the CPU at 64×64 (a 2×2 latent at LTX's 32×), 9 frames (2 latent frames),
2 steps, the keyframes conditioning frame 0 and the last frame.
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

from storycli.motion.decoders.ltx_tiny import (
    LTX_SIZE_MULTIPLE,
    TINY_LTX_TEXT_LENGTH,
    build_tiny_ltx_condition_pipeline,
    quiet_ltx_schedule,
)
from storycli.weights.hub import quiet_loading

SIZE = 2 * LTX_SIZE_MULTIPLE  # 64: a 2×2 latent
FRAMES = 9  # 8k+1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread: None) -> Iterator[Any]:
    yield build_tiny_ltx_condition_pipeline()


def _keyframe(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _video(pipe: Any, first: Image.Image, last: Image.Image, frames: int = FRAMES) -> np.ndarray:
    """One call with classifier-free guidance: the first keyframe at frame 0, the last at the
    video's last frame."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    conditions = [
        LTXVideoCondition(image=first, frame_index=0),
        LTXVideoCondition(image=last, frame_index=frames - 1),
    ]
    with quiet_ltx_schedule():
        return pipe(
            conditions=conditions,
            prompt="a fox walks through the forest",
            negative_prompt="",
            height=SIZE,
            width=SIZE,
            num_frames=frames,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=TINY_LTX_TEXT_LENGTH,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).frames


def test_conditions_run_on_cpu(pipe: Any) -> None:
    assert pipe.vae_spatial_compression_ratio == 32 and pipe.vae_temporal_compression_ratio == 8
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels
    for frames in (FRAMES, 17):
        video = _video(pipe, _keyframe(1), _keyframe(2), frames)
        assert video.shape == (1, frames, SIZE, SIZE, 3)
        assert np.isfinite(video).all() and video.std() > 0


def test_two_builds_are_identical(pipe: Any) -> None:
    state = torch.random.get_rng_state()
    other = build_tiny_ltx_condition_pipeline()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert_same_weights(pipe, other)
    first, last = _keyframe(1), _keyframe(2)
    np.testing.assert_array_equal(_video(pipe, first, last), _video(other, first, last))


def test_last_keyframe_changes_the_video(pipe: Any) -> None:
    first = _keyframe(1)
    a, b = _video(pipe, first, _keyframe(2)), _video(pipe, first, _keyframe(3))
    assert not np.array_equal(a, b)


def test_save_and_load_gives_the_same_video(pipe: Any, tmp_path: Path) -> None:
    from diffusers import LTXConditionPipeline

    with quiet_loading():  # (transformers' "Writing model shards" bars)
        pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LTXConditionPipeline"
    assert index["transformer"] == ["diffusers", "LTXVideoTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLLTXVideo"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    with quiet_loading():
        loaded = LTXConditionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            ours, theirs = module.state_dict(), loaded.components[name].state_dict()
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    first, last = _keyframe(1), _keyframe(2)
    # Same weights, but loaded ones sit at safetensors offsets, not 64-byte aligned: the CPU
    # matmul then takes another kernel path, last-bit (~1e-7) differences in the VAE's
    # timestep embedding. Equal up to float32 rounding, not bit for bit.
    np.testing.assert_allclose(_video(pipe, first, last), _video(loaded, first, last), atol=1e-5)


def test_build_and_call_print_nothing() -> None:
    """A fresh process (import notices are logged once per process): no bars, no warnings."""
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from PIL import Image\n"
        "from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition as C\n"
        "from storycli.motion.decoders.ltx_tiny import build_tiny_ltx_condition_pipeline as b, "
        "quiet_ltx_schedule as q\n"
        "p = b(); k = Image.new('RGB', (32, 32))\n"
        "with q():\n"
        "    p(conditions=[C(image=k, frame_index=0), C(image=k, frame_index=8)], prompt='a', "
        "height=32, width=32, num_frames=9, num_inference_steps=2, max_sequence_length=64)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert (done.stdout, done.stderr) == ("", "")
