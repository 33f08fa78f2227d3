"""Loading the wan and ltx decoders' real weights the way a user's machine does, with tiny random
pipelines saved in the real repos' layouts: the hub cache (offline, with the snapshot's commit
recorded), a local folder, and a download holding only `fp16` variant files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hub_repos import hub_repo, quiet_save
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.ltx import LtxDecoder
from storycli.motion.decoders.wan import WanDecoder
from storycli.motion.presets import load_video_presets

pytestmark = pytest.mark.usefixtures("one_thread")

DECODERS = pytest.mark.parametrize("decoder", [WanDecoder, LtxDecoder], ids=["wan", "ltx"])
COMMIT = "7" * 40


def configs_for(folder: Path, decoder: type, **changes: Any) -> Path:
    """A configs folder whose `<decoder>` preset is the real one at the tiny pipeline's area."""
    preset = load_video_presets()[decoder.name]
    tiny = load_video_presets()[f"{decoder.name}-tiny"]
    entry = dataclasses.asdict(preset) | {"area": tiny.size**2, "steps": 2} | changes
    entry.pop("name")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "video_models.yaml").write_text(
        yaml.safe_dump({decoder.name: entry}), encoding="utf-8"
    )
    return folder


def saved_pipeline(folder: Path, decoder: type, variant: str | None = None) -> Path:
    pipe = decoder.tiny_pipeline(torch.float32)
    quiet_save(pipe, folder, **({"variant": variant} if variant else {}))
    return folder


def frames_of(decoder: Any) -> np.ndarray:
    def keyframe(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))

    request = TransitionRequest(keyframe(0), keyframe(1), frames=9, start_prompt="a fox")
    return np.stack([np.asarray(f, dtype=np.int16) for f in decoder.transition(request)])


@DECODERS
def test_loads_from_the_hub_cache_offline_and_records_the_commit(
    decoder: type, hub_offline: None, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    from storycli.motion.decoders.end_frames import load_end_frames_decoder

    repo = load_video_presets()[decoder.name].base
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    hub_repo(cache, repo, saved_pipeline(tmp_path / "saved", decoder), commit=COMMIT)
    configs = configs_for(tmp_path / "configs", decoder)
    loaded = load_end_frames_decoder(decoder, decoder.name, device="cpu", configs_dir=configs)
    described = loaded.describe()
    assert (described["model"], described["model_revision"]) == (repo, COMMIT)
    # The same weights as the tiny pipeline built in memory: the same video (to the last bit
    # of arithmetic: loaded tensors may sit at other alignments).
    tiny = decoder(decoder.tiny_pipeline(torch.float32), loaded.preset)
    assert np.abs(frames_of(loaded) - frames_of(tiny)).max() <= 1


@DECODERS
def test_loads_a_local_folder_of_fp16_variant_files_in_float32(
    decoder: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storycli.motion.decoders.end_frames import load_end_frames_decoder

    saved_pipeline(tmp_path / "models" / "video", decoder, variant="fp16")
    assert not list((tmp_path / "models" / "video" / "transformer").glob("*model.safetensors"))
    monkeypatch.chdir(tmp_path)
    configs = configs_for(tmp_path / "configs", decoder, variant="fp16")
    loaded = load_end_frames_decoder(
        decoder, "./models/video", device="cpu", dtype="float32", configs_dir=configs
    )
    assert loaded.pipe.transformer.dtype == torch.float32
    assert loaded.describe()["model_revision"] is None  # a folder: no hub commit
    assert frames_of(loaded).shape[0] == 9
