"""The motion predictor, its checkpoints, the image encoder, and the model-free decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.crossfade import blend
from storycli.motion.decoders.registry import load_decoder
from storycli.motion.predictor.model import (
    MotionPredictor,
    PredictorConfig,
    PredictorError,
    lerp_embeddings,
    load_predictor,
    save_predictor,
    slerp_embeddings,
)
from storycli.weights.image_encoder import load_image_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def ends(dim: int = 32, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g) * 5, torch.randn(batch, dim, generator=g) * 5


def randomize_head(model: MotionPredictor, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g))


@pytest.mark.parametrize("frames", [2, 5, 16])
def test_untrained_predictor_is_exactly_lerp(frames):
    start, end = ends()
    model = MotionPredictor(PredictorConfig.tiny()).eval()
    out = model(start, end, frames)
    assert out.shape == (3, frames, 32)
    assert torch.equal(out, lerp_embeddings(start, end, frames))


def test_endpoints_stay_exact_whatever_the_weights():
    start, end = ends()
    model = MotionPredictor(PredictorConfig.tiny()).eval()
    randomize_head(model)
    out = model(start, end, 9)
    assert torch.equal(out[:, 0], start) and torch.equal(out[:, -1], end)
    assert not torch.allclose(out[:, 4], lerp_embeddings(start, end, 9)[:, 4])


def test_slerp_keeps_ends_and_interpolates_norms():
    start, end = ends()
    out = slerp_embeddings(start, end, 7)
    torch.testing.assert_close(out[:, 0], start)
    torch.testing.assert_close(out[:, -1], end)
    middle = (start.norm(dim=-1) + end.norm(dim=-1)) / 2
    torch.testing.assert_close(out[:, 3].norm(dim=-1), middle)
    same = slerp_embeddings(start, start, 4)  # parallel: no division by sin(0)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same[:, 2], start)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = MotionPredictor(PredictorConfig.tiny(encoder="tiny")).eval()
    randomize_head(model)
    path = save_predictor(model, tmp_path / "smp")
    assert path.name == "predictor.safetensors" and path.with_suffix(".json").is_file()
    start, end = ends()
    for where in (tmp_path / "smp", path):
        loaded = load_predictor(where, expect_dim=32)
        assert loaded.config == model.config
        assert torch.equal(loaded(start, end, 6), model(start, end, 6))

    with pytest.raises(PredictorError, match=r"32-d .* 1024-d"):
        load_predictor(path, expect_dim=1024)
    with pytest.raises(PredictorError, match="no predictor checkpoint"):
        load_predictor(tmp_path / "missing")
    path.write_bytes(b"not safetensors")
    with pytest.raises(PredictorError, match="not a readable predictor checkpoint"):
        load_predictor(path)


def test_tiny_encoder_is_deterministic_with_a_stable_preprocessing_id():
    a, b = load_image_encoder("tiny", "cpu"), load_image_encoder("tiny", "cpu")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "navy")]
    assert torch.equal(a.encode(images), b.encode(images))
    assert a.encode(images).shape == (2, a.dim) == (2, 32)
    assert a.preprocess_id == b.preprocess_id and len(a.preprocess_id) == 12
    assert a.encode([]).shape == (0, 32)


def test_crossfade_is_the_pixel_blend():
    start, end = Image.new("RGB", (8, 6), (0, 0, 0)), Image.new("RGB", (8, 6), (200, 100, 50))
    frames = blend(start, end, 5)
    values = [np.asarray(f)[0, 0].tolist() for f in frames]
    assert values == [[0, 0, 0], [50, 25, 12], [100, 50, 25], [150, 75, 38], [200, 100, 50]]


def test_latent_slerp_on_the_tiny_vae():
    decoder = load_decoder("latent-slerp", "tiny", device="cpu")
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    end = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    steps: list[tuple[int, int]] = []
    request = TransitionRequest(start, end, frames=6)
    frames = decoder.transition(request, on_step=lambda done, total: steps.append((done, total)))
    assert len(frames) == 6 and {f.size for f in frames} == {(40, 30)}
    assert steps[-1][0] == steps[-1][1]
    again = decoder.transition(request)
    for x, y in zip(frames, again, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # A path between the two: the middle frame differs from both ends.
    middle = np.asarray(frames[3], dtype=float)
    assert np.abs(middle - np.asarray(frames[0], dtype=float)).mean() > 0
    assert np.abs(middle - np.asarray(frames[-1], dtype=float)).mean() > 0
