"""The metrics as pure functions over embeddings and pixel arrays (no models, no files).

Conventions, as the papers whose numbers they are compared with:

- CLIP-T: cosine between a frame's image embedding and its prompt's text embedding, the prompt
  prefixed with "A photo depicts "; reported raw and on the CLIPScore scale 2.5·max(cos, 0)
  that 1Prompt1Story's Table 1 uses (≈0.84–0.91 there, raw cosines are ≈0.24–0.33).
- CLIP-I: mean cosine over all C(n, 2) pairs of a character's frames (1Prompt1Story, ConsiStory).
- CLIPSIM-first / CLIPSIM-frames: mean cosine of each video frame to the first, and of
  consecutive frames (the usual video-consistency pair).
- Motion: mean absolute pixel difference of consecutive frames in [0, 1]; a still video scores
  0, so a method cannot win the similarity metrics by not moving.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations, pairwise
from typing import Any

import numpy as np

CLIP_T_PREFIX = "A photo depicts "
CLIP_SCORE_SCALE = 2.5


def as_array(embeds: Any) -> np.ndarray:
    """Embeddings (a torch tensor or anything array-like) as a 2-D float64 array."""
    if hasattr(embeds, "detach"):
        embeds = embeds.detach().cpu().numpy()
    array = np.asarray(embeds, dtype=np.float64)
    return array.reshape(1, -1) if array.ndim == 1 else array


def normalize(embeds: Any) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero rather than becoming NaN)."""
    array = as_array(embeds)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two vectors."""
    return float((normalize(a) @ normalize(b).T)[0, 0])


def clip_score(cos: float) -> float:
    """The CLIPScore scale of a cosine: 2.5·max(cos, 0)."""
    return CLIP_SCORE_SCALE * max(cos, 0.0)


def clip_t(image_embeds: Any, text_embeds: Any) -> list[float]:
    """Row i of the images against row i of the texts: raw cosines."""
    images, texts = normalize(image_embeds), normalize(text_embeds)
    if images.shape != texts.shape:
        raise ValueError(f"{images.shape[0]} image and {texts.shape[0]} text embeddings")
    return [float(v) for v in np.sum(images * texts, axis=1)]


def pairwise_cosines(embeds: Any) -> list[float]:
    """Cosine of every unordered pair of rows, in `itertools.combinations` order."""
    unit = normalize(embeds)
    return [float(unit[i] @ unit[j]) for i, j in combinations(range(len(unit)), 2)]


def mean(values: Iterable[float]) -> float | None:
    """The mean, or None for no values (a metric that does not apply, not a zero)."""
    items = list(values)
    return float(np.mean(items)) if items else None


def mean_pairwise_cosine(embeds: Any) -> float | None:
    """CLIP-I: mean cosine over all pairs (None for fewer than two rows)."""
    return mean(pairwise_cosines(embeds))


def clipsim_first(embeds: Any) -> float | None:
    """Mean cosine of every frame after the first to the first (None for one frame)."""
    unit = normalize(embeds)
    return mean(float(unit[i] @ unit[0]) for i in range(1, len(unit)))


def clipsim_frames(embeds: Any) -> float | None:
    """Mean cosine of consecutive frames (None for one frame)."""
    unit = normalize(embeds)
    return mean(float(unit[i] @ unit[i + 1]) for i in range(len(unit) - 1))


def motion_magnitude(frames: Sequence[np.ndarray]) -> float | None:
    """Mean absolute difference of consecutive frames' pixels, 8-bit values scaled to [0, 1]
    (None for one frame). Frames must share a shape."""
    if len(frames) < 2:
        return None
    diffs = []
    for a, b in pairwise(frames):
        if a.shape != b.shape:
            raise ValueError(f"frames of shapes {a.shape} and {b.shape}")
        diffs.append(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0)
    return float(np.mean(diffs))
