"""Loading SDXL pipelines: preset, hub id, local diffusers folder or single checkpoint file."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import SCHEDULERS, Configs
from .story import local_model_path

log = logging.getLogger(__name__)

Offload = Literal["none", "model", "sequential"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelUnavailable(Exception):
    """The model's weights cannot be loaded (not cached offline, missing file, bad checkpoint)."""


@dataclass
class LoadedModel:
    pipe: Any  # diffusers.StableDiffusionXLPipeline
    model_id: str  # preset source, hub id or absolute path
    revision: str | None  # hub commit of the cached snapshot, when known
    preset: str | None
    tiny: bool
    long_side: int | None  # render size cap (tiny preset)
    device: str
    dtype: str

    @property
    def label(self) -> str:
        return "tiny random model" if self.tiny else self.model_id

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "revision": self.revision,
            "preset": self.preset,
            "tiny_random_model": self.tiny,
            "device": self.device,
            "dtype": self.dtype,
        }


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelUnavailable(f"--device {device}: no CUDA GPU is visible to torch")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_description(device: str) -> str:
    """The device in words, for benchmark records: GPU name, or CPU model, cores and threads."""
    import os
    import platform

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # Half precision on GPUs; CPUs get float32 (bfloat16 is faster there but less exact).
        return torch.float32 if device == "cpu" else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelUnavailable(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}") from None


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot of a hub model, if it is cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(found, str):
        match = re.search(r"snapshots/([0-9a-f]{40})/", found.replace("\\", "/"))
        return match.group(1) if match else None
    return None


def _unavailable(model: str, source: str, exc: Exception) -> ModelUnavailable:
    if Path(source).exists():
        return ModelUnavailable(f"Cannot load model '{model}' from {source}: {exc}")
    return ModelUnavailable(
        f"Model '{model}' ({source}) is not in the local Hugging Face cache and could not be "
        f"downloaded; fetch it once on a connected machine with `hf download {source}`, "
        "or set `model:` to a local diffusers folder or .safetensors file."
    )


def place_pipeline(pipe: Any, device: str, offload: Offload) -> None:
    """Put a diffusers pipeline on `device`, or arm CPU offload; silence its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def load_pipeline(
    model: str,
    configs: Configs | None = None,
    base_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    vae_slicing: bool = False,
    vae_tiling: bool = False,
) -> LoadedModel:
    """Load an SDXL pipeline for `model` and place it on `device` with the memory options."""
    from diffusers import StableDiffusionXLPipeline

    configs = configs or Configs()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    preset = configs.presets.get(model)
    source = preset.source if preset else model
    revision = None
    tiny = source == "tiny"

    try:
        if tiny:
            from .tiny import build_tiny_sdxl_pipeline

            pipe = build_tiny_sdxl_pipeline(torch_dtype)
        elif preset is None and (local := local_model_path(model, base_dir or Path.cwd())):
            path = local.resolve()
            source = str(path)
            if path.is_file():
                pipe = StableDiffusionXLPipeline.from_single_file(str(path), dtype=torch_dtype)
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(
                    str(path), dtype=torch_dtype, local_files_only=True
                )
        else:
            variant = preset.variant if preset and torch_dtype == torch.float16 else None
            pipe = StableDiffusionXLPipeline.from_pretrained(
                source, dtype=torch_dtype, variant=variant
            )
            revision = _hub_revision(source)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _unavailable(model, source, exc) from exc

    place_pipeline(pipe, device, offload)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    return LoadedModel(
        pipe=pipe,
        model_id=source,
        revision=revision,
        preset=preset.name if preset else None,
        tiny=tiny,
        long_side=preset.long_side if preset else None,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
    )


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for the named one, keeping the model's noise schedule."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.cls)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **dict(spec.kwargs))
