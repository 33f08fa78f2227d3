"""The decode phase and the VAE: frames decoded `--decode-batch` at a time, the float32 upcast
only where the VAE asks for it, and `vae:` (an fp16-safe VAE as users have it: a diffusers VAE
folder, one .safetensors file, a hub id) replacing the model's own."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cli_runs import run_cli
from PIL import Image

import storycli.keyframes.models
from storycli.keyframes.backbones.sdxl import decode_latents, encode_pictures, vae_upcast
from storycli.keyframes.schedule import RenderSize
from storycli.render import read_png_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = ["[Ann] reads a book", "[Ann] walks home", "[Ann] drinks tea", "[Ann] sleeps"]


def write_story(path: Path, **changes: Any) -> Path:
    """One character, two references and two read frames (one read chunk on a CPU)."""
    story: dict[str, Any] = {
        "name": "vae",
        "model": "tiny",
        "characters": {"Ann": "a woman with red hair"},
        "frames": list(FRAMES),
        "seed": 5,
        "width": 256,
        "height": 192,
        "steps": 2,
        "scheduler": "euler",
        "consistency": {"id_length": 2},
        **changes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(story, sort_keys=False), encoding="utf-8")
    return path


def pixels(folder: Path) -> list[np.ndarray]:
    out = []
    for n in range(1, len(FRAMES) + 1):
        with Image.open(folder / f"frame_{n:02d}.png") as image:
            out.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    return out


def keys(folder: Path) -> list[str]:
    return [read_png_metadata(folder / f"frame_{n:02d}.png")[1]["key"] for n in (1, 2, 3, 4)]


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ --decode-batch


@pytest.fixture
def decode_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every VAE decode of the pipelines `generate` loads."""
    sizes: list[int] = []
    real = storycli.keyframes.models.load_pipeline

    def hooked(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        loaded.pipe.vae.post_quant_conv.register_forward_pre_hook(
            lambda module, inputs: sizes.append(inputs[0].shape[0])
        )
        return loaded

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", hooked)
    return sizes


def test_frames_are_decoded_one_at_a_time_unless_asked(
    tmp_path: Path, decode_sizes: list[int]
) -> None:
    story = write_story(tmp_path / "story.yaml")
    run_cli("generate", story, "--out", tmp_path / "one", "-q")
    assert decode_sizes == [1, 1, 1, 1]

    decode_sizes.clear()
    run_cli("generate", story, "--out", tmp_path / "two", "-q", "--decode-batch", "2")
    assert len(decode_sizes) >= 2 and max(decode_sizes) == 2 and sum(decode_sizes) == 4

    # Batching moves float rounding at most.
    for one, two in zip(pixels(tmp_path / "one/vae"), pixels(tmp_path / "two/vae"), strict=True):
        assert np.abs(one - two).max() <= 1


def test_decode_batch_below_one_is_one_line(tmp_path: Path) -> None:
    story = write_story(tmp_path / "story.yaml")
    result = run_cli("generate", story, "--out", tmp_path / "out", "--decode-batch", "0", code=2)
    assert result.stderr.strip() == "error: --decode-batch 0: must be 1 or more"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- float32 upcast


@pytest.fixture(scope="module")
def half_pipe(one_thread: None) -> Any:
    from storycli.weights.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(torch.float16)


def latents(pipe: Any, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 24, 32, generator=generator).to(pipe.unet.dtype)


def decoder_dtypes(vae: Any) -> tuple[list[torch.dtype], Any]:
    """The decoder's and the encoder's dtypes at every decode."""
    seen: list[torch.dtype] = []

    def record(module: Any, inputs: Any) -> None:
        seen.append((module.conv_in.weight.dtype, vae.encoder.conv_in.weight.dtype))

    return seen, vae.decoder.register_forward_pre_hook(record)


@torch.inference_mode()
def test_fp16_safe_vae_decodes_in_float16(half_pipe: Any) -> None:
    assert half_pipe.vae.config.force_upcast is False  # the tiny VAE, like sdxl-vae-fp16-fix
    seen, hook = decoder_dtypes(half_pipe.vae)
    try:
        images = decode_latents(half_pipe, latents(half_pipe))
    finally:
        hook.remove()
    assert seen == [(torch.float16, torch.float16)]
    assert len(images) == 2 and images[0].size == (64, 48)


@torch.inference_mode()
def test_upcast_is_the_decoder_only_once_and_gives_diffusers_pixels(half_pipe: Any) -> None:
    pipe = copy.copy(half_pipe)
    pipe.vae = copy.deepcopy(half_pipe.vae)
    pipe.vae.register_to_config(force_upcast=True)  # as SDXL's own VAE
    x = latents(pipe)
    seen, hook = decoder_dtypes(pipe.vae)
    try:
        with vae_upcast(pipe.vae, "decoder"):  # generate's decode phase
            images = decode_latents(pipe, x[:1]) + decode_latents(pipe, x[1:])
            # Not cast back between frames.
            assert pipe.vae.decoder.conv_in.weight.dtype == torch.float32
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float16)] * 2  # the encoder stays float16
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}  # restored

    # What diffusers' SDXL pipeline does: the whole VAE in float32.
    reference = copy.deepcopy(pipe.vae).to(torch.float32)
    decoded = reference.decode(x.float() / reference.config.scaling_factor, return_dict=False)[0]
    expected = pipe.image_processor.postprocess(decoded, output_type="pil")
    for image, want in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(want))


@torch.inference_mode()
def test_pictures_upcast_only_the_encoder(half_pipe: Any, tmp_path: Path) -> None:
    pipe = copy.copy(half_pipe)
    pipe.vae = copy.deepcopy(half_pipe.vae)
    pipe.vae.register_to_config(force_upcast=True)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (80, 60), (200, 120, 40)).save(picture)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    hook = pipe.vae.encoder.register_forward_pre_hook(
        lambda m, a: seen.append((m.conv_in.weight.dtype, pipe.vae.decoder.conv_in.weight.dtype))
    )
    try:
        [latent] = encode_pictures(pipe, [str(picture)], RenderSize(64, 48))
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float16)]
    assert latent.dtype == torch.float16 and latent.shape == (4, 24, 32)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float16}


# ------------------------------------------------------------------------------------ vae:


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    """A tiny random VAE (the tiny pipeline's config, other weights, `force_upcast: false`) as
    a diffusers folder of fp16 weights and as one .safetensors file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from storycli.weights.tiny import build_tiny_sdxl_pipeline

    config = dict(build_tiny_sdxl_pipeline().vae.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        vae = AutoencoderKL.from_config({**config, "force_upcast": False})
    torch.nn.Module.to(vae, dtype=torch.float16)
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "tiny-vae", variant="fp16")
    assert sorted(p.name for p in (root / "tiny-vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, root / "tiny-vae.safetensors"
    )
    return {"folder": root / "tiny-vae", "file": root / "tiny-vae.safetensors"}


@pytest.fixture(scope="module")
def without_vae(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    root = tmp_path_factory.mktemp("plain")
    story = write_story(root / "story.yaml")
    run_cli("generate", story, "--out", root / "out", "-q")
    return root / "out" / "vae"


def test_vae_folder_and_file_replace_the_models_vae(
    tmp_path: Path, saved_vae: dict[str, Path], without_vae: Path
) -> None:
    # A folder named relative to the story file; the file by its absolute path.
    relative = os.path.relpath(saved_vae["folder"], tmp_path)
    folder_story = write_story(tmp_path / "folder.yaml", vae=relative)
    file_story = write_story(tmp_path / "file.yaml", vae=str(saved_vae["file"]))
    run_cli("generate", folder_story, "--out", tmp_path / "folder", "-q")
    run_cli("generate", file_story, "--out", tmp_path / "file", "-q")

    for name, out in (("folder", tmp_path / "folder/vae"), ("file", tmp_path / "file/vae")):
        model = manifest(out)["model"]
        assert model["vae"] == str(saved_vae[name].resolve()) and model["vae_revision"] is None
        meta = read_png_metadata(out / "frame_01.png")[1]
        assert meta["model"]["vae"] == str(saved_vae[name].resolve())
        # Frames made with another VAE are other frames.
        assert set(keys(out)).isdisjoint(keys(without_vae))
    assert "vae" not in manifest(without_vae)["model"]  # keys without `vae:` are as before
    # The same weights either way; not the model's own VAE's pixels.
    folder, file, plain = (
        pixels(tmp_path / "folder/vae"),
        pixels(tmp_path / "file/vae"),
        pixels(without_vae),
    )
    for a, b, c in zip(folder, file, plain, strict=True):
        assert np.array_equal(a, b) and not np.array_equal(a, c)


@torch.inference_mode()
def test_loaded_fp16_safe_vae_decodes_in_float16(saved_vae: dict[str, Path]) -> None:
    from storycli.keyframes.models import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="float16", vae=str(saved_vae["folder"])).pipe
    assert pipe.vae.config.force_upcast is False and pipe.vae.dtype == torch.float16
    seen, hook = decoder_dtypes(pipe.vae)
    try:
        decode_latents(pipe, latents(pipe, 1))
    finally:
        hook.remove()
    assert seen == [(torch.float16, torch.float16)]


def test_vae_is_part_of_the_model_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from storycli.config import Configs
    from storycli.keyframes.model_cache import ModelCache

    loads: list[dict[str, Any]] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs)
        return SimpleNamespace(device="cpu")

    monkeypatch.setattr(storycli.keyframes.models, "load_pipeline", load)
    cache, configs = ModelCache(), Configs()
    assert cache.load("tiny", configs, device="cpu", vae=None)[1] is False
    assert cache.load("tiny", configs, device="cpu", vae=None)[1] is True
    assert cache.load("tiny", configs, device="cpu", vae="org/a-vae")[1] is False
    assert cache.load("tiny", configs, device="cpu", vae="org/a-vae")[1] is True
    assert cache.load("tiny", configs, device="cpu", vae="org/b-vae")[1] is False
    assert [k["vae"] for k in loads] == [None, "org/a-vae", "org/b-vae"]


def test_uncached_hub_vae_offline_is_one_line(hub_offline: None, tmp_path: Path) -> None:
    story = write_story(tmp_path / "story.yaml", vae="tiny-org/no-such-vae")
    result = run_cli("generate", story, "--out", tmp_path / "out", code=1)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "The VAE 'tiny-org/no-such-vae' is not in the local Hugging Face cache" in errors[0]
    assert "`hf download tiny-org/no-such-vae`" in errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("./no-such-vae", "VAE file or folder './no-such-vae' does not exist"),
        ("./empty", "'./empty' is a folder without config.json"),
        ("not a hub id", "unknown VAE 'not a hub id'"),
    ],
)
def test_validate_reports_a_bad_vae_naming_the_field(
    tmp_path: Path, value: str, needle: str
) -> None:
    (tmp_path / "empty").mkdir()
    story = write_story(tmp_path / "story.yaml", vae=value)
    result = run_cli("validate", story, code=2)
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {story}:") and " vae: " in line and needle in line, line


def test_preset_vae(tmp_path: Path, saved_vae: dict[str, Path]) -> None:
    import shutil

    from storycli.config import Configs
    from storycli.keyframes.models import resolve_model

    configs_dir = tmp_path / "configs"
    shutil.copytree(Configs().root, configs_dir)
    presets = yaml.safe_load((configs_dir / "models.yaml").read_text())
    presets["tiny-vae"] = {**presets["tiny"], "vae": str(saved_vae["folder"])}
    presets["tiny-hub-vae"] = {**presets["tiny"], "vae": "org/some-vae"}
    (configs_dir / "models.yaml").write_text(yaml.safe_dump(presets))
    configs = Configs(configs_dir)

    assert resolve_model("tiny-vae", configs, device="cpu").vae == str(saved_vae["folder"])
    assert resolve_model("tiny-hub-vae", configs, device="cpu").vae == "org/some-vae"
    # A story's own `vae:` wins.
    story_vae = resolve_model("tiny-vae", configs, device="cpu", vae="org/other")
    assert story_vae.vae == "org/other"
    assert resolve_model("tiny", configs, device="cpu").vae is None
