"""Reference-photo identity through diffusers' IP-Adapter for SDXL (`ip_adapter:` in a story).

The adapter is loaded with the pipeline's own `load_ip_adapter` (a hub id such as
h94/IP-Adapter, or a local folder laid out like it) for the duration of one story and unloaded
after it, so a batch's cached pipeline is left as it was. `tiny` is a random adapter and image
encoders for the tiny test model (each variant), loaded through the same `load_ip_adapter`. The
story's photo conditions every frame's UNet forward (`added_cond_kwargs["image_embeds"]`), a
character's photo the frames that show it (see `Photos`); CSA and one-prompt work alongside
(the adapter's processors are the cross-attention ones, CSA's the self-attention ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.story.schema import IPAdapter

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


def _resampler_state_dict(embed_dim: int, output_dim: int) -> dict[str, torch.Tensor]:
    """A random IP-Adapter Plus image projection (the Resampler: learned queries attending to
    the image encoder's penultimate hidden states) in the original file's key layout, which
    diffusers converts on load. Sizes are small but the structure is the real one: 4 blocks of
    perceiver attention (64-d heads) + feed-forward."""
    hidden, queries, depth, ff = 64, 4, 4, 4 * 64

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp) / inp**0.5

    state: dict[str, torch.Tensor] = {
        "latents": torch.randn(1, queries, hidden) / hidden**0.5,
        "proj_in.weight": linear(hidden, embed_dim),
        "proj_in.bias": torch.zeros(hidden),
        "proj_out.weight": linear(output_dim, hidden),
        "proj_out.bias": torch.zeros(output_dim),
        "norm_out.weight": torch.ones(output_dim),
        "norm_out.bias": torch.zeros(output_dim),
    }
    for i in range(depth):
        for norm in (f"layers.{i}.0.norm1", f"layers.{i}.0.norm2", f"layers.{i}.1.0"):
            state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
        state[f"layers.{i}.0.to_q.weight"] = linear(hidden, hidden)
        state[f"layers.{i}.0.to_kv.weight"] = linear(2 * hidden, hidden)
        state[f"layers.{i}.0.to_out.weight"] = linear(hidden, hidden)
        state[f"layers.{i}.1.1.weight"] = linear(ff, hidden)
        state[f"layers.{i}.1.3.weight"] = linear(hidden, ff)
    return state


# The plain adapters turn one image embedding into 4 tokens (ip-adapter_sd15 and _sdxl alike).
IMAGE_TOKENS = 4


def ip_adapter_state_dict(unet: Any, image_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter in the original file layout (`ip-adapter_sd15`, `ip-adapter_sdxl`),
    for `load_ip_adapter`.

    `image_proj.proj` maps one image embedding to 4 tokens; `ip_adapter.{k}.to_{k,v}_ip` are
    the decoupled key/value projections of the k-th cross-attention (k = 1, 3, 5, ...: the
    original numbering counts self-attention layers too), in the UNet's processor order.
    """
    from diffusers.models.embeddings import ImageProjection

    cross_dim = unet.config.cross_attention_dim
    proj = ImageProjection(
        image_embed_dim=image_dim, cross_attention_dim=cross_dim, num_image_text_embeds=IMAGE_TOKENS
    )
    image_proj = {k.replace("image_embeds", "proj"): v for k, v in proj.state_dict().items()}
    ip_layers: dict[str, torch.Tensor] = {}
    names = [
        name
        for name in unet.attn_processors
        if not name.endswith("attn1.processor") and "motion_modules" not in name
    ]
    for index, name in enumerate(names):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attn.to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            layer = torch.nn.Linear(cross_dim, hidden, bias=False)
            ip_layers[f"{2 * index + 1}.{kind}.weight"] = layer.weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def tiny_ip_adapter(
    unet: Any, variant: str = "plain"
) -> tuple[Any, Any, dict[str, dict[str, torch.Tensor]]]:
    """A random adapter of `variant` for the tiny UNet, deterministic: (the tiny CLIP vision
    tower, its processor, the adapter's state dict in that variant's file layout). `plain`
    projects the image embedding to 4 tokens; `plus` and `plus-face` (same architecture,
    different weights, as in h94/IP-Adapter) resample the encoder's hidden states."""
    from storycli.weights.image_encoder import build_tiny_image_encoder

    encoder, processor = build_tiny_image_encoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 + list(VARIANTS).index(variant))
        state_dict = ip_adapter_state_dict(unet, encoder.config.projection_dim)
        if variant != "plain":
            state_dict["image_proj"] = _resampler_state_dict(
                encoder.config.hidden_size, unet.config.cross_attention_dim
            )
    return encoder, processor, state_dict


def save_tiny_ip_adapter(root: Path, unet: Any, variant: str = "plain") -> Path:
    """The tiny adapter saved as h94/IP-Adapter lays out that variant (for tests of the folder
    loader), e.g. sdxl_models/ip-adapter_sdxl.safetensors + sdxl_models/image_encoder/."""
    from safetensors.torch import save_file

    encoder, _, state_dict = tiny_ip_adapter(unet, variant)
    subfolder, weight, encoder_folder = VARIANTS[variant]
    (root / subfolder).mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{k}": v for part, tensors in state_dict.items() for k, v in tensors.items()}
    save_file(flat, root / subfolder / weight)
    encoder.save_pretrained(root / encoder_folder)
    return root


def _load_tiny(pipe: Any, variant: str) -> None:
    encoder, processor, state_dict = tiny_ip_adapter(pipe.unet, variant)
    pipe.register_modules(image_encoder=encoder.to(pipe.unet.dtype), feature_extractor=processor)
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)


def _load(pipe: Any, settings: IPAdapter) -> None:
    from storycli.weights.hub import HubWeights, from_hub

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


@dataclass(frozen=True)
class Photos:
    """A story's IP-Adapter photos, encoded: what each frame's UNet forward adds.

    A story's own photo conditions every frame at its scale (the adapter's scale). With
    characters' photos the adapter runs at scale 1 and every forward row gets one mask per
    photo, the photo's scale where the row's frame shows its character (the story's own: every
    row) and 0 elsewhere: diffusers attends to each masked photo separately and adds it times
    its mask, so a frame without the character is exactly as without the photo, and a frame
    with two characters gets both photos, each at its scale.
    """

    embeds: torch.Tensor  # [2, photos, ...]: (unconditional, conditional) image embeddings
    owners: tuple[str | None, ...]  # the character each photo conditions; None: every frame
    scales: tuple[float, ...]

    @property
    def masked(self) -> bool:
        return any(owner is not None for owner in self.owners)

    def forward_inputs(
        self, characters: Sequence[Sequence[str]], cfg: bool, latent_size: tuple[int, int]
    ) -> tuple[list[torch.Tensor], dict[str, Any] | None]:
        """(`added_cond_kwargs["image_embeds"]`, `cross_attention_kwargs` or None) for a
        forward whose rows show `characters` (unconditional rows first with `cfg`)."""
        uncond, cond = self.embeds.chunk(2)
        n = len(characters)
        embeds = [torch.cat([uncond] * n + [cond] * n if cfg else [cond] * n)]
        if not self.masked:
            return embeds, None
        weights = torch.tensor(
            [
                [
                    s if o is None or o in shown else 0.0
                    for o, s in zip(self.owners, self.scales, strict=True)
                ]
                for shown in characters
            ]
        )
        if cfg:
            weights = torch.cat([weights, weights])
        # Constant masks at the latent's aspect ratio: diffusers resizes them to every
        # attention resolution, and a constant stays that constant.
        masks = weights[:, :, None, None].expand(-1, -1, *latent_size)
        return embeds, {"ip_adapter_masks": [masks.to(self.embeds.device).contiguous()]}


@contextmanager
def attached_ip_adapter(
    pipe: Any, photos: Sequence[tuple[str | None, IPAdapter]]
) -> Iterator[Photos | None]:
    """The story's adapter on `pipe` for the block (one for all its photos: the story checks
    they share variant and model); yields the photos' embeddings, or None without photos."""
    if not photos:
        yield None
        return
    from storycli.weights.hub import quiet_loading

    settings = photos[0][1]
    with quiet_loading():  # diffusers' notes on dtype casts and processor swaps
        if settings.model == "tiny":
            _load_tiny(pipe, settings.variant)
        else:
            _load(pipe, settings)
    try:
        device = pipe._execution_device
        embeds = []
        for _, adapter in photos:  # one at a time: a photo's embedding is its own alone
            with Image.open(adapter.image) as photo:
                image = photo.convert("RGB")
            (one,) = pipe.prepare_ip_adapter_image_embeds(
                ip_adapter_image=[image],
                ip_adapter_image_embeds=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
            )
            embeds.append(one)
        encoded = Photos(
            torch.cat(embeds, dim=1),
            tuple(owner for owner, _ in photos),
            tuple(adapter.scale for _, adapter in photos),
        )
        # Masked, each photo's scale is in its masks (see Photos).
        pipe.set_ip_adapter_scale(1.0 if encoded.masked else encoded.scales[0])
        yield encoded
    finally:
        pipe.unload_ip_adapter()
