"""CLIP image encoders: the embedding space the motion predictor works in.

The default is the OpenCLIP ViT-H/14 image tower (1024-d projected `image_embeds`) that SD1.5
IP-Adapter and Stable Video Diffusion ship, so predicted embeddings can be fed to those decoders
as they are. `tiny` is a small random CLIP vision model built offline, for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.story.checks import is_model_path
from storycli.weights.devices import resolve_device
from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    clip_image_processor_class,
    from_hub,
    hub_revision,
    hub_unreachable,
    quiet_loading,
    short_reason,
)
from storycli.weights.tiny import TINY_SEED

# name -> (hub id, subfolder). IP-Adapter's image encoder is the laion2B ViT-H/14 tower.
ENCODERS: dict[str, tuple[str, str | None]] = {
    "openclip-vit-h": ("h94/IP-Adapter", "models/image_encoder"),
}
DEFAULT_ENCODER = "openclip-vit-h"
TINY_IMAGE_SIZE = 32


@dataclass
class ImageEncoder:
    """A CLIP vision tower with projection, its preprocessing, and a stable identity."""

    model: Any  # transformers.CLIPVisionModelWithProjection
    processor: Any  # transformers.CLIPImageProcessor
    name: str  # preset name, hub id or absolute path: recorded in caches and checkpoints
    device: str
    dtype: torch.dtype
    revision: str | None = None  # commit of the cached hub snapshot it was loaded from

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def preprocess_id(self) -> str:
        """A short hash of the preprocessing settings: caches built with other ones are stale."""
        settings = self.processor.to_dict()
        for key in ("processor_class", "image_processor_type"):
            settings.pop(key, None)
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Projected image embeddings, (len(images), dim) float32 on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.dtype)
            out.append(self.model(pixel_values=pixels).image_embeds.float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)


def build_tiny_image_encoder() -> tuple[Any, Any]:
    """A small random CLIP vision tower (32-d embeddings) and its processor, deterministic."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        model = CLIPVisionModelWithProjection(config).eval()
    processor = clip_image_processor_class()(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return model, processor


def load_image_encoder(
    name: str = DEFAULT_ENCODER, device: str = "auto", dtype: torch.dtype | None = None
) -> ImageEncoder:
    """Load an encoder by preset name, hub id or local folder; `tiny` builds a random one.

    Raises `ModelUnavailable` (one sentence, with the fix) when the weights are not on disk.
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if name == "tiny":
        model, processor = build_tiny_image_encoder()
        return ImageEncoder(model.to(device, dtype), processor, "tiny", device, dtype)

    from transformers import CLIPVisionModelWithProjection

    source, subfolder = ENCODERS.get(name, (name, None))
    local = Path(source).expanduser()
    label = str(local.resolve()) if local.exists() else (name if name in ENCODERS else source)
    where = f"{source}/{subfolder}" if subfolder else source

    def load(cls: Any, local_only: bool, **kwargs: Any) -> Any:
        return cls.from_pretrained(
            str(local) if local.exists() else source,
            subfolder=subfolder or "",
            local_files_only=local_only,
            **kwargs,
        )

    revision = None
    if local.exists():
        try:
            with quiet_loading():
                model = load(CLIPVisionModelWithProjection, True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"image encoder {name!r}: cannot load {local}: {short_reason(exc)}; fix the "
                "folder or pass --encoder with another one"
            ) from exc
    elif is_model_path(source):  # a path that is not there: not a hub id to look up
        raise ModelUnavailable(f"image encoder {name!r}: the folder {local} does not exist")
    else:
        fetch = f'{source} --include "{subfolder}/*"' if subfolder else source
        what = f"The image encoder '{name}'" + (f" ({where})" if name != where else "")
        weights = HubWeights(
            what,
            source,
            fetch,
            ", or pass --encoder with a local folder",
        )
        model = from_hub(
            lambda local_only: load(CLIPVisionModelWithProjection, local_only, dtype=dtype),
            weights,
        )
        revision = hub_revision(source, f"{subfolder}/config.json" if subfolder else "config.json")
    # IP-Adapter's image encoder folder carries no preprocessor config: it is used with
    # CLIPImageProcessor's defaults (short side 224, centre crop, OpenAI mean/std). The cache
    # is asked first; the hub only when it answers (one quick probe: no retries on a miss).
    processor = None
    with contextlib.suppress(OSError, ValueError):
        processor = load(clip_image_processor_class(), True)
    if processor is None and not local.exists() and hub_unreachable(source) is None:
        with contextlib.suppress(OSError, ValueError):
            processor = load(clip_image_processor_class(), False)
    if processor is None:
        processor = clip_image_processor_class()()
    return ImageEncoder(model.to(device).eval(), processor, label, device, dtype, revision)
