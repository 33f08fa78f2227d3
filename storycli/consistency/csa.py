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
resolution level and one skip flag per layer), not inside the processors, and the bank is
filed in a forward hook. So `torch.compile` of the UNet's `forward` sees only tensors and a few
per-call constants: with `compiled=True` the skip flags become a tensor (a skipped layer masks
its extra keys out instead of branching in Python) and a read step's bank is staged on the
device before the forward, so the graph neither breaks nor recompiles from step to step.
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

Phase = Literal["off", "write", "read", "window"]
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
    # "fast": one batched attention per layer, keys/values projected once per token and gathered.
    # "reference": the straightforward per-image loop that re-projects sampled hidden states;
    # kept as the readable definition the fast path is tested against.
    impl: Literal["fast", "reference"] = "fast"
    # "uniform": each image samples every other image alike. "temporal": more tokens from the
    # frames just before it in story order (the first frame looks at the ones after it).
    sampling: Literal["uniform", "temporal"] = "uniform"
    temporal_decay: float = 0.5

    def rate(self, level: Level) -> float:
        return self.sa32 if level == "sa32" else self.sa64

    def apply_probability(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        return self.prob_early if step < self.late_from_step else self.prob_late


@dataclass(frozen=True)
class BankSettings:
    """What the reference bank holds. It lives for one denoising step (the story loop drops
    each step's bank once every frame has read it), so it stays next to the UNet."""

    dtype: torch.dtype | None = None  # None: the activations' dtype
    levels: tuple[Level, ...] = ("sa32", "sa64")  # read frames use CSA only on banked levels
    max_step: int | None = None  # bank (and read-phase CSA) only before this step


def temporal_counts(n: int, total: int, tokens: int, decay: float) -> torch.Tensor:
    """How many tokens image i draws from image j (an n×n matrix with rows summing to `total`).

    Image i draws from the images before it (i ≥ 1) or, for the first image, from those after it;
    weights fall off geometrically with distance. Counts are capped at `tokens` per source.
    """
    counts = torch.zeros(n, n, dtype=torch.long)
    for i in range(n):
        sources = list(range(i - 1, -1, -1)) if i > 0 else list(range(1, n))
        if not sources:
            continue
        weights = torch.tensor([decay**d for d in range(len(sources))], dtype=torch.float64)
        want = min(total, tokens * len(sources))
        share = torch.floor(weights / weights.sum() * want).long().clamp(max=tokens)
        for rank in range(len(sources)):  # hand out the remainder nearest-first
            gap = want - int(share.sum())
            if gap <= 0:
                break
            share[rank] += min(gap, tokens - int(share[rank]))
        counts[i, sources] = share
    return counts


_BLOCK_RE = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


def csa_layers(unet: torch.nn.Module, blocks: Sequence[str] = ("up",)) -> list[LayerInfo]:
    """The self-attention layers CSA replaces, with their resolution level.

    The level comes from the layer's place in the UNet, not from its token count: a layer in
    `down_blocks.i` runs on a grid downsampled i times, `mid_block` on the coarsest grid, and
    `up_blocks.j` on a grid downsampled (num_up - 1 - j) times. Layers on the coarsest grid that
    has self-attention get `sa32` (SDXL: H/32 × W/32), finer ones `sa64` (SDXL: H/16 × W/16).
    """
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    found: list[tuple[tuple[int, int], str, int]] = []  # (forward order, name, downsample)
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        match = _BLOCK_RE.match(name)
        if not name.endswith("attn1") or match is None:
            continue
        if match.group(2) is not None:
            kind, block, downsample = "down", (0, int(match.group(2))), int(match.group(2))
        elif match.group(3) is not None:
            up = int(match.group(3))
            kind, block, downsample = "up", (2, up), n_up - 1 - up
        else:
            kind, block, downsample = "mid", (1, 0), n_down - 1
        if kind in blocks:
            found.append((block, name, downsample))
    if not found:
        return []
    # `attn_processors` lists down, up, then mid blocks (the order the UNet registers them);
    # layers are indexed in the order the forward runs them: down, mid, up. (A stable sort:
    # within a block, module order is forward order.)
    found.sort(key=lambda entry: entry[0])
    coarsest = max(downsample for _, _, downsample in found)
    return [
        LayerInfo(name, i, "sa32" if downsample == coarsest else "sa64", downsample)
        for i, (_, name, downsample) in enumerate(found)
    ]


@dataclass
class _LevelDraw:
    """One step's token draws on one resolution level (write phase)."""

    tokens: int  # N, tokens per image on this level
    banked: torch.Tensor  # (n·k,) every image's sampled tokens, flat into n·N: what is banked
    gather: torch.Tensor  # (n, K) flat indices into the call's n·N tokens: image i's extra tokens


@dataclass
class CallStream:
    """One call's CSA randomness and step count. Calls interleaved step by step (the story loop)
    then draw exactly as they would running one after another."""

    phase: Phase
    n_images: int
    character: str | None
    read_characters: tuple[str, ...]
    generator: torch.Generator
    step: int = -1
    history_key: str | None = None  # a read frame whose samples later frames read (history)


class CSAState:
    """Everything CSA remembers during one story: phase, step, draws, and the reference bank."""

    def __init__(
        self,
        settings: CSASettings,
        layers: Sequence[LayerInfo],
        bank: BankSettings | None = None,
        compiled: bool = False,
    ) -> None:
        self.settings = settings
        self.compiled = compiled
        self.bank_settings = bank or BankSettings()
        self.layers = tuple(layers)
        self.generator = torch.Generator(device="cpu")
        self.phase: Phase = "off"
        self.n_images = 1
        self.character: str | None = None
        self.read_characters: tuple[str, ...] = ()
        self.history_key: str | None = None
        self.step = -1
        # bank[character][step][layer name] -> (2, groups, references * k, channels): the
        # sampled tokens' keys and values, as projected in the write forward, so read frames
        # attend to them without projecting them again.
        self.bank: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self._draws: dict[Level, _LevelDraw] = {}
        self._apply: list[bool] = [False] * len(self.layers)  # the first call's skip flags
        self._apply_rows: list[list[bool]] = []  # each entered call's flags (read batches)
        self.streams: list[CallStream] = []
        self.peak_bank_bytes = 0  # the largest bank the story loop dropped
        self._by_name = {layer.name: layer for layer in self.layers}
        # Per UNet call, decided in the pre-hook so processors read no step counter.
        self.csa_now = False  # CSA applies in this call (phase on, past warm-up)
        self.store_now = False  # this write call's samples go to the bank
        self.apply_flags: torch.Tensor | None = None  # compiled: the skip flags as a tensor
        self._written: dict[str, torch.Tensor] = {}  # keys/values to bank after the forward
        self._staged: dict[str, torch.Tensor] = {}  # compiled read: this step's bank
        self._latent_size = (0, 0)

    # -- call lifecycle -----------------------------------------------------------------------

    def open_call(
        self,
        phase: Phase,
        n_images: int,
        seed: int,
        character: str | None = None,
        read_characters: Sequence[str] = (),
        history_key: str | None = None,
    ) -> CallStream:
        """The CSA randomness and step count of one call of `n_images` frames (per CFG group),
        seeded as that call; `enter` it before each of its UNet forwards. `history_key`: a
        read frame also banks samples of its own tokens there (rolling history)."""
        if phase == "write" and character is None:
            raise ValueError("a write call needs the character whose bank it fills")
        missing = [c for c in read_characters if c not in self.bank]
        if phase == "read" and missing:
            raise RuntimeError(f"no reference bank for {missing}; run its write call first")
        if phase == "write":
            self.bank[character] = {}  # type: ignore[index]
        if history_key is not None:
            self.bank[history_key] = {}
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return CallStream(
            phase, n_images, character, tuple(read_characters), generator, history_key=history_key
        )

    def enter(self, streams: Sequence[CallStream]) -> None:
        """The next UNet forward runs these calls together, at the same step. Only read calls
        (one frame each, same characters) or plain ones share a forward; each keeps its own
        draws, so the batch computes what the calls would one by one."""
        first = streams[0]
        if len(streams) > 1 and any(
            (s.phase, s.read_characters, s.step, s.n_images)
            != (first.phase, first.read_characters, first.step, 1)
            for s in streams
        ):
            raise ValueError("only one-frame calls at the same step and phase share a forward")
        if len(streams) > 1 and first.phase not in ("read", "off"):
            raise ValueError(f"{first.phase} calls cannot share a forward")
        self.streams = list(streams)
        self.phase, self.character = first.phase, first.character
        self.n_images = sum(s.n_images for s in streams)
        self.read_characters = first.read_characters
        self.history_key = first.history_key if first.phase == "read" else None
        self.generator, self.step = first.generator, first.step

    def leave(self) -> None:
        """After the forward(s) of `enter`: keep each call's step count for its next step."""
        for stream in self.streams:
            stream.step = self.step
        self.end_call()

    def begin_call(
        self,
        phase: Phase,
        n_images: int,
        seed: int,
        character: str | None = None,
        read_characters: Sequence[str] = (),
    ) -> None:
        """Prepare for one whole pipeline call (all its steps) of `n_images` frames."""
        self.enter([self.open_call(phase, n_images, seed, character, read_characters)])

    def drop_step(self, step: int) -> None:
        """Free every character's bank of `step`: the story loop has read it for all frames."""
        self.peak_bank_bytes = max(self.peak_bank_bytes, self.bank_bytes())
        for steps in self.bank.values():
            steps.pop(step, None)

    def banked_steps(self) -> int:
        """The most steps any character's bank holds now."""
        return max((len(steps) for steps in self.bank.values()), default=0)

    def end_call(self) -> None:
        self.phase, self._draws, self._staged = "off", {}, {}
        self.csa_now = self.store_now = False

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

    def _banks_step(self, step: int) -> bool:
        limit = self.bank_settings.max_step
        return step >= self.settings.warmup_steps and (limit is None or step < limit)

    def begin_step(
        self, latent_height: int, latent_width: int, device: torch.device | None = None
    ) -> None:
        """Advance the step counter and make this step's random draws."""
        self.step += 1
        self._staged, self._written = {}, {}
        self._latent_size = (latent_height, latent_width)
        self.csa_now = self.phase != "off" and self.step >= self.settings.warmup_steps
        history = self.phase == "read" and self.history_key is not None
        self.store_now = (self.phase == "write" or history) and self._banks_step(self.step)
        if self.phase == "off":
            return
        p = self.settings.apply_probability(self.step)
        if p <= 0.0:
            self._apply_rows = [[False] * len(self.layers) for _ in self.streams]
        else:
            self._apply_rows = [
                (torch.rand(len(self.layers), generator=s.generator) < p).tolist()
                for s in self.streams
            ]
        self._apply = self._apply_rows[0]
        if self.compiled:
            self.apply_flags = torch.tensor(self._apply_rows, device=device)  # (calls, layers)
        self._draws = {}
        if self.phase == "write" or (history and self.store_now):
            self._draw_levels()  # a history frame: samples of its own tokens, to bank
        if self.compiled and self.phase == "read" and device is not None:
            self._stage(device)

    def end_step(self) -> None:
        """After the UNet forward: file this step's write-phase samples in the bank."""
        for name, kv in self._written.items():
            self._store(self._by_name[name], kv)
        self._written = {}

    def begin_window(self, n_images: int) -> None:
        """Window mode: the next UNet forward is one window of `n_images` frames; draw for it."""
        self.n_images = n_images
        self._draws = {}
        self._draw_levels()

    def _draw_levels(self) -> None:
        if self.step < self.settings.warmup_steps:
            return
        height, width = self._latent_size
        for level in ("sa32", "sa64"):
            downsample = {layer.downsample for layer in self.layers if layer.level == level}
            if downsample:
                factor = 2 ** downsample.pop()
                tokens = math.ceil(height / factor) * math.ceil(width / factor)
                draw = self._draw(level, tokens)
                if draw is not None:
                    self._draws[level] = draw

    def _draw(self, level: Level, tokens: int) -> _LevelDraw | None:
        n = self.n_images
        k = round(self.settings.rate(level) * tokens)
        if k == 0:
            return None
        g = self.generator
        samples = torch.rand(n, tokens, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
        offsets = torch.arange(n)[:, None] * tokens
        flat = samples + offsets  # (n, k) into the call's n·N tokens
        if n == 1:
            # A lone reference has no other image to sample: it attends to its own tokens only
            # (as the reference code with id_length 1), but its samples are still banked.
            gather = flat[:, :0]
        elif self.settings.sampling == "uniform":
            # Image i sees every other image's sample set (the reference code's semantics).
            others = [torch.cat([flat[j] for j in range(n) if j != i]) for i in range(n)]
            gather = torch.stack(others)
        else:
            total = min((n - 1) * k, tokens)
            counts = temporal_counts(n, total, tokens, self.settings.temporal_decay)
            rows = []
            for i in range(n):
                parts = [
                    torch.randperm(tokens, generator=g)[: int(c)] + j * tokens
                    for j, c in enumerate(counts[i].tolist())
                    if c > 0
                ]
                rows.append(torch.cat(parts).sort().values if parts else flat.new_zeros(0))
            gather = torch.stack(rows)
        return _LevelDraw(tokens, flat.flatten(), gather)

    # -- bank storage ---------------------------------------------------------------------------

    def _store(self, layer: LayerInfo, kv: torch.Tensor) -> None:
        tensor = kv.to(dtype=self.bank_settings.dtype or kv.dtype)
        owner = self.history_key if self.phase == "read" else self.character
        steps = self.bank[owner]  # type: ignore[index]
        steps.setdefault(self.step, {})[layer.name] = tensor

    def _reads_layer(self, layer: LayerInfo) -> bool:
        return self._banks_step(self.step) and layer.level in self.bank_settings.levels

    def _stage(self, device: torch.device) -> None:
        """Compiled read step: gather this step's bank for every read layer before the forward."""
        for layer in self.layers:
            if self._reads_layer(layer):
                banked = self._banked(layer, device)
                if banked:
                    self._staged[layer.name] = torch.cat(banked, dim=2)

    def _banked(self, layer: LayerInfo, device: torch.device) -> list[torch.Tensor]:
        """The bank entries a read frame attends to in `layer`, on `device`."""
        out = []
        for c in self.read_characters:
            tensor = self.bank[c].get(self.step, {}).get(layer.name)
            if tensor is not None:
                out.append(tensor.to(device))
        return out

    # -- what the processor asks ----------------------------------------------------------------

    def write_draw(self, layer: LayerInfo) -> tuple[_LevelDraw | None, bool, bool]:
        """Write and window phases: (this level's draw, whether CSA applies in `layer` now,
        whether its samples go to the bank)."""
        draw = self._draws.get(layer.level)
        if draw is None:
            return None, False, False
        applies = self.n_images > 1 and (self.compiled or self._apply[layer.index])
        stores = self.store_now and layer.level in self.bank_settings.levels
        return draw, applies, stores

    def history_draw(self, layer: LayerInfo) -> _LevelDraw | None:
        """Read phase with rolling history: this layer's sample of the frame's own tokens,
        when this step banks them."""
        if self.phase != "read" or self.history_key is None or not self.store_now:
            return None
        if layer.level not in self.bank_settings.levels:
            return None
        return self._draws.get(layer.level)

    def file_bank(self, layer: LayerInfo, key: torch.Tensor, value: torch.Tensor) -> None:
        """Bank the sampled tokens' keys and values, (groups, n·k, C) each, after the forward."""
        self._written[layer.name] = torch.stack([key, value])

    def read_tokens(self, layer: LayerInfo, hidden: torch.Tensor) -> torch.Tensor | None:
        """In the read phase: the banked keys and values (2, batch, K, C) this layer attends to,
        or None."""
        if not self.read_characters:
            return None
        if self.compiled:
            extra = self._staged.get(layer.name)
            if extra is None:
                return None
        else:
            applies = any(row[layer.index] for row in self._apply_rows)
            if not applies or not self._reads_layer(layer):
                return None
            banked = self._banked(layer, hidden.device)
            if not banked:
                return None
            extra = torch.cat(banked, dim=2)
        extra = extra.to(hidden.dtype)
        groups = hidden.shape[0] // self.n_images
        if extra.shape[1] != groups:
            raise RuntimeError("read call and write call disagree on classifier-free guidance")
        return extra.repeat_interleave(self.n_images, dim=1)

    def check_batch(self, hidden: torch.Tensor) -> None:
        if hidden.shape[0] % self.n_images:
            raise RuntimeError(f"batch {hidden.shape[0]} is not a multiple of {self.n_images}")

    def skip_bias(self, layer: LayerInfo, own: int, extra: int, like: torch.Tensor):
        """An additive key bias that hides the `extra` keys of the images skipping CSA in this
        layer now (plain attention, exactly): every skip in compiled mode, so skipping needs no
        Python branch, and in a read batch whose frames drew different skips."""
        if self.compiled and self.apply_flags is not None:
            keep = self.apply_flags[:, layer.index].to(like.device)
        elif len(self._apply_rows) > 1:
            flags = [row[layer.index] for row in self._apply_rows]
            if all(flags):
                return None
            keep = torch.tensor(flags, device=like.device)
        else:
            return None
        hidden = torch.where(keep, 0.0, float("-inf")).to(like.dtype)
        if keep.numel() == 1:  # one call: one bias for every row
            bias = torch.cat([like.new_zeros(own), hidden.expand(extra)])
            return bias.view(1, 1, 1, own + extra)
        # Rows are [CFG group 0: calls..., group 1: calls...], one frame per call.
        rows = hidden.repeat(like.shape[0] // keep.numel())[:, None].expand(-1, extra)
        bias = torch.cat([like.new_zeros(rows.shape[0], own), rows], dim=1)
        return bias.view(rows.shape[0], 1, 1, own + extra)


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
    """Self-attention whose keys/values also cover tokens of other images (see module doc)."""

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
                extra = state.read_tokens(self.layer, hidden_states)
                history = state.history_draw(self.layer)
                if extra is not None or history is not None:
                    key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
                if history is not None:  # bank this frame's samples for the frames after it
                    banked = history.banked.to(hidden_states.device)
                    state.file_bank(self.layer, key[:, banked], value[:, banked])
                if extra is not None:
                    key = torch.cat([key, extra[0]], dim=1)
                    value = torch.cat([value, extra[1]], dim=1)
                    bias = state.skip_bias(
                        self.layer, hidden_states.shape[1], extra.shape[2], hidden_states
                    )
                    out = _attend(attn, hidden_states, key, value, bias)
        if out is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _write(self, attn: Attention, hidden: torch.Tensor) -> torch.Tensor | None:
        """Write or window phase: bank the sampled tokens' keys/values when this step banks,
        and run CSA when it applies in this layer now (None: plain attention)."""
        state = self.state
        draw, applies, stores = state.write_draw(self.layer)
        if draw is None or not (applies or stores):
            return None
        n = state.n_images
        batch, tokens, channels = hidden.shape
        groups = batch // n
        banked = draw.banked.to(hidden.device)
        if applies and state.settings.impl == "fast":
            key, value = attn.to_k(hidden), attn.to_v(hidden)
            if stores:
                state.file_bank(
                    self.layer,
                    key.view(groups, n * tokens, -1)[:, banked],
                    value.view(groups, n * tokens, -1)[:, banked],
                )
            return self._write_fast(attn, hidden, draw, key, value)
        if stores:  # project only the sampled tokens (a per-token map: same numbers)
            sampled = hidden.view(groups, n * tokens, channels)[:, banked]
            state.file_bank(self.layer, attn.to_k(sampled), attn.to_v(sampled))
        return self._write_reference(attn, hidden, draw) if applies else None

    def _write_fast(
        self,
        attn: Attention,
        hidden: torch.Tensor,
        draw: _LevelDraw,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """All images in one SDPA call; keys/values projected once per token, then gathered."""
        n = self.state.n_images
        batch, tokens, _ = hidden.shape
        groups = batch // n
        gather = draw.gather.to(hidden.device)  # (n, K)

        def with_extra(own: torch.Tensor) -> torch.Tensor:
            flat = own.view(groups, n * tokens, own.shape[-1])
            extra = flat[:, gather].reshape(batch, gather.shape[1], own.shape[-1])
            return torch.cat([own, extra], dim=1)

        bias = self.state.skip_bias(self.layer, tokens, gather.shape[1], hidden)
        return _attend(attn, hidden, with_extra(key), with_extra(value), bias)

    def _write_reference(
        self, attn: Attention, hidden: torch.Tensor, draw: _LevelDraw
    ) -> torch.Tensor:
        """The definition, one image at a time: own tokens + re-projected samples of others."""
        n = self.state.n_images
        batch, tokens, channels = hidden.shape
        x = hidden.view(batch // n, n * tokens, channels)
        outputs = []
        for group in range(batch // n):
            for i in range(n):
                own = x[group, i * tokens : (i + 1) * tokens][None]
                others = x[group, draw.gather[i].to(hidden.device)][None]
                context = torch.cat([own, others], dim=1)
                bias = self.state.skip_bias(self.layer, tokens, others.shape[1], hidden)
                key, value = attn.to_k(context), attn.to_v(context)
                outputs.append(_attend(attn, own, key, value, bias))
        return torch.cat(outputs, dim=0)


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
        state.begin_step(sample.shape[-2], sample.shape[-1], sample.device)

    def post_hook(_module: torch.nn.Module, _args: tuple, _output: object) -> None:
        state.end_step()

    unet.set_attn_processor(processors)
    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(saved)
        state.clear()


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window: every `stride` frames, the last window ending on the last
    frame. One window when the story is not longer than `window`."""
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


@contextmanager
def windowed_unet(
    unet: torch.nn.Module, state: CSAState, frames: int, window: int, stride: int
) -> Iterator[None]:
    """Sliding-window CSA (the paper's Algorithm 1, at the level of the UNet call).

    While active, a UNet call on all `frames` frames (times CFG groups) runs as one forward per
    window of `window` consecutive frames, each frame attending to samples from its window; a
    frame's noise prediction is the mean over the windows that cover it. Activations exist for
    one window at a time, so peak memory does not grow with the story's length.
    """
    original = unet.forward
    patched = "forward" in vars(unet)  # e.g. compiled: restore that, not the class's method
    starts = window_starts(frames, window, stride)
    size = min(window, frames)

    def forward(sample: torch.Tensor, timestep: torch.Tensor, *args: object, **kwargs: object):
        batch = sample.shape[0]
        groups = batch // frames

        def take(value: object, rows: torch.Tensor) -> object:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value[rows]
            if isinstance(value, dict):
                return {k: take(v, rows) for k, v in value.items()}
            if isinstance(value, list):  # IP-Adapter image embeddings, one per adapter
                return [take(v, rows) for v in value]
            return value

        total = torch.zeros_like(sample)
        covered = torch.zeros(frames, dtype=sample.dtype, device=sample.device)
        return_dict = kwargs.pop("return_dict", True)
        for start in starts:
            rows = torch.tensor(
                [g * frames + start + j for g in range(groups) for j in range(size)],
                device=sample.device,
            )
            state.begin_window(size)
            out = original(
                sample[rows],
                take(timestep, rows),
                *[take(a, rows) for a in args],
                return_dict=False,
                **{k: take(v, rows) for k, v in kwargs.items()},
            )[0]
            total[rows] += out
            covered[start : start + size] += 1
        result = total / covered.repeat(groups).view(-1, *([1] * (sample.ndim - 1)))
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    unet.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if patched:
            unet.forward = original  # type: ignore[method-assign]
        else:
            del unet.forward  # back to the class's method


@contextmanager
def compiled_unet(unet: torch.nn.Module, backend: str = "inductor") -> Iterator[None]:
    """`torch.compile` the UNet's forward (not its hooks: CSA draws there, outside the graph).

    `fullgraph=True`: a graph break is a bug here, not a slowdown to tolerate."""
    unet.forward = torch.compile(unet.forward, backend=backend, fullgraph=True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del unet.forward
