"""`latent-slerp`: spherical interpolation between the keyframes' VAE latents.

Smooth, but a dissolve with ghosting rather than motion: a cheap baseline that needs only a VAE
(the SDXL one, ~84M parameters), so it runs on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from storycli.motion.decoders.base import StepCallback, TransitionRequest
from storycli.motion.predictor.model import slerp_embeddings
from storycli.story.checks import is_model_path
from storycli.weights.devices import resolve_device, resolve_dtype
from storycli.weights.hub import (
    HubWeights,
    ModelUnavailable,
    from_hub,
    hub_revision,
    quiet_loading,
    short_reason,
)

# The SDXL VAE, patched to run in float16 without NaNs; same latent space as SDXL's own.
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"


def load_vae(model: str | None, device: str, dtype: str) -> tuple[Any, str]:
    """An `AutoencoderKL` by hub id or local folder (a VAE folder, or a pipeline folder with a
    `vae/` subfolder); `tiny` is the tiny random SDXL's VAE. Returns (vae, label)."""
    from diffusers import AutoencoderKL

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = model or DEFAULT_VAE
    if source == "tiny":
        from storycli.weights.tiny import build_tiny_sdxl_pipeline

        vae = build_tiny_sdxl_pipeline(torch_dtype).vae
        return vae.to(device), "tiny"
    local = Path(source).expanduser()
    if local.exists():
        subfolder = "vae" if (local / "vae").is_dir() else None
        try:
            with quiet_loading():
                vae = AutoencoderKL.from_pretrained(
                    str(local), subfolder=subfolder, dtype=torch_dtype, local_files_only=True
                )
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load a VAE from {local}: {short_reason(exc)}") from exc
        return vae.to(device).eval(), str(local.resolve())
    if is_model_path(source):  # a path that is not there: not a hub id to look up
        raise ModelUnavailable(f"the VAE folder {local} does not exist; fix --model")
    weights = HubWeights(
        f"The VAE '{source}'", source, source, ", or pass --model with a local VAE folder"
    )
    vae = from_hub(
        lambda local_only: AutoencoderKL.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_only
        ),
        weights,
    )
    return vae.to(device).eval(), source


class LatentSlerpDecoder:
    name = "latent-slerp"
    image_encoder = None
    baseline_embeddings = True
    fps = 8
    max_frames: int | None = None

    def __init__(self, vae: Any, label: str, chunk: int = 4) -> None:
        self.vae = vae
        self.label = label
        self.chunk = chunk  # frames decoded at once: bounds memory for long transitions
        # The cached snapshot's commit when the VAE came from the hub (label = its hub id).
        hub_id = label != "tiny" and not Path(label).is_absolute()
        self.revision = hub_revision(label, "config.json") if hub_id else None

    def describe(self) -> dict[str, Any]:
        return {"decoder": self.name, "vae": self.label, "vae_revision": self.revision}

    def _pixels(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))
        x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return x.to(self.vae.device, self.vae.dtype)

    @torch.inference_mode()
    def transition(
        self, request: TransitionRequest, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        size = request.start.size
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # The VAE needs sides divisible by its factor; frames are scaled back afterwards.
        work = (max(factor, size[0] // factor * factor), max(factor, size[1] // factor * factor))
        pixels = torch.cat([self._pixels(request.start, work), self._pixels(request.end, work)])
        # The posterior mean, not a sample: the same keyframes always give the same video.
        latents = self.vae.encode(pixels).latent_dist.mean.float()
        shape = latents.shape[1:]
        path = slerp_embeddings(latents[:1].flatten(1), latents[1:].flatten(1), request.frames)
        path = path[0].view(request.frames, *shape)
        frames: list[Image.Image] = []
        chunks = range(0, request.frames, self.chunk)
        for done, start in enumerate(chunks, 1):
            batch = path[start : start + self.chunk].to(self.vae.dtype)
            decoded = self.vae.decode(batch).sample.float()
            images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
            frames += [
                Image.fromarray(a).resize(size, Image.Resampling.LANCZOS)
                for a in images.cpu().numpy()
            ]
            if on_step is not None:
                on_step(done, len(chunks))
        return frames
