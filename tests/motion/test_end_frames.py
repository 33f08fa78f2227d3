"""What the first-and-last-frame decoders (wan, ltx) share: frame counts, notes, sizes, and how
the motion predictor's P_i become Wan's per-latent-frame attention weights."""

from __future__ import annotations

import pytest
import torch

from storycli.motion.decoders.end_frames import (
    area_size,
    end_frames_count,
    frame_note,
    resample_indices,
)
from storycli.motion.decoders.wan import end_weights


@pytest.mark.parametrize(
    ("factor", "asked", "frames"),
    [
        *[(4, a, f) for a, f in [(1, 5), (5, 5), (6, 9), (9, 9), (16, 17), (17, 17)]],
        *[(8, a, f) for a, f in [(1, 9), (9, 9), (10, 17), (16, 17), (17, 17), (18, 25)]],
    ],
)
def test_frame_count_is_the_next_factor_k_plus_1(factor: int, asked: int, frames: int) -> None:
    assert end_frames_count(asked, factor) == frames


def test_frame_note_only_when_the_count_is_rounded() -> None:
    assert frame_note("wan", 5) is None and frame_note("wan", 33) is None
    assert frame_note("ltx", 25) is None
    assert frame_note("crossfade", 6) is None and frame_note("animatediff", 6) is None
    assert "wan renders 4k+1 frames" in str(frame_note("wan", 16))
    assert "rendered at 17 frames and resampled to the 16 asked for" in str(frame_note("wan", 16))
    assert "ltx renders 8k+1 frames" in str(frame_note("ltx", 16))
    assert "rendered at 17 frames" in str(frame_note("ltx", 16))


def test_resampling_keeps_both_ends() -> None:
    assert resample_indices(9, 6) == [0, 2, 3, 5, 6, 8]
    assert resample_indices(5, 5) == [0, 1, 2, 3, 4]
    assert resample_indices(5, 2) == [0, 4]


@pytest.mark.parametrize(
    ("size", "area", "multiple", "expected"),
    [
        ((1344, 768), 1280 * 720, 16, (1264, 720)),  # 16:9-ish keyframes at 720p's area
        ((1024, 1024), 1280 * 720, 16, (960, 960)),
        ((1024, 1024), 768 * 512, 32, (640, 640)),
        ((768, 1344), 768 * 512, 32, (480, 832)),  # portrait stays portrait
        ((64, 48), 32 * 32, 16, (32, 32)),  # never below one multiple
    ],
)
def test_render_size_keeps_aspect_at_the_area(
    size: tuple[int, int], area: int, multiple: int, expected: tuple[int, int]
) -> None:
    width, height = area_size(size, area, multiple)
    assert (width, height) == expected
    assert width % multiple == 0 and height % multiple == 0


def test_end_weights_follow_the_predictor_along_the_line() -> None:
    start, end = torch.zeros(4), torch.tensor([2.0, 0.0, 0.0, 0.0])
    # Eased motion: P_i at fractions 0, 0.1, 0.5, 0.9, 1 of the way, plus a part off the line
    # (the last coordinate), which cannot steer Wan and must not count.
    fractions = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    p = start + fractions[:, None] * (end - start)
    p[1:4, 3] = 5.0
    weights = end_weights(p, latent_frames=5)
    assert weights.shape == (5, 2)
    torch.testing.assert_close(weights[:, 1], fractions.clamp(1e-4, 1.0))
    torch.testing.assert_close(weights[1:4, 0], 1 - fractions[1:4])
    assert weights.min() >= 1e-4  # never a log of zero

    # Fewer latent frames than P_i: α interpolated at each latent frame's place in the clip.
    three = end_weights(p, latent_frames=3)
    torch.testing.assert_close(three[:, 1], torch.tensor([1e-4, 0.5, 1.0]))


def test_end_weights_clamp_overshoot_and_handle_equal_ends() -> None:
    p = torch.tensor([[0.0], [1.5], [-0.5], [1.0]])  # past either end: held at the ends
    torch.testing.assert_close(end_weights(p, 4)[:, 1], torch.tensor([1e-4, 1.0, 1e-4, 1.0]))
    same = torch.ones(3, 4)  # both keyframes alike: no direction, so linear in time
    torch.testing.assert_close(end_weights(same, 3)[:, 1], torch.tensor([1e-4, 0.5, 1.0]))


def test_offload_only_when_the_weights_and_a_margin_do_not_fit() -> None:
    from storycli.motion.decoders.end_frames import fits_in_memory, prepare_real_pipeline
    from storycli.motion.decoders.ltx_tiny import build_tiny_ltx_condition_pipeline

    pipe = build_tiny_ltx_condition_pipeline()
    weights = sum(
        p.numel() * p.element_size()
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )
    margin = 4 * 2**30 + weights * 1.25
    assert fits_in_memory(pipe, int(margin) + 1)
    assert not fits_in_memory(pipe, int(margin) - 1)
    # On the CPU nothing is offloaded; the VAE decodes in tiles either way.
    assert prepare_real_pipeline(pipe, "cpu", "none") == "none"
    assert pipe.vae.use_tiling
