"""Project configuration files (presets, styles, defaults) and the scheduler table.

Pure Python: importing this module never imports torch, so `validate` and `--help` stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from storycli.errors import InvalidInput

#: The model families (backbones) stage one runs.
FAMILIES = ("sdxl", "flux")


@dataclass(frozen=True)
class SchedulerSpec:
    """How a scheduler name maps onto a diffusers scheduler class."""

    cls: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    unet_calls_per_step: int = 1


# Named like A1111/ComfyUI samplers (lower-case, dashes) so users recognise them.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler-a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "ddim": SchedulerSpec("DDIMScheduler"),
    "dpmpp-2m": SchedulerSpec("DPMSolverMultistepScheduler"),
    "dpmpp-2m-karras": SchedulerSpec("DPMSolverMultistepScheduler", (("use_karras_sigmas", True),)),
    "dpmpp-2m-sde-karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        (("use_karras_sigmas", True), ("algorithm_type", "sde-dpmsolver++")),
    ),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    # Second-order samplers evaluate the UNet twice per step.
    "heun": SchedulerSpec("HeunDiscreteScheduler", unet_calls_per_step=2),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler", unet_calls_per_step=2),
}


def default_configs_dir() -> Path:
    """The `configs/` folder: the packaged copy in a wheel, else the repository's."""
    packaged = Path(__file__).parent / "_configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


class ConfigFileError(InvalidInput):
    """A file under configs/ is missing or malformed."""


@dataclass(frozen=True)
class Style:
    prompt: str
    negative: str

    def apply(self, prompt: str) -> str:
        return self.prompt.replace("{prompt}", prompt)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    source: str
    variant: str | None = None
    description: str = ""
    long_side: int | None = None
    vae: str | None = None  # replaces the model's VAE: hub id, folder or file (see `vae:`)
    # "sdxl" or "flux": the backbone, known without looking at any weights (None: found out
    # from the source, see `story.family`).
    family: str | None = None
    # Story values for the keys a story leaves out, over configs/defaults.yaml's (a story's
    # own values win); validated as a story's when a story uses the preset (`story.loader`).
    defaults: dict[str, Any] = field(default_factory=dict)
    # FLUX.1: T5 positions a prompt gets, under the tokenizer's own 512 (schnell was distilled
    # with 256, and Black Forest Labs' code gives it 256); None: the tokenizer's.
    t5_tokens: int | None = None


class Configs:
    """The three YAML files of a configs folder, read lazily."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_configs_dir()

    def _read(self, name: str) -> dict[str, Any]:
        path = self.root / name
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigFileError(f"{path}: cannot read ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigFileError(f"{path}: expected a mapping of names to entries")
        return data

    @cached_property
    def defaults(self) -> dict[str, Any]:
        return self._read("defaults.yaml")

    @cached_property
    def styles(self) -> dict[str, Style]:
        out = {}
        for name, entry in self._read("styles.yaml").items():
            if not isinstance(entry, dict) or "{prompt}" not in str(entry.get("prompt", "")):
                raise ConfigFileError(
                    f"{self.root / 'styles.yaml'}: style '{name}' needs a `prompt` containing "
                    "{prompt}"
                )
            out[str(name)] = Style(str(entry["prompt"]), str(entry.get("negative") or ""))
        return out

    @cached_property
    def presets(self) -> dict[str, ModelPreset]:
        out = {}
        for name, entry in self._read("models.yaml").items():
            if not isinstance(entry, dict) or "source" not in entry:
                raise ConfigFileError(
                    f"{self.root / 'models.yaml'}: preset '{name}' needs a `source`"
                )
            family, defaults = entry.get("family"), entry.get("defaults") or {}
            if family not in (None, *FAMILIES):
                raise ConfigFileError(
                    f"{self.root / 'models.yaml'}: preset '{name}' has family '{family}'; "
                    f"use one of: {', '.join(FAMILIES)}"
                )
            if not isinstance(defaults, dict):
                raise ConfigFileError(
                    f"{self.root / 'models.yaml'}: preset '{name}': `defaults` must be a "
                    "mapping of story keys to values"
                )
            t5_tokens = entry.get("t5_tokens")
            if t5_tokens is not None and (
                isinstance(t5_tokens, bool)
                or not isinstance(t5_tokens, int)
                or not 2 <= t5_tokens <= 512
            ):
                raise ConfigFileError(
                    f"{self.root / 'models.yaml'}: preset '{name}': `t5_tokens` must be a whole "
                    f"number from 2 to 512 (FLUX.1's T5 positions), got {t5_tokens!r}"
                )
            out[str(name)] = ModelPreset(
                name=str(name),
                source=str(entry["source"]),
                variant=entry.get("variant"),
                description=" ".join(str(entry.get("description", "")).split()),
                long_side=entry.get("long_side"),
                vae=str(entry["vae"]) if entry.get("vae") else None,
                family=family,
                defaults=defaults,
                t5_tokens=t5_tokens,
            )
        return out
