"""Loading SDXL pipelines: preset, hub id, local diffusers folder or single checkpoint file."""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from .config import SCHEDULERS, Configs
from .errors import InvalidInput, RuntimeProblem
from .story import local_model_path, weights_identity

log = logging.getLogger(__name__)

Offload = Literal["none", "model", "sequential"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InvalidOption(InvalidInput):
    """An option this machine or model cannot honour (e.g. --device cuda without a GPU)."""


class ModelUnavailable(RuntimeProblem):
    """The model's weights cannot be loaded (not cached offline, missing file, bad checkpoint)."""


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
    pipe: Any  # diffusers.StableDiffusionXLPipeline


def clip_image_processor_class() -> Any:
    """CLIP's image processor, the PIL backend where transformers has it: the same numbers with
    or without torchvision (which has no CPU build on the project's machines), so embeddings and
    caches mean the same everywhere."""
    import transformers

    # Not getattr's default: touching CLIPImageProcessor without torchvision logs a warning.
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    return pil if pil is not None else transformers.CLIPImageProcessor


def resolve_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidOption(
                f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto"
            )
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        if device.startswith("cuda") and index >= torch.cuda.device_count():
            raise InvalidOption(
                f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
        if device == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise InvalidOption("--device mps: Apple's MPS backend is not available here")
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
        raise InvalidOption(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------ hub cache first, then hub
#
# Every hub load here first tries the cache alone (`local_files_only=True`): no network, so no
# "Could not reach the Hub ... Using cached commit hash" warnings offline. Only when the cache
# cannot serve it, offline mode is off and one quick request shows the hub answering, is it
# loaded again online: for a file that is not cached, huggingface_hub retries an unanswered
# request five times with backoff, ~25 s of duplicated warnings before the same failure.

T = TypeVar("T")

# The single-file configs: what diffusers' `_download_diffusers_model_config_from_hub` fetches
# (diffusers/loaders/single_file.py). `hf download --include` patterns match across `/`.
SINGLE_FILE_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]
SINGLE_FILE_CONFIG_FETCH = '--include "*.json" "*.txt"'


def load_errors() -> tuple[type[BaseException], ...]:
    """What a load raises for weights that are missing, partial or unreadable (OSError covers
    huggingface_hub's LocalEntryNotFoundError, IncompleteSnapshotError and HTTP errors)."""
    from huggingface_hub import errors

    found: tuple[type[BaseException], ...] = (
        OSError,
        ValueError,
        RuntimeError,
        errors.EntryNotFoundError,
        errors.RevisionResolutionError,
        errors.CachedRepoTreeNotFoundError,
    )
    # A checkpoint file without one of the pipeline's models (only diffusers loads those).
    single_file = sys.modules.get("diffusers.loaders.single_file_utils")
    return found + ((single_file.SingleFileComponentError,) if single_file else ())


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode (HF_HUB_OFFLINE) is on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s cached snapshot (the commit refs/main names), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        commit = (storage / "refs" / "main").read_text().strip()
    except OSError:
        return None
    folder = storage / "snapshots" / commit
    return folder if commit and folder.is_dir() else None


def hub_revision(repo_id: str, filename: str = "model_index.json") -> str | None:
    """The commit of the cached snapshot of a hub repo, found through `filename` (a file the
    repo is known to have, e.g. `config.json`, `models/image_encoder/config.json`); None when
    that file is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    if isinstance(found, str):
        match = re.search(r"snapshots/([0-9a-f]{40})/", found.replace("\\", "/"))
        return match.group(1) if match else None
    return None


def hub_unreachable(repo_id: str) -> str | None:
    """Why the hub cannot serve `repo_id` now, in words, or None when it answers.

    One request without retries, so an unreachable hub costs no more than the connect attempt.
    """
    if hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo_id, timeout=10)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403, 404):
            return (
                f"the Hugging Face Hub has no repository '{repo_id}' this machine may read (a "
                "typo, or a private or gated one: log in with `hf auth login`)"
            )
        if status is not None and status < 500:
            return None  # it answered: the load reports what else is wrong
        return f"the Hugging Face Hub is not answering (HTTP {status})"
    except Exception:  # connection refused, DNS failure, timeout, proxy: nothing to retry
        return "the Hugging Face Hub cannot be reached"
    return None


def short_reason(exc: BaseException, folder: Path | None = None) -> str:
    """A library error as one short clause: its first sentence, on one line, paths inside the
    snapshot `folder` made relative (they name the hub cache's hashed folders)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if folder is not None:
        text = text.replace(f"{folder}/", "").replace(str(folder), ".")
    if match := re.search(r"is incomplete: (.+?)\. ", text):  # IncompleteSnapshotError
        return f"the snapshot is incomplete: {match.group(1)}"
    text = re.split(r"(?<=[a-z0-9)\]'\"])[.:;] (?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
    return text if len(text) <= 240 else text[:239].rstrip() + "…"


@dataclass(frozen=True)
class HubWeights:
    """One component's hub weights and how to talk about them when they cannot be loaded."""

    what: str  # "Model 'sdxl' (stabilityai/...)", "The VAE 'madebyollin/...'": sentence start
    repo: str  # hub id
    fetch: str  # what follows `hf download` to get them
    instead: str = ""  # the alternative, e.g. ", or pass --model with a local VAE folder"
    plural: bool = False  # `what` names several files ("are not in the cache")

    def unavailable(self, exc: BaseException | None, why: str | None) -> ModelUnavailable:
        """One sentence: what is missing, why it could not be fetched, the command that fixes it.

        `why` None: the hub answered and the download or load itself failed."""
        fetch = f"`hf download {self.fetch}`"
        is_, it = ("are", "them") if self.plural else ("is", "it")
        snapshot = cached_snapshot(self.repo)
        reason = short_reason(exc, snapshot) if exc is not None else ""
        if why is None:
            return ModelUnavailable(
                f"{self.what} could not be loaded ({reason}); fetch {it} with {fetch}{self.instead}"
            )
        if snapshot is None:
            return ModelUnavailable(
                f"{self.what} {is_} not in the local Hugging Face cache and {why}; fetch {it} "
                f"once on a connected machine with {fetch}{self.instead}"
            )
        # Something of the repo is cached: say what the library found wrong with it.
        return ModelUnavailable(
            f"{self.what} {is_} in the local Hugging Face cache but cannot be loaded from there "
            f"({reason}) and {why}; complete the download on a connected machine with "
            f"{fetch}{self.instead}"
        )


def from_hub(load: Callable[[bool], T], weights: HubWeights) -> T:
    """`load(local_files_only)` from the cache; again online only if that fails and the hub
    answers. Failures become one `ModelUnavailable` sentence."""
    errors = load_errors()
    with quiet_loading():
        try:
            return load(True)
        except errors as exc:
            local_error: BaseException = exc
        why = hub_unreachable(weights.repo)
        if why is not None:
            raise weights.unavailable(local_error, why) from local_error
        try:
            return load(False)
        except errors as exc:
            raise weights.unavailable(exc, None) from exc


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading pipeline components" / "Loading weights" bars from diffusers and transformers
    while loading (the commands show their own progress). Download bars are left alone."""
    # Only libraries already imported: the encoder's loads need no diffusers import for this.
    modules = [sys.modules.get(f"{lib}.utils.logging") for lib in ("diffusers", "transformers")]
    saved = [(m, m._tqdm_active) for m in modules if m is not None and hasattr(m, "_tqdm_active")]
    for module, _ in saved:
        module._tqdm_active = False

    def drop_safetensors_fallback(record: logging.LogRecord) -> bool:
        # diffusers logs an ERROR when a folder has no safetensors weights, then tries .bin
        # ones: noise when those load, a second message next to ours when they are missing too.
        return not record.getMessage().startswith("An error occurred while trying to fetch")

    modeling = logging.getLogger("diffusers.models.modeling_utils")
    modeling.addFilter(drop_safetensors_fallback)  # one per call: nested uses stay right
    try:
        yield
    finally:
        modeling.removeFilter(drop_safetensors_fallback)
        for module, value in saved:
            module._tqdm_active = value


def weights_variant(folder: Path, preferred: str | None = None) -> str | None:
    """The `variant` to load a diffusers folder (a pipeline's, or one model's such as a VAE)
    with: `preferred` when its files are there; None when every component has plain weights;
    else the one variant all of them have. `save_pretrained(variant="fp16")` leaves only
    `*.fp16.safetensors` files, which diffusers finds only when told the variant."""
    pattern = re.compile(
        r"(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>\w+))?"
        r"(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    )
    found: list[set[str | None]] = []
    subs = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    for sub in subs:
        kinds = {m["variant"] for f in sub.iterdir() if (m := pattern.fullmatch(f.name))}
        if kinds:
            found.append(kinds)
    if preferred is not None and any(preferred in kinds for kinds in found):
        return preferred
    if all(None in kinds for kinds in found):
        return None
    common = set.intersection(*found) - {None}
    return common.pop() if len(common) == 1 else None


def _single_file_config_repo(path: Path) -> str:
    """The hub repo whose configs diffusers builds the pipeline from for checkpoint `path`: the
    one it infers from the checkpoint's keys (SDXL base for SDXL fine-tunes)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    default = "stabilityai/stable-diffusion-xl-base-1.0"
    if path.suffix.lower() != ".safetensors":
        return default  # a pickled .ckpt cannot be inspected without loading it all
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())

        class _Lazy(Mapping[str, Any]):  # the keys at once, a tensor only when looked at
            def __contains__(self, key: object) -> bool:
                return key in keys

            def __getitem__(self, key: str) -> Any:
                if key not in keys:
                    raise KeyError(key)
                return f.get_tensor(key)

            def __iter__(self) -> Iterator[str]:
                return iter(keys)

            def __len__(self) -> int:
                return len(keys)

        try:
            return str(fetch_diffusers_config(_Lazy())["pretrained_model_name_or_path"])
        except Exception:  # an unrecognised layout: diffusers will say what is wrong with it
            return default


def _load_single_file(path: Path, torch_dtype: torch.dtype) -> Any:
    """An SDXL pipeline from one checkpoint file, with the configs of the repo diffusers infers,
    taken from the cache (or fetched, when the hub answers)."""
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import snapshot_download

    repo = _single_file_config_repo(path)
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


def _unavailable(model: str, source: str, exc: BaseException) -> ModelUnavailable:
    """A local folder or checkpoint file that diffusers cannot load, with the library's reason."""
    return ModelUnavailable(f"Cannot load model '{model}' from {source}: {short_reason(exc)}")


SEQUENTIAL_ON_CPU = (
    "--offload sequential needs a CUDA device; on CPU the weights are already in host memory"
)


def check_offload(offload: str, device: str) -> None:
    """Refuse an offload mode that cannot work on `device`, before any weights are loaded."""
    # Sequential offload parks every weight on the meta device and copies it to the execution
    # device around each forward; accelerate cannot do that with the CPU as execution device
    # (a TypeError from inside it), and it would save nothing there. Model offload works on the
    # CPU (each model is moved to where it already is), so it is left alone.
    if offload == "sequential" and torch.device(device).type == "cpu":
        raise InvalidOption(SEQUENTIAL_ON_CPU)


def place_pipeline(pipe: Any, device: str, offload: Offload) -> None:
    """Put a diffusers pipeline on `device`, or arm CPU offload; silence its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


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
    torch_dtype = resolve_dtype(dtype, device)
    preset = configs.presets.get(model)
    source = preset.source if preset else model
    revision = None
    if preset is None and (local := local_model_path(model, base_dir)):
        source = str(local.resolve())
    elif source != "tiny":
        revision = hub_revision(source)
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
        tiny=source == "tiny",
        long_side=preset.long_side if preset else None,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        vae=vae,
        vae_revision=vae_revision,
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
    """Load an SDXL pipeline for `model` (with `vae` replacing its VAE, see `resolve_model`)
    and place it on `device` with the memory options."""
    from diffusers import StableDiffusionXLPipeline

    configs = configs or Configs()

    def resolved() -> ModelInfo:
        return resolve_model(model, configs, base_dir, device, dtype, offload, vae)

    info = resolved()
    torch_dtype = DTYPES[info.dtype]
    preset = configs.presets.get(model)
    source = info.model_id

    try:
        if info.tiny:
            from .tiny import build_tiny_sdxl_pipeline

            pipe = build_tiny_sdxl_pipeline(torch_dtype)
        elif Path(source).is_absolute():
            path = Path(source)
            if path.is_file():
                pipe = _load_single_file(path, torch_dtype)
            else:
                variant = weights_variant(path, "fp16" if torch_dtype == torch.float16 else None)
                with quiet_loading():
                    pipe = StableDiffusionXLPipeline.from_pretrained(
                        str(path), dtype=torch_dtype, variant=variant, local_files_only=True
                    )
        else:
            preferred = preset.variant if preset and torch_dtype == torch.float16 else None

            def load(local_only: bool) -> Any:
                # A cached snapshot may hold only the fp16 files (`--include "*.fp16.*"`).
                snapshot = cached_snapshot(source) if local_only else None
                variant = weights_variant(snapshot, preferred) if snapshot else preferred
                return StableDiffusionXLPipeline.from_pretrained(
                    source, dtype=torch_dtype, variant=variant, local_files_only=local_only
                )

            what = f"Model '{model}'" + (f" ({source})" if source != model else "")
            instead = ", or set `model:` to a local diffusers folder or .safetensors file"
            pipe = from_hub(load, HubWeights(what, source, source, instead))
    except ModelUnavailable:
        raise
    except load_errors() as exc:
        raise _unavailable(model, source, exc) from exc
    if info.vae is not None:
        pipe.vae = load_vae(info.vae, pipe, torch_dtype)

    place_pipeline(pipe, info.device, offload)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    # Resolved again: a download during the load has put a snapshot (its revision) in the cache.
    return LoadedModel(pipe=pipe, **vars(resolved()))


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for the named one, keeping the model's noise schedule."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.cls)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **dict(spec.kwargs))
