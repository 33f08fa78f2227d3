"""FLUX.1 transformers from one file, as users have them: BFL's `flux1-dev.safetensors` layout
(plain or under ComfyUI's prefix) and city96-style Q8_0 GGUF files, configured from a FLUX.1
diffusers folder or a hub-cache snapshot, offline; bad files as one line.

Every file is the tiny random FLUX.1 transformer written by `flux_checkpoints`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flux_checkpoints import bfl_state_dict, write_flux_gguf, write_flux_safetensors
from hub_repos import hub_repo, quiet_save

from storycli.keyframes.flux_files import (
    FLUX_DEV_REPO,
    FLUX_SCHNELL_REPO,
    flux_config_repo,
    flux_file_variant,
    flux_state_dict,
    is_flux_transformer_file,
    load_flux_transformer_file,
    single_file_shapes,
)
from storycli.weights.hub import ModelUnavailable, quiet_loading

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """The tiny FLUX.1-dev pipeline saved as a diffusers folder, and its transformer as a BFL
    .safetensors file and a Q8_0 .gguf file."""
    from storycli.weights.tiny_flux import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux-dev")
    pipe = build_tiny_flux_pipeline(guidance_embeds=True)
    quiet_save(pipe, folder / "pipeline")
    return {
        "pipeline": folder / "pipeline",
        "transformer": pipe.transformer,
        "safetensors": write_flux_safetensors(pipe.transformer, folder / "flux1-dev.safetensors"),
        "gguf": write_flux_gguf(pipe.transformer, folder / "flux1-dev-Q8_0.gguf"),
    }


def forward(transformer: Any) -> torch.Tensor:
    """One denoising call on fixed random inputs (16 image tokens, 8 text tokens)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]


def config_of(model: Any) -> dict[str, Any]:
    """A model's config as saved (tuples as lists), without diffusers' bookkeeping keys."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if k[0] != "_"
    }


def one_line_error(path: Path, config: str | Path, match: str) -> str:
    with pytest.raises(ModelUnavailable, match=match) as info:
        load_flux_transformer_file(path, torch.float32, config)
    text = str(info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- conversion


def test_conversion_matches_diffusers_at_flux1_width(dev: dict[str, Any]) -> None:
    """At FLUX.1's width (3072, where diffusers' own converter works) every tensor lands where
    diffusers puts it: the tiny file, with its stacked tensors widened to FLUX.1's row counts
    (one column: only rows are moved), each row numbered."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(dev["transformer"].config) | {
        "num_attention_heads": 24,
        "attention_head_dim": 128,
    }
    checkpoint = bfl_state_dict(dev["transformer"])
    for name in checkpoint:
        if name.endswith(("qkv.weight", "qkv.bias", "linear1.weight", "linear1.bias")):
            rows = 3 * 3072 + (4 * 3072 if "linear1" in name else 0)
            numbered = torch.arange(rows, dtype=torch.float32)
            checkpoint[name] = numbered.unsqueeze(1) if name.endswith("weight") else numbered
    ours = flux_state_dict(checkpoint, config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_header_shapes_match_the_tensors(dev: dict[str, Any]) -> None:
    """Both headers are read without the libraries, to the tensors' (unquantized) shapes."""
    expected = {k: tuple(v.shape) for k, v in bfl_state_dict(dev["transformer"]).items()}
    assert single_file_shapes(dev["safetensors"]) == expected
    assert single_file_shapes(dev["gguf"]) == expected


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("comfy", [False, True], ids=["bfl", "comfy-prefix"])
def test_safetensors_file_loads_exactly(dev: dict[str, Any], tmp_path: Path, comfy: bool) -> None:
    path = dev["safetensors"]
    if comfy:
        path = write_flux_safetensors(dev["transformer"], tmp_path / "flux1-dev.safetensors", True)
    loaded = load_flux_transformer_file(path, torch.float32, dev["pipeline"])
    want, got = dev["transformer"].state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert config_of(loaded) == config_of(dev["transformer"])


def test_a_diffusers_layout_file_loads_too(dev: dict[str, Any], tmp_path: Path) -> None:
    """A transformer's own `diffusion_pytorch_model.safetensors`, pointed at as one file."""
    from safetensors.torch import save_file

    path = tmp_path / "flux1-dev-diffusers.safetensors"
    save_file(dev["transformer"].state_dict(), str(path))
    assert flux_file_variant(path) == "dev"
    loaded = load_flux_transformer_file(path, torch.float32, str(dev["pipeline"]))
    want, got = dev["transformer"].state_dict(), loaded.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_safetensors_file_loads_in_the_asked_dtype(dev: dict[str, Any]) -> None:
    loaded = load_flux_transformer_file(dev["safetensors"], torch.bfloat16, dev["pipeline"])
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_gguf_q8_file_loads_quantized_on_cpu(dev: dict[str, Any]) -> None:
    """The weights stay Q8_0 (dequantized per matmul, on CPU) and the output is within what
    8-bit blocks cost: each weight off by at most half a step of its block's 1/127 scale."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    loaded = load_flux_transformer_file(dev["gguf"], torch.float32, dev["pipeline"])
    to_q = loaded.transformer_blocks[0].attn.to_q.weight
    assert isinstance(to_q, GGUFParameter)
    assert to_q.quant_type == gguf.GGMLQuantizationType.Q8_0
    assert to_q.dtype == torch.uint8 and to_q.device.type == "cpu"
    quantized = [n for n, p in loaded.named_parameters() if isinstance(p, GGUFParameter)]
    assert len(quantized) > 30  # every large 2-D weight
    assert not isinstance(loaded.context_embedder.weight, GGUFParameter)  # kept F16 in the file
    want, got = forward(dev["transformer"]), forward(loaded)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.02


def test_gguf_transformer_runs_in_the_folders_pipeline(dev: dict[str, Any]) -> None:
    """The rest of the pipeline from the FLUX.1 folder, the GGUF transformer handed in, in
    bfloat16 on CPU: one step end to end (how the loader will put them together)."""
    from diffusers import FluxPipeline

    transformer = load_flux_transformer_file(dev["gguf"], torch.bfloat16, dev["pipeline"])
    with quiet_loading():
        pipe = FluxPipeline.from_pretrained(
            dev["pipeline"], transformer=transformer, torch_dtype=torch.bfloat16
        )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer is transformer and pipe.vae.dtype == torch.bfloat16
    out = pipe(
        "a fox",
        num_inference_steps=1,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_config_from_the_hub_cache_offline(dev: dict[str, Any], hub_cache: Path) -> None:
    """`config_source` a hub id: its cached snapshot's transformer/config.json, offline."""
    hub_repo(hub_cache, FLUX_DEV_REPO, dev["pipeline"], patterns=("*.json", "*.txt"))
    assert flux_config_repo(dev["safetensors"]) == FLUX_DEV_REPO
    loaded = load_flux_transformer_file(dev["gguf"], torch.float32, FLUX_DEV_REPO)
    assert config_of(loaded) == config_of(dev["transformer"])


def test_config_missing_from_the_cache_is_one_line(dev: dict[str, Any], hub_cache: Path) -> None:
    text = one_line_error(dev["safetensors"], FLUX_DEV_REPO, "not in the local Hugging Face cache")
    assert f"hf download {FLUX_DEV_REPO} transformer/config.json" in text


# --------------------------------------------------------------------------- telling files apart


def test_flux_files_are_told_apart_by_their_headers(dev: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from storycli.weights.tiny_flux import build_tiny_flux_pipeline

    schnell = build_tiny_flux_pipeline().transformer
    assert flux_file_variant(dev["safetensors"]) == flux_file_variant(dev["gguf"]) == "dev"
    path = write_flux_safetensors(schnell, tmp_path / "flux1-schnell.safetensors")
    assert flux_file_variant(path) == "schnell"
    assert flux_config_repo(path) == FLUX_SCHNELL_REPO
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sdxl))
    flux2 = tmp_path / "flux2.safetensors"
    save_file(
        bfl_state_dict(schnell) | {"single_stream_modulation.lin.weight": torch.zeros(2)},
        str(flux2),
    )
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all, just text")
    for path in (sdxl, flux2, garbage, tmp_path / "missing.safetensors", dev["pipeline"]):
        assert not is_flux_transformer_file(path)


# --------------------------------------------------------------------------- bad files


def test_a_file_that_is_not_flux_is_one_line(dev: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sdxl))
    text = one_line_error(sdxl, dev["pipeline"], "not a FLUX.1 transformer")
    assert "sd_xl_base_1.0.safetensors" in text
    garbage = tmp_path / "flux1-dev-Q8_0.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 7)
    one_line_error(garbage, dev["pipeline"], "flux1-dev-Q8_0.gguf: not a readable GGUF file")
    one_line_error(tmp_path / "nowhere.safetensors", dev["pipeline"], "no such file")
    truncated = tmp_path / "flux1-dev.safetensors"
    truncated.write_bytes(dev["safetensors"].read_bytes()[:-3000])  # an interrupted download
    one_line_error(truncated, dev["pipeline"], "flux1-dev.safetensors: it cannot be read")


def test_gguf_without_the_gguf_package_says_how_to_install_it(
    dev: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    text = one_line_error(dev["gguf"], dev["pipeline"], "needs the `gguf` package")
    assert text.endswith("install it with pip install 'storydiff[gguf]'")


def test_a_file_that_does_not_fit_the_config_is_one_line(
    dev: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from storycli.weights.tiny_flux import build_tiny_flux_pipeline

    schnell = tmp_path / "flux1-schnell.safetensors"
    write_flux_safetensors(build_tiny_flux_pipeline().transformer, schnell)
    one_line_error(schnell, dev["pipeline"], f"FLUX.1-schnell .*use {FLUX_SCHNELL_REPO}'s")
    partial = bfl_state_dict(dev["transformer"])
    del partial["single_blocks.1.linear2.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    one_line_error(tmp_path / "partial.safetensors", dev["pipeline"], "no tensor single_blocks.1")
    wide = bfl_state_dict(dev["transformer"])
    wide["single_blocks.0.linear1.weight"] = torch.zeros(7, 32)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    one_line_error(tmp_path / "wide.safetensors", dev["pipeline"], "does not match the config")
    fill = bfl_state_dict(dev["transformer"]) | {"img_in.weight": torch.zeros(32, 384)}
    save_file(fill, str(tmp_path / "flux1-fill-dev.safetensors"))
    assert is_flux_transformer_file(tmp_path / "flux1-fill-dev.safetensors")
    one_line_error(tmp_path / "flux1-fill-dev.safetensors", dev["pipeline"], "FLUX.1 Fill")
