"""A CLIP model for scoring: text and image towers with their projections, the tokenizer and the
image preprocessing, loaded by hub id or local folder, or built tiny and random for tests.

Embeddings are the projected features (`text_projection(pooled text)`, `visual_projection(pooled
image)`) computed through the towers directly, so they mean the same under transformers 4 and 5
(whose `get_*_features` changed return type). They come back unnormalised, float32, on the CPU;
`metrics` normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.evaluate import DEFAULT_CLIP
from storycli.story.checks import is_model_path
from storycli.weights.devices import resolve_device
from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    clip_image_processor_class,
    from_hub,
    hub_revision,
    load_errors,
    quiet_loading,
    short_reason,
)
from storycli.weights.tiny import TINY_SEED, build_tokenizer

TINY = "tiny"
TINY_IMAGE_SIZE = 32
# CLIP's text encoder reads 77 positions; longer prompts are cut, as every CLIPScore does.
MAX_TEXT_TOKENS = 77


@dataclass
class ClipModel:
    """A loaded CLIP model and how to talk about it in evaluation.json."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any  # a CLIP tokenizer
    processor: Any  # CLIPImageProcessor(Pil)
    name: str  # `tiny`, a hub id or an absolute folder
    device: str
    dtype: torch.dtype
    revision: str | None = None  # hub commit of the cached snapshot, when known

    @property
    def tiny(self) -> bool:
        return self.name == TINY

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "revision": self.revision,
            "tiny_random_model": self.tiny,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Projected image embeddings, (len(images), dim), float32 on the CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.projection_dim))
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Projected text embeddings, (len(texts), dim), float32 on the CPU; texts longer than
        CLIP's 77 tokens are cut there."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=MAX_TEXT_TOKENS,
                return_tensors="pt",
            )
            pooled = self.model.text_model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.projection_dim))
        return torch.cat(out)


def build_tiny_clip() -> tuple[Any, Any, Any]:
    """A small random CLIPModel (32-d), the offline tiny tokenizer and a 32 px processor.

    Weights are drawn inside a forked RNG from a fixed seed, so two builds are identical and the
    caller's random state is untouched."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TEXT_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 2)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = clip_image_processor_class()(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return model.eval(), tokenizer, processor


def load_clip(
    name: str = DEFAULT_CLIP, device: str = "auto", dtype: torch.dtype | None = None
) -> ClipModel:
    """Load a CLIP model by hub id or local folder (`tiny`: random, offline).

    Raises `ModelUnavailable` (one sentence with the fix) when the weights are not on disk and
    cannot be fetched, or a folder does not hold a CLIP model."""
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if name == TINY:
        model, tokenizer, processor = build_tiny_clip()
        return ClipModel(model.to(device, dtype), tokenizer, processor, TINY, device, dtype)

    from transformers import CLIPModel, CLIPTokenizer

    local = Path(name).expanduser()

    def load(source: str, local_only: bool) -> tuple[Any, Any, Any]:
        model = CLIPModel.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
        processor = clip_image_processor_class().from_pretrained(
            source, local_files_only=local_only
        )
        return model, tokenizer, processor

    revision = None
    if local.exists():
        label = str(local.resolve())
        try:
            with quiet_loading():
                model, tokenizer, processor = load(label, True)
        except load_errors() as exc:
            raise ModelUnavailable(
                f"--clip {name}: cannot load a CLIP model from {label} ({short_reason(exc)}); "
                "it needs a CLIPModel with its tokenizer and preprocessor_config.json, as "
                f"`hf download {DEFAULT_CLIP}` gives"
            ) from exc
    elif is_model_path(name):  # a path that is not there: not a hub id to look up
        raise ModelUnavailable(f"--clip {name}: the folder {local} does not exist")
    else:
        label = name
        weights = HubWeights(
            f"The CLIP model '{name}'", name, name, ", or pass --clip with a local folder"
        )
        model, tokenizer, processor = from_hub(lambda local_only: load(name, local_only), weights)
        revision = hub_revision(name, "config.json")
    return ClipModel(model.to(device).eval(), tokenizer, processor, label, device, dtype, revision)
