"""The wan decoder on the tiny random Wan2.1 FLF2V pipeline: seeded frames, its own image
conditioning untouched without a predictor, and the predictor's P_i steering it with one.

(The command-line behaviour it shares with ltx is in test_end_frames_cli.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from animate_runs import save_tiny_predictor
from cli_runs import run_cli
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.wan import WanDecoder, load_wan_decoder
from storycli.motion.decoders.wan_tiny import WAN_TEXT_LENGTH, wan_prompt_embeds
from storycli.motion.predictor.model import weights_path
from storycli.motion.video.io import read_frames

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 32  # the wan-tiny preset's area is 32²: square keyframes render unscaled


def noise_image(seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def decoder(one_thread: None) -> Iterator[WanDecoder]:
    yield load_wan_decoder("tiny", device="cpu")


def request(frames: int = 9, **extra: Any) -> TransitionRequest:
    return TransitionRequest(
        noise_image(0),
        noise_image(1),
        frames=frames,
        start_prompt="a fox",
        end_prompt="a fox sleeps",
        **extra,
    )


def arrays(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.int16) for f in frames])


def plain_pipeline(decoder: WanDecoder, seed: int = 0, output_type: str = "pil") -> Any:
    """What `WanImageToVideoPipeline` itself makes of the request, called directly."""
    pipe = decoder.pipe
    embeds = wan_prompt_embeds(pipe, ["a fox a fox sleeps"], WAN_TEXT_LENGTH)
    negative = wan_prompt_embeds(pipe, [decoder.preset.negative], WAN_TEXT_LENGTH)
    return pipe(
        image=noise_image(0),
        last_image=noise_image(1),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        height=SIDE,
        width=SIDE,
        num_frames=9,
        num_inference_steps=decoder.steps,
        guidance_scale=decoder.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).frames


def test_frames_are_seeded_and_report_progress(decoder: WanDecoder) -> None:
    steps: list[tuple[int, int]] = []
    wide = TransitionRequest(noise_image(0, (64, 48)), noise_image(1, (64, 48)), frames=3)
    frames = decoder.transition(wide, on_step=lambda done, total: steps.append((done, total)))
    assert len(frames) == 3 and all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    assert steps == [(1, 2), (2, 2)]
    assert np.array_equal(arrays(frames), arrays(decoder.transition(wide)))
    other = decoder.transition(TransitionRequest(wide.start, wide.end, frames=3, seed=1))
    assert not np.array_equal(arrays(frames), arrays(other))


def test_without_embeddings_it_is_the_plain_pipeline(decoder: WanDecoder) -> None:
    ours = decoder.transition(request())
    assert np.array_equal(arrays(ours), arrays(plain_pipeline(decoder)[0]))


def test_even_steering_is_the_plain_attention(decoder: WanDecoder) -> None:
    """Weights ½ : ½ for every latent frame add the same log-weight to every image token: the
    softmax is unchanged, so the steered processor must give the plain one's video."""
    plain = plain_pipeline(decoder, output_type="np")
    decoder._steering.weights = torch.full((3, 2), 0.5)
    try:
        even = plain_pipeline(decoder, output_type="np")
    finally:
        decoder._steering.weights = None
    np.testing.assert_allclose(even, plain, atol=1e-5)


def test_predictor_embeddings_steer_the_frames(decoder: WanDecoder) -> None:
    k = decoder.image_encoder.encode([noise_image(0), noise_image(1)])
    assert decoder.image_encoder.name == "tiny"  # the predictor's space is Wan's CLIP tower

    def along(fractions: torch.Tensor) -> torch.Tensor:
        return k[0] + fractions[:, None] * (k[1] - k[0])

    plain = arrays(decoder.transition(request()))
    linear = arrays(decoder.transition(request(embeddings=along(torch.linspace(0, 1, 9)))))
    eased = arrays(decoder.transition(request(embeddings=along(torch.linspace(0, 1, 9) ** 3))))
    assert not np.array_equal(linear, plain)
    assert not np.array_equal(eased, linear)
    assert decoder._steering.weights is None  # nothing carried into the next transition


def test_predictor_through_the_cli_is_recorded_and_changes_the_video(tmp_path: Path) -> None:
    folder = tmp_path / "kf"
    folder.mkdir()
    for seed in range(2):
        noise_image(seed).save(folder / f"key_{seed}.png")
    smp = save_tiny_predictor(tmp_path / "smp", random_head=True)
    base = ["animate", folder, "--decoder", "wan", "--model", "tiny", "--frames", "9"]
    run_cli(*base, "-o", tmp_path / "plain")
    run_cli(*base, "--predictor", smp, "-o", tmp_path / "steered")
    described = json.loads((tmp_path / "steered" / "animate.json").read_text())["decoder"]
    assert described["predictor"] == str(weights_path(smp).resolve())
    plain = read_frames(tmp_path / "plain" / "transition_01_02.mp4", 16, None)
    steered = read_frames(tmp_path / "steered" / "transition_01_02.mp4", 16, None)
    assert len(plain) == len(steered) == 9
    assert not np.array_equal(arrays(plain), arrays(steered))


def test_predictor_of_another_width_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "kf"
    folder.mkdir()
    for seed in range(2):
        noise_image(seed).save(folder / f"key_{seed}.png")
    smp = save_tiny_predictor(tmp_path / "smp", dim=16)
    result = run_cli(
        "animate", folder, "--decoder", "wan", "--model", "tiny", "--frames", "9",
        "--predictor", smp, code=2,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "16-d" in lines[0] and "32-d" in lines[0], result.stderr
    assert not (folder / "video").exists()
