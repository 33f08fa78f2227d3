"""Loading one video-model component (a pipeline, motion adapter, ControlNet, adapter weights)
the way every decoder does: a local folder as it is, a hub id from the cache first, and any
failure as one `ModelUnavailable` sentence naming the component."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from storycli.story.checks import local_model_path
from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    from_hub,
    load_errors,
    quiet_loading,
    short_reason,
)

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
