"""Reference-photo identity through diffusers' IP-Adapter (`ip_adapter:`), on the tiny model
with a tiny random adapter: in memory (`model: tiny`) and saved in h94/IP-Adapter's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_runs import pixels, run_cli
from per_call_schedule import one_call_a_forward
from PIL import Image

from storycli.consistency.ip_adapter import save_tiny_ip_adapter
from storycli.weights.tiny import build_tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def story(tmp_path: Path, name: str, adapter: dict[str, Any] | None, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "model": "tiny",
        "identity": "a woman with red hair",
        "frames": ["walks", "reads", "drinks tea", "[NC] a street"],
        "seed": 3,
        "width": 256,
        "height": 192,
        "steps": 2,
        "scheduler": "euler",
        "consistency": {"method": "storydiffusion", "id_length": 2},
    }
    if adapter is not None:
        data["ip_adapter"] = adapter
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data | changes, sort_keys=False), encoding="utf-8")
    return path


def frames(out: Path, name: str) -> list[np.ndarray]:
    return [pixels(out / name / f"frame_0{i}.png") for i in range(1, 5)]


def test_the_photo_changes_the_frames_and_scale_zero_is_no_adapter(tmp_path: Path) -> None:
    photo(tmp_path / "a.png", 0)
    photo(tmp_path / "b.png", 1)
    out = tmp_path / "out"
    stories = [
        story(tmp_path, "plain", None),
        story(tmp_path, "zero", {"image": "a.png", "model": "tiny", "scale": 0.0}),
        story(tmp_path, "photo-a", {"image": "a.png", "model": "tiny", "scale": 1.0}),
        story(tmp_path, "photo-b", {"image": "b.png", "model": "tiny", "scale": 1.0}),
        story(
            tmp_path,
            "one-prompt",
            {"image": "a.png", "model": "tiny", "scale": 1.0},
            consistency={"method": ["storydiffusion", "one-prompt"], "id_length": 2},
        ),
    ]
    # One batch: the adapter is loaded and unloaded per story on the one cached pipeline.
    run_cli("generate", *stories, "--out", out)
    plain, zero, a, b = (frames(out, n) for n in ("plain", "zero", "photo-a", "photo-b"))
    for i in range(4):
        np.testing.assert_array_equal(zero[i], plain[i])  # scale 0: exactly no adapter
        assert not np.array_equal(a[i], b[i])  # the photo shows in every frame
        assert not np.array_equal(a[i], plain[i])
    assert len(frames(out, "one-prompt")) == 4
    # The story without an adapter, alone, is as in the batch: the pipeline was left as it was.
    run_cli("generate", story(tmp_path, "plain-alone", None), "--out", out)
    for i in range(4):
        np.testing.assert_array_equal(frames(out, "plain-alone")[i], plain[i])
    manifest = json.loads((out / "photo-a" / "manifest.json").read_text())
    assert manifest["story"]["ip_adapter"]["image"] == str((tmp_path / "a.png").resolve())


def test_an_adapter_folder_in_the_hub_layout_loads(tmp_path: Path) -> None:
    root = save_tiny_ip_adapter(tmp_path / "IP-Adapter", build_tiny_sdxl_pipeline().unet)
    assert (root / "sdxl_models" / "ip-adapter_sdxl.safetensors").is_file()
    assert (root / "sdxl_models" / "image_encoder" / "config.json").is_file()
    photo(tmp_path / "a.png", 0)
    out = tmp_path / "out"
    adapter = {"image": "a.png", "model": "./IP-Adapter", "scale": 1.0}
    run_cli("generate", story(tmp_path, "folder", adapter), "--out", out)
    run_cli("generate", story(tmp_path, "plain", None), "--out", out)
    assert not np.array_equal(frames(out, "folder")[0], frames(out, "plain")[0])


def test_missing_adapter_weights_offline_are_one_line(tmp_path: Path, hub_offline: None) -> None:
    photo(tmp_path / "a.png", 0)
    path = story(tmp_path, "hub", {"image": "a.png", "model": "h94/IP-Adapter"})
    result = run_cli("generate", path, "--out", tmp_path / "out", code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "h94/IP-Adapter" in errors[0] and "hf download" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    bad = story(tmp_path, "bad", {"image": "missing.png", "model": "tiny"})
    result = run_cli("validate", bad, code=2)
    assert "ip_adapter.image" in result.stderr and "does not exist" in result.stderr


def cast_story(tmp_path: Path, name: str, photos: dict[str, dict[str, Any]]) -> Path:
    """Two characters, either with its own photo (`photos`: name → ip_adapter)."""
    characters: dict[str, Any] = {
        "Mara": "a girl with curly black hair",
        "Ollie": "a small grey cat",
    }
    for who, adapter in photos.items():
        characters[who] = {"description": characters[who], "ip_adapter": adapter}
    frames = [
        "[Mara] walks",
        "[Ollie] sleeps",
        "[Mara] reads",
        "[Ollie] jumps",
        "[Mara] drinks tea",
        "[Mara] and [Ollie] wave",
        "[NC] a street",
    ]
    return story(tmp_path, name, None, identity=None, characters=characters, frames=frames)


def all_frames(out: Path, name: str) -> list[np.ndarray]:
    return [pixels(out / name / f"frame_0{i}.png") for i in range(1, 8)]


MARA, OLLIE, BOTH, STREET = (0, 2, 4), (1, 3), 5, 6


def test_a_characters_photo_conditions_only_the_frames_that_show_it(tmp_path: Path) -> None:
    photo(tmp_path / "a.png", 0)
    photo(tmp_path / "b.png", 1)
    mara = {"image": "a.png", "model": "tiny", "scale": 1.0}
    ollie = {"image": "b.png", "model": "tiny", "scale": 1.0}
    out = tmp_path / "out"
    stories = [
        cast_story(tmp_path, "plain", {}),
        cast_story(tmp_path, "mara", {"Mara": mara}),
        cast_story(tmp_path, "mara-zero", {"Mara": mara | {"scale": 0.0}}),
        cast_story(tmp_path, "both", {"Mara": mara, "Ollie": ollie}),
    ]
    run_cli("generate", *stories, "--out", out)
    plain, only_mara, zero, both = (
        all_frames(out, n) for n in ("plain", "mara", "mara-zero", "both")
    )
    for i in range(7):
        np.testing.assert_array_equal(zero[i], plain[i])  # scale 0: exactly no photo
    for i in (*MARA, BOTH):  # Mara's photo shows where Mara is
        assert not np.array_equal(only_mara[i], plain[i])
    for i in (*OLLIE, STREET):  # and nowhere else: those frames are as without it
        np.testing.assert_array_equal(only_mara[i], plain[i])
    # Ollie's photo too: his frames and the frame with both change, Mara's alone do not.
    for i in (*OLLIE, BOTH):
        assert not np.array_equal(both[i], only_mara[i])
    for i in (*MARA, STREET):
        np.testing.assert_array_equal(both[i], only_mara[i])


def test_photo_rows_in_shared_forwards_equal_one_call_a_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each character's photo masks only its rows when both characters' references share the
    write forward and their frames share read forwards: the same frames (within float
    rounding) as every call in a forward of its own."""
    photo(tmp_path / "a.png", 0)
    photo(tmp_path / "b.png", 1)
    path = cast_story(
        tmp_path,
        "cast",
        {
            "Mara": {"image": "a.png", "model": "tiny", "scale": 1.0},
            "Ollie": {"image": "b.png", "model": "tiny", "scale": 0.7},
        },
    )
    run_cli("generate", path, "--out", tmp_path / "batched", "--frame-batch", "4")
    monkeypatch.setattr("storycli.keyframes.loop.story_chunks", one_call_a_forward)
    run_cli("generate", path, "--out", tmp_path / "alone", "--frame-batch", "4")
    batched, alone = (
        all_frames(tmp_path / "batched", "cast"),
        all_frames(tmp_path / "alone", "cast"),
    )
    for i in range(7):
        assert np.abs(batched[i].astype(int) - alone[i].astype(int)).max() <= 2, i


def test_adding_a_characters_photo_regenerates_only_its_frames(tmp_path: Path) -> None:
    photo(tmp_path / "a.png", 0)
    photo(tmp_path / "b.png", 1)
    mara = {"image": "a.png", "model": "tiny", "scale": 1.0}
    out = tmp_path / "out"
    run_cli("generate", cast_story(tmp_path, "s", {"Mara": mara}), "--out", out)
    before = all_frames(out, "s")
    ollie = {"image": "b.png", "model": "tiny", "scale": 1.0}
    result = run_cli(
        "generate", cast_story(tmp_path, "s", {"Mara": mara, "Ollie": ollie}), "--out", out
    )
    assert "3 frame(s) generated, 4 unchanged" in result.stderr  # Ollie's two, and both
    after = all_frames(out, "s")
    for i in (*MARA, STREET):
        np.testing.assert_array_equal(after[i], before[i])


def test_a_storys_photos_share_one_adapter(tmp_path: Path) -> None:
    photo(tmp_path / "a.png", 0)
    photos = {
        "Mara": {"image": "a.png", "model": "tiny"},
        "Ollie": {"image": "a.png", "model": "tiny", "variant": "plus"},
    }
    result = run_cli("validate", cast_story(tmp_path, "mixed", photos), code=2)
    assert "characters.Ollie.ip_adapter.variant" in result.stderr
    assert "'plus'" in result.stderr and "same variant" in result.stderr
    missing = {"Mara": {"image": "nope.png", "model": "tiny"}}
    result = run_cli("validate", cast_story(tmp_path, "missing", missing), code=2)
    assert "characters.Mara.ip_adapter.image" in result.stderr
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("variant", ["plus", "plus-face"])
def test_plus_variants_resample_the_encoders_hidden_states(tmp_path: Path, variant: str) -> None:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from storycli.consistency.ip_adapter import VARIANTS, attached_ip_adapter
    from storycli.story.schema import IPAdapter

    pipe = build_tiny_sdxl_pipeline()
    settings = IPAdapter(image=str(photo(tmp_path / "a.png", 0)), model="tiny", variant=variant)
    with attached_ip_adapter(pipe, [(None, settings)]) as photos:
        (projection,) = pipe.unet.encoder_hid_proj.image_projection_layers
        assert isinstance(projection, IPAdapterPlusImageProjection)  # the Resampler
        assert photos is not None and photos.embeds.ndim == 4  # [2, photos, tokens, hidden]
    assert pipe.unet.encoder_hid_proj is None  # unloaded after the story

    # Saved in h94/IP-Adapter's layout, the folder loads the very same adapter.
    root = save_tiny_ip_adapter(tmp_path / "IP-Adapter", pipe.unet, variant)
    subfolder, weight, encoder = VARIANTS[variant]
    assert (root / subfolder / weight).is_file() and (root / encoder / "config.json").is_file()
    out = tmp_path / "out"
    stories = [
        story(tmp_path, "tiny", {"image": "a.png", "model": "tiny", "variant": variant}),
        story(tmp_path, "folder", {"image": "a.png", "model": "./IP-Adapter", "variant": variant}),
        story(tmp_path, "plain", {"image": "a.png", "model": "tiny", "variant": "plain"}),
    ]
    run_cli("generate", *stories, "--out", out)
    tiny, folder, plain = (frames(out, n) for n in ("tiny", "folder", "plain"))
    for i in range(4):
        np.testing.assert_array_equal(folder[i], tiny[i])
        assert not np.array_equal(tiny[i], plain[i])
