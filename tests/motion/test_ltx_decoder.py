"""The ltx decoder on the tiny random LTX-Video condition pipeline: exactly the pipeline's own
video for the same noise, and a predictor noted as unused.

(The command-line behaviour it shares with wan is in test_end_frames_cli.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from animate_runs import save_tiny_predictor
from cli_runs import run_cli
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.ltx import LtxDecoder, load_ltx_decoder
from storycli.motion.decoders.ltx_tiny import TINY_LTX_TEXT_LENGTH, quiet_ltx_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 64  # the ltx-tiny preset's area is 64²: square keyframes render unscaled


def noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def decoder(one_thread: None) -> Iterator[LtxDecoder]:
    yield load_ltx_decoder("tiny", device="cpu")


def test_it_is_the_condition_pipeline_with_both_keyframes(decoder: LtxDecoder) -> None:
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    request = TransitionRequest(noise_image(0), noise_image(1), frames=9, start_prompt="a fox")
    ours = decoder.transition(request)
    with quiet_ltx_schedule():
        plain = decoder.pipe(
            conditions=[
                LTXVideoCondition(image=noise_image(0), frame_index=0),
                LTXVideoCondition(image=noise_image(1), frame_index=8),
            ],
            prompt="a fox",
            negative_prompt=decoder.preset.negative,
            height=SIDE,
            width=SIDE,
            num_frames=9,
            frame_rate=decoder.fps,
            num_inference_steps=decoder.steps,
            guidance_scale=decoder.guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=TINY_LTX_TEXT_LENGTH,
        ).frames[0]
    assert len(ours) == len(plain) == 9
    assert np.array_equal(np.stack([np.asarray(f) for f in ours]), np.stack(plain))


def test_a_predictor_is_noted_as_unused(tmp_path: Path) -> None:
    folder = tmp_path / "kf"
    folder.mkdir()
    for seed in range(2):
        noise_image(seed).save(folder / f"key_{seed}.png")
    smp = save_tiny_predictor(tmp_path / "smp")
    args = ["--decoder", "ltx", "--model", "tiny", "--frames", "9", "--predictor", smp]
    result = run_cli("animate", folder, *args)
    assert "--predictor ignored: the ltx decoder does not use embeddings" in result.stderr
    assert (folder / "video" / "transition_01_02.mp4").is_file()
