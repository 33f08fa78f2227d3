"""1Prompt1Story (Liu et al., ICLR 2025), training-free: each frame's text embedding comes from
one consolidated prompt ("identity, frames…" in story order, or a window from the frame when
not all fit: see `consolidate.py`), reweighted so that it expresses its own frame and suppresses
the others; identity-preserving cross-attention then lets every cross-attention layer also
attend to the identity tokens alone.

Singular-Value Reweighting acts on the penultimate hidden states of each of SDXL's two text
encoders separately (their columns of the concatenated prompt embedding), as the official code
does; the pooled embedding is left as it is. Token sets are a frame's own tokens and the EOT
rows (the end token and all padding, as tokenizer 1 fills them).

Identity-preserving cross-attention (IPCA) appends, in every cross-attention layer, the keys and
values of the identity tokens (start token, style prefix, identity) to the frame's own. Here it
is the UNet's own `encoder_attention_mask`: the text input is [frame's 77 rows; the frame's
embedding before reweighting] and the mask keeps only the identity rows of the second half (none
for unconditional and [NC] rows, which then attend exactly as without it). CLIP's text encoders
are causal, so those rows do not depend on the frame tokens after them: they are the identity
alone, without the official code's separate 50-step pass over the identity prompt to cache them.
Projecting 77 more tokens per layer and step costs well under 1 % of a UNet forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from storycli.consistency.consolidate import Consolidated
from storycli.story.schema import OnePrompt


@dataclass(frozen=True)
class TokenSets:
    """Where a consolidated prompt's pieces sit in the encoder's 77 rows."""

    identity_end: int  # rows [0, identity_end): start token, style prefix, identity
    parts: tuple[tuple[int, int], ...]  # each frame text's rows [start, end), in prompt order
    eot_start: int  # rows [eot_start, length): end token and padding
    express: int = 0  # the part expressed (`Consolidated.express`); the others are suppressed

    def rows(self, part: int, with_eot: bool, length: int) -> list[int]:
        start, end = self.parts[part]
        return list(range(start, end)) + (list(range(self.eot_start, length)) if with_eot else [])

    def steps(self) -> list[tuple[int, bool]]:
        """The official code's order: (part, enhance) — every other part suppressed, one at a
        time in prompt order, then the expressed part enhanced."""
        others = [(n, False) for n in range(len(self.parts)) if n != self.express]
        return [*others, (self.express, True)]


def token_sets(tokenizer: Any, consolidated: Consolidated) -> TokenSets:
    """The pieces' rows, from the token counts of the prompt's prefixes (see `cumulative`)."""
    length = tokenizer.model_max_length

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    ends = [min(1 + count(text), length - 1) for text in consolidated.cumulative()]
    parts = tuple(itertools.pairwise(ends))
    eot = min(1 + count(consolidated.prompt), length - 1)
    return TokenSets(ends[0], parts, eot, consolidated.express)


def singular_value_reweight(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """σ → β·exp(−α·σ)·σ for every singular value of the rows `x`, in float64 as the official
    code computes it (`punish_wight` on `.to(float)`; on the CPU where the device has no
    float64, e.g. MPS)."""
    work = x.detach().to("cpu" if x.device.type == "mps" else x.device, torch.float64)
    u, sigma, vh = torch.linalg.svd(work, full_matrices=False)
    sigma = beta * torch.exp(-alpha * sigma) * sigma
    return ((u * sigma) @ vh).to(device=x.device, dtype=x.dtype)


def reweight(x: torch.Tensor, sets: TokenSets, settings: OnePrompt) -> torch.Tensor:
    """One encoder's embedding (77, d) of a consolidated prompt, made to express its frame's
    part (`sets.express`): `naive` scales rows; `svr` suppresses every other frame's set (its
    tokens + EOT) one set at a time, then enhances the frame's own (the official code's order);
    `svr-eot` leaves EOT out of the sets and scales it by `eot_scale` on every SVR call
    instead."""
    x = x.clone()
    length = x.shape[0]
    if settings.reweight == "naive":
        for n, enhance in sets.steps():
            factor = settings.naive_enhance if enhance else settings.naive_suppress
            x[sets.rows(n, False, length)] *= factor
        return x
    with_eot = settings.reweight == "svr"
    order = [(n, settings.enhance if up else settings.suppress) for n, up in sets.steps()]
    for n, weights in order:
        rows = sets.rows(n, with_eot, length)
        if rows:
            x[rows] = singular_value_reweight(x[rows], weights.alpha, weights.beta)
        if not with_eot:
            x[sets.eot_start :] *= settings.eot_scale
    return x


def encoder_widths(pipe: Any, total: int) -> list[int]:
    """The columns each text encoder contributes to the prompt embedding (SDXL: 768 + 1280)."""
    widths = [
        int(encoder.config.hidden_size)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2)
        if encoder is not None
    ]
    return widths if sum(widths) == total else [total]


def one_prompt_conditioning(
    pipe: Any,
    consolidated: Sequence[Consolidated | None],
    text: torch.Tensor,
    cfg: bool,
    settings: OnePrompt,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's text input made 1Prompt1Story's: each consolidated frame's conditional rows
    reweighted, and with IPCA the identity half appended with its `encoder_attention_mask`.
    `text` is the chunk's prompt embedding, unconditional rows first under CFG; `consolidated`
    says, per frame of the chunk, its consolidated prompt (None: an [NC] frame)."""
    frames = len(consolidated)
    offset = frames if cfg else 0  # the conditional rows
    before = text.clone() if settings.ipca else text  # IPCA appends the unweighted rows
    widths = encoder_widths(pipe, text.shape[-1])
    sets: list[TokenSets | None] = [
        token_sets(pipe.tokenizer or pipe.tokenizer_2, c) if c is not None else None
        for c in consolidated
    ]
    for n, frame_sets in enumerate(sets):
        if frame_sets is None:
            continue
        columns, start = [], 0
        for width in widths:
            block = text[offset + n, :, start : start + width]
            columns.append(reweight(block, frame_sets, settings))
            start += width
        text[offset + n] = torch.cat(columns, dim=-1)
    if not settings.ipca:
        return text, None
    length = text.shape[1]
    keep = torch.zeros(text.shape[0], 2 * length, dtype=text.dtype, device=text.device)
    keep[:, :length] = 1.0
    for n, frame_sets in enumerate(sets):
        if frame_sets is not None:
            keep[offset + n, length : length + frame_sets.identity_end] = 1.0
    # Rows that keep no identity token get zeros there: masked out, any value would do.
    identity = torch.where(keep[:, length:, None] > 0, before, torch.zeros_like(before))
    return torch.cat([text, identity], dim=1), keep
