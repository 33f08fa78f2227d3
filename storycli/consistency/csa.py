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

All mutable state lives in `CSAState`; every random draw comes from its `torch.Generator`, reseeded
per pipeline call. Draws happen once per UNet call in a forward pre-hook (one index set per
resolution level and one skip flag per layer), not inside the processors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

Phase = Literal["off", "write", "read"]
Level = Literal["sa32", "sa64"]


@dataclass(frozen=True)
class LayerInfo:
    name: str  # e.g. "up_blocks.0.attentions.1.transformer_blocks.0.attn1"
    index: int  # position among the replaced layers (indexes the per-step skip flags)
    level: Level
    downsample: int  # log2 of the layer's grid size relative to the latent


@dataclass(frozen=True)
class CSASettings:
    sa32: float = 0.5
    sa64: float = 0.5
    warmup_steps: int = 1
    prob_early: float = 0.7
    prob_late: float = 0.9
    late_from_step: int = 20

    def rate(self, level: Level) -> float:
        return self.sa32 if level == "sa32" else self.sa64

    def apply_probability(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        return self.prob_early if step < self.late_from_step else self.prob_late


_BLOCK_RE = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


def csa_layers(unet: torch.nn.Module, blocks: Sequence[str] = ("up",)) -> list[LayerInfo]:
    """The self-attention layers CSA replaces, with their resolution level.

    The level comes from the layer's place in the UNet, not from its token count: a layer in
    `down_blocks.i` runs on a grid downsampled i times, `mid_block` on the coarsest grid, and
    `up_blocks.j` on a grid downsampled (num_up - 1 - j) times. Layers on the coarsest grid that
    has self-attention get `sa32` (SDXL: H/32 × W/32), finer ones `sa64` (SDXL: H/16 × W/16).
    """
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    found: list[tuple[str, int]] = []
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        match = _BLOCK_RE.match(name)
        if not name.endswith("attn1") or match is None:
            continue
        if match.group(2) is not None:
            kind, downsample = "down", int(match.group(2))
        elif match.group(3) is not None:
            kind, downsample = "up", n_up - 1 - int(match.group(3))
        else:
            kind, downsample = "mid", n_down - 1
        if kind in blocks:
            found.append((name, downsample))
    if not found:
        return []
    coarsest = max(downsample for _, downsample in found)
    return [
        LayerInfo(name, i, "sa32" if downsample == coarsest else "sa64", downsample)
        for i, (name, downsample) in enumerate(found)
    ]


class CSAState:
    """Everything CSA remembers during one story: phase, step, draws, and the reference bank."""

    def __init__(self, settings: CSASettings, layers: Sequence[LayerInfo]) -> None:
        self.settings = settings
        self.layers = tuple(layers)
        self.generator = torch.Generator(device="cpu")
        self.phase: Phase = "off"
        self.n_images = 1
        self.character: str | None = None
        self.read_characters: tuple[str, ...] = ()
        self.step = -1
        # bank[character][step][layer name] -> (groups, references * k, channels)
        self.bank: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self._indices: dict[Level, torch.Tensor | None] = {}
        self._apply = torch.zeros(len(self.layers), dtype=torch.bool)
        self._others: torch.Tensor | None = None

    # -- call lifecycle -----------------------------------------------------------------------

    def begin_call(
        self,
        phase: Phase,
        n_images: int,
        seed: int,
        character: str | None = None,
        read_characters: Sequence[str] = (),
    ) -> None:
        """Prepare for one pipeline call of `n_images` frames (per CFG group)."""
        if phase == "write" and character is None:
            raise ValueError("a write call needs the character whose bank it fills")
        missing = [c for c in read_characters if c not in self.bank]
        if phase == "read" and missing:
            raise RuntimeError(f"no reference bank for {missing}; run its write call first")
        self.phase, self.n_images, self.character = phase, n_images, character
        self.read_characters = tuple(read_characters)
        self.step = -1
        self.generator.manual_seed(seed)
        if phase == "write":
            self.bank[character] = {}  # type: ignore[index]
            # others[i] lists the images j != i whose samples image i attends to.
            idx = torch.arange(n_images)
            self._others = torch.stack([idx[idx != i] for i in range(n_images)])

    def end_call(self) -> None:
        self.phase, self._indices, self._others = "off", {}, None

    def clear(self) -> None:
        """Free the bank (call when the story is done)."""
        self.end_call()
        self.bank.clear()

    def bank_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for steps in self.bank.values()
            for layers in steps.values()
            for t in layers.values()
        )

    # -- per UNet call ------------------------------------------------------------------------

    def begin_step(self, latent_height: int, latent_width: int) -> None:
        """Advance the step counter and make this step's random draws."""
        self.step += 1
        if self.phase == "off":
            return
        p = self.settings.apply_probability(self.step)
        if p <= 0.0:
            self._apply = torch.zeros(len(self.layers), dtype=torch.bool)
        else:
            self._apply = torch.rand(len(self.layers), generator=self.generator) < p
        self._indices = {}
        if self.phase == "write" and self.step >= self.settings.warmup_steps:
            for level in ("sa32", "sa64"):
                downsample = {layer.downsample for layer in self.layers if layer.level == level}
                if not downsample:
                    continue
                factor = 2 ** downsample.pop()
                tokens = math.ceil(latent_height / factor) * math.ceil(latent_width / factor)
                k = round(self.settings.rate(level) * tokens)
                self._indices[level] = (
                    torch.rand(self.n_images, tokens, generator=self.generator)
                    .argsort(dim=1)[:, :k]
                    .sort(dim=1)
                    .values
                    if k > 0
                    else None
                )

    def extra_tokens(self, layer: LayerInfo, hidden: torch.Tensor) -> torch.Tensor | None:
        """Tokens this layer's queries attend to beyond their own, or None for plain attention.

        `hidden` is the layer input (batch, tokens, channels); the batch is `groups` (2 with CFG:
        [uncond × n, cond × n]) times `n_images`. In the write phase this also fills the bank.
        """
        if self.phase == "off" or self.step < self.settings.warmup_steps:
            return None
        batch, tokens, channels = hidden.shape
        if batch % self.n_images:
            raise RuntimeError(f"batch {batch} is not a multiple of {self.n_images} images")
        groups = batch // self.n_images
        apply = bool(self._apply[layer.index])

        if self.phase == "write":
            idx = self._indices.get(layer.level)
            if idx is None:
                return None
            idx = idx.to(hidden.device)
            x = hidden.view(groups, self.n_images, tokens, channels)
            rows = torch.arange(self.n_images, device=hidden.device)[:, None]
            samples = x[:, rows, idx]  # (groups, n, k, channels)
            k = samples.shape[2]
            steps = self.bank[self.character]  # type: ignore[index]
            steps.setdefault(self.step, {})[layer.name] = samples.reshape(
                groups, self.n_images * k, channels
            )
            if not apply or self.n_images == 1:
                return None
            assert self._others is not None
            others = samples[:, self._others.to(hidden.device)]  # (groups, n, n-1, k, channels)
            return others.reshape(batch, (self.n_images - 1) * k, channels)

        if not apply or not self.read_characters:
            return None
        banked = [
            tensor
            for c in self.read_characters
            if (tensor := self.bank[c].get(self.step, {}).get(layer.name)) is not None
        ]
        if not banked:
            return None
        extra = torch.cat(banked, dim=1).to(device=hidden.device, dtype=hidden.dtype)
        if extra.shape[0] != groups:
            raise RuntimeError("read call and write call disagree on classifier-free guidance")
        return extra.repeat_interleave(self.n_images, dim=0)


class ConsistentSelfAttnProcessor:
    """Self-attention whose keys/values are the layer's own tokens plus `CSAState.extra_tokens`."""

    def __init__(self, state: CSAState, layer: LayerInfo) -> None:
        self.state = state
        self.layer = layer
        self.plain = AttnProcessor2_0()

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
        unsupported = (
            encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or hidden_states.ndim != 3
        )
        extra = None if unsupported else self.state.extra_tokens(self.layer, hidden_states)
        if extra is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        batch = hidden_states.shape[0]
        context = torch.cat([hidden_states, extra], dim=1)
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def installed_csa(unet: torch.nn.Module, state: CSAState) -> Iterator[CSAState]:
    """Swap CSA processors into `unet` for the duration of the block, then restore."""
    saved = unet.attn_processors
    by_name = {layer.name + ".processor": layer for layer in state.layers}
    processors = {
        name: ConsistentSelfAttnProcessor(state, by_name[name]) if name in by_name else proc
        for name, proc in saved.items()
    }

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.begin_step(sample.shape[-2], sample.shape[-1])

    unet.set_attn_processor(processors)
    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        unet.set_attn_processor(saved)
        state.clear()
