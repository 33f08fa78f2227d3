"""Wan2.1 first-last-frame-to-video (FLF2V): transitions with both keyframes as end frames.

`WanImageToVideoPipeline` is called with `image=` the start keyframe and `last_image=` the end
keyframe; the text is the keyframes' prompts. Wan renders 4k+1 frames at sides multiple of 16
(see `end_frames`). `--model` is a preset of configs/video_models.yaml (`wan`, `wan-tiny`),
`tiny`, or a Wan FLF2V diffusers repo / folder.

The motion predictor (`--predictor`) steers Wan through its image cross-attention. Wan reads
the CLIP ViT-H/14 tokens of both keyframes side by side (257 + 257, each half with a learned
position) in every block, and every latent frame attends to both halves alike. Given the
predictor's per-frame embeddings P_1..P_L, latent frame j attends to the first keyframe's half
with weight 1 − α_j and to the last one's with α_j, where α_j is how far P at that frame lies
along the line from P_1 to P_L (its projection, clamped to [0, 1]). α = ½ everywhere is exactly
the plain pipeline, so without a predictor nothing is changed. What P_i holds off that line
cannot be used: Wan attends to CLIP's penultimate tokens, not to the projected embedding the
predictor works in, and there is no map back. The predictor must work in Wan's own image
encoder's space: CLIP ViT-H/14 (laion2B), the tower of `openclip-vit-h`, train-predictor's
default encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.components import load_encoder_ref
from storycli.motion.decoders.end_frames import EndFramesDecoder, load_end_frames_decoder
from storycli.motion.decoders.wan_tiny import (
    WAN_SIZE_MULTIPLE,
    WAN_TEXT_LENGTH,
    build_tiny_wan_flf2v_pipeline,
    wan_pipeline_class,
    wan_prompt_embeds,
)
from storycli.motion.presets import VideoPreset
from storycli.weights.image_encoder import ImageEncoder, load_image_encoder


def load_wan_decoder(model: str = "wan", **options: Any) -> WanDecoder:
    """Load the Wan FLF2V transition decoder for a preset, a Wan diffusers repo, or `tiny`
    (`options`: see `load_end_frames_decoder`). On a GPU too small for it the real model gets
    model CPU offload: the 14B transformer, UMT5-XXL and CLIP do not fit most cards at once."""
    return load_end_frames_decoder(WanDecoder, model, **options)


class WanDecoder(EndFramesDecoder):
    """`TransitionDecoder` on a `WanImageToVideoPipeline` (first and last frame given)."""

    name = "wan"
    label = "Wan model"
    size_multiple = WAN_SIZE_MULTIPLE
    pipeline_class = staticmethod(wan_pipeline_class)
    tiny_pipeline = staticmethod(build_tiny_wan_flf2v_pipeline)

    def __init__(self, pipe: Any, preset: VideoPreset, **settings: Any) -> None:
        super().__init__(pipe, preset, **settings)
        self._encoder: ImageEncoder | None = None
        self._steering = FrameSteering()
        processors = {
            name: self._steering if name.endswith("attn2.processor") else processor
            for name, processor in pipe.transformer.attn_processors.items()
        }
        pipe.transformer.set_attn_processor(processors)

    @property
    def image_encoder(self) -> ImageEncoder:  # type: ignore[override]
        """The CLIP tower the predictor's P_i must come from (loaded when first asked for, i.e.
        only with `--predictor`): the preset's `image_encoder`, default `openclip-vit-h`."""
        if self._encoder is None:
            module = self.pipe.transformer
            device, dtype = str(self.pipe._execution_device), module.dtype
            if self.preset.tiny:
                self._encoder = load_image_encoder("tiny", device, dtype)
            elif self.preset.image_encoder is not None:
                self._encoder = load_encoder_ref(self.preset.image_encoder, device, dtype)
            else:
                self._encoder = load_image_encoder(device=device, dtype=dtype)
        return self._encoder

    def _encode(self, text: str) -> torch.Tensor:
        # Encoded without ftfy (see `wan_prompt_embeds`).
        return wan_prompt_embeds(self.pipe, [text], WAN_TEXT_LENGTH)

    def _render(
        self, first: Image.Image, last: Image.Image, request: TransitionRequest, call: dict
    ) -> list[Image.Image]:
        positive, negative = self.prompts(request)
        latent_frames = (call["num_frames"] - 1) // self.factor + 1
        self._steering.weights = (
            None if request.embeddings is None else end_weights(request.embeddings, latent_frames)
        )
        try:
            return self.pipe(
                image=first,
                last_image=last,
                prompt_embeds=positive,
                negative_prompt_embeds=negative,
                **call,
            ).frames[0]
        finally:
            self._steering.weights = None


def end_weights(embeddings: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """(latent_frames, 2): how much each latent frame attends to the first and to the last
    keyframe's CLIP tokens, from the per-frame embeddings P_1..P_L (see the module docstring).

    α at each of the L frames is P_i's projection onto the line P_1 → P_L; latent frame j sits at
    the clip's fraction j / (latent_frames − 1) and takes α there by linear interpolation."""
    p = embeddings.float().cpu()
    span = p[-1] - p[0]
    length = float(span.dot(span))
    if length < 1e-12:  # both ends alike: nothing tells the frames apart
        alpha = torch.linspace(0.0, 1.0, len(p))
    else:
        alpha = ((p - p[0]) @ span / length).clamp(0.0, 1.0)
    where = torch.linspace(0.0, len(p) - 1, latent_frames)
    low = where.floor().long().clamp(max=len(p) - 1)
    high = (low + 1).clamp(max=len(p) - 1)
    frac = where - low
    alpha = alpha[low] * (1 - frac) + alpha[high] * frac
    # Neither side quite to zero: a log weight of -inf would leave its half unattended but
    # still in the softmax's arithmetic.
    return torch.stack([1 - alpha, alpha], dim=1).clamp(1e-4, 1.0)


class FrameSteering:
    """Wan's attention processor for the cross-attention blocks (`attn2`): the plain
    `WanAttnProcessor` while `weights` is None; with `weights` (latent frames, 2), each latent
    frame's image attention is tilted toward the first or the last keyframe's tokens by adding
    log-weights to the attention scores (half the image tokens are each keyframe's).

    Written here because no diffusers processor takes a per-query-frame bias on Wan's image
    context; the text attention and the projections are diffusers' own."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.plain = WanAttnProcessor()
        self.weights: torch.Tensor | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        if self.weights is None or attn.add_k_proj is None or encoder_hidden_states is None:
            return self.plain(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        from diffusers.models.transformers.transformer_wan import (
            _get_added_kv_projections,
            _get_qkv_projections,
        )
        from torch.nn.functional import scaled_dot_product_attention as attend

        # As in WanAttnProcessor: the text context is the last 512 tokens, images before it.
        images = encoder_hidden_states.shape[1] - WAN_TEXT_LENGTH
        image, text = encoder_hidden_states[:, :images], encoder_hidden_states[:, images:]
        query, key, value = _get_qkv_projections(attn, hidden_states, text)
        key_img, value_img = _get_added_kv_projections(attn, image)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H·D) → (B, H, L, D)
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        query = heads(attn.norm_q(query))
        out = attend(query, heads(attn.norm_k(key)), heads(value))
        bias = self._bias(query.shape[2], images).to(query.device, query.dtype)
        out = out + attend(
            query, heads(attn.norm_added_k(key_img)), heads(value_img), attn_mask=bias
        )
        out = out.transpose(1, 2).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def _bias(self, queries: int, images: int) -> torch.Tensor:
        """(queries, images) log-weights: query tokens are latent-frame major."""
        weights = self.weights
        assert weights is not None
        frames = weights.shape[0]
        if queries % frames:
            raise ValueError(f"{queries} query tokens do not split into {frames} latent frames")
        half = images // 2
        per_frame = torch.cat(
            [weights[:, :1].log().expand(-1, half), weights[:, 1:].log().expand(-1, images - half)],
            dim=1,
        )
        return per_frame.repeat_interleave(queries // frames, dim=0)
