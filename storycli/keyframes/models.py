"""Loading stage one's pipeline: preset, hub id, local diffusers folder or single checkpoint file,
with an optional separate VAE, and the scheduler a story names.

Two model families: SDXL (`StableDiffusionXLPipeline`) and FLUX.1 (`FluxPipeline`), told apart
by the `model_index.json` a folder or cached snapshot has (`model_family`), before loading.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storycli.config import SCHEDULERS, Configs
from storycli.keyframes.flux_files import (
    flux_config_repo,
    is_flux_transformer_file,
    load_flux_transformer_file,
)
from storycli.story.checks import local_model_path, weights_identity
from storycli.story.family import PIPELINE_FAMILIES, TINY_SOURCES, folder_family, index_family
from storycli.weights.devices import (
    DTYPES,
    Offload,
    check_offload,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)
from storycli.weights.hub import (
    SINGLE_FILE_CONFIG_FETCH,
    SINGLE_FILE_CONFIG_PATTERNS,
    HubWeights,
    ModelUnavailable,
    cached_snapshot,
    from_hub,
    hub_revision,
    load_errors,
    quiet_loading,
    short_reason,
    single_file_config_repo,
    unavailable,
    weights_variant,
)


@dataclass
class ModelInfo:
    """What a `model:` value resolves to, known without loading it (`resolve_model`): what
    frame keys and the manifest record."""

    model_id: str  # preset source, hub id or absolute path
    revision: str | None  # hub commit of the cached snapshot, when known
    preset: str | None
    tiny: bool
    long_side: int | None  # render size cap (tiny preset)
    device: str
    dtype: str
    vae: str | None = None  # the VAE replacing the model's own: hub id or absolute path
    vae_revision: str | None = None
    # "sdxl" or "flux" (None: a hub id not cached yet, known once loaded). Not in `describe`:
    # the model's id already tells frames of different families apart.
    family: str | None = "sdxl"

    @property
    def label(self) -> str:
        return "tiny random model" if self.tiny else self.model_id

    def describe(self) -> dict[str, Any]:
        out = {
            "id": self.model_id,
            "revision": self.revision,
            "preset": self.preset,
            "tiny_random_model": self.tiny,
            "device": self.device,
            "dtype": self.dtype,
        }
        if self.vae is not None:  # only then: frames made with the model's own VAE keep keys
            out |= {"vae": self.vae, "vae_revision": self.vae_revision}
        return out


@dataclass(kw_only=True)
class LoadedModel(ModelInfo):
    pipe: Any  # diffusers.StableDiffusionXLPipeline or FluxPipeline


def model_family(source: str) -> str | None:
    """ "sdxl" or "flux" for a resolved source (tiny preset, absolute path or hub id), without
    loading it; None for a hub id whose snapshot is not cached (the load finds out). Folders,
    snapshots and tiny models as the story's checks see them (`story.family.folder_family`)."""
    path = Path(source)
    if path.is_absolute() and not path.is_dir():
        # One file: a FLUX.1 transformer (.safetensors or .gguf, told by its header) or SDXL.
        return "flux" if is_flux_transformer_file(path) else "sdxl"
    return folder_family(source)


def pipeline_class(family: str | None) -> Any:
    """The diffusers pipeline class a family loads with."""
    import diffusers

    return diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusionXLPipeline


def _load_single_file(path: Path, torch_dtype: torch.dtype) -> Any:
    """An SDXL pipeline from one checkpoint file, with the configs of the repo diffusers infers,
    taken from the cache (or fetched, when the hub answers)."""
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import snapshot_download

    repo = single_file_config_repo(path)
    configs = HubWeights(
        f"The config files of {repo} that checkpoint {path.name} is built with",
        repo,
        f"{repo} {SINGLE_FILE_CONFIG_FETCH}",
        plural=True,
    )
    folder = from_hub(
        lambda local_only: snapshot_download(
            repo, allow_patterns=SINGLE_FILE_CONFIG_PATTERNS, local_files_only=local_only
        ),
        configs,
    )
    with quiet_loading():
        return StableDiffusionXLPipeline.from_single_file(
            str(path), config=folder, dtype=torch_dtype, local_files_only=True
        )


#: What a FLUX.1 transformer file needs of its config repo: all but the transformer's weights
#: (the file has them) and the repo's own single files (BFL's transformer and autoencoder).
FLUX_FILE_IGNORE = ["transformer/*.safetensors", "flux1-*.safetensors", "ae.safetensors"]


def _load_flux_file(path: Path, torch_dtype: torch.dtype) -> Any:
    """A FLUX.1 pipeline whose transformer is one .safetensors/.gguf file; its VAE, text
    encoders, tokenizers, scheduler and transformer config from the hub repo `flux_config_repo`
    names (dev's or schnell's), cache first."""
    from diffusers import FluxPipeline
    from huggingface_hub import snapshot_download

    repo = flux_config_repo(path)
    excluded = " ".join(f'"{p}"' for p in FLUX_FILE_IGNORE)
    rest = HubWeights(
        f"The rest of the FLUX.1 pipeline ({repo}) that transformer file {path.name} runs in",
        repo,
        f"{repo} --exclude {excluded}",
        plural=True,
    )
    folder = Path(
        from_hub(
            lambda local_only: snapshot_download(
                repo, ignore_patterns=FLUX_FILE_IGNORE, local_files_only=local_only
            ),
            rest,
        )
    )
    transformer = load_flux_transformer_file(path, torch_dtype, folder)
    try:
        with quiet_loading():
            # Passed in, the transformer is neither read from the folder nor cast: diffusers
            # refuses to cast a GGUF-quantized model, whose compute dtype is set already.
            return FluxPipeline.from_pretrained(
                str(folder), transformer=transformer, dtype=torch_dtype, local_files_only=True
            )
    except load_errors() as exc:
        raise rest.unavailable(exc, None) from exc


def resolve_model(
    model: str,
    configs: Configs | None = None,
    base_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    vae: str | None = None,
) -> ModelInfo:
    """What `load_pipeline` with these arguments gives, without loading anything: the source,
    the cached snapshot's commit, device and dtype (refusing ones this machine cannot honour),
    the VAE (`vae`, else the preset's). `LoadedModel.describe()` is this one's."""
    configs = configs or Configs()
    base_dir = base_dir or Path.cwd()
    device = resolve_device(device)
    check_offload(offload, device)
    preset = configs.presets.get(model)
    source = preset.source if preset else model
    revision = None
    if preset is None and (local := local_model_path(model, base_dir)):
        source = str(local.resolve())
    elif source not in TINY_SOURCES:
        revision = hub_revision(source)
    # A preset's `family:` first, as the story's checks did (`story.family.story_family`).
    family = preset.family if preset and preset.family else model_family(source)
    torch_dtype = resolve_dtype(dtype, device)
    if dtype == "auto" and family == "flux" and torch_dtype == torch.float16:
        torch_dtype = torch.bfloat16  # FLUX.1 is trained in bfloat16; float16 overflows
    if vae is None and preset is not None and preset.vae is not None:
        vae, base_dir = preset.vae, configs.root  # a preset's path: relative to its file
    vae_revision = None
    if vae is not None:
        vae = weights_identity(vae, base_dir)
        if not Path(vae).is_absolute():
            vae_revision = hub_revision(vae, "config.json")
    return ModelInfo(
        model_id=source,
        revision=revision,
        preset=preset.name if preset else None,
        tiny=source in TINY_SOURCES,
        long_side=preset.long_side if preset else None,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        vae=vae,
        vae_revision=vae_revision,
        family=family,
    )


def load_vae(vae: str, pipe: Any, torch_dtype: torch.dtype) -> Any:
    """The AutoencoderKL of a `vae:` value as `resolve_model` resolved it: a hub id (cache
    first), a diffusers VAE folder, or one .safetensors file, built with the model's own VAE
    config (a file has none: that config's `force_upcast` then decides the upcast)."""
    from diffusers import AutoencoderKL

    preferred = "fp16" if torch_dtype == torch.float16 else None
    path = Path(vae)
    if not path.is_absolute():

        def load(local_only: bool) -> Any:
            snapshot = cached_snapshot(vae) if local_only else None
            variant = weights_variant(snapshot, preferred) if snapshot else None
            return AutoencoderKL.from_pretrained(
                vae, dtype=torch_dtype, variant=variant, local_files_only=local_only
            )

        instead = ", or set `vae:` to a local VAE folder or .safetensors file"
        return from_hub(load, HubWeights(f"The VAE '{vae}'", vae, vae, instead))
    try:
        with quiet_loading():
            if path.is_dir():
                return AutoencoderKL.from_pretrained(
                    vae,
                    dtype=torch_dtype,
                    variant=weights_variant(path, preferred),
                    local_files_only=True,
                )
            with tempfile.TemporaryDirectory() as config:
                pipe.vae.save_config(config)
                return AutoencoderKL.from_single_file(
                    vae, config=config, dtype=torch_dtype, local_files_only=True
                )
    except load_errors() as exc:
        raise ModelUnavailable(f"Cannot load the VAE '{vae}': {short_reason(exc)}") from exc


def load_pipeline(
    model: str,
    configs: Configs | None = None,
    base_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: Offload = "none",
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    vae: str | None = None,
) -> LoadedModel:
    """Load the SDXL or FLUX.1 pipeline for `model` (with `vae` replacing its VAE, see
    `resolve_model`) and place it on `device` with the memory options."""
    configs = configs or Configs()

    def resolved() -> ModelInfo:
        return resolve_model(model, configs, base_dir, device, dtype, offload, vae)

    info = resolved()
    torch_dtype = DTYPES[info.dtype]
    preset = configs.presets.get(model)
    source = info.model_id

    try:
        if info.tiny and info.family == "flux":
            from storycli.weights.tiny_flux import build_tiny_flux_pipeline

            pipe = build_tiny_flux_pipeline(torch_dtype)
        elif info.tiny:
            from storycli.weights.tiny import build_tiny_sdxl_pipeline

            pipe = build_tiny_sdxl_pipeline(torch_dtype)
        elif Path(source).is_absolute():
            path = Path(source)
            if path.is_file() and info.family == "flux":
                pipe = _load_flux_file(path, torch_dtype)
            elif path.is_file():
                pipe = _load_single_file(path, torch_dtype)
            else:
                variant = weights_variant(path, "fp16" if torch_dtype == torch.float16 else None)
                cls = pipeline_class(info.family)  # imported before: `quiet_loading` sees it
                with quiet_loading():
                    pipe = cls.from_pretrained(
                        str(path), dtype=torch_dtype, variant=variant, local_files_only=True
                    )
        else:
            preferred = preset.variant if preset and torch_dtype == torch.float16 else None
            pipe = _load_from_hub(model, source, torch_dtype, preferred, dtype == "auto")
    except ModelUnavailable:
        raise
    except load_errors() as exc:
        raise unavailable(model, source, exc) from exc
    if info.vae is not None:
        pipe.vae = load_vae(info.vae, pipe, torch_dtype)

    place_pipeline(pipe, info.device, offload)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    # Resolved again: a download during the load has put a snapshot (its revision) in the cache.
    loaded = LoadedModel(pipe=pipe, **vars(resolved()))
    loaded.family = "flux" if type(pipe).__name__ in PIPELINE_FAMILIES else "sdxl"
    return loaded


def _load_from_hub(
    model: str, source: str, torch_dtype: torch.dtype, preferred: str | None, auto: bool
) -> Any:
    """A hub id's pipeline, cache first (`from_hub`), of the family its `model_index.json`
    names (fetched first when nothing is cached). `auto`: the dtype was not asked for, so a
    FLUX.1 found only now runs in bfloat16 (as `resolve_model` says once it is cached)."""
    import diffusers  # noqa: F401  (imported before `quiet_loading` looks for it)
    from huggingface_hub import hf_hub_download

    def load(local_only: bool) -> Any:
        # A cached snapshot may hold only the fp16 files (`--include "*.fp16.*"`).
        snapshot = cached_snapshot(source) if local_only else None
        variant = weights_variant(snapshot, preferred) if snapshot else preferred
        family = model_family(source)
        if family is None and not local_only:
            family = index_family(Path(hf_hub_download(source, "model_index.json")))
        wanted = torch_dtype
        if auto and family == "flux" and torch_dtype == torch.float16:
            wanted = torch.bfloat16
        return pipeline_class(family).from_pretrained(
            source, dtype=wanted, variant=variant, local_files_only=local_only
        )

    what = f"Model '{model}'" + (f" ({source})" if source != model else "")
    instead = ", or set `model:` to a local diffusers folder or .safetensors file"
    return from_hub(load, HubWeights(what, source, source, instead))


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for the named one, keeping the model's noise schedule."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.cls)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **dict(spec.kwargs))
