"""Loading one video-model component (a pipeline, motion adapter, ControlNet, adapter weights,
an image encoder) the way every decoder does: a local folder as it is, a hub id from the cache
first, and any failure as one `ModelUnavailable` sentence naming the component."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from storycli.motion.presets import ComponentRef
from storycli.story.checks import local_model_path
from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    cached_snapshot,
    from_hub,
    hub_revision,
    load_errors,
    quiet_loading,
    short_reason,
    weights_variant,
)
from storycli.weights.image_encoder import ENCODERS, ImageEncoder, load_image_encoder

LOCAL_HINT = ", or point the video preset at a local folder"


def check_local(label: str, source: str) -> None:
    """Fail fast, before loading gigabytes, when a component names a folder that is not there."""
    local = local_model_path(source, Path.cwd())
    if local is not None and not local.exists():
        raise ModelUnavailable(
            f"The {label} folder '{source}' does not exist (looked at {local}); download it "
            f"there with `hf download <hub id> --local-dir {local}` or fix the path."
        )


def load_component(
    label: str,
    source: str,
    load: Callable[[str, bool], Any],
    fetch: str | None = None,
    shown: str | None = None,
) -> Any:
    """`load(folder or hub id, local_files_only)`: a local folder as it is, a hub id from the
    cache first (see `models.from_hub`); any failure becomes one `ModelUnavailable` sentence."""
    local = local_model_path(source, Path.cwd())
    if local is not None:
        try:
            with quiet_loading():
                return load(str(local), True)
        except load_errors() as exc:
            raise ModelUnavailable(
                f"Cannot load the {label} from {local.resolve()}: {short_reason(exc)}"
            ) from exc
    weights = HubWeights(f"The {label} '{shown or source}'", source, fetch or source, LOCAL_HINT)
    return from_hub(lambda local_only: load(source, local_only), weights)


def pipeline_variant(src: str, local_only: bool, preferred: str | None) -> str | None:
    """The `variant=` to load pipeline folder or hub id `src` with: what is on disk decides (an
    fp16-only download runs in float32 too); before a download, `preferred` (the preset's
    variant when running in half precision)."""
    folder = Path(src) if Path(src).is_dir() else cached_snapshot(src) if local_only else None
    return weights_variant(folder, preferred) if folder is not None else preferred


def load_encoder_ref(ref: ComponentRef, device: str, dtype: torch.dtype) -> ImageEncoder:
    """A preset's CLIP image tower through `load_image_encoder` (same names, same caches)."""
    for name, (repo, subfolder) in ENCODERS.items():
        if (repo, subfolder or None) == (ref.repo, ref.subfolder or None):
            return load_image_encoder(name, device, dtype)
    local = local_model_path(ref.repo, Path.cwd())
    if local is not None:
        return load_image_encoder(str(local / (ref.subfolder or "")), device, dtype)
    if not ref.subfolder:
        return load_image_encoder(ref.repo, device, dtype)
    # A hub repo + subfolder that encoder.py has no name for: fetch that folder, load it as a
    # local one, and record the hub location (not the snapshot path) as the encoder's name.
    from huggingface_hub import snapshot_download

    fetch = f'{ref.repo} --include "{ref.subfolder}/*"'
    folder = load_component(
        "image encoder",
        ref.repo,
        lambda src, local_only: snapshot_download(
            src, allow_patterns=[f"{ref.subfolder}/*"], local_files_only=local_only
        ),
        fetch,
    )
    encoder = load_image_encoder(str(Path(folder) / ref.subfolder), device, dtype)
    encoder.name = ref.where
    encoder.revision = hub_revision(ref.repo, f"{ref.subfolder}/config.json")
    return encoder
