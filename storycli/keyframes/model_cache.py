"""One loaded pipeline kept across the stories of a batch. Torch-free to import, so a dry run
stays instant."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storycli.config import Configs
from storycli.story.checks import weights_identity

if TYPE_CHECKING:
    from storycli.keyframes.models import LoadedModel


def model_identity(model: str, configs: Configs, base_dir: Path | None = None) -> str:
    """What a story's `model:` value loads, whatever it is called: a preset's name, a local
    file or folder's resolved path, or a hub id."""
    if model in configs.presets:
        return f"preset:{model}"
    return weights_identity(model, base_dir or Path.cwd())


@dataclass
class ModelCache:
    """The pipeline of the last story, kept for the next one that uses the same model on the
    same device with the same memory options: a batch loads SDXL once, not once per story. It
    holds one pipeline at a time (a change of model frees the old one first), and the story
    loop restores everything it changes on it (scheduler, attention processors, FreeU)."""

    loads: int = 0  # pipelines loaded so far
    _key: tuple[Any, ...] | None = None
    _loaded: LoadedModel | None = None

    def load(
        self,
        model: str,
        configs: Configs,
        base_dir: Path | None = None,
        **options: Any,
    ) -> tuple[LoadedModel, bool]:
        """(the loaded model, whether it was reused); `options` as for `load_pipeline`."""
        vae = options.get("vae")  # a path relative to the story: keyed by what it names
        key = (
            model_identity(model, configs, base_dir),
            vae and weights_identity(vae, base_dir or Path.cwd()),
            *sorted((name, value) for name, value in options.items() if name != "vae"),
        )
        if key == self._key and self._loaded is not None:
            return self._loaded, True
        self.clear()
        from storycli.keyframes.models import load_pipeline

        loaded = load_pipeline(model, configs, base_dir=base_dir, **options)
        self._key, self._loaded = key, loaded
        self.loads += 1
        return loaded, False

    def clear(self) -> None:
        if self._loaded is None:
            return
        device = self._loaded.device
        self._key = self._loaded = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
