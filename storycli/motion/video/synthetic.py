"""Synthetic training clips with non-linear motion, for tests and benchmarks.

Each clip is a plain or gradient background with one to three filled shapes. Every shape follows
a different curved path (an elliptic arc, quadratic acceleration from rest, or a 90-degree turn
at mid-clip) while rotating or growing, so the middle of a clip is far from a linear blend or
linear path between its first and last frames: exactly what a motion model must learn.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storycli.atomic import atomic_write_bytes
from storycli.motion.video.io import write_mp4

__all__ = ["synthetic_clip", "write_synthetic_dataset"]

_SHAPE_KINDS = ("circle", "square", "triangle")
_PATH_KINDS = ("arc", "accelerate", "turn")
_DATASET_QUALITY = 9

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Shape:
    kind: str  # one of _SHAPE_KINDS
    color: RGB
    radius: float  # at t=0, in pixels
    growth: float  # radius multiplier reached at t=1 (1.0 = constant size)
    spin: float  # radians turned over the clip
    path: str  # one of _PATH_KINDS
    points: np.ndarray  # path parameters, see _position


# --------------------------------------------------------------------------- colours


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _shape_colors(rng: np.random.Generator, n: int) -> list[RGB]:
    """Saturated, bright colours with evenly spread hues, so shapes are told apart easily."""
    start = rng.uniform()
    return [
        _hsv(start + i / n + rng.uniform(-0.05, 0.05), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1))
        for i in range(n)
    ]


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A dark, desaturated plain or gradient background that contrasts with the shapes."""
    width, height = size
    hue = rng.uniform()
    first = np.array(_hsv(hue, rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.3)), dtype=np.float64)
    if rng.uniform() < 0.5:
        return Image.new("RGB", size, tuple(int(c) for c in first))
    second = np.array(_hsv(hue + 0.15, rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.45)))
    # Gradient along a random direction: weights in [0, 1] from a projected coordinate.
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    weight = (proj - proj.min()) / max(np.ptp(proj), 1e-9)
    pixels = first + weight[..., None] * (second - first)
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------- motion


def _arc_points(rng: np.random.Generator, size: tuple[int, int], margin: float) -> np.ndarray:
    """[cx, cy, rx, ry, start angle, sweep]: most of an ellipse, so the chord is a poor guess."""
    width, height = size
    rx = max((width / 2 - margin) * rng.uniform(0.7, 1.0), 1.0)
    ry = max((height / 2 - margin) * rng.uniform(0.7, 1.0), 1.0)
    sweep = rng.choice([-1.0, 1.0]) * rng.uniform(1.2, 1.7) * math.pi
    return np.array([width / 2, height / 2, rx, ry, rng.uniform(0, 2 * math.pi), sweep])


def _corners(rng: np.random.Generator, size: tuple[int, int], margin: float) -> np.ndarray:
    """The four corners of the box shapes may move in, jittered, in cyclic order."""
    width, height = size
    lo_x, hi_x = margin, max(width - margin, margin)
    lo_y, hi_y = margin, max(height - margin, margin)
    box = np.array([[lo_x, lo_y], [hi_x, lo_y], [hi_x, hi_y], [lo_x, hi_y]])
    jitter = rng.uniform(-0.05, 0.05, size=box.shape) * np.array([width, height])
    lo, hi = np.array([lo_x, lo_y]), np.array([hi_x, hi_y])
    return np.clip(box + jitter, lo, hi)


def _line_points(rng: np.random.Generator, size: tuple[int, int], margin: float) -> np.ndarray:
    """Three consecutive corners [a, b, c]: a to c diagonally, or a to b to c with a turn at b."""
    corners = _corners(rng, size, margin)
    first = int(rng.integers(4))
    step = int(rng.choice([1, -1]))
    return corners[[(first + i * step) % 4 for i in range(3)]]


def _position(shape: _Shape, t: float) -> tuple[float, float]:
    """Centre of ``shape`` at clip time ``t`` in [0, 1]."""
    p = shape.points
    if shape.path == "arc":
        angle = p[4] + p[5] * t
        return p[0] + p[2] * math.cos(angle), p[1] + p[3] * math.sin(angle)
    if shape.path == "accelerate":
        # Starts at rest, quadratic in time: at t=0.5 only a quarter of the way to the end.
        a, c = p[0], p[2]
        x, y = a + (c - a) * t * t
        return float(x), float(y)
    # "turn": straight to the middle corner in the first half, then turn 90 degrees.
    a, b, c = p
    x, y = a + (b - a) * (2 * t) if t < 0.5 else b + (c - b) * (2 * t - 1)
    return float(x), float(y)


def _random_shape(rng: np.random.Generator, size: tuple[int, int], path: str, color: RGB) -> _Shape:
    kind = str(rng.choice(_SHAPE_KINDS))
    radius = rng.uniform(0.08, 0.13) * min(size)
    # A circle's rotation is invisible, so circles always grow; polygons rotate, some grow too.
    growth = rng.uniform(1.4, 1.8) if kind == "circle" or rng.uniform() < 0.3 else 1.0
    spin = 0.0 if kind == "circle" else rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * math.pi
    margin = radius * growth * 1.3 + 1  # polygons reach past the radius at their corners
    points = _arc_points(rng, size, margin) if path == "arc" else _line_points(rng, size, margin)
    return _Shape(kind, color, radius, growth, spin, path, points)


def _random_shapes(rng: np.random.Generator, size: tuple[int, int]) -> list[_Shape]:
    """One to three shapes, each on a different kind of path, in distinct colours."""
    count = int(rng.integers(1, 4))
    paths = [str(p) for p in rng.permutation(_PATH_KINDS)[:count]]
    colors = _shape_colors(rng, count)
    return [
        _random_shape(rng, size, path, color) for path, color in zip(paths, colors, strict=True)
    ]


# --------------------------------------------------------------------------- drawing


def _polygon(
    center: tuple[float, float], radius: float, sides: int, angle: float
) -> list[tuple[float, float]]:
    """Vertices of a regular polygon with circumradius ``radius``, turned by ``angle``."""
    cx, cy = center
    turns = [angle + 2 * math.pi * k / sides for k in range(sides)]
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in turns]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape, t: float) -> None:
    center = _position(shape, t)
    # Growth is quadratic in time too, so size is not linear between the end frames either.
    radius = shape.radius * (1 + (shape.growth - 1) * t * t)
    angle = shape.spin * t
    if shape.kind == "circle":
        cx, cy = center
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=shape.color)
    elif shape.kind == "square":
        draw.polygon(_polygon(center, radius * 1.3, 4, angle + math.pi / 4), fill=shape.color)
    else:
        draw.polygon(_polygon(center, radius * 1.3, 3, angle - math.pi / 2), fill=shape.color)


def synthetic_clip(seed: int, frames: int, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    """``frames`` RGB frames of size ``size`` (width, height), fully determined by ``seed``."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if min(size) < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {size}")
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    shapes = _random_shapes(rng, size)
    clip = []
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 0.0
        frame = background.copy()
        draw = ImageDraw.Draw(frame)
        for shape in shapes:
            _draw_shape(draw, shape, t)
        clip.append(frame)
    return clip


# --------------------------------------------------------------------------- datasets


def _clip_seed(seed: int, group: int, index: int) -> int:
    """An independent seed per clip: SeedSequence mixes its inputs so clips don't correlate.

    ``group`` keeps video and frame-folder seeds apart, so adding videos leaves folders as
    they were.
    """
    return int(np.random.SeedSequence([seed, group, index]).generate_state(1)[0])


def _write_frame_folder(folder: Path, clip: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(clip):
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        atomic_write_bytes(folder / f"{i:04d}.png", buffer.getvalue())


def write_synthetic_dataset(
    folder: Path,
    videos: int,
    seconds: float = 3.0,
    fps: int = 8,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    frame_folders: int = 0,
) -> list[Path]:
    """Write ``videos`` MP4s and ``frame_folders`` PNG frame folders of synthetic clips.

    Files are ``video_000.mp4``, ... and ``frames_000/0000.png``, ...; each clip has its own
    seed derived from ``seed`` and its index. Returns the video paths, then the folder paths.
    """
    if videos < 0 or frame_folders < 0:
        raise ValueError("videos and frame_folders must be >= 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, round(seconds * fps))
    written: list[Path] = []
    for i in range(videos):
        path = folder / f"video_{i:03d}.mp4"
        write_mp4(path, synthetic_clip(_clip_seed(seed, 0, i), count, size), fps, _DATASET_QUALITY)
        written.append(path)
    for j in range(frame_folders):
        path = folder / f"frames_{j:03d}"
        _write_frame_folder(path, synthetic_clip(_clip_seed(seed, 1, j), count, size))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m storycli.motion.video.synthetic DIR`: a folder of synthetic training videos."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m storycli.motion.video.synthetic",
        description="Write synthetic videos (shapes on curved, accelerating and turning paths) "
        "for trying `storydiff train-predictor` without a video collection.",
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = write_synthetic_dataset(
        args.folder, args.videos, args.seconds, args.fps, (args.size, args.size), args.seed
    )
    print(f"wrote {len(written)} videos to {args.folder}")


if __name__ == "__main__":
    main()
