"""LTX-Video condition pipeline: transitions with the keyframes as conditions at both ends.

`LTXConditionPipeline` is called with two `LTXVideoCondition`s: the start keyframe at frame 0,
the end keyframe at the video's last frame; the text is the keyframes' prompts. LTX renders
8k+1 frames at sides multiple of 32 (see `end_frames`). `--model` is a preset of
configs/video_models.yaml (`ltx`, `ltx-tiny`), `tiny`, or an LTX-Video diffusers repo / folder
(0.9.5 or later: the condition pipeline's first release). It takes no per-frame embeddings:
with `--predictor` animate says the predictor is ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from storycli.motion.decoders.base import TransitionRequest
from storycli.motion.decoders.end_frames import EndFramesDecoder, load_end_frames_decoder
from storycli.motion.decoders.ltx_tiny import (
    LTX_MIN_STEPS,
    LTX_SIZE_MULTIPLE,
    TINY_LTX_TEXT_LENGTH,
    build_tiny_ltx_condition_pipeline,
    quiet_ltx_schedule,
)

# LTX-Video's T5 sequence length: the pipeline's default (its tokenizer's 128 would do for
# most prompts; 256 keeps long story prompts whole).
LTX_TEXT_LENGTH = 256


def load_ltx_decoder(model: str = "ltx", **options: Any) -> LtxDecoder:
    """Load the LTX-Video transition decoder for a preset, an LTX diffusers repo, or `tiny`
    (`options`: see `load_end_frames_decoder`; fewer than `LTX_MIN_STEPS` steps are refused).
    On a GPU too small for it the real model gets model CPU offload, as Wan's."""
    return load_end_frames_decoder(LtxDecoder, model, **options)


def _ltx_pipeline_class() -> Any:
    from diffusers import LTXConditionPipeline

    return LTXConditionPipeline


class LtxDecoder(EndFramesDecoder):
    """`TransitionDecoder` on an `LTXConditionPipeline` (conditions at the first and last
    frame)."""

    name = "ltx"
    label = "LTX-Video model"
    size_multiple = LTX_SIZE_MULTIPLE
    min_steps = LTX_MIN_STEPS
    pipeline_class = staticmethod(_ltx_pipeline_class)
    tiny_pipeline = staticmethod(build_tiny_ltx_condition_pipeline)

    @property
    def text_length(self) -> int:
        return TINY_LTX_TEXT_LENGTH if self.preset.tiny else LTX_TEXT_LENGTH

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            max_sequence_length=self.text_length,
            device=self.pipe._execution_device,
        )
        return embeds, mask

    def _render(
        self, first: Image.Image, last: Image.Image, request: TransitionRequest, call: dict
    ) -> list[Image.Image]:
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        (positive, mask), negative = self.prompts(request)
        negative, negative_mask = negative or (None, None)
        conditions = [
            LTXVideoCondition(image=first, frame_index=0),
            LTXVideoCondition(image=last, frame_index=call["num_frames"] - 1),
        ]
        with quiet_ltx_schedule():
            return self.pipe(
                conditions=conditions,
                prompt_embeds=positive,
                prompt_attention_mask=mask,
                negative_prompt_embeds=negative,
                negative_prompt_attention_mask=negative_mask,
                frame_rate=self.fps,
                max_sequence_length=self.text_length,
                **call,
            ).frames[0]
