"""Consistent Self-Attention (StoryDiffusion) as a diffusers attention processor.

Semantics follow the reference implementation (see shared spec, storydiffusion.md §1), with its
hidden assumptions removed:

* **write phase** — a character's reference frames are denoised together; in each replaced
  self-attention layer, image *i* attends to its own N tokens plus tokens sampled from every other
  reference image (each image *j* contributes the same sampled index set to all queries within a
  step and level). The samples are stored in a bank, per character, step and layer.
* **read phase** — any other frame attends to its own tokens plus the banked samples of every
  character it shows.
* CFG halves (and any other groups of the batch) never mix; guidance ≤ 1 (no CFG) works.
* Plain attention during the first `warmup_steps` steps, then CSA per layer call with probability
  `prob_early` before `late_from_step` and `prob_late` after.

Several calls can share one UNet forward: every character's references in one write forward
(each image samples only its own call's images; rows of calls with fewer samples are padded and
masked), and read frames of any characters with plain frames (each row attends to its own
characters' banks). Convolutions and MLPs run batched; only attention is split by row.

All mutable state lives in `CSAState`; every random draw comes from the `torch.Generator` of the
call it belongs to. Draws happen once per UNet call in a forward pre-hook (one index set per
resolution level and call, moved to the device once for all layers of the level; one skip
flag per layer and call), not inside the processors, and the bank is filed in a forward hook.

The state (settings, draws, bank) is `storycli.consistency.csa_state`; this module is the
processor that reads it. Which self-attention layers get the processor, and the forward hooks that
drive the state, depend on the denoising network: they belong to the backbone
(`storycli.keyframes.backbones`; SDXL's UNet in `backbones/sdxl.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storycli.consistency.csa_state import CSAState, LayerInfo, LevelGather


def _extra_bias(
    valid: torch.Tensor | None,
    flags: torch.Tensor | None,
    own: int,
    extra: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """An additive key bias (batch, 1, 1, own + extra) over [own keys, extra keys] that hides
    the extra keys a row does not read: padding (`valid`, (rows, extra)) and all of them in
    rows that skip CSA in this layer now (`flags`, (rows,)): plain attention, exactly. None
    when every row reads every extra key."""
    if valid is None and flags is None:
        return None
    # Both are on the model's device already: no copy per layer.
    if valid is None:
        keep = flags[:, None].expand(-1, extra)  # type: ignore[index]
    else:
        keep = valid if flags is None else valid & flags[:, None]
    rows = keep.shape[0]
    # Rows are [CFG group 0: rows…, group 1: rows…]: the same mask for every group.
    hidden = torch.where(keep, 0.0, float("-inf")).to(like.dtype).repeat(like.shape[0] // rows, 1)
    return torch.cat([like.new_zeros(hidden.shape[0], own), hidden], dim=1)[:, None, None, :]


def _attend(
    attn: Attention,
    query_in: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None = None,
):
    """Multi-head SDPA of `attn` with already projected keys/values; returns the output proj."""
    batch = query_in.shape[0]
    query = attn.to_q(query_in)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


class ConsistentSelfAttnProcessor:
    """Self-attention whose keys/values also cover tokens of other images (see module doc).

    Excluded from `torch.compile` (see the backbone's `compiled_blocks`): it reads the story's
    Python state (phase, draws, bank) that differs per layer and call, which a graph would have
    to guard on and recompile for; its work is a few gathers and one attention call per layer."""

    def __init__(self, state: CSAState, layer: LayerInfo) -> None:
        self.state = state
        self.layer = layer
        self.plain = AttnProcessor2_0()

    @torch.compiler.disable
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        state = self.state
        supported = (
            encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and hidden_states.ndim == 3
        )
        out = None
        if supported and state.csa_now:
            state.check_batch(hidden_states)
            if state.phase in ("write", "window"):
                out = self._write(attn, hidden_states)
            else:
                out = self._read(attn, hidden_states)
        if out is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _read(self, attn: Attention, hidden: torch.Tensor) -> torch.Tensor | None:
        """Read phase: each row's own tokens plus the banks of its characters (None: plain
        attention); a read frame with rolling history banks samples of its own tokens."""
        state = self.state
        read = state.read_tokens(self.layer, hidden)
        history = state.history_level(self.layer)
        if read is None and history is None:
            return None
        key, value = attn.to_k(hidden), attn.to_v(hidden)
        if history is not None:  # bank this frame's samples for the frames after it
            banked = history.banked[0]
            state.file_bank(self.layer, key[:, banked], value[:, banked])
        if read is None:
            return None
        extra, valid = read
        batch, tokens, _ = hidden.shape
        groups, rows, width = extra.shape[1:4]

        def with_extra(own: torch.Tensor, banked: torch.Tensor) -> torch.Tensor:
            # Concatenated per row in one copy (an expanded bank is read, not materialised).
            own = own.view(groups, rows, tokens, -1)
            return torch.cat([own, banked], dim=2).view(batch, tokens + width, -1)

        bias = _extra_bias(valid, None, tokens, width, hidden)
        return _attend(attn, hidden, with_extra(key, extra[0]), with_extra(value, extra[1]), bias)

    def _write(self, attn: Attention, hidden: torch.Tensor) -> torch.Tensor | None:
        """Write or window phase: bank each call's sampled tokens' keys/values when this step
        banks, and run CSA where it applies in this layer now (None: plain attention)."""
        state = self.state
        level, applies, stores = state.write_level(self.layer)
        if level is None or not (any(applies) or stores):
            return None
        batch, tokens, channels = hidden.shape
        groups = batch // state.rows
        if any(applies) and state.settings.impl == "fast":
            key, value = attn.to_k(hidden), attn.to_v(hidden)
            flat_key = key.view(groups, state.rows * tokens, -1)
            flat_value = value.view(groups, state.rows * tokens, -1)
            if stores:
                for segment, banked in enumerate(level.banked):
                    state.file_bank(self.layer, flat_key[:, banked], flat_value[:, banked], segment)
            return self._write_fast(attn, hidden, level, applies, flat_key, flat_value)
        if stores:  # project only the sampled tokens (a per-token map: same numbers)
            flat = hidden.view(groups, state.rows * tokens, channels)
            for segment, banked in enumerate(level.banked):
                sampled = flat[:, banked]
                state.file_bank(self.layer, attn.to_k(sampled), attn.to_v(sampled), segment)
        return self._write_reference(attn, hidden, applies) if any(applies) else None

    def _write_fast(
        self,
        attn: Attention,
        hidden: torch.Tensor,
        level: LevelGather,
        applies: list[bool],
        flat_key: torch.Tensor,
        flat_value: torch.Tensor,
    ) -> torch.Tensor:
        """Every row of every call in one SDPA call: keys/values projected once per token, and
        each row's own plus extra tokens gathered by one index (rows with fewer padded)."""
        batch, tokens, _ = hidden.shape
        context = level.index.shape[1]
        key = flat_key[:, level.index].reshape(batch, context, -1)
        value = flat_value[:, level.index].reshape(batch, context, -1)
        flags = self.state.row_flags(self.layer) if not all(applies) else None
        bias = _extra_bias(level.valid, flags, tokens, context - tokens, hidden)
        return _attend(attn, hidden, key, value, bias)

    def _write_reference(
        self, attn: Attention, hidden: torch.Tensor, applies: list[bool]
    ) -> torch.Tensor:
        """The definition, one image at a time: its own tokens plus re-projected samples of
        its call's other images (its own tokens only where its call skips CSA now)."""
        state = self.state
        batch, tokens, channels = hidden.shape
        x = hidden.view(batch // state.rows, state.rows * tokens, channels)
        outputs: list[torch.Tensor] = [hidden[:0]] * batch
        for segment, applied in zip(state.segments, applies, strict=True):
            draw = segment.draws.get(self.layer.level)
            for group in range(x.shape[0]):
                for i in range(segment.n):
                    row = segment.start + i
                    own = x[group, row * tokens : (row + 1) * tokens][None]
                    context = own
                    if applied and draw is not None:
                        index = draw.gather[i] + segment.start * tokens
                        context = torch.cat([own, x[group, index.to(hidden.device)][None]], dim=1)
                    key, value = attn.to_k(context), attn.to_v(context)
                    outputs[group * state.rows + row] = _attend(attn, own, key, value)
        return torch.cat(outputs, dim=0)


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window: every `stride` frames, the last window ending on the last
    frame. One window when the story is not longer than `window`."""
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts
