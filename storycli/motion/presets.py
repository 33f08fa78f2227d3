"""Named presets for the video (transition) decoder stack: configs/video_models.yaml.

Pure Python: importing this module never imports torch, so `--help` and validation stay quick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from storycli.config import ConfigFileError, default_configs_dir

VIDEO_MODELS_FILE = "video_models.yaml"
DEFAULT_VIDEO_PRESET = "animatediff"
TINY = "tiny"


class VideoPresetError(ConfigFileError):
    """configs/video_models.yaml is missing, malformed, or names no usable preset."""


@dataclass(frozen=True)
class ComponentRef:
    """Where one component's weights live: a hub id or local folder, plus a subfolder/file."""

    repo: str
    subfolder: str | None = None
    weight_name: str | None = None

    @property
    def where(self) -> str:
        parts = [self.repo, self.subfolder, self.weight_name]
        return "/".join(p for p in parts if p)


@dataclass(frozen=True)
class VideoPreset:
    """One entry of video_models.yaml: a decoder's whole stack and its settings."""

    name: str
    # animatediff: the SD1.5 base; wan, ltx: the whole diffusers repo. Hub id, folder or "tiny".
    base: str
    decoder: str = DEFAULT_VIDEO_PRESET  # which `--decoder` the preset is for
    motion_adapter: str | None = None
    sparsectrl: str | None = None
    ip_adapter: ComponentRef | None = None
    image_encoder: ComponentRef | None = None
    variant: str | None = None  # of the base, used when running in float16
    size: int = 512  # long side of the rendered video
    # Pixels per frame (wan, ltx: rendered at this area with the keyframes' aspect; None: size²)
    area: int | None = None
    steps: int = 25
    guidance: float = 7.5
    fps: int = 8
    ip_scale: float = 1.0
    negative: str = ""
    description: str = ""

    @property
    def tiny(self) -> bool:
        return self.base == TINY


# A `tiny` that works even when a custom configs folder leaves it out (tests, smoke runs).
_BUILTIN_TINY = VideoPreset(name=TINY, base=TINY, size=64, steps=2, description="tiny stack")

_FIELDS = {f.name for f in dataclasses.fields(VideoPreset)} - {"name"}
_REF_FIELDS = {f.name for f in dataclasses.fields(ComponentRef)}
_INTS = ("size", "area", "steps", "fps")
_FLOATS = ("guidance", "ip_scale")
_STRINGS = ("base", "decoder", "motion_adapter", "sparsectrl", "variant", "negative", "description")
# The keys each decoder's non-tiny presets must have (beyond `base`). Wan's and LTX's diffusers
# repos hold their whole stack (text/image encoders, VAE, transformer): nothing else to name.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "animatediff": ("motion_adapter", "sparsectrl", "ip_adapter", "image_encoder"),
    "wan": (),
    "ltx": (),
}


def _ref(value: Any, key: str, where: str, weight: bool) -> ComponentRef:
    if isinstance(value, str):
        value = {"repo": value}
    if not isinstance(value, dict) or not isinstance(value.get("repo"), str):
        raise VideoPresetError(f"{where}: `{key}` needs a mapping with a `repo` string")
    unknown = sorted(set(value) - _REF_FIELDS)
    if unknown:
        raise VideoPresetError(
            f"{where}: `{key}` has unknown keys {unknown}; known: {sorted(_REF_FIELDS)}"
        )
    if weight and not value.get("weight_name"):
        raise VideoPresetError(f"{where}: `{key}` needs a `weight_name` (the .safetensors file)")
    return ComponentRef(**{k: (None if v is None else str(v)) for k, v in value.items()})


def _check_types(entry: dict[str, Any], where: str) -> None:
    for key in _INTS:
        value = entry.get(key)
        if key in entry and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VideoPresetError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    for key in _FLOATS:
        value = entry.get(key)
        if key in entry and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise VideoPresetError(f"{where}: `{key}` must be a number, got {value!r}")
    for key in _STRINGS:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise VideoPresetError(f"{where}: `{key}` must be a string, got {entry[key]!r}")


def _parse_preset(name: str, entry: Any, path: Path) -> VideoPreset:
    where = f"{path}: preset '{name}'"
    if not isinstance(entry, dict) or not entry.get("base"):
        raise VideoPresetError(f"{where} needs a `base` (an SD1.5 hub id, folder or 'tiny')")
    entry = {key: value for key, value in entry.items() if value is not None}  # `key: ~`: default
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise VideoPresetError(f"{where} has unknown keys {unknown}; known: {sorted(_FIELDS)}")
    _check_types(entry, where)
    values = dict(entry)
    for key in ("ip_adapter", "image_encoder"):
        if values.get(key) is not None:
            values[key] = _ref(values[key], key, where, weight=key == "ip_adapter")
    decoder = values.setdefault("decoder", DEFAULT_VIDEO_PRESET)
    if decoder not in _REQUIRED:
        raise VideoPresetError(f"{where}: `decoder` must be one of {', '.join(_REQUIRED)}")
    if values["base"] != TINY:
        missing = [key for key in _REQUIRED[decoder] if not values.get(key)]
        if missing:
            raise VideoPresetError(f"{where} is missing {', '.join(missing)}")
    values["description"] = " ".join(str(values.get("description") or "").split())
    values["negative"] = str(values.get("negative") or "")
    for key in _FLOATS:
        if key in values:
            values[key] = float(values[key])
    return VideoPreset(name=name, **values)


def load_video_presets(configs_dir: Path | None = None) -> dict[str, VideoPreset]:
    """Read video_models.yaml from `configs_dir` (default: the packaged/repository configs)."""
    path = (configs_dir or default_configs_dir()) / VIDEO_MODELS_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VideoPresetError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise VideoPresetError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise VideoPresetError(f"{path}: expected a mapping of preset names to entries")
    return {str(name): _parse_preset(str(name), entry, path) for name, entry in data.items()}


def resolve_video_preset(
    model: str, presets: Mapping[str, VideoPreset], decoder: str = DEFAULT_VIDEO_PRESET
) -> VideoPreset:
    """The preset `model` names; else `model` is the decoder's base (hub id or local folder) and
    the other components and settings come from the decoder's default preset (named after it).

    `tiny` is each decoder's tiny stack: the `tiny` preset for animatediff, `<decoder>-tiny`
    (e.g. `wan-tiny`) for the others."""
    if not model:
        raise VideoPresetError("empty video model name: use a preset, a hub id or a folder")
    if model == TINY and decoder != DEFAULT_VIDEO_PRESET:
        model = f"{decoder}-{TINY}"
        if model not in presets:
            return dataclasses.replace(_BUILTIN_TINY, name=model, decoder=decoder)
    if model in presets:
        if presets[model].decoder != decoder:
            raise VideoPresetError(
                f"video preset '{model}' is for the {presets[model].decoder} decoder; "
                f"use --decoder {presets[model].decoder}"
            )
        return presets[model]
    if model == TINY:
        return _BUILTIN_TINY
    default = presets.get(decoder)
    if default is None:
        raise VideoPresetError(
            f"video model '{model}' is not a preset ({', '.join(presets)}) and there is no "
            f"'{decoder}' preset to take its other components from"
        )
    # The variant belongs to the default base; an arbitrary base may not ship fp16 files.
    return dataclasses.replace(default, name=model, base=model, variant=None, description="")
