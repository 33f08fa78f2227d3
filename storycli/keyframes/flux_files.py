"""A FLUX.1 transformer from one file, the way users have them: Black Forest Labs' own
`flux1-dev.safetensors` (original key layout, optionally under ComfyUI's `model.diffusion_model.`
prefix), or a GGUF-quantized `flux1-dev-Q8_0.gguf` (city96/FLUX.1-dev-gguf), run through
diffusers' GGUF quantizer (dequantized per layer at compute time, CPU or GPU). A transformer
saved in diffusers' own key layout as one file loads too.

The file holds only the transformer's weights: its config comes from a FLUX.1 diffusers folder or
hub repo (`transformer/config.json`), taken from the cache first, as the rest of the pipeline is.

diffusers' own `convert_flux_transformer_checkpoint_to_diffusers` hardcodes FLUX.1's width (3072),
so here the file is converted with the config's width instead (`bfl_tensors`, checked against
diffusers' converter at FLUX.1's width in the tests) and the diffusers-layout state dict is
handed to `FluxTransformer2DModel.from_single_file`, which quantizes and loads it.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    from_hub,
    load_errors,
    quiet_loading,
    short_reason,
)

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
GGUF_INSTALL = "pip install 'storydiff[gguf]'"
TRANSFORMER_CONFIG = "transformer/config.json"
# ComfyUI's all-in-one checkpoints keep the transformer under this prefix (diffusers strips it too).
COMFY_PREFIX = "model.diffusion_model."
# diffusers' marker of a FLUX.1 transformer (`CHECKPOINT_KEY_NAMES["flux"]`) and of the later
# models that share its block names but not its layout (FLUX.2, FLUX.3, Chroma).
_FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
# A FLUX.1 transformer saved by diffusers (SD3 and Chroma lack one of these, FLUX.2 the last).
_DIFFUSERS_MARKERS = (
    "transformer_blocks.0.norm1_context.linear.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "single_transformer_blocks.0.proj_mlp.weight",
)
_NOT_FLUX1 = (
    "single_stream_modulation.lin.weight",
    "early_stream_modulations.image.lin.weight",
    "distilled_guidance_layer.in_proj.bias",
)
_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class BflTensor:
    """One tensor of the original (BFL) layout and the diffusers tensors it becomes."""

    bfl: str
    diffusers: tuple[str, ...]
    split: tuple[int, ...] = ()  # row counts, when one BFL tensor is several diffusers ones
    # AdaLayerNormContinuous: BFL's rows are (shift, scale), diffusers' (scale, shift).
    swap: bool = False


def _pairs(bfl: str, diffusers: tuple[str, ...], split: tuple[int, ...] = ()) -> list[BflTensor]:
    """The weight and bias of one linear layer (a bias splits as its weight's rows do)."""
    return [
        BflTensor(f"{bfl}.{kind}", tuple(f"{d}.{kind}" for d in diffusers), split)
        for kind in ("weight", "bias")
    ]


def bfl_tensors(config: Mapping[str, Any]) -> list[BflTensor]:
    """Every tensor of a FLUX.1 transformer with this diffusers config, in BFL's layout: the
    inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, at any width."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = inner * 4  # FluxSingleTransformerBlock's mlp_ratio (diffusers fixes it at 4.0)
    tensors = _pairs("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",))
    tensors += _pairs("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",))
    tensors += _pairs("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",))
    tensors += _pairs("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",))
    if config.get("guidance_embeds"):
        tensors += _pairs("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",))
        tensors += _pairs("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",))
    tensors += _pairs("txt_in", ("context_embedder",)) + _pairs("img_in", ("x_embedder",))
    for i in range(int(config["num_layers"])):
        bfl, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, mod, norm, q, k, v, out, mlp_in in (
            ("img", "norm1", "norm", "to_q", "to_k", "to_v", "to_out.0", "ff"),
            ("txt", "norm1_context", "norm_added", "add_q_proj", "add_k_proj", "add_v_proj",
             "to_add_out", "ff_context"),
        ):  # fmt: skip
            tensors += _pairs(f"{bfl}.{side}_mod.lin", (f"{ours}.{mod}.linear",))
            qkv = tuple(f"{ours}.attn.{p}" for p in (q, k, v))
            tensors += _pairs(f"{bfl}.{side}_attn.qkv", qkv, (inner,) * 3)
            for which in ("query", "key"):
                name = f"{ours}.attn.{norm}_{which[0]}.weight"
                tensors.append(BflTensor(f"{bfl}.{side}_attn.norm.{which}_norm.scale", (name,)))
            tensors += _pairs(f"{bfl}.{side}_attn.proj", (f"{ours}.attn.{out}",))
            tensors += _pairs(f"{bfl}.{side}_mlp.0", (f"{ours}.{mlp_in}.net.0.proj",))
            tensors += _pairs(f"{bfl}.{side}_mlp.2", (f"{ours}.{mlp_in}.net.2",))
    for i in range(int(config["num_single_layers"])):
        bfl, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        tensors += _pairs(f"{bfl}.modulation.lin", (f"{ours}.norm.linear",))
        parts = (*(f"{ours}.attn.to_{p}" for p in "qkv"), f"{ours}.proj_mlp")
        tensors += _pairs(f"{bfl}.linear1", parts, (inner, inner, inner, mlp))
        for which in ("query", "key"):
            name = f"{ours}.attn.norm_{which[0]}.weight"
            tensors.append(BflTensor(f"{bfl}.norm.{which}_norm.scale", (name,)))
        tensors += _pairs(f"{bfl}.linear2", (f"{ours}.proj_out",))
    tensors += _pairs("final_layer.linear", ("proj_out",))
    tensors += [
        BflTensor(f"final_layer.adaLN_modulation.1.{kind}", (f"norm_out.linear.{kind}",), swap=True)
        for kind in ("weight", "bias")
    ]
    return tensors


def flux_state_dict(
    checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The diffusers state dict of a FLUX.1 checkpoint in BFL's layout (converted) or already
    in diffusers' (taken as is); other models' tensors in an all-in-one file are left out.
    Splits are views; GGUF-quantized tensors stay quantized (their rows are whole blocks, and
    `GGUFParameter` keeps its type through split and cat). Raises KeyError for a missing
    tensor, RuntimeError for rows that do not match `config`."""
    found = {k.removeprefix(COMFY_PREFIX): v for k, v in checkpoint.items()}
    specs = bfl_tensors(config)
    if _flux_layout(found) == "diffusers":
        return {name: found[name] for spec in specs for name in spec.diffusers}
    converted: dict[str, torch.Tensor] = {}
    for spec in specs:
        tensor = found[spec.bfl]
        if spec.swap:
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        if spec.split and tensor.shape[0] != sum(spec.split):
            raise RuntimeError(f"{spec.bfl} has {tensor.shape[0]} rows, not {sum(spec.split)}")
        parts = torch.split(tensor, list(spec.split), dim=0) if spec.split else (tensor,)
        converted.update(zip(spec.diffusers, parts, strict=True))
    return converted


def single_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and (unquantized) shape in a .safetensors or .gguf file, from its
    header alone: no tensor is read and no library imported, so it is cheap on a 24 GB file.
    Raises ValueError for a file that is neither."""
    with path.open("rb") as f:
        if path.suffix.lower() == ".gguf":
            return _gguf_shapes(f)
        (length,) = struct.unpack("<Q", _read(f, 8))
        if length > 100_000_000:  # safetensors caps its header at 100 MB
            raise ValueError("not a safetensors file")
        try:
            header = json.loads(_read(f, length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("not a safetensors file") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file")
    return {
        name: tuple(entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "shape" in entry
    }


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends early")
    return data


# GGUF metadata value types → their size in bytes (8: string, 9: array are sized as read).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, length).decode("utf-8", "replace")


def _gguf_skip_value(f: BinaryIO, kind: int) -> None:
    if kind == 8:
        _gguf_string(f)
    elif kind == 9:
        item, count = struct.unpack("<IQ", _read(f, 12))
        if item in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _gguf_skip_value(f, item)
    elif kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], 1)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _gguf_shapes(f: BinaryIO) -> dict[str, tuple[int, ...]]:
    """The tensor infos of a GGUF (v2, v3) file, after its metadata: names and dimensions,
    innermost first in the file, so reversed here to torch's order."""
    magic, version, tensors, kvs = struct.unpack("<4sIQQ", _read(f, 24))
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError("not a GGUF v2/v3 file")
    for _ in range(kvs):
        _gguf_string(f)
        (kind,) = struct.unpack("<I", _read(f, 4))
        _gguf_skip_value(f, kind)
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(tensors):
        name = _gguf_string(f)
        (dims,) = struct.unpack("<I", _read(f, 4))
        shape = struct.unpack(f"<{dims}Q", _read(f, 8 * dims))
        _read(f, 12)  # the tensor type (uint32) and its data offset (uint64)
        shapes[name] = tuple(reversed(shape))
    return shapes


def _flux_layout(names: Mapping[str, Any]) -> str | None:
    """ "bfl" or "diffusers" for a FLUX.1 transformer's tensor names (prefix removed), else None."""
    if any(k in names for k in _NOT_FLUX1):
        return None
    if _FLUX_MARKER in names:
        return "bfl"
    return "diffusers" if all(k in names for k in _DIFFUSERS_MARKERS) else None


def flux_file_variant(path: Path) -> str | None:
    """Which FLUX.1 transformer a .safetensors/.gguf file holds, by its tensor names and the
    image input's width (as diffusers' `infer_diffusers_model_type`): "dev", "schnell", "fill",
    "depth"; None for any other file (SDXL, FLUX.2, Chroma, a VAE, unreadable)."""
    if path.suffix.lower() not in _SUFFIXES or not path.is_file():
        return None
    try:
        shapes = {k.removeprefix(COMFY_PREFIX): v for k, v in single_file_shapes(path).items()}
    except (OSError, ValueError, struct.error):
        return None
    layout = _flux_layout(shapes)
    if layout is None:
        return None
    guidance, image = (
        ("guidance_in.in_layer.bias", "img_in.weight")
        if layout == "bfl"
        else ("time_text_embed.guidance_embedder.linear_1.bias", "x_embedder.weight")
    )
    if guidance not in shapes:
        return "schnell"
    return {384: "fill", 128: "depth"}.get(shapes.get(image, (0, 0))[-1], "dev")


def is_flux_transformer_file(path: Path) -> bool:
    """Whether `path` is a FLUX.1 transformer checkpoint (.safetensors or .gguf), told from its
    header: what routes a `model:` file to `load_flux_transformer_file` rather than SDXL's."""
    return flux_file_variant(path) is not None


def flux_config_repo(path: Path) -> str:
    """The hub repo whose configs (and VAE, text encoders) go with FLUX.1 file `path`: dev's
    when it has a guidance embedding, schnell's when not (as diffusers infers)."""
    return FLUX_SCHNELL_REPO if flux_file_variant(path) == "schnell" else FLUX_DEV_REPO


def _config_folder(config_source: str | Path) -> tuple[Path, str | None]:
    """The folder holding the transformer config and the subfolder it is in: a local diffusers
    pipeline folder (or a transformer folder itself), else a hub repo's cached snapshot (fetched
    when the hub answers)."""
    local = Path(config_source)
    if isinstance(config_source, Path) or local.is_dir():
        if (local / TRANSFORMER_CONFIG).is_file():
            return local, "transformer"
        if (local / "config.json").is_file():
            return local, None
        raise ModelUnavailable(
            f"The FLUX.1 configs folder {local} has no {TRANSFORMER_CONFIG}; point it at a "
            "diffusers FLUX.1 pipeline folder (what `save_pretrained` writes)"
        )
    from huggingface_hub import hf_hub_download

    repo = str(config_source)
    weights = HubWeights(f"The transformer config of {repo}", repo, f"{repo} {TRANSFORMER_CONFIG}")
    found = from_hub(
        lambda local_only: hf_hub_download(repo, TRANSFORMER_CONFIG, local_files_only=local_only),
        weights,
    )
    return Path(found).parent.parent, "transformer"


def _check_file(path: Path) -> str:
    """The FLUX.1 variant of `path`, or one line saying why it cannot be loaded as one."""
    what = f"Cannot load FLUX.1 transformer file {path.name}"
    if not path.is_file():
        raise ModelUnavailable(f"{what}: no such file ({path})")
    if path.suffix.lower() not in _SUFFIXES:
        raise ModelUnavailable(f"{what}: only .safetensors and .gguf files are read")
    try:
        single_file_shapes(path)
    except (OSError, ValueError, struct.error) as exc:
        kind = "GGUF" if path.suffix.lower() == ".gguf" else "safetensors"
        raise ModelUnavailable(f"{what}: not a readable {kind} file ({short_reason(exc)})") from exc
    variant = flux_file_variant(path)
    if variant is None:
        raise ModelUnavailable(
            f"{what}: it is not a FLUX.1 transformer (none of its tensors is named as FLUX.1's "
            "double_blocks.* or transformer_blocks.*)"
        )
    if variant in ("fill", "depth"):
        raise ModelUnavailable(
            f"{what}: it is FLUX.1 {variant.capitalize()}, a conditioned model, not a "
            "text-to-image FLUX.1 (dev or schnell)"
        )
    if path.suffix.lower() == ".gguf" and not _gguf_available():
        raise ModelUnavailable(
            f"{what}: reading GGUF files needs the `gguf` package; install it with {GGUF_INSTALL}"
        )
    return variant


def _gguf_available() -> bool:
    """Whether the gguf package (≥0.10, as diffusers' GGUF quantizer requires) imports."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    from diffusers.utils import is_gguf_available, is_gguf_version

    return is_gguf_available() and not is_gguf_version("<", "0.10.0")


def load_flux_transformer_file(
    path: Path, torch_dtype: torch.dtype, config_source: str | Path
) -> FluxTransformer2DModel:
    """FLUX.1's transformer from one .safetensors file (BFL layout, loaded in `torch_dtype`) or
    one .gguf file (weights kept quantized, computed in `torch_dtype`), configured by
    `config_source`: a FLUX.1 hub repo (cache first) or a local diffusers folder. Anything
    wrong is one `ModelUnavailable` line naming the file."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    path = Path(path)
    variant = _check_file(path)
    folder, subfolder = _config_folder(config_source)
    what = f"Cannot load FLUX.1 transformer file {path.name}"
    try:
        config = FluxTransformer2DModel.load_config(str(folder), subfolder=subfolder)
    except load_errors() as exc:
        raise ModelUnavailable(f"{what}: its config in {folder}: {short_reason(exc)}") from exc
    if bool(config.get("guidance_embeds")) != (variant == "dev"):
        # dev's guidance embedding has no place in schnell's model, and the reverse.
        wanted = FLUX_DEV_REPO if variant == "dev" else FLUX_SCHNELL_REPO
        raise ModelUnavailable(
            f"{what}: it is FLUX.1-{variant} but the configs of {config_source} are not; use "
            f"{wanted}'s"
        )
    gguf = path.suffix.lower() == ".gguf"
    with quiet_loading(), _no_fp32_cast_warning():
        try:
            checkpoint = load_single_file_checkpoint(str(path))
        except load_errors() as exc:  # a truncated file, an unsupported GGUF quant type
            raise ModelUnavailable(f"{what}: it cannot be read ({short_reason(exc)})") from exc
        try:
            state = flux_state_dict(checkpoint, config)
        except KeyError as exc:
            raise ModelUnavailable(
                f"{what}: it has no tensor {exc.args[0]}, which the config of {config_source} "
                "needs (a different block count or a partial file)"
            ) from exc
        except load_errors() as exc:
            raise ModelUnavailable(
                f"{what}: it does not match the config of {config_source} ({short_reason(exc)})"
            ) from exc
        try:
            return FluxTransformer2DModel.from_single_file(
                state,
                config=str(folder),
                subfolder=subfolder,
                torch_dtype=torch_dtype,
                local_files_only=True,
                # GGUF weights stay quantized; each layer dequantizes them for its matmul.
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype)
                if gguf
                else None,
            )
        except load_errors() as exc:
            raise ModelUnavailable(f"{what}: {short_reason(exc)}") from exc


@contextmanager
def _no_fp32_cast_warning() -> Iterator[None]:
    """Without diffusers' "modules that should be kept in float32: []" warning, which its
    `from_single_file` makes it log for every dtype (FLUX keeps no module in float32)."""

    def keep(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    modeling = logging.getLogger("diffusers.models.modeling_utils")
    modeling.addFilter(keep)
    try:
        yield
    finally:
        modeling.removeFilter(keep)
