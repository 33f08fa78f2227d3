"""Tests for video I/O (``storycli.motion.video.io``) and synthetic clips (``.synthetic``).

Everything here encodes and decodes real files with the ffmpeg binary of imageio-ffmpeg.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storycli.motion.video.io import (
    VideoError,
    VideoSource,
    find_sources,
    pad_to_multiple,
    probe_mp4,
    probe_video,
    read_frames,
    write_mp4,
)
from storycli.motion.video.synthetic import synthetic_clip, write_synthetic_dataset

FPS = 8
FRAMES = 24  # 3 s at 8 fps


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def video_64x32(tmp_path_factory) -> Path:
    """A 64x32, 24-frame, 8 fps MP4 of a synthetic clip (shared: encoding costs time)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_mp4(path, synthetic_clip(1, FRAMES, (64, 32)), FPS, quality=9)
    return path


# --------------------------------------------------------------------------- pad_to_multiple


def test_pad_to_multiple_replicates_the_bottom_row_and_right_column():
    frame = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    padded = pad_to_multiple(frame, 4)
    assert padded.shape == (8, 4, 3)
    np.testing.assert_array_equal(padded[:5, :3], frame)
    for row in range(5, 8):
        np.testing.assert_array_equal(padded[row, :3], frame[4])
    for col in range(3, 4):
        np.testing.assert_array_equal(padded[:5, col], frame[:, 2])
    np.testing.assert_array_equal(padded[7, 3], frame[4, 2])  # corner from the corner pixel


def test_pad_to_multiple_keeps_aligned_frames_and_defaults_to_16():
    aligned = np.zeros((32, 16, 3), dtype=np.uint8)
    assert pad_to_multiple(aligned).shape == (32, 16, 3)
    assert pad_to_multiple(np.zeros((30, 50, 3), dtype=np.uint8)).shape == (32, 64, 3)


# --------------------------------------------------------------------------- write_mp4


def test_write_mp4_round_trip_pads_to_16_and_leaves_no_temp_files(tmp_path):
    clip = synthetic_clip(7, 10, (50, 30))
    target = tmp_path / "out.mp4"
    info = write_mp4(target, clip, fps=FPS, quality=10)
    assert (info.path, info.frames, info.width, info.height, info.fps) == (target, 10, 64, 32, 8.0)
    assert probe_mp4(target) == info
    frames, seconds = probe_video(target)
    assert frames == 10 and seconds == pytest.approx(10 / FPS, abs=0.15)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    # Content survives the encode; the padding repeats the last column rather than black.
    decoded = read_frames(target, fps=FPS, short_side=None)
    assert len(decoded) == 10
    first = _pixels(decoded[0])
    assert np.abs(first[:30, :50] - _pixels(clip[0])).mean() < 6
    assert np.abs(first[:30, 60] - _pixels(clip[0])[:, 49]).mean() < 12


def test_write_mp4_reports_each_frame_sent_before_the_file_exists(tmp_path):
    target = tmp_path / "out.mp4"
    calls = []
    clip = synthetic_clip(2, 5, (32, 16))
    write_mp4(target, clip, fps=FPS, on_frame=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(6)]  # 0: ffmpeg started, then one per frame sent
    assert probe_mp4(target).frames == 5

    seen = []
    write_mp4(target, clip, fps=FPS, on_frame=lambda done, total: seen.append(target.stat().st_ino))
    # The old file stays in place during the whole encode: it is replaced only at the end.
    assert len(set(seen)) == 1 and target.stat().st_ino != seen[0]


def test_write_mp4_accepts_arrays_and_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.mp4"
    write_mp4(target, [np.zeros((16, 16, 3), np.uint8)] * 3, fps=4)
    frames = [np.full((32, 48, 3), 200, np.uint8)] * 5
    info = write_mp4(target, frames, fps=4)
    assert (info.frames, info.width, info.height) == (5, 48, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_write_mp4_rejects_mismatched_sizes_and_writes_nothing(tmp_path):
    frames = [_solid((255, 0, 0), (32, 32)), _solid((0, 255, 0), (48, 32))]
    with pytest.raises(ValueError, match="one size"):
        write_mp4(tmp_path / "out.mp4", frames, fps=FPS)
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_rejects_an_empty_frame_list_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "out.mp4", [], fps=FPS)
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_failing_after_the_encode_removes_its_temp_file(tmp_path):
    # A folder in the way makes the final os.replace fail after ffmpeg has written the temp file.
    blocker = tmp_path / "out.mp4"
    blocker.mkdir()
    with pytest.raises(VideoError, match=re.escape(str(blocker))):
        write_mp4(blocker, [_solid((0, 0, 255), (32, 32))] * 2, fps=FPS)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert blocker.is_dir() and list(blocker.iterdir()) == []


def test_write_mp4_into_a_missing_folder_raises_video_error(tmp_path):
    with pytest.raises(VideoError, match="missing"):
        write_mp4(tmp_path / "missing" / "out.mp4", [_solid((9, 9, 9), (16, 16))], fps=FPS)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- read_frames


def test_read_frames_resamples_to_a_lower_fps(video_64x32):
    frames = read_frames(video_64x32, fps=4, short_side=None)
    assert abs(len(frames) - FRAMES // 2) <= 1
    assert all(f.mode == "RGB" and f.size == (64, 32) for f in frames)
    assert len(read_frames(video_64x32, fps=FPS, short_side=None)) == FRAMES


def test_read_frames_shrinks_to_short_side_but_never_upscales(video_64x32):
    assert read_frames(video_64x32, fps=4, short_side=16)[0].size == (32, 16)
    assert read_frames(video_64x32, fps=4, short_side=100)[0].size == (64, 32)


def test_read_frames_accepts_a_video_source(video_64x32):
    [source] = find_sources(video_64x32.parent)
    assert source.kind == "video"
    assert len(read_frames(source, fps=FPS)) == FRAMES


def test_read_frames_on_a_frame_folder_sorts_by_name_and_ignores_other_files(tmp_path):
    colors = {"0000.png": (0, 255, 0), "0001.jpg": (0, 0, 255), "0002.png": (255, 0, 0)}
    for name in ["0002.png", "0000.png", "0001.jpg"]:  # written out of order
        _solid(colors[name]).save(tmp_path / name, quality=95)
    _solid((255, 255, 255)).save(tmp_path / ".0003.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_frames(tmp_path, fps=FPS, short_side=10)
    assert [f.size for f in frames] == [(20, 10)] * 3
    means = [tuple(np.round(_pixels(f).mean(axis=(0, 1)) / 255)) for f in frames]
    assert means == [(0, 1, 0), (0, 0, 1), (1, 0, 0)]


def test_read_frames_on_a_corrupt_image_names_it(tmp_path):
    _solid((1, 2, 3)).save(tmp_path / "0000.png")
    (tmp_path / "0001.png").write_bytes(b"not a png at all")
    with pytest.raises(VideoError, match=re.escape(str(tmp_path / "0001.png"))):
        read_frames(tmp_path, fps=FPS)


def test_read_frames_on_a_corrupt_video_names_the_file(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoError, match=re.escape(str(path))):
        read_frames(path, fps=FPS)


def test_read_frames_on_an_empty_or_missing_file_raises_video_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4 is empty"):
        read_frames(empty, fps=FPS)
    with pytest.raises(VideoError, match=r"gone\.mp4"):
        read_frames(tmp_path / "gone.mp4", fps=FPS)


# --------------------------------------------------------------------------- find_sources


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_find_sources_walks_recursively_and_skips_hidden_and_other_files(tmp_path, video_64x32):
    (tmp_path / "b.mp4").write_bytes(video_64x32.read_bytes())
    _touch(tmp_path / "a.webm")
    _touch(tmp_path / "nested" / "deeper" / "c.MKV")  # suffixes match case-insensitively
    _solid((5, 5, 5)).save(_touch(tmp_path / "shots" / "0001.png"))
    _solid((6, 6, 6)).save(_touch(tmp_path / "shots" / "0000.png"))
    _touch(tmp_path / ".cache" / "x.mp4")
    _solid((7, 7, 7)).save(_touch(tmp_path / ".cache" / "frames" / "0000.png"))
    _touch(tmp_path / ".hidden.mp4")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "empty_dir" / "readme.md")

    sources = find_sources(tmp_path)
    assert [(s.path.relative_to(tmp_path).as_posix(), s.kind) for s in sources] == [
        ("a.webm", "video"),
        ("b.mp4", "video"),
        ("nested/deeper/c.MKV", "video"),
        ("shots", "frames"),
    ]
    shots = sources[3]
    images = list((tmp_path / "shots").iterdir())
    assert shots.size_bytes == sum(p.stat().st_size for p in images)
    assert shots.mtime_ns == max(p.stat().st_mtime_ns for p in [*images, shots.path])
    video = sources[1]
    assert video.key == f"video:{video.path.resolve()}:{video.size_bytes}:{video.mtime_ns}"


def test_source_key_changes_when_a_file_is_modified(tmp_path):
    video = _touch(tmp_path / "a.mp4", b"one")
    frame = tmp_path / "shots" / "0000.png"
    _solid((1, 1, 1)).save(_touch(frame))
    before = {s.path: s.key for s in find_sources(tmp_path)}
    assert before == {s.path: s.key for s in find_sources(tmp_path)}  # stable when unchanged

    # Same size, new mtime: the key must still change (an in-place edit).
    stat = video.stat()
    video.write_bytes(b"two")
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _solid((2, 2, 2), (41, 20)).save(frame)
    after = {s.path: s.key for s in find_sources(tmp_path)}
    assert after.keys() == before.keys()
    assert all(after[p] != before[p] for p in before)


def test_find_sources_rejects_a_file_or_missing_folder(tmp_path):
    with pytest.raises(VideoError, match="not a directory"):
        find_sources(_touch(tmp_path / "a.mp4"))
    with pytest.raises(VideoError, match="nowhere"):
        find_sources(tmp_path / "nowhere")


def test_video_source_is_frozen_and_hashable(tmp_path):
    source = VideoSource(path=tmp_path, kind="frames", size_bytes=1, mtime_ns=2)
    assert source.key == f"frames:{tmp_path.resolve()}:1:2"
    assert len({source, VideoSource(tmp_path, "frames", 1, 2)}) == 1
    with pytest.raises(AttributeError):
        source.size_bytes = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- synthetic


def test_synthetic_clip_is_deterministic_per_seed_and_differs_across_seeds():
    first = [_pixels(f) for f in synthetic_clip(3, 6, (64, 48))]
    again = [_pixels(f) for f in synthetic_clip(3, 6, (64, 48))]
    other = [_pixels(f) for f in synthetic_clip(4, 6, (64, 48))]
    assert all(f.shape == (48, 64, 3) for f in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[-1])  # something moves


@pytest.mark.parametrize("seed", range(8))
def test_synthetic_motion_is_not_a_blend_of_the_end_frames(seed):
    clip = [_pixels(f) for f in synthetic_clip(seed, 9, (64, 48))]
    blend = (clip[0] + clip[-1]) / 2
    # Measured: 4.4 to 25.8 for seeds 0-7 (>= 2.1 over 200 seeds); identical frames give 0.
    assert np.abs(clip[4] - blend).mean() > 3.0


def test_write_synthetic_dataset_writes_readable_videos_and_frame_folders(tmp_path):
    root = tmp_path / "data"
    paths = write_synthetic_dataset(
        root, videos=2, seconds=1.0, fps=8, size=(48, 32), seed=5, frame_folders=1
    )
    assert paths == [root / "video_000.mp4", root / "video_001.mp4", root / "frames_000"]
    assert sorted(p.name for p in (root / "frames_000").iterdir()) == [
        f"{i:04d}.png" for i in range(8)
    ]
    assert [s.path for s in find_sources(root)] == sorted(paths)
    clips = [read_frames(p, fps=8) for p in paths]
    assert all(len(c) == 8 and c[0].size == (48, 32) for c in clips)
    assert not np.array_equal(_pixels(clips[0][0]), _pixels(clips[1][0]))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp files left


def test_synthetic_module_command_writes_a_dataset(tmp_path):
    from storycli.motion.video.synthetic import main

    main([str(tmp_path / "clips"), "--videos", "2", "--seconds", "1", "--size", "32"])
    written = sorted(p.name for p in (tmp_path / "clips").iterdir())
    assert written == ["video_000.mp4", "video_001.mp4"]
    info = probe_mp4(tmp_path / "clips" / "video_000.mp4")
    assert (info.frames, info.width, info.height) == (8, 32, 32)
