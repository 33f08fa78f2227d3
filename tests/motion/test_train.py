"""Training the motion predictor: cache, clip sampling, split, learning, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storycli.motion.predictor.dataset import (
    ClipSampler,
    ClipSettings,
    DatasetError,
    build_embedding_cache,
    check_writable_folder,
    folder_lock,
    split_videos,
)
from storycli.motion.predictor.model import lerp_embeddings, load_predictor
from storycli.motion.predictor.train import TrainError, TrainHooks, TrainOptions, train_predictor
from storycli.motion.video.io import write_mp4
from storycli.motion.video.synthetic import synthetic_clip, write_synthetic_dataset
from storycli.weights.image_encoder import load_image_encoder

FPS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return load_image_encoder("tiny", "cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """64 synthetic 3 s videos: enough held-out videos for a stable validation gain."""
    folder = tmp_path_factory.mktemp("videos")
    write_synthetic_dataset(folder, videos=64, seconds=3.0, fps=FPS, seed=0)
    return folder


def options(data: Path, out: Path, **overrides) -> TrainOptions:
    settings = {
        "encoder": "tiny",
        "device": "cpu",
        "batch_size": 32,
        "lr": 1e-3,
        "max_steps": 200,
        "warmup_steps": 20,
        "eval_every": 50,
        "checkpoint_every": 100,
        "val_fraction": 0.25,
        "val_clips": 128,
        "max_clip_seconds": 2.5,
        **overrides,
    }
    return TrainOptions(data=data, out=out, **settings)


@pytest.fixture(scope="module")
def trained(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    evals = []
    result = train_predictor(options(videos, out), TrainHooks(on_eval=evals.append))
    return result, evals


# --------------------------------------------------------------------------------- sampling


def rotating(frames: int, step: float, cut_at: int | None = None, dim: int = 8) -> torch.Tensor:
    """Embeddings turning in a plane by `step` radians per frame (a jump of 1.5 at `cut_at`)."""
    angles = torch.arange(frames, dtype=torch.float64) * step
    if cut_at is not None:
        angles[cut_at:] += 1.5
    out = torch.zeros(frames, dim, dtype=torch.float64)
    out[:, 0], out[:, 1] = angles.cos(), angles.sin()
    return (3 * out).float()


def test_clip_sampler_is_deterministic_and_within_bounds():
    settings = ClipSettings(frames=16, fps=FPS, min_seconds=1.0, max_seconds=4.0)
    sampler = ClipSampler([rotating(60, 0.02), rotating(25, 0.02)], settings)
    a = sampler.sample(256, np.random.default_rng(7))
    b = sampler.sample(256, np.random.default_rng(7))
    assert torch.equal(a.target, b.target) and (a.index == b.index).all()
    assert a.target.shape == (256, 16, 8) and a.start.shape == a.end.shape == (256, 8)
    assert torch.equal(a.target[:, 0], a.start) and torch.equal(a.target[:, -1], a.end)
    span = np.abs(a.index[:, -1] - a.index[:, 0])
    assert span.min() >= settings.min_span and span.max() <= 4 * FPS
    assert (span[a.video == 1] <= 24).all()  # clamped to the 25-frame video
    lengths = np.array([60, 25])
    assert (a.index >= 0).all() and (a.index < lengths[a.video][:, None]).all()
    steps = np.diff(a.index, axis=1)
    forward, backward = (steps >= 0).all(1), (steps <= 0).all(1)
    assert (forward | backward).all()
    assert 0.35 < backward.mean() < 0.65  # time reversed with p = 0.5


def test_clip_sampler_rejects_hard_cuts_and_static_clips():
    settings = ClipSettings(frames=16, fps=FPS, max_tries=30)
    cut = rotating(48, 0.05, cut_at=24)
    static = rotating(48, 0.0)  # nothing moves: cos(K_s, K_e) = 1
    batch = ClipSampler([cut, static], settings).sample(128, np.random.default_rng(0))
    assert batch.rejected > 0 and batch.forced == 0
    assert (batch.video == 0).all()
    low, high = batch.index.min(1), batch.index.max(1)
    assert not ((low < 24) & (high >= 24)).any()  # no clip spans the cut


def test_split_is_by_video_and_deterministic():
    names = [f"clip_{i:02d}.mp4" for i in range(20)]
    train, val = split_videos(names, 0.1, seed=3)
    assert len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == list(range(20))
    shuffled = names[::-1]
    val2 = split_videos(shuffled, 0.1, seed=3)[1]
    assert {shuffled[i] for i in val2} == {names[i] for i in val}  # order-independent
    assert split_videos(names[:2], 0.01, seed=0)[1] != []  # two videos: one held out
    assert split_videos(names[:1], 0.5, seed=0) == ([0], [])


# --------------------------------------------------------------------------------- learning


def test_training_lowers_validation_loss_and_beats_lerp(trained):
    result, evals = trained
    records = json.loads(result.metrics_path.read_text())
    assert [r["step"] for r in records] == [0, 50, 100, 150, 200] == [r["step"] for r in evals]
    first, last = records[0], records[-1]
    assert first["gain"] == pytest.approx(0.0, abs=1e-9)  # untrained predictor == lerp
    assert last["val_loss"] < first["val_loss"]
    assert last["val_mse_predictor"] < last["val_mse_lerp"]
    assert last["gain"] > 0.02, records
    assert result.final == last and result.steps == 200
    assert result.best["gain"] >= last["gain"] and result.best in records
    assert last["clips_per_second"] > 0 and last["lr"] >= 0 and math.isfinite(last["train_loss"])
    by_position = last["val_mse_by_position"]
    assert len(by_position["tau"]) == len(by_position["predictor"]) == 14
    assert len(by_position["lerp"]) == len(by_position["slerp"]) == 14
    assert result.counts["train_videos"] + result.counts["val_videos"] == 64
    assert result.counts["val_videos"] == 16


def test_trained_predictor_loads_and_keeps_endpoints_exact(trained, encoder):
    result, _ = trained
    model = load_predictor(result.predictor_path, expect_dim=encoder.dim)
    config = model.config
    assert (config.encoder, config.preprocess_id) == (encoder.name, encoder.preprocess_id)
    assert config.scale > 0 and config.frames == 16
    frames = encoder.encode(synthetic_clip(123, 9))
    start, end = frames[None, 0], frames[None, -1]
    with torch.no_grad():
        pred = model(start, end, 16)
    assert torch.equal(pred[:, 0], start) and torch.equal(pred[:, -1], end)
    assert not torch.allclose(pred, lerp_embeddings(start, end, 16))  # it learned something


def test_resume_gives_the_same_run_as_no_interruption(videos, tmp_path):
    short = {"max_steps": 12, "eval_every": 4, "checkpoint_every": 6}
    straight = train_predictor(options(videos, tmp_path / "straight", **short))

    class Interrupted(Exception):
        pass

    def stop(step: int, total: int, loss: float) -> None:
        if step == 9:  # after the step-8 evaluation, past the step-6 checkpoint
            raise Interrupted

    broken = tmp_path / "broken"
    with pytest.raises(Interrupted):
        train_predictor(options(videos, broken, **short), TrainHooks(on_step=stop))
    assert [r["step"] for r in json.loads((broken / "metrics.json").read_text())] == [0, 4, 8]
    # The same run with other settings is refused (the same settings continue it: see below).
    with pytest.raises(TrainError, match=r"unfinished training run with other settings.*--resume"):
        train_predictor(options(videos, broken, lr=5e-4, **short))
    with pytest.raises(TrainError, match="frames"):
        train_predictor(options(videos, broken, resume=True, frames=12, **short))

    resumed = train_predictor(options(videos, broken, resume=True, **short))
    assert resumed.resumed_from == 6 and resumed.steps == straight.steps == 12

    def comparable(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "clips_per_second"}
            for r in json.loads(path.read_text())
        ]

    assert comparable(resumed.metrics_path) == comparable(straight.metrics_path)
    a, b = load_file(straight.predictor_path), load_file(resumed.predictor_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert kept == ["step_000006", "step_000012"]


class Interrupted(Exception):
    pass


def stop_at(step: int):
    """An on_step hook that interrupts the run once `step` is done (as Ctrl-C would)."""

    def hook(done: int, total: int, loss: float) -> None:
        if done == step:
            raise Interrupted

    return hook


def test_the_same_settings_continue_an_unfinished_run_without_resume(videos, tmp_path):
    short = {"max_steps": 12, "eval_every": 4, "checkpoint_every": 6}
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # after the step-6 checkpoint
        train_predictor(options(videos, out, **short), TrainHooks(on_step=stop_at(9)))
    notes: list[str] = []
    again = train_predictor(options(videos, out, **short), TrainHooks(on_note=notes.append))
    assert again.resumed_from == 6 and again.steps == 12
    assert any("unfinished run" in n for n in notes), notes
    assert [r["step"] for r in json.loads(again.metrics_path.read_text())] == [0, 4, 8, 12]
    # Finished now: the same settings again are refused, not silently retrained.
    with pytest.raises(TrainError, match=r"finished training run.*--resume.*--overwrite"):
        train_predictor(options(videos, out, **short))

    early = tmp_path / "early"  # interrupted before its first checkpoint: starts again
    with pytest.raises(Interrupted):
        train_predictor(options(videos, early, **short), TrainHooks(on_step=stop_at(2)))
    assert not (early / "checkpoints").exists() and (early / "run.json").is_file()
    fresh = train_predictor(options(videos, early, **short))
    assert fresh.resumed_from is None and fresh.steps == 12


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_synthetic_dataset(data, videos=3, seconds=2.5, fps=FPS, seed=5)
    cache = data / ".storydiff-cache"
    short = {"max_steps": 6, "eval_every": 3, "checkpoint_every": 3, "val_clips": 8}
    with pytest.raises(Interrupted):
        train_predictor(options(data, out, **short), TrainHooks(on_step=stop_at(4)))
    # What SIGKILL leaves mid-write: atomic-write temp files and half-made checkpoint folders.
    ours = [
        out / ".metrics.json.0123456789ab.tmp",
        out / ".run.json.a1b2c3d4e5f6.tmp",
        out / ".predictor.safetensors.00112233aabb.tmp",
        out / ".checkpoints.0a0b0c0d0e0f.tmp",  # a run folder being cleared
        out / "checkpoints" / ".step_000006.abcdefabcdef.tmp",
        out / "checkpoints" / ".tmp-step_000006-deadbeef",  # the previous naming
        cache / f".{'0' * 32}.safetensors.abcdef012345.tmp",
        cache / ".index.json.fedcba987654.tmp",
        cache / ".write-check.0123456789ab.tmp",
    ]
    # Someone else's files, some looking like temp files: never touched.
    theirs = [
        out / ".notes.txt.0123456789ab.tmp",
        out / "draft.tmp",
        out / ".tmp-mine",
        out / "checkpoints" / ".notes.abcdefabcdef.tmp",
        cache / ".other.safetensors.abcdef012345.tmp",
        cache / ".index.json.tmp",
    ]
    for path in ours + theirs:
        if path.name.startswith((".checkpoints.", ".step_", ".tmp-step_")):
            path.mkdir()
            (path / "state.pt").write_bytes(b"half")
        else:
            path.write_bytes(b"half")
    result = train_predictor(options(data, out, resume=True, **short))
    assert result.resumed_from == 3 and result.steps == 6
    assert [p for p in ours if p.exists()] == []
    assert [p for p in theirs if not p.exists()] == []
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [".notes.abcdefabcdef.tmp", "step_000003", "step_000006"]


def test_another_process_in_the_run_folder_is_refused(videos, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out, exclusive=True, wait=False) as held:  # as a running trainer holds it
        assert held
        with pytest.raises(TrainError, match="in use by another"):
            train_predictor(options(videos, out, max_steps=2))
    assert list(out.iterdir()) == []  # refused before anything was written


def test_warmup_longer_than_the_run_is_noted(videos, tmp_path):
    notes: list[str] = []
    quick = {"max_steps": 3, "eval_every": 3, "checkpoint_every": 3, "val_clips": 8}
    train_predictor(
        options(videos, tmp_path / "a", warmup_steps=20, **quick), TrainHooks(on_note=notes.append)
    )
    warm = [n for n in notes if "warm" in n]
    assert len(warm) == 1 and "never reaches its peak" in warm[0], notes
    notes.clear()
    train_predictor(
        options(videos, tmp_path / "b", warmup_steps=3, **quick), TrainHooks(on_note=notes.append)
    )
    assert not [n for n in notes if "warm" in n], notes


def test_unwritable_cache_folder_is_refused_before_encoding(videos, tmp_path):
    # /proc takes no new entries, even from root (for whom chmod does not stop writes).
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for folder in (Path("/proc/storydiff-test"), afile / "sub", afile):
        with pytest.raises(DatasetError, match=r"not writable.*--cache DIR") as info:
            check_writable_folder(folder)
        assert str(folder) in str(info.value) and str(info.value).count(". ") == 0
    ok = tmp_path / "new" / "cache"
    check_writable_folder(ok)
    assert ok.is_dir() and list(ok.iterdir()) == []  # the probe file is gone again

    encodes: list = []
    with pytest.raises(DatasetError, match="not writable"):
        train_predictor(
            options(videos, tmp_path / "run", cache_dir=afile / "sub", max_steps=1),
            TrainHooks(on_encode=lambda *a: encodes.append(a)),
        )
    assert encodes == [] and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- cache


def cache_files(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}


def test_embedding_cache_is_reused_and_refreshed(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, videos=3, seconds=2.5, fps=FPS, seed=5, frame_folders=1)
    quick = {"max_steps": 2, "eval_every": 1, "checkpoint_every": 2, "val_clips": 8}
    encodes = []
    first = train_predictor(
        options(data, tmp_path / "a", **quick),
        TrainHooks(on_encode=lambda done, total, name: encodes.append((done, total, name))),
    )
    assert first.counts["encoded"] == 4 and first.counts["cached"] == 0
    assert [e[:2] for e in encodes] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    cache = data / ".storydiff-cache"
    before = cache_files(cache)
    assert len(before) == 4 and (cache / "index.json").is_file()

    second = train_predictor(options(data, tmp_path / "a", overwrite=True, **quick))
    assert (second.counts["encoded"], second.counts["cached"]) == (0, 4)
    assert cache_files(cache) == before  # nothing re-encoded or rewritten
    assert second.encode_frames_per_second is None

    # Another clip in the same file: new size and mtime, so it is encoded again.
    write_mp4(data / "video_001.mp4", synthetic_clip(999, 24), FPS, quality=9)
    third = train_predictor(options(data, tmp_path / "b", **quick))
    assert (third.counts["encoded"], third.counts["cached"]) == (1, 3)
    after = cache_files(cache)
    assert len(after) == 4  # the stale array was dropped
    assert len(set(after) & set(before)) == 3


def test_unreadable_and_short_sources_are_skipped(tmp_path, encoder):
    data = tmp_path / "data"
    write_synthetic_dataset(data, videos=2, seconds=3.0, fps=FPS, seed=1)
    write_synthetic_dataset(tmp_path / "short", videos=1, seconds=1.0, fps=FPS, seed=2)
    (tmp_path / "short" / "video_000.mp4").rename(data / "short.mp4")
    (data / "broken.mp4").write_bytes(b"not a video at all" * 10)
    result = build_embedding_cache(data, encoder, fps=FPS, min_frames=16)
    assert result.counts == {"videos": 2, "encoded": 2, "cached": 0, "skipped": 2}
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["broken.mp4"].startswith("unreadable")
    assert reasons["short.mp4"].startswith("too short")
    again = build_embedding_cache(data, encoder, fps=FPS, min_frames=16)
    assert again.counts == {"videos": 2, "encoded": 0, "cached": 2, "skipped": 2}

    useless = tmp_path / "useless"
    useless.mkdir()
    (data / "short.mp4").rename(useless / "short.mp4")
    (data / "broken.mp4").rename(useless / "broken.mp4")
    with pytest.raises(DatasetError, match=r"useless: no usable training videos .* need"):
        build_embedding_cache(useless, encoder, fps=FPS, min_frames=16)

    (data / "video_001.mp4").unlink()
    with pytest.raises(DatasetError, match="need at least 2"):
        train_predictor(options(data, tmp_path / "out", max_steps=1))
