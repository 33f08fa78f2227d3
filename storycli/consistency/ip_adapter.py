"""Reference-photo identity through diffusers' IP-Adapter for SDXL (`ip_adapter:` in a story).

The adapter is loaded with the pipeline's own `load_ip_adapter` (a hub id such as
h94/IP-Adapter, or a local folder laid out like it) for the duration of one story and unloaded
after it, so a batch's cached pipeline is left as it was. `tiny` is a random adapter and image
encoder for the tiny test model, loaded through the same `load_ip_adapter`. The photo's image
embedding goes to every frame's UNet forward (`added_cond_kwargs["image_embeds"]`); CSA and
one-prompt work alongside (the adapter's processors are the cross-attention ones, CSA's the
self-attention ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..story import IPAdapter

# variant → (subfolder, weight file, image encoder folder) in the h94/IP-Adapter layout.
VARIANTS = {
    "plain": ("sdxl_models", "ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
    "plus": ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"),
    "plus-face": (
        "sdxl_models",
        "ip-adapter-plus-face_sdxl_vit-h.safetensors",
        "models/image_encoder",
    ),
}


def tiny_ip_adapter(unet: Any) -> tuple[Any, Any, dict[str, dict[str, torch.Tensor]]]:
    """A random plain adapter for the tiny UNet, deterministic: (the tiny CLIP vision tower,
    its processor, the adapter's state dict in the `ip-adapter_sdxl` layout)."""
    from ..motion.encoder import build_tiny_image_encoder
    from ..motion.tiny_video import ip_adapter_state_dict

    encoder, processor = build_tiny_image_encoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        state_dict = ip_adapter_state_dict(unet, encoder.config.projection_dim)
    return encoder, processor, state_dict


def save_tiny_ip_adapter(root: Path, unet: Any) -> Path:
    """The tiny adapter saved as h94/IP-Adapter lays out its plain SDXL adapter (for tests of
    the folder loader): sdxl_models/ip-adapter_sdxl.safetensors + sdxl_models/image_encoder/."""
    from safetensors.torch import save_file

    encoder, _, state_dict = tiny_ip_adapter(unet)
    subfolder, weight, encoder_folder = VARIANTS["plain"]
    (root / subfolder).mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{k}": v for part, tensors in state_dict.items() for k, v in tensors.items()}
    save_file(flat, root / subfolder / weight)
    encoder.save_pretrained(root / encoder_folder)
    return root


def _load_tiny(pipe: Any) -> None:
    encoder, processor, state_dict = tiny_ip_adapter(pipe.unet)
    pipe.register_modules(image_encoder=encoder.to(pipe.unet.dtype), feature_extractor=processor)
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)


def _load(pipe: Any, settings: IPAdapter) -> None:
    from ..models import HubWeights, from_hub

    subfolder, weight, encoder_folder = VARIANTS[settings.variant]
    source = settings.model
    local = Path(source).expanduser()
    if local.is_dir():
        pipe.load_ip_adapter(
            str(local),
            subfolder=subfolder,
            weight_name=weight,
            image_encoder_folder=encoder_folder,
            local_files_only=True,
        )
        return
    fetch = f"{source} --include '{subfolder}/{weight}' '{encoder_folder}/*'"
    from_hub(
        lambda local_only: pipe.load_ip_adapter(
            source,
            subfolder=subfolder,
            weight_name=weight,
            image_encoder_folder=encoder_folder,
            local_files_only=local_only,
        ),
        HubWeights(f"The IP-Adapter '{source}' ({settings.variant})", source, fetch),
    )


@contextmanager
def attached_ip_adapter(pipe: Any, settings: IPAdapter | None) -> Iterator[torch.Tensor | None]:
    """The story's adapter on `pipe` for the block; yields the photo's image embeddings
    (unconditional, conditional) or None without an adapter."""
    if settings is None:
        yield None
        return
    from ..models import quiet_loading

    with quiet_loading():  # diffusers' notes on dtype casts and processor swaps
        if settings.model == "tiny":
            _load_tiny(pipe)
        else:
            _load(pipe, settings)
    try:
        pipe.set_ip_adapter_scale(settings.scale)
        with Image.open(settings.image) as photo:
            image = photo.convert("RGB")
        device = pipe._execution_device
        (embeds,) = pipe.prepare_ip_adapter_image_embeds(
            ip_adapter_image=[image],
            ip_adapter_image_embeds=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
        )
        yield embeds
    finally:
        pipe.unload_ip_adapter()


def chunk_image_embeds(embeds: torch.Tensor, frames: int, cfg: bool) -> list[torch.Tensor]:
    """`added_cond_kwargs["image_embeds"]` for a forward of `frames` frames: the photo for every
    row, its unconditional embedding in the unconditional rows."""
    uncond, cond = embeds.chunk(2)
    rows = [uncond] * frames + [cond] * frames if cfg else [cond] * frames
    return [torch.cat(rows)]
