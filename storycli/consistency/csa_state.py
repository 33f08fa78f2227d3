"""Consistent Self-Attention's state: settings, each call's random draws, and the reference bank.

`CSAState` is everything CSA remembers during one story; the attention processor
(`storycli.consistency.csa`) only asks it questions (`write_level`, `read_tokens`, ...) and
files samples in it (`file_bank`). What drives it is the backbone's forward hooks
(`storycli.keyframes.backbones`): `begin_step` before each forward of the denoising network makes
that forward's draws from each call's own generator, `end_step` after it files the bank, and
`begin_window` before each window's forward. Nothing here knows which network runs: a layer is a
`LayerInfo` (name, resolution level, downsampling) chosen by the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

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


@dataclass
class _LevelDraw:
    """One call's token draws on one resolution level for one step (write phase)."""

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


@dataclass
class _Segment:
    """One call's rows in the forward being run: rows `start` … `start + n - 1` of every CFG
    group, with this step's skip flags and (write, window, history) token draws."""

    stream: CallStream
    start: int
    n: int
    apply: list[bool]  # per layer: CSA applies there now
    draws: dict[Level, _LevelDraw]

    @property
    def owner(self) -> str | None:
        """The bank entry its samples go to: the write call's character, a history key."""
        return self.stream.history_key if self.stream.phase == "read" else self.stream.character


@dataclass
class LevelGather:
    """A forward's draws on one level, every segment's together, on the device: one gather
    serves all layers of that level (no per-layer index copies)."""

    # (rows, N + K) flat indices into a CFG group's rows·N tokens: each row's own tokens, then
    # its extra ones: one gather builds every row's keys (no separate concatenation).
    index: torch.Tensor
    valid: torch.Tensor | None  # (rows, K) which extra tokens are real (None: all are)
    widths: list[int]  # K of each segment (the rest of its rows' K is padding)
    banked: list[torch.Tensor]  # each segment's sampled tokens, flat into rows·N


class CSAState:
    """Everything CSA remembers during one story: phase, step, draws, and the reference bank.

    One UNet forward may run several calls (`enter`): every character's write call together
    (each image samples only its own character's images), or read calls of any characters
    with plain ones (each row attends to its own characters' banks). Each call keeps its own
    generator and step, so the batch computes what the calls would one by one."""

    def __init__(
        self,
        settings: CSASettings,
        layers: Sequence[LayerInfo],
        bank: BankSettings | None = None,
    ) -> None:
        self.settings = settings
        self.bank_settings = bank or BankSettings()
        self.layers = tuple(layers)
        self.phase: Phase = "off"  # of the forward: write, window, read (reads and plain), off
        self.step = -1
        # bank[character][step][layer name] -> (2, groups, references * k, channels): the
        # sampled tokens' keys and values, as projected in the write forward, so read frames
        # attend to them without projecting them again.
        self.bank: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self.segments: list[_Segment] = []
        self.rows = 1  # rows per CFG group in the forward
        self.peak_bank_bytes = 0  # the largest bank the story loop dropped
        self._by_name = {layer.name: layer for layer in self.layers}
        # Per UNet call, decided in the pre-hook so processors read no step counter.
        self.csa_now = False  # CSA applies in this call (phase on, past warm-up)
        self.store_now = False  # this call's samples go to the bank
        self._levels: dict[Level, LevelGather] = {}
        self._flags: torch.Tensor | None = None  # (rows, layers) apply flags, on the device
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # read padding masks, by widths
        self._written: dict[tuple[str, str], torch.Tensor] = {}  # to bank after the forward
        self._latent_size = (0, 0)
        self._device: torch.device | None = None

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
        """The next UNet forward runs these calls together, at the same step, their rows in
        this order: write calls together, or read and plain calls together; a window call and
        a read call that banks history run alone."""
        phases = {s.phase for s in streams}
        if len(streams) > 1:
            if not (phases == {"write"} or phases <= {"read", "off"}):
                raise ValueError(f"{' and '.join(sorted(phases))} calls cannot share a forward")
            if any(s.history_key is not None for s in streams):
                raise ValueError("a read call with rolling history runs alone")
            if len({s.step for s in streams}) > 1:
                raise ValueError("calls sharing a forward must be at the same step")
        self.segments, start = [], 0
        for stream in streams:
            self.segments.append(_Segment(stream, start, stream.n_images, [], {}))
            start += stream.n_images
        self.rows = start
        self.phase = next((p for p in ("write", "window", "read") if p in phases), "off")  # type: ignore[assignment]
        self.step = streams[0].step

    def leave(self) -> None:
        """After the forward(s) of `enter`: keep each call's step count for its next step."""
        for segment in self.segments:
            segment.stream.step = self.step
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
        self.phase, self._levels, self._flags = "off", {}, None
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
        """Advance the step counter and make this step's random draws: per call, its skip
        flags, then (write, history) its token samples on each level, from its own generator."""
        self.step += 1
        self._written, self._levels, self._flags, self._masks = {}, {}, None, {}
        self._latent_size = (latent_height, latent_width)
        self._device = device
        self.csa_now = self.phase != "off" and self.step >= self.settings.warmup_steps
        history = self.phase == "read" and self.segments[0].stream.history_key is not None
        self.store_now = (self.phase == "write" or history) and self._banks_step(self.step)
        if self.phase == "off":
            return
        p = self.settings.apply_probability(self.step)
        for segment in self.segments:
            off = segment.stream.phase == "off" or p <= 0.0
            segment.apply = (
                [False] * len(self.layers)
                if off
                else (torch.rand(len(self.layers), generator=segment.stream.generator) < p).tolist()
            )
        self._row_flags()
        if self.phase == "write" or (history and self.store_now):
            self._draw_levels()  # a history frame: samples of its own tokens, to bank

    def _row_flags(self) -> None:
        """Which rows skip which layers, copied to the device once for every layer (None: no
        row skips any)."""
        self._flags = None
        if not all(all(segment.apply) for segment in self.segments):
            self._flags = torch.tensor(
                [segment.apply for segment in self.segments for _ in range(segment.n)],
                device=self._device,
            )

    def end_step(self) -> None:
        """After the UNet forward: file this step's samples in the bank."""
        for (owner, name), kv in self._written.items():
            self._store(owner, self._by_name[name], kv)
        self._written = {}

    def begin_window(self, n_images: int) -> None:
        """Window mode: the next UNet forward is one window of `n_images` frames; draw for it."""
        segment = self.segments[0]
        self.segments = [_Segment(segment.stream, 0, n_images, segment.apply, {})]
        self.rows = n_images
        self._row_flags()
        self._draw_levels()

    def _draw_levels(self) -> None:
        self._levels = {}
        for segment in self.segments:
            segment.draws = {}
        if self.step < self.settings.warmup_steps:
            return
        height, width = self._latent_size
        for level in ("sa32", "sa64"):
            downsample = {layer.downsample for layer in self.layers if layer.level == level}
            if not downsample:
                continue
            factor = 2 ** downsample.pop()
            tokens = math.ceil(height / factor) * math.ceil(width / factor)
            draws = [self._draw(level, tokens, segment) for segment in self.segments]
            for segment, draw in zip(self.segments, draws, strict=True):
                if draw is not None:
                    segment.draws[level] = draw
            if any(draw is not None for draw in draws):
                self._levels[level] = self._combine(draws, tokens)

    def _combine(self, draws: list[_LevelDraw | None], tokens: int) -> LevelGather:
        """The segments' draws as one gather over the forward's rows (shorter rows padded),
        moved to the device once for every layer of the level."""
        widths = [draw.gather.shape[1] if draw is not None else 0 for draw in draws]
        own = torch.arange(self.rows * tokens).view(self.rows, tokens)
        gather = torch.zeros(self.rows, max(widths), dtype=torch.long)
        valid = torch.zeros(self.rows, max(widths), dtype=torch.bool)
        banked = []
        for segment, draw, width in zip(self.segments, draws, widths, strict=True):
            offset = segment.start * tokens  # its rows' tokens within a CFG group's rows·N
            rows = slice(segment.start, segment.start + segment.n)
            if draw is not None:
                gather[rows, :width] = draw.gather + offset
                valid[rows, :width] = True
            banked.append(
                (draw.banked + offset).to(self._device) if draw is not None else gather[0, :0]
            )
        return LevelGather(
            torch.cat([own, gather], dim=1).to(self._device),
            None if bool(valid.all()) else valid.to(self._device),
            widths,
            banked,
        )

    def _draw(self, level: Level, tokens: int, segment: _Segment) -> _LevelDraw | None:
        n = segment.n
        k = round(self.settings.rate(level) * tokens)
        if k == 0 or segment.stream.phase == "off":
            return None
        g = segment.stream.generator
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

    def _store(self, owner: str, layer: LayerInfo, kv: torch.Tensor) -> None:
        tensor = kv.to(dtype=self.bank_settings.dtype or kv.dtype)
        self.bank[owner].setdefault(self.step, {})[layer.name] = tensor

    def _reads_layer(self, layer: LayerInfo) -> bool:
        return self._banks_step(self.step) and layer.level in self.bank_settings.levels

    # -- what the processor asks ----------------------------------------------------------------

    def applies(self, layer: LayerInfo) -> list[bool]:
        """Per segment: whether CSA applies to its rows in `layer` now."""
        return [segment.apply[layer.index] for segment in self.segments]

    def write_level(self, layer: LayerInfo) -> tuple[LevelGather | None, list[bool], bool]:
        """Write and window phases: (this level's draws, per segment whether CSA applies in
        `layer` now, whether the samples go to the bank)."""
        level = self._levels.get(layer.level)
        if level is None:
            return None, [], False
        applies = [
            flag and width > 0
            for flag, width in zip(self.applies(layer), level.widths, strict=True)
        ]
        stores = self.store_now and layer.level in self.bank_settings.levels
        return level, applies, stores

    def history_level(self, layer: LayerInfo) -> LevelGather | None:
        """Read phase with rolling history: this layer's sample of the frame's own tokens,
        when this step banks them."""
        if self.phase != "read" or not self.store_now:
            return None
        if layer.level not in self.bank_settings.levels:
            return None
        return self._levels.get(layer.level)

    def file_bank(
        self, layer: LayerInfo, key: torch.Tensor, value: torch.Tensor, segment: int = 0
    ) -> None:
        """Bank a segment's sampled tokens' keys and values, (groups, n·k, C) each, after the
        forward (read frames of this step attend to them)."""
        owner = self.segments[segment].owner
        self._written[(owner, layer.name)] = torch.stack([key, value])  # type: ignore[index]

    def read_tokens(
        self, layer: LayerInfo, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """In the read phase: the banked keys and values (2, groups, rows, K, C) the rows attend
        to in `layer` and which of them each row reads, (rows, K) (None: all; a row reading fewer
        banks, or skipping CSA here, has the rest masked), or None when no row reads here."""
        if not self._reads_layer(layer):
            return None
        # Per segment, the banks it reads here now; rows reading the same share one tensor.
        reads = [
            segment.stream.read_characters if segment.apply[layer.index] else ()
            for segment in self.segments
        ]
        parts: dict[tuple[str, ...], torch.Tensor | None] = {}
        for names in dict.fromkeys(reads):
            banked = [
                tensor
                for c in names
                if (tensor := self.bank[c].get(self.step, {}).get(layer.name)) is not None
            ]
            parts[names] = (
                torch.cat(banked, dim=2).to(hidden.device, hidden.dtype) if banked else None
            )
        found = [part for part in parts.values() if part is not None]
        if not found:
            return None
        groups = hidden.shape[0] // self.rows
        if any(part.shape[1] != groups for part in found):
            raise RuntimeError("read call and write call disagree on classifier-free guidance")
        if len(parts) == 1:  # every row reads the same banks: a view, no padding, no mask
            return found[0][:, :, None].expand(-1, -1, self.rows, -1, -1), None
        widths = [0 if parts[names] is None else parts[names].shape[2] for names in reads]
        width = max(widths)
        padded = []
        for segment, names, have in zip(self.segments, reads, widths, strict=True):
            part = parts[names]
            part = found[0][:, :, :0] if part is None else part
            part = F.pad(part, (0, 0, 0, width - have))  # (2, groups, K, C)
            padded.append(part[:, :, None].expand(-1, -1, segment.n, -1, -1))
        return torch.cat(padded, dim=2), self._valid(widths, hidden.device)

    def _valid(self, widths: list[int], device: torch.device) -> torch.Tensor | None:
        """(rows, K): which of the K extra keys each row reads, for segments reading `widths`
        keys (None: all of them); made once per forward and width pattern, not per layer."""
        if len(set(widths)) == 1:
            return None
        key = tuple(widths)
        if key not in self._masks:
            valid = torch.zeros(self.rows, max(widths), dtype=torch.bool)
            for segment, have in zip(self.segments, widths, strict=True):
                valid[segment.start : segment.start + segment.n, :have] = True
            self._masks[key] = valid.to(device)
        return self._masks[key]

    def check_batch(self, hidden: torch.Tensor) -> None:
        if hidden.shape[0] % self.rows:
            raise RuntimeError(f"batch {hidden.shape[0]} is not a multiple of {self.rows}")

    def grid_tokens(self, layer: LayerInfo) -> int:
        """Tokens per image in `layer` this step: the latent grid of `begin_step`, downsampled
        as the layer is (as the draws count them)."""
        factor = 2**layer.downsample
        height, width = self._latent_size
        return math.ceil(height / factor) * math.ceil(width / factor)

    def row_flags(self, layer: LayerInfo) -> torch.Tensor | None:
        """(rows,) whether each row applies CSA in `layer` now (None: every row does)."""
        return None if self._flags is None else self._flags[:, layer.index]
