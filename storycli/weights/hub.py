"""Fetching weights the way a user's machine does: Hugging Face cache first, hub ids, local folders,
fp16 variants, and one-line messages when weights are missing offline.

Shared by every model the tool loads (SDXL, its VAE, IP-Adapter, image encoders, video models).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from storycli.errors import RuntimeProblem
from storycli.story.family import cached_snapshot  # its home is the story's family lookup

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeProblem):
    """The model's weights cannot be loaded (not cached offline, missing file, bad checkpoint)."""


def clip_image_processor_class() -> Any:
    """CLIP's image processor, the PIL backend where transformers has it: the same numbers with
    or without torchvision (which has no CPU build on the project's machines), so embeddings and
    caches mean the same everywhere."""
    import transformers

    # Not getattr's default: touching CLIPImageProcessor without torchvision logs a warning.
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    return pil if pil is not None else transformers.CLIPImageProcessor


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


def single_file_config_repo(path: Path) -> str:
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


def unavailable(model: str, source: str, exc: BaseException) -> ModelUnavailable:
    """A local folder or checkpoint file that diffusers cannot load, with the library's reason."""
    return ModelUnavailable(f"Cannot load model '{model}' from {source}: {short_reason(exc)}")
