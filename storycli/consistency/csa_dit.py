"""Consistent Self-Attention (StoryDiffusion) in a diffusion transformer: FLUX.1's joint attention.

StoryDiffusion's idea carries over unchanged (`storycli.consistency.csa` has the reasoning): in
the write phase a character's reference frames are denoised together and each image's queries
also see tokens sampled from the other references; the samples' keys and values are banked per
character, step and layer; in the read phase every other frame's queries see its own tokens
plus the banks of the characters it shows. The same `CSAState` drives both networks: one
generator per call, draws made in the transformer's forward pre-hook (skip flags per layer, one
sorted token sample per image), the bank filed in its forward hook and dropped by the story loop
once every frame of the step has read it. What changes is the attention it goes into.

**FLUX's attention is joint.** A double-stream block projects text (`add_*_proj`) and image
tokens (`to_*`) with separate weights, RMS-normalises queries and keys per head, concatenates
them as [text, image] and runs one attention over the joint sequence; a single-stream block
gets [text, image] already joined and projects both with one set of weights. Positions enter
only through RoPE, rotated into queries and keys after the norms (text ids are all zero, image
ids are the packed latent grid's row and column). So:

* **What is banked**: keys and values of sampled *image* tokens, *after* RoPE. A borrowed token
  keeps the position it had in its own frame: the reading frame sees "this appearance at that
  place", as a UNet's borrowed token (no positional encoding inside self-attention) carries its
  position only implicitly in its features. Text tokens are never banked: they are the prompt,
  each frame has its own, and borrowing them would leak one frame's prompt into another.
  Keys/values are stored flat, (groups, n·k, heads·head_dim), the format `CSAState` keeps for
  SDXL, so banks, saved characters and the per-step lifetime need nothing new.
* **How a row attends**: its *image* queries attend to its own full sequence (text + image)
  plus the borrowed tokens; its *text* queries attend to its own sequence only, as in the stock
  block: the text stream describes this frame's prompt and should not be rewritten by another
  frame's pixels (the text tokens' outputs feed every later block's keys and values, so a
  leak would compound). This is done with **two attention calls**, text queries over
  own keys and image queries over own + borrowed keys, rather than one call with a (queries ×
  keys) mask hiding the borrowed keys from text rows: both are exact (softmax is per query
  row, so splitting the queries changes nothing mathematically), but the split computes no
  masked-out text×bank scores, materialises no S×(S+K) mask, and leaves both calls mask-free
  (flash / memory-efficient kernels) whenever every row reads the same bank; only rows that
  skip CSA or read fewer banks need a per-key bias, (batch, 1, 1, S+K), broadcast over queries.
* **Write rows** attend the same way: a reference's image queries see its own sequence plus
  the samples of its call's other references (one gather of the flat image keys per layer, as
  SDXL's fast path; calls with fewer samples padded and masked, rows that skip CSA in a layer
  masked whole), its text queries their own sequence. `CSASettings.impl` does not apply: the
  per-image "reference" loop is SDXL's readable definition; here the tests hold the definition
  (float64 softmax over the same keys) against this one path.
* **Bit-identity when off**: q/k/v are computed with diffusers' own `_get_qkv_projections`,
  norms and `apply_rotary_emb`, in the stock processor's order, and a row that does not use CSA
  goes through the same `dispatch_attention_fn` call. With CSA off (phase "off", rate 0, warm-up,
  no bank) the transformer's output is bit-identical to `FluxAttnProcessor`'s.

**Rates.** Every DiT layer runs on one token grid, the packed latent grid H/16 × W/16 — the very
grid SDXL's `sa64` rate is defined on (SDXL's finer self-attention level, H/16 × W/16; 64 × 64
at 1024 px for both). So every DiT layer is level `sa64`: a story's `sa64` means the same fraction
of the same-size grid on both backbones, and all layers of a step share one sample per image (as
all layers of one SDXL level do), so a read frame sees the same borrowed positions at every
depth. `sa32` has no DiT layer and is ignored. Rejected: a rate per block kind (double → sa32,
single → sa64): it would give `sa32` a meaning it has nowhere else, and double- and single-stream
blocks differ in weights, not in resolution, so nothing says they need different rates.
`BankSettings.levels` works as on SDXL (without `sa64`, nothing is banked).

**Which blocks** (`dit_csa_layers`): FLUX.1 has 19 double-stream then 38 single-stream blocks,
all at one resolution. Names: `double`, `single`, `double.<i>`, `single.<i>`, ranges
`single.<i>-<j>`; and the story schema's UNet words, mapped by depth into thirds of FLUX.1's 57
blocks: `down` = the double-stream blocks (0–18), `mid` = the first half of the single-stream
ones (0–18), `up` = their second half (19–37). Default `up`, as SDXL's default: (1) cost — every
CSA layer holds a bank of refs·k tokens × heads·head_dim × 2 and widens its read rows' keys
from S to S + refs·k (at 1024 px, rate 0.5 and 3 references: 4 608 → 10 752 keys), so a third
of the layers costs a third of all of them; (2) identity — the late blocks refine appearance
(colour, texture, face detail) once the early ones have fixed each frame's layout from its own
prompt; sharing late keeps each frame's composition its own — by depth, the choice
StoryDiffusion's code makes on SDXL (its decoder's up blocks only). This default is an
analogy, not a measurement: measuring it on the real FLUX.1 (identity similarity vs prompt
alignment per block range) is still to do. A known limit of cross-image attention in FLUX
is a locality bias (queries favour borrowed tokens near their own position; CharaConsist,
arXiv 2507.11533): keeping positions is the faithful port; re-positioning borrowed tokens
would be a different method.

**Hooks** (`installed_dit_csa`): processors swapped in per layer through
`transformer.set_attn_processor`, a forward pre-hook calling `state.begin_step` with the
packed grid (read from `img_ids`: rows × columns must be the image token count), a forward hook
calling `state.end_step`; everything restored on exit. One transformer forward per step per
call (CFG, where used, as groups of rows in that forward, as SDXL's); FLUX.1 Kontext's extra
reference-image tokens, context parallelism and custom attention masks are not supported (the
processor falls back to plain attention for the last two; the hook refuses the first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

# diffusers' own projection helper (plain or fused q/k/v): the exact ops of `FluxAttnProcessor`.
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

# The key bias hiding padded or skipped extra keys: the UNet processor's, shared.
from storycli.consistency.csa import _extra_bias
from storycli.consistency.csa_state import CSAState, LayerInfo
from storycli.story.schema import BLOCK_NAME

#: The default blocks (see the module doc): FLUX.1's last 19 single-stream blocks.
DEFAULT_DIT_BLOCKS: tuple[str, ...] = ("up",)
_DOUBLE, _SINGLE = "transformer_blocks", "single_transformer_blocks"
# The level every DiT layer gets: the packed latent grid is SDXL's sa64 grid (module doc).
_DIT_LEVEL = "sa64"


# ------------------------------------------------------------------------------ the processor


def _joint_qkv(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    encoder: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (batch, text + image, heads, head_dim) after the norms and
    RoPE, by `FluxAttnProcessor`'s ops in its order (so plain attention over them is
    bit-identical to it)."""
    query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden, encoder)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
        e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
        e_value = e_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([e_query, query], dim=1)
        key = torch.cat([e_key, key], dim=1)
        value = torch.cat([e_value, value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query, key, value


def _joined(own: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(batch, S + K, heads, head_dim): each row's own keys (or values) then its extra ones,
    (groups, rows, K, heads·head_dim), in one copy (an expanded bank is read, not copied)."""
    groups, rows = extra.shape[:2]
    heads, head_dim = own.shape[2:]
    own = own.reshape(groups, rows, *own.shape[1:])
    joined = torch.cat([own, extra.unflatten(-1, (heads, head_dim))], dim=2)
    return joined.view(groups * rows, -1, heads, head_dim)


class DiTConsistentAttnProcessor:
    """FLUX joint attention whose image queries also see borrowed image tokens (module doc).

    Excluded from `torch.compile` like the UNet's processor: it reads the story's Python state
    (phase, draws, bank), which differs per layer and call."""

    # Set from the processor it replaces (`installed_dit_csa`), as `set_attention_backend` does.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: CSAState, layer: LayerInfo) -> None:
        self.state = state
        self.layer = layer

    @torch.compiler.disable
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        state = self.state
        out = None
        if state.csa_now and attention_mask is None and self._parallel_config is None:
            state.check_batch(hidden_states)
            image = self._image_tokens(hidden_states, encoder_hidden_states)
            if state.phase in ("write", "window"):
                out = self._write(query, key, value, image)
            else:
                out = self._read(query, key, value, image)
        if out is None:  # plain attention: the stock call on the same tensors
            out = self._dispatch(query, key, value, attention_mask)
        return self._finish(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states)

    def _image_tokens(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> int:
        """Image tokens per row: a double-stream block's `hidden_states`; in a single-stream one
        the step's grid (the joint sequence's last tokens, text first)."""
        tokens = self.state.grid_tokens(self.layer)
        joint = encoder is None  # single-stream: text tokens come first in `hidden`
        if hidden.shape[1] < tokens or (not joint and hidden.shape[1] != tokens):
            raise RuntimeError(f"{hidden.shape[1]} tokens, the step's grid has {tokens}")
        return tokens

    def _dispatch(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # A bias needs a kernel that takes one: the native one (a flash backend set on the
        # model serves the mask-free calls).
        backend = self._attention_backend if mask is None else "native"
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            backend=backend,
            parallel_config=self._parallel_config,
        )

    @staticmethod
    def _finish(
        attn: torch.nn.Module, out: torch.Tensor, encoder: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`FluxAttnProcessor`'s tail: split text from image and project each (double-stream);
        a single-stream block projects after its MLP, outside attention."""
        if encoder is None:
            return out
        text, image = out.split_with_sizes([encoder.shape[1], out.shape[1] - encoder.shape[1]], 1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())

    def _attend_with(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        image: int,
        extra: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Text queries over their own sequence; image queries over it plus `extra` keys and
        values (groups, rows, K, heads·head_dim), each row its own; `bias` (batch, 1, 1,
        S + K) hides extra keys."""
        text = query.shape[1] - image
        text_out = self._dispatch(query[:, :text], key, value) if text else query[:, :0]
        image_out = self._dispatch(
            query[:, text:], _joined(key, extra[0]), _joined(value, extra[1]), bias
        )
        return torch.cat([text_out, image_out], dim=1)

    def _flat_image(self, tensor: torch.Tensor, image: int) -> torch.Tensor:
        """(groups, rows·N, heads·head_dim): a CFG group's image tokens, row after row, as the
        state's flat token indices count them."""
        groups = tensor.shape[0] // self.state.rows
        return tensor[:, tensor.shape[1] - image :].reshape(groups, self.state.rows * image, -1)

    def _write(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image: int
    ) -> torch.Tensor | None:
        """Write or window phase: bank each call's sampled image tokens when this step banks,
        and borrow the other references' samples where CSA applies now (None: plain)."""
        state = self.state
        level, applies, stores = state.write_level(self.layer)
        if level is None or not (any(applies) or stores):
            return None
        flat_key, flat_value = self._flat_image(key, image), self._flat_image(value, image)
        if stores:
            for segment, banked in enumerate(level.banked):
                state.file_bank(self.layer, flat_key[:, banked], flat_value[:, banked], segment)
        if not any(applies):
            return None
        index = level.index[:, image:]  # each row's extra tokens (its own come first)
        flags = state.row_flags(self.layer) if not all(applies) else None
        bias = _extra_bias(level.valid, flags, key.shape[1], index.shape[1], key)
        extra = (flat_key[:, index], flat_value[:, index])  # (groups, rows, K, heads·head_dim)
        return self._attend_with(query, key, value, image, extra, bias)

    def _read(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image: int
    ) -> torch.Tensor | None:
        """Read phase: image queries see their characters' banks (None: plain attention); a
        read frame with rolling history banks samples of its own image tokens."""
        state = self.state
        read = state.read_tokens(self.layer, key)
        history = state.history_level(self.layer)
        if history is not None:  # bank this frame's samples for the frames after it
            banked = history.banked[0]
            flat_key, flat_value = self._flat_image(key, image), self._flat_image(value, image)
            state.file_bank(self.layer, flat_key[:, banked], flat_value[:, banked])
        if read is None:
            return None
        extra, valid = read  # (2, groups, rows, K, heads·head_dim), (rows, K) or None
        bias = _extra_bias(valid, None, key.shape[1], extra.shape[3], key)
        return self._attend_with(query, key, value, image, (extra[0], extra[1]), bias)


# ------------------------------------------------------------------------------ in the transformer


def _selected(spec: str, n_double: int, n_single: int) -> list[tuple[str, int]]:
    """The (stack, block index) pairs one `blocks` entry names (module doc; the names are the
    story format's `BLOCK_NAME`)."""
    half = n_single // 2
    streams = {"double": (_DOUBLE, n_double), "single": (_SINGLE, n_single)}
    match = BLOCK_NAME.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"unknown DiT block {spec!r}: use down, mid, up, double, single, "
            "double.<i>, single.<i> or a range like single.<i>-<j>"
        )
    word, kind, first, last = match.groups()
    words = {
        "down": [(_DOUBLE, i) for i in range(n_double)],
        "mid": [(_SINGLE, i) for i in range(half)],
        "up": [(_SINGLE, i) for i in range(half, n_single)],
    }
    words |= {name: [(stack, i) for i in range(n)] for name, (stack, n) in streams.items()}
    if word is not None:
        return words[word]
    stack, count = streams[kind]
    lo, hi = int(first), int(last if last is not None else first)
    if not lo <= hi < count:
        raise ValueError(f"DiT block {spec!r}: the transformer has {count} {kind}-stream blocks")
    return [(stack, i) for i in range(lo, hi + 1)]


def dit_csa_layers(
    transformer: torch.nn.Module, blocks: Sequence[str] = DEFAULT_DIT_BLOCKS
) -> list[LayerInfo]:
    """The attention layers of a FLUX transformer that CSA replaces, in forward order
    (double-stream blocks, then single-stream): all level `sa64` on the packed grid
    (downsample 0). `blocks`: see the module doc (default `up`, the last half of the
    single-stream blocks)."""
    n_double = len(transformer.transformer_blocks)
    n_single = len(transformer.single_transformer_blocks)
    chosen: set[tuple[str, int]] = set()
    for spec in blocks:
        chosen.update(_selected(spec, n_double, n_single))
    order = [(_DOUBLE, i) for i in range(n_double)] + [(_SINGLE, i) for i in range(n_single)]
    picked = [entry for entry in order if entry in chosen]
    return [
        LayerInfo(f"{stack}.{i}.attn", index, _DIT_LEVEL, 0)
        for index, (stack, i) in enumerate(picked)
    ]


def packed_grid(img_ids: torch.Tensor, tokens: int) -> tuple[int, int]:
    """The packed latent grid (rows, columns) of FLUX's image position ids (tokens, 3): row
    and column ids count from 0. Refuses ids that are not one image's full grid (e.g. FLUX.1
    Kontext's extra reference-image tokens)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (the deprecated batched form)
    top = ids[:, 1:3].amax(dim=0).tolist()  # one device sync per forward
    height, width = int(top[0]) + 1, int(top[1]) + 1
    if height * width != tokens or ids.shape[0] != tokens:
        raise ValueError(
            f"CSA on a DiT needs one image's token grid: {tokens} image tokens, "
            f"ids span {height} × {width}"
        )
    return height, width


@contextmanager
def installed_dit_csa(transformer: torch.nn.Module, state: CSAState) -> Iterator[CSAState]:
    """Swap CSA processors into a FLUX `transformer`'s layers of `state.layers` for the
    duration of the block, with forward hooks driving `state` (each forward one step: draws on
    the packed grid before, the bank filed after); everything restored on exit."""
    saved = transformer.attn_processors
    by_name = {layer.name + ".processor": layer for layer in state.layers}
    missing = set(by_name) - set(saved)
    if missing:
        raise ValueError(f"no such attention layers: {sorted(missing)}")
    processors = {}
    for name, proc in saved.items():
        if name in by_name:
            csa = DiTConsistentAttnProcessor(state, by_name[name])
            csa._attention_backend = getattr(proc, "_attention_backend", None)
            csa._parallel_config = getattr(proc, "_parallel_config", None)
            proc = csa
        processors[name] = proc

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        img_ids = args[4] if len(args) > 4 else kwargs["img_ids"]
        height, width = packed_grid(img_ids, hidden.shape[1])
        state.begin_step(height, width, hidden.device)

    def post_hook(_module: torch.nn.Module, _args: tuple, _output: object) -> None:
        state.end_step()

    transformer.set_attn_processor(processors)
    handles = [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        transformer.set_attn_processor(saved)
        state.clear()
