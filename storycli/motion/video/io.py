"""Video input and output: find training clips, decode them at a fixed rate, write MP4s.

Decoding and encoding go through the ffmpeg binary that imageio-ffmpeg ships, so no system
ffmpeg is needed. A "source" is either a video file or a folder of image files that are the
frames of one clip. MP4s are written atomically: encoded to a temp file next to the target,
read back and checked, and only then renamed onto the target.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import imageio_ffmpeg
import numpy as np
from PIL import Image

from storycli.atomic import fsync_path
from storycli.errors import RuntimeProblem

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "VideoError",
    "VideoInfo",
    "VideoSource",
    "decode_every_frame",
    "find_sources",
    "pad_to_multiple",
    "probe_mp4",
    "probe_video",
    "read_frames",
    "temp_target",
    "write_mp4",
]

VIDEO_SUFFIXES: frozenset[str] = frozenset(
    {".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v"}
)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

_MACRO_BLOCK = 16  # H.264 works on 16x16 blocks; padding ourselves avoids ffmpeg rescaling
_MAX_REASON_CHARS = 200
_TEMP_TOKEN_BYTES = 6  # secrets.token_hex(6): 12 hex digits in a temp file's name
# `.NAME.<12 hex>.tmp.mp4`, as _reserve_temp names them.
_TEMP_NAME = re.compile(rf"\.(?P<target>.+)\.[0-9a-f]{{{2 * _TEMP_TOKEN_BYTES}}}\.tmp\.mp4")

FrameCallback = Callable[[int, int], None]  # (frames sent to the encoder, total)


class VideoError(RuntimeProblem):
    """A video or frame folder that cannot be found, decoded or written."""


@dataclass(frozen=True)
class VideoSource:
    """One clip: a video file, or a folder whose image files are its frames."""

    path: Path
    kind: Literal["video", "frames"]
    size_bytes: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """Stable identity for caches: changes when the clip's files are replaced or edited."""
        return f"{self.kind}:{self.path.resolve()}:{self.size_bytes}:{self.mtime_ns}"


@dataclass(frozen=True)
class VideoInfo:
    """What an encoded video holds, as read back from the file."""

    path: Path
    frames: int
    width: int
    height: int
    fps: float


# --------------------------------------------------------------------------- finding sources


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _frame_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (their frame order)."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if not _is_hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _video_source(path: Path) -> VideoSource:
    st = path.stat()
    return VideoSource(path=path, kind="video", size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)


def _frames_source(folder: Path, images: Sequence[Path]) -> VideoSource:
    stats = [p.stat() for p in images]
    # The folder's own mtime catches frames that were deleted or renamed.
    mtime = max([folder.stat().st_mtime_ns, *(st.st_mtime_ns for st in stats)])
    size = sum(st.st_size for st in stats)
    return VideoSource(path=folder, kind="frames", size_bytes=size, mtime_ns=mtime)


def _source_from_path(path: Path) -> VideoSource:
    """Wrap a bare path: a folder is a frame folder, anything else a video file."""
    try:
        if path.is_dir():
            return _frames_source(path, _frame_files(path))
        return _video_source(path)
    except OSError as err:
        raise VideoError(f"cannot read {path}: {err.strerror or err}.") from err


def find_sources(folder: Path) -> list[VideoSource]:
    """All clips under ``folder`` (recursive, hidden entries skipped), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder} is not a directory, so it holds no videos.")
    sources: list[VideoSource] = []
    for root, dirs, files in os.walk(folder):
        # Pruning in place stops os.walk from descending into hidden folders (caches).
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        here = Path(root)
        videos = [here / f for f in files if not _is_hidden(f)]
        sources += [_video_source(p) for p in videos if p.suffix.lower() in VIDEO_SUFFIXES]
        images = _frame_files(here)
        if images:
            sources.append(_frames_source(here, images))
    return sorted(sources, key=lambda s: s.path)


# --------------------------------------------------------------------------- reading


def _short_reason(err: BaseException) -> str:
    """The last non-empty line of an error: for ffmpeg that is the line naming the problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    return reason[:_MAX_REASON_CHARS].rstrip(".")


def _check_readable_file(path: Path) -> None:
    """Clear errors for the common cases before ffmpeg reports them less readably."""
    if not path.is_file():
        raise VideoError(f"video {path} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise VideoError(f"video {path} is empty (0 bytes).")


def _shrink(image: Image.Image, short_side: int | None) -> Image.Image:
    """Resize so the shorter side is ``short_side``, keeping the aspect; never upscale."""
    width, height = image.size
    short = min(width, height)
    if short_side is None or short <= short_side:
        return image
    scale = short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _decode_arrays(path: Path, fps: float | None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames of the first video stream, resampled to ``fps`` by ffmpeg's fps
    filter (None: every frame as encoded)."""
    # -map 0:v:0 ignores audio/subtitle streams and fails clearly on files without video.
    params = ["-map", "0:v:0", *(["-vf", f"fps={fps}"] if fps is not None else [])]
    reader = imageio_ffmpeg.read_frames(str(path), output_params=params)
    try:
        meta = next(reader)
        width, height = meta["size"]
        for raw in reader:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()  # stops ffmpeg even when the caller stops early


def decode_every_frame(path: Path) -> list[np.ndarray]:
    """Every frame of a video as encoded (no resampling), RGB uint8; VideoError naming the file
    for anything that cannot be decoded."""
    _check_readable_file(path)
    try:
        return [frame.copy() for frame in _decode_arrays(path, None)]
    except Exception as err:  # ffmpeg failures surface as OSError/RuntimeError/parse errors
        raise VideoError(f"cannot decode video {path}: {_short_reason(err)}.") from err


def _read_video(path: Path, fps: float, short_side: int | None) -> list[Image.Image]:
    _check_readable_file(path)
    try:
        frames = [
            _shrink(Image.fromarray(frame, mode="RGB"), short_side)
            for frame in _decode_arrays(path, fps)
        ]
    except Exception as err:  # ffmpeg failures surface as OSError/RuntimeError/parse errors
        raise VideoError(f"cannot decode video {path}: {_short_reason(err)}.") from err
    if not frames:
        raise VideoError(f"video {path} has no decodable frames.")
    return frames


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VideoError(f"cannot read frame image {path}: {_short_reason(err)}.") from err


def _read_frame_folder(folder: Path, short_side: int | None) -> list[Image.Image]:
    images = _frame_files(folder)
    if not images:
        raise VideoError(f"frame folder {folder} contains no image files.")
    frames: list[Image.Image] = []
    for path in images:
        frame = _load_image(path)
        if frames and frame.size != frames[0].size:
            raise VideoError(
                f"frame {path} is {frame.size[0]}x{frame.size[1]} but the first frame of "
                f"{folder} is {frames[0].size[0]}x{frames[0].size[1]}."
            )
        frames.append(frame)
    return [_shrink(frame, short_side) for frame in frames]


def read_frames(
    source: VideoSource | Path, fps: float, short_side: int | None = 256
) -> list[Image.Image]:
    """RGB frames of one clip, sampled at ``fps`` and shrunk so the short side is ``short_side``.

    Videos are resampled to ``fps`` by ffmpeg; the images of a frame folder are taken as already
    sampled at ``fps``. Raises VideoError naming the file for anything that cannot be decoded.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1 or None, got {short_side}")
    if not isinstance(source, VideoSource):
        source = _source_from_path(Path(source))
    if source.kind == "frames":
        return _read_frame_folder(source.path, short_side)
    return _read_video(source.path, fps, short_side)


def probe_video(path: Path) -> tuple[int, float]:
    """(frame count, seconds) of a video, counted by decoding it with ffmpeg."""
    path = Path(path)
    _check_readable_file(path)
    try:
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as err:
        raise VideoError(f"cannot probe video {path}: {_short_reason(err)}.") from err
    return int(frames), float(seconds)


def _read_meta(path: Path) -> dict:
    reader = imageio_ffmpeg.read_frames(str(path), output_params=["-map", "0:v:0"])
    try:
        return next(reader)
    finally:
        reader.close()


def probe_mp4(path: Path) -> VideoInfo:
    """Frame count, size and frame rate of an encoded video, read back from the file."""
    path = Path(path)
    frames, _ = probe_video(path)
    try:
        meta = _read_meta(path)
        width, height = meta["size"]
        fps = float(meta["fps"])
    except Exception as err:
        raise VideoError(f"cannot read the header of video {path}: {_short_reason(err)}.") from err
    return VideoInfo(path=path, frames=frames, width=int(width), height=int(height), fps=fps)


# --------------------------------------------------------------------------- writing


def pad_to_multiple(frame: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Pad bottom/right by edge replication so height and width are multiples of ``multiple``.

    Edge replication (not black) keeps the padding invisible after chroma subsampling and
    cropping. Returns ``frame`` itself when no padding is needed.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if frame.ndim < 2:
        raise ValueError(f"frame must be at least 2-D (HxW[xC]), got shape {frame.shape}")
    pad_h = -frame.shape[0] % multiple
    pad_w = -frame.shape[1] % multiple
    if pad_h == 0 and pad_w == 0:
        return frame
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (frame.ndim - 2)
    return np.pad(frame, widths, mode="edge")


def _frame_size(frame: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a PIL image or an HxWx3 uint8 array."""
    if isinstance(frame, Image.Image):
        return frame.size
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"array frames must be HxWx3 uint8, got {frame.shape} {frame.dtype}")
    return frame.shape[1], frame.shape[0]


def _common_size(frames: Sequence[Image.Image | np.ndarray]) -> tuple[int, int]:
    if len(frames) == 0:
        raise ValueError("cannot write a video with no frames")
    sizes = {_frame_size(frame) for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"all frames must share one size, got {sorted(sizes)}")
    return sizes.pop()


def _to_rgb_array(frame: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    return frame


def _reserve_temp(target: Path) -> Path:
    """Create an empty, exclusive temp file next to ``target`` whose name ends in .mp4."""
    for _ in range(100):
        # ffmpeg picks the container from the extension, so the name must end with .mp4.
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp.mp4")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as err:
            raise VideoError(f"cannot create a file next to {target}: {err.strerror}.") from err
    raise VideoError(f"could not create a temp file next to {target}.")


def temp_target(name: str) -> str | None:
    """The file name a `write_mp4` temp file called ``name`` was to become, else None.

    A process killed mid-encode leaves its temp file behind; this lets the owner of the
    target names find exactly those leftovers (and nothing else) to remove.
    """
    match = _TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


def _encode(
    tmp: Path,
    frames: Sequence[Image.Image | np.ndarray],
    fps: float,
    crf: int,
    on_frame: FrameCallback | None,
) -> None:
    """Encode padded RGB frames to ``tmp`` with libx264 through imageio-ffmpeg's writer."""
    first = pad_to_multiple(_to_rgb_array(frames[0]), _MACRO_BLOCK)
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (first.shape[1], first.shape[0]),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        # crf set directly: imageio-ffmpeg's quality must be >= 1, ours may be 0.
        quality=None,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=["-crf", str(crf), "-movflags", "+faststart"],
    )
    try:
        writer.send(None)  # prime the generator before the first frame
        if on_frame is not None:
            on_frame(0, len(frames))
        for done, frame in enumerate(frames, 1):
            padded = pad_to_multiple(_to_rgb_array(frame), _MACRO_BLOCK)
            writer.send(np.ascontiguousarray(padded).tobytes())
            if on_frame is not None:
                on_frame(done, len(frames))
    finally:
        writer.close()  # flushes and waits for ffmpeg to finish the file


def _verify(tmp: Path, target: Path, expected_frames: int) -> VideoInfo:
    if tmp.stat().st_size == 0:
        raise VideoError(f"ffmpeg wrote an empty file for {target}.")
    info = probe_mp4(tmp)
    if info.frames != expected_frames:
        raise VideoError(
            f"encoded {target} holds {info.frames} frames instead of {expected_frames}."
        )
    return info


def write_mp4(
    path: Path,
    frames: Sequence[Image.Image | np.ndarray],
    fps: float,
    quality: int = 8,
    on_frame: FrameCallback | None = None,
) -> VideoInfo:
    """Atomically write an H.264/yuv420p MP4 and return what was read back from it.

    Frames (PIL images or HxWx3 uint8 arrays, all one size) are padded at the bottom/right to
    multiples of 16. ``quality`` 0-10 maps to crf = (1 - quality/10) * 51. On any failure the
    target is left untouched, no temp file remains, and VideoError is raised.

    ``on_frame(done, total)`` is called once ffmpeg has started (done 0) and after each frame
    sent to it. ffmpeg still flushes and the file is read back after the last call: the target
    exists only when this function returns.
    """
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= quality <= 10:
        raise ValueError(f"quality must be between 0 and 10, got {quality}")
    _common_size(frames)
    crf = int((1 - quality / 10) * 51)
    tmp = _reserve_temp(path)
    try:
        _encode(tmp, frames, fps, crf, on_frame)
        info = _verify(tmp, path, len(frames))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, VideoError) or not isinstance(err, Exception):
            raise
        raise VideoError(f"cannot write video {path}: {_short_reason(err)}.") from err
    if os.name == "posix":
        fsync_path(path.parent)
    return replace(info, path=path)
