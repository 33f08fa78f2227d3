"""Training data for the motion predictor: cached per-video CLIP embeddings and clip sampling.

Videos (and folders of frame images) are decoded once at a fixed rate, encoded with the frozen
image encoder and cached as one fp16 `[T, D]` safetensors file per source, so training never
touches pixels again. A cached array depends on the source file (path, size, mtime), the encoder,
its preprocessing and the sampling rate / short side; the file name is a hash of all of them, so
a changed file or setting simply misses the cache and is encoded afresh.

Clips are drawn from the cached arrays with an explicit numpy Generator: L frames spread over a
log-uniform span of seconds, hard cuts and near-static clips rejected, time reversed half the time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from storycli.atomic import atomic_write_bytes, atomic_write_text, remove_temp_files
from storycli.errors import InvalidInput
from storycli.locks import folder_lock
from storycli.motion.video.io import VideoError, VideoSource, find_sources, read_frames
from storycli.paths import PROBE_NAME, write_problem
from storycli.seeds import derive_seed
from storycli.weights.image_encoder import ImageEncoder

CACHE_DIRNAME = ".storydiff-cache"
INDEX_NAME = "index.json"
CACHE_VERSION = 1
TENSOR_NAME = "embeddings"

# on_progress(done, total, name): one call per source, cached or not.
ProgressFn = Callable[[int, int, str], None]

# What `atomic_write_*` leaves behind when killed between creating its temp file and the rename
# (`.NAME.<12 hex>.tmp`); train.py names its temp and discarded folders the same way.
_CACHE_FILE = re.compile(r"^[0-9a-f]{32}\.safetensors$")


class DatasetError(InvalidInput):
    """A video folder that cannot be trained on (nothing usable, too few videos)."""


# --------------------------------------------------------------------------------------------
# Folders: writability, locks, leftovers of killed runs
# --------------------------------------------------------------------------------------------


def check_writable_folder(folder: Path) -> None:
    """Create `folder` if needed once a file can be made there; DatasetError if not."""
    folder = Path(folder)
    problem = write_problem(folder)
    if problem is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
    if problem is not None:
        raise DatasetError(
            f"{folder}: the embedding cache folder is not writable ({problem}); pass --cache DIR "
            "to keep the cache in a folder you can write to"
        )


def _cache_owned(name: str) -> bool:
    return name in (INDEX_NAME, PROBE_NAME) or _CACHE_FILE.match(name) is not None


@contextlib.contextmanager
def _using_cache(cache_dir: Path) -> Iterator[None]:
    """A shared lock on the cache while it is read and written, so runs can share a cache.

    Leftovers of killed runs are removed only when no other run holds the cache: a live run's
    temp files look exactly like a dead one's.
    """
    with folder_lock(cache_dir, exclusive=True, wait=False) as alone:
        if alone:
            remove_temp_files(cache_dir, _cache_owned)
    with folder_lock(cache_dir, exclusive=False):
        yield


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeSettings:
    """Everything a cached embedding array depends on besides the source file itself."""

    encoder: str  # ImageEncoder.name
    preprocess_id: str
    fps: float
    short_side: int | None

    def key(self, source: VideoSource) -> str:
        return (
            f"v{CACHE_VERSION}|{source.key}|{self.encoder}|{self.preprocess_id}"
            f"|fps={self.fps:g}|short={self.short_side}"
        )


def cache_stem(key: str) -> str:
    """The cache file name (without suffix) for one key: a hash, so any change misses."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_cache_dir(data: Path) -> Path:
    """`<DATA>/.storydiff-cache`: hidden, so `find_sources` never mistakes it for data."""
    return Path(data) / CACHE_DIRNAME


def prepare_cache_dir(folder: Path, cache_dir: Path | None = None) -> Path:
    """The cache folder for the data folder `folder`, created and checked writable.

    Called before any model is loaded, so a bad folder costs nothing. Raises DatasetError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder; need a folder of videos or frame folders")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(folder)
    check_writable_folder(cache_dir)
    return cache_dir


@dataclass(frozen=True)
class VideoEmbeddings:
    name: str  # the source's path relative to the data folder (POSIX), stable across machines
    embeddings: torch.Tensor  # (T, D) float16, as cached: a fresh run trains on the same values


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class EmbeddingSet:
    """The usable videos of a folder as embeddings, and how they were obtained."""

    folder: Path
    cache_dir: Path
    settings: EncodeSettings
    dim: int
    videos: list[VideoEmbeddings] = field(default_factory=list)
    encoded: int = 0
    cached: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    encoded_frames: int = 0
    encode_seconds: float = 0.0  # decode + encode + write time of the sources encoded now

    @property
    def counts(self) -> dict[str, int]:
        return {
            "videos": len(self.videos),
            "encoded": self.encoded,
            "cached": self.cached,
            "skipped": len(self.skipped),
        }

    @property
    def encode_frames_per_second(self) -> float | None:
        if not self.encoded_frames or self.encode_seconds <= 0:
            return None
        return self.encoded_frames / self.encode_seconds


def min_video_frames(fps: float, min_seconds: float, clip_frames: int) -> int:
    """Frames a video needs: at least `min_seconds` long and room for the shortest clip span."""
    by_seconds = math.ceil(min_seconds * fps - 1e-9)
    return max(2, by_seconds, clip_frames)


def _relative_name(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _read_index(cache_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((cache_dir / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}  # no index (or a broken one): the embedding files themselves are the truth
    entries = data.get("entries") if isinstance(data, dict) else None
    return dict(entries) if isinstance(entries, dict) else {}


def _write_index(cache_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    payload = {"version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}
    atomic_write_text(cache_dir / INDEX_NAME, json.dumps(payload, indent=1) + "\n")


def _load_cached(path: Path, dim: int) -> torch.Tensor | None:
    """The cached (T, D) float16 array, or None when it is missing or unusable."""
    if not path.is_file():
        return None
    try:
        tensor = load_file(path)[TENSOR_NAME]
    except (OSError, KeyError, SafetensorError, ValueError, RuntimeError):
        return None  # a truncated or foreign file: encode again
    if tensor.ndim != 2 or tensor.shape[1] != dim or tensor.dtype != torch.float16:
        return None
    return tensor


def _write_cached(path: Path, embeddings: torch.Tensor, key: str) -> torch.Tensor:
    """Store fp16 and return what was stored, so a fresh run trains on the cached values."""
    half = embeddings.to(torch.float16).contiguous()
    atomic_write_bytes(path, save({TENSOR_NAME: half}, metadata={"key": key}))
    return half


def _entry(source: VideoSource, name: str, settings: EncodeSettings, frames: int) -> dict:
    return {
        "name": name,
        "path": str(source.path.resolve()),
        "kind": source.kind,
        "size_bytes": source.size_bytes,
        "mtime_ns": source.mtime_ns,
        "encoder": settings.encoder,
        "preprocess_id": settings.preprocess_id,
        "fps": settings.fps,
        "short_side": settings.short_side,
        "frames": frames,
    }


def _drop_stale(
    cache_dir: Path, index: dict[str, dict[str, Any]], sources: Sequence[VideoSource]
) -> None:
    """Forget (and delete) entries of files that changed since they were cached."""
    current = {str(s.path.resolve()): (s.size_bytes, s.mtime_ns) for s in sources}
    for stem, entry in list(index.items()):
        state = current.get(entry.get("path", ""))
        if state is not None and state != (entry.get("size_bytes"), entry.get("mtime_ns")):
            del index[stem]
            (cache_dir / f"{stem}.safetensors").unlink(missing_ok=True)


def _too_short(frames: int, needed: int, fps: float) -> str:
    return (
        f"too short: {frames} frames ({frames / fps:.2f} s at {fps:g} fps), "
        f"need {needed} ({needed / fps:.2f} s)"
    )


def _nothing_usable(
    folder: Path, found: int, skipped: list[Skipped], needed: int, fps: float
) -> DatasetError:
    example = f"; e.g. {skipped[0].name}: {skipped[0].reason}" if skipped else ""
    return DatasetError(
        f"{folder}: no usable training videos (found {found} sources, skipped {len(skipped)}"
        f"{example}); need video files or folders of frame images at least "
        f"{needed / fps:.2f} s long ({needed} frames at {fps:g} fps)"
    )


def build_embedding_cache(
    folder: Path,
    encoder: ImageEncoder,
    fps: float = 8.0,
    short_side: int | None = 224,
    cache_dir: Path | None = None,
    min_frames: int = 16,
    on_progress: ProgressFn | None = None,
) -> EmbeddingSet:
    """Embeddings of every usable source under `folder`, encoding only what is not cached.

    Unreadable sources and ones shorter than `min_frames` (at `fps`) are skipped and listed.
    Raises DatasetError when nothing usable is left.
    """
    folder = Path(folder)
    cache_dir = prepare_cache_dir(folder, cache_dir)
    settings = EncodeSettings(encoder.name, encoder.preprocess_id, float(fps), short_side)
    sources = find_sources(folder)
    with _using_cache(cache_dir):
        index = _read_index(cache_dir)
        _drop_stale(cache_dir, index, sources)
        result = EmbeddingSet(folder, cache_dir, settings, encoder.dim)
        try:
            for done, source in enumerate(sources, 1):
                _add_source(result, source, encoder, index, min_frames)
                if on_progress is not None:
                    on_progress(done, len(sources), _relative_name(source.path, folder))
        finally:
            # Also after an interruption: the files written so far stay findable (after a
            # SIGKILL they are found all the same, by name: the index is only a record).
            _write_index(cache_dir, index)
    if not result.videos:
        raise _nothing_usable(folder, len(sources), result.skipped, min_frames, fps)
    return result


def _add_source(
    result: EmbeddingSet,
    source: VideoSource,
    encoder: ImageEncoder,
    index: dict[str, dict[str, Any]],
    min_frames: int,
) -> None:
    """Load or encode one source into `result` (or list it as skipped)."""
    settings = result.settings
    name = _relative_name(source.path, result.folder)
    key = settings.key(source)
    stem = cache_stem(key)
    path = result.cache_dir / f"{stem}.safetensors"
    entry = index.get(stem)
    embeddings = _load_cached(path, result.dim)
    if embeddings is not None:
        result.cached += 1
        index[stem] = {**_entry(source, name, settings, len(embeddings)), "file": path.name}
    elif entry is not None and entry.get("file") is None and entry.get("frames", 0) < min_frames:
        # Known to be too short from an earlier run: no need to decode it again.
        result.skipped.append(Skipped(name, _too_short(entry["frames"], min_frames, settings.fps)))
        return
    else:
        embeddings = _encode_source(result, source, encoder, index, stem, key, min_frames)
        if embeddings is None:
            return
    if len(embeddings) < min_frames:
        result.skipped.append(Skipped(name, _too_short(len(embeddings), min_frames, settings.fps)))
        return
    result.videos.append(VideoEmbeddings(name, embeddings))


def _encode_source(
    result: EmbeddingSet,
    source: VideoSource,
    encoder: ImageEncoder,
    index: dict[str, dict[str, Any]],
    stem: str,
    key: str,
    min_frames: int,
) -> torch.Tensor | None:
    settings = result.settings
    name = _relative_name(source.path, result.folder)
    started = time.perf_counter()
    try:
        images = read_frames(source, settings.fps, settings.short_side)
    except VideoError as exc:
        result.skipped.append(Skipped(name, f"unreadable: {exc}"))
        return None
    if len(images) < min_frames:
        # Remember the length (no embeddings) so a re-run does not decode it again.
        index[stem] = {**_entry(source, name, settings, len(images)), "file": None}
        result.skipped.append(Skipped(name, _too_short(len(images), min_frames, settings.fps)))
        return None
    path = result.cache_dir / f"{stem}.safetensors"
    embeddings = _write_cached(path, encoder.encode(images), key)
    index[stem] = {**_entry(source, name, settings, len(embeddings)), "file": path.name}
    result.encoded += 1
    result.encoded_frames += len(images)
    result.encode_seconds += time.perf_counter() - started
    return embeddings


def embedding_rms(videos: Sequence[torch.Tensor]) -> float:
    """σ: the RMS of the embedding norms over all frames (the predictor's output scale)."""
    flat = torch.cat([v.double() for v in videos])
    return float(flat.pow(2).sum(-1).mean().sqrt())


def embedding_center(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(mean embedding, RMS norm of the centred embeddings): the predictor's input statistics."""
    flat = torch.cat([v.double() for v in videos])
    mean = flat.mean(0)
    return mean.float(), float((flat - mean).pow(2).sum(-1).mean().sqrt())


# --------------------------------------------------------------------------------------------
# Train / validation split (by video)
# --------------------------------------------------------------------------------------------


def split_videos(
    names: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, validation) indices: whole videos, never clips of one video in both.

    Videos are ranked by a hash of (seed, name), so the split does not depend on the order the
    folder is listed in and mostly survives adding videos. With two or more videos at least one
    is held out, and at least one is kept for training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    n = len(names)
    if n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    ranked = sorted(range(n), key=lambda i: (derive_seed(seed, "split", names[i]), names[i]))
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


# --------------------------------------------------------------------------------------------
# Clip sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSettings:
    frames: int = 16  # L, endpoints included
    fps: float = 8.0  # the rate the cached arrays were sampled at
    min_seconds: float = 1.0
    max_seconds: float = 4.0
    cut_cos: float = 0.75  # any adjacent pair below this: a hard cut, rejected
    static_cos: float = 0.97  # cos(K_s, K_e) above this: nothing moves, rejected
    max_tries: int = 8  # draws per clip before a rejected one is kept anyway
    reverse_p: float = 0.5

    def __post_init__(self) -> None:
        if self.frames < 3:
            raise ValueError("a training clip needs at least 3 frames (one interior frame)")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError("need 0 < min_seconds <= max_seconds")

    @property
    def min_span(self) -> int:
        """Frame steps between the endpoints of the shortest clip."""
        return max(1, round(self.min_seconds * self.fps))


@dataclass(frozen=True)
class ClipBatch:
    start: torch.Tensor  # (B, D) K_s
    end: torch.Tensor  # (B, D) K_e
    target: torch.Tensor  # (B, L, D) K*_1..K*_L, target[:, 0] == start, target[:, -1] == end
    video: np.ndarray  # (B,) index into the sampler's videos
    index: np.ndarray  # (B, L) frame indices within each video (reversed clips run backwards)
    rejected: int = 0  # draws rejected as cuts or static while filling the batch
    forced: int = 0  # clips still failing the checks after max_tries, kept anyway


class ClipSampler:
    """Draws clips from a fixed set of embedding arrays; all randomness from the caller's rng.

    The arrays are kept in their own dtype (float16 from the cache: half the memory of float32,
    and lossless since that is what was cached); clips come out as float32.
    """

    def __init__(self, videos: Sequence[torch.Tensor], settings: ClipSettings) -> None:
        if not videos:
            raise ValueError("no videos to sample clips from")
        lengths = np.array([len(v) for v in videos], dtype=np.int64)
        if (lengths < 2).any():
            raise ValueError("every video needs at least 2 frames")
        self.settings = settings
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        # Videos are drawn in proportion to their length: every second of footage counts once.
        self.weights = lengths / lengths.sum()
        self.flat = torch.cat(list(videos))
        self._lin = np.linspace(0.0, 1.0, settings.frames)

    def _draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n candidate clips: (video index (n,), frame indices (n, L))."""
        s = self.settings
        video = rng.choice(len(self.lengths), size=n, p=self.weights)
        length = self.lengths[video]
        hi = np.log(np.minimum(s.max_seconds, (length - 1) / s.fps))
        lo = np.minimum(np.log(s.min_seconds), hi)  # clamped to the video
        seconds = np.exp(rng.uniform(lo, hi))
        span = np.clip(np.rint(seconds * s.fps).astype(np.int64), 1, length - 1)
        start = rng.integers(0, length - span)  # start + span <= length - 1
        index = np.rint(start[:, None] + span[:, None] * self._lin).astype(np.int64)
        return video, index

    def _gather(self, video: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """(n, L, D) float32 embeddings of the frames `index` of videos `video`."""
        return self.flat[torch.from_numpy(self.offsets[video][:, None] + index)].float()

    def _rejected(self, video: np.ndarray, index: np.ndarray) -> np.ndarray:
        """True for hard cuts (an adjacent cosine below cut_cos) and near-static clips."""
        clips = self._gather(video, index)
        unit = torch.nn.functional.normalize(clips, dim=-1)
        adjacent = (unit[:, 1:] * unit[:, :-1]).sum(-1).amin(-1)
        ends = (unit[:, 0] * unit[:, -1]).sum(-1)
        bad = (adjacent < self.settings.cut_cos) | (ends > self.settings.static_cos)
        return bad.numpy()

    def sample(self, batch: int, rng: np.random.Generator) -> ClipBatch:
        """`batch` clips; rejected draws are redrawn up to max_tries times."""
        video, index = self._draw(batch, rng)
        bad = self._rejected(video, index)
        rejected = int(bad.sum())
        for _ in range(self.settings.max_tries - 1):
            if not bad.any():
                break
            rows = np.flatnonzero(bad)
            video[rows], index[rows] = self._draw(len(rows), rng)
            bad[rows] = self._rejected(video[rows], index[rows])
            rejected += int(bad[rows].sum())
        reverse = rng.random(batch) < self.settings.reverse_p
        index[reverse] = index[reverse, ::-1]
        target = self._gather(video, index)
        return ClipBatch(
            target[:, 0].clone(),
            target[:, -1].clone(),
            target,
            video,
            index,
            rejected,
            int(bad.sum()),
        )


def validation_clips(
    videos: Sequence[torch.Tensor], settings: ClipSettings, clips: int, seed: int
) -> ClipBatch:
    """The fixed validation set: drawn once, from its own seed, whatever the training step."""
    rng = np.random.default_rng(derive_seed(seed, "validation"))
    return ClipSampler(videos, settings).sample(clips, rng)
