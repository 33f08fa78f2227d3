"""Consistent Self-Attention in the tiny FLUX transformer: off is stock, the bank holds post-RoPE
image keys/values, reads and writes attend as defined, draws are seeded, installing restores."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers import transformer_flux
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from storycli.consistency.csa_dit import (
    DiTConsistentAttnProcessor,
    dit_csa_layers,
    installed_dit_csa,
    packed_grid,
)
from storycli.consistency.csa_state import BankSettings, CSASettings, CSAState
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

ALWAYS = CSASettings(sa32=0.5, sa64=0.5, warmup_steps=0, prob_early=1.0, prob_late=1.0)
GRID = (4, 6)  # packed latent grid: 24 image tokens
TEXT = 8  # text tokens


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_flux_pipeline().transformer


def flux_inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    height, width = GRID
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None]
    return {
        "hidden_states": torch.randn(batch, height * width, 64, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(TEXT, 3),
        "return_dict": False,
    }


def forward(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def every_layer(transformer) -> list:
    return dit_csa_layers(transformer, ["double", "single"])


def run(transformer, state: CSAState, inputs: dict, streams: list) -> torch.Tensor:
    state.enter(streams)
    out = forward(transformer, inputs)
    state.leave()
    return out


class Recorder:
    """Each attention module's inputs and outputs during the forwards run under it."""

    def __init__(self, transformer, layers) -> None:
        self.modules = {layer.name: transformer.get_submodule(layer.name) for layer in layers}
        self.inputs: dict[str, dict] = {}
        self.outputs: dict[str, object] = {}
        self.handles = []
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(_module, _args, kwargs):
            self.inputs[name] = dict(kwargs)

        return hook

    def _post(self, name):
        def hook(_module, _args, output):
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def stock_qkv(attn, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The post-RoPE q/k/v (batch, S, heads, head_dim) the stock processor attends with,
    captured at its `dispatch_attention_fn` call."""
    seen = {}

    def record(query, key, value, **kwargs):
        seen.update(q=query, k=key, v=value)
        return dispatch_attention_fn(query, key, value, **kwargs)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(transformer_flux, "dispatch_attention_fn", record)
        FluxAttnProcessor()(attn, **inputs)
    return seen["q"], seen["k"], seen["v"]


def attention(query, key, value) -> torch.Tensor:
    """Softmax attention (S_q, heads, head_dim) in float64, the definition."""
    scores = torch.einsum("qhd,khd->hqk", query.double(), key.double()) / query.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), value.double())


def finish(attn, out: torch.Tensor, inputs: dict) -> torch.Tensor | tuple:
    """The stock processor's output projections on (batch, S, heads, head_dim)."""
    out = out.flatten(2).to(torch.float32)
    if inputs.get("encoder_hidden_states") is None:
        return out
    with torch.no_grad():
        return attn.to_out[0](out[:, TEXT:]), attn.to_add_out(out[:, :TEXT])


def assert_output(got, want) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ layers, install


def test_layers_default_and_names(transformer):
    default = dit_csa_layers(transformer)  # "up": the second half of the single-stream blocks
    assert [layer.name for layer in default] == ["single_transformer_blocks.1.attn"]
    layers = every_layer(transformer)
    assert [layer.name for layer in layers] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert [layer.index for layer in layers] == [0, 1, 2, 3]
    assert {(layer.level, layer.downsample) for layer in layers} == {("sa64", 0)}
    named = dit_csa_layers(transformer, ["single.0-1", "double.1", "down"])
    assert [layer.name for layer in named] == [layer.name for layer in layers]
    assert [layer.name for layer in dit_csa_layers(transformer, ["mid"])] == [
        "single_transformer_blocks.0.attn"
    ]
    for bad in ("double.2", "single.1-0", "attn", "up.1"):
        with pytest.raises(ValueError):
            dit_csa_layers(transformer, [bad])


def test_packed_grid_from_ids():
    ids = flux_inputs(1)["img_ids"]
    assert packed_grid(ids, 24) == GRID
    assert packed_grid(ids[None], 24) == GRID
    with pytest.raises(ValueError, match="one image"):
        packed_grid(torch.cat([ids, ids]), 48)  # e.g. Kontext's reference-image tokens


def test_install_restores_processors_and_hooks(transformer):
    before = transformer.attn_processors
    hooks = (len(transformer._forward_pre_hooks), len(transformer._forward_hooks))
    layers = dit_csa_layers(transformer, ["double.0", "single"])
    state = CSAState(ALWAYS, layers)
    with pytest.raises(RuntimeError, match="inside"), installed_dit_csa(transformer, state):
        inside = transformer.attn_processors
        assert (len(transformer._forward_pre_hooks), len(transformer._forward_hooks)) == (
            hooks[0] + 1,
            hooks[1] + 1,
        )
        chosen = {layer.name + ".processor" for layer in layers}
        for name, proc in inside.items():
            assert isinstance(proc, DiTConsistentAttnProcessor) == (name in chosen)
        raise RuntimeError("inside")  # restored on an error too
    after = transformer.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert (len(transformer._forward_pre_hooks), len(transformer._forward_hooks)) == hooks
    assert state.bank == {} and state.phase == "off"


# ------------------------------------------------------------------------------ off is stock


@pytest.mark.parametrize("case", ["off", "rate0", "no-bank", "warmup"])
def test_off_is_bit_identical_to_stock(transformer, case):
    inputs = flux_inputs(4)
    stock = forward(transformer, inputs)
    settings = ALWAYS
    if case == "rate0":
        settings = CSASettings(sa32=0.0, sa64=0.0, warmup_steps=0, prob_early=1.0)
    if case == "warmup":
        settings = CSASettings(warmup_steps=1)
    state = CSAState(settings, every_layer(transformer))
    with installed_dit_csa(transformer, state):
        if case == "off":
            out = forward(transformer, inputs)
        elif case == "no-bank":  # a read call at a step its character's bank lacks
            state.bank["a"] = {}
            stream = state.open_call("read", 2, seed=1, read_characters=("a",))
            out = run(transformer, state, inputs, [stream])
        else:
            out = run(transformer, state, inputs, [state.open_call("write", 2, 1, "a")])
    assert torch.equal(out, stock)


# ------------------------------------------------------------------------------ write


def write_forward(transformer, seed: int = 3, counts=(2,), settings: CSASettings = ALWAYS):
    """One write forward of characters with `counts` references each (two CFG groups of
    rows), recording every layer; returns (state, recorder, bank)."""
    layers = every_layer(transformer)
    state = CSAState(settings, layers)
    recorder = Recorder(transformer, layers)
    inputs = flux_inputs(2 * sum(counts), seed=seed)
    try:
        with installed_dit_csa(transformer, state):
            streams = [state.open_call("write", n, seed + i, f"c{i}") for i, n in enumerate(counts)]
            run(transformer, state, inputs, streams)
            bank = {owner: dict(steps) for owner, steps in state.bank.items()}
    finally:
        recorder.remove()
    return state, recorder, bank


def test_write_banks_sampled_image_keys_after_rope(transformer):
    state, recorder, bank = write_forward(transformer, counts=(2, 3))
    rows, tokens = 5, GRID[0] * GRID[1]
    for layer in state.layers:
        attn = recorder.modules[layer.name]
        _, key, value = stock_qkv(attn, recorder.inputs[layer.name])
        image = key.shape[1] - tokens
        for segment in state.segments:
            draw = segment.draws["sa64"]
            assert len(draw.banked) == segment.n * round(0.5 * tokens)
            banked = draw.banked + segment.start * tokens
            for kind, tensor in enumerate((key, value)):
                flat = tensor[:, image:].reshape(2, rows * tokens, -1)
                stored = bank[segment.stream.character][0][layer.name][kind]
                assert torch.equal(stored, flat[:, banked])


@pytest.mark.parametrize("skips", [False, True])
def test_write_rows_attend_to_other_references(transformer, skips):
    """Each reference's image queries: own tokens plus the other references' samples (the
    call with fewer has its padding masked); text queries: own tokens. `skips`: some calls
    skip CSA in some layers (plain attention there)."""
    settings = CSASettings(warmup_steps=0, prob_early=0.5) if skips else ALWAYS
    state, recorder, _ = write_forward(transformer, seed=11, counts=(2, 3), settings=settings)
    if skips:  # the seed makes both kinds of layer
        applies = [a for segment in state.segments for a in segment.apply]
        assert any(applies) and not all(applies)
    rows, tokens = 5, GRID[0] * GRID[1]
    for layer in state.layers:
        attn = recorder.modules[layer.name]
        inputs = recorder.inputs[layer.name]
        query, key, value = stock_qkv(attn, inputs)
        text = key.shape[1] - tokens
        outs = []
        for b in range(key.shape[0]):
            group, row = divmod(b, rows)
            flat_k = key[group * rows : (group + 1) * rows, text:].reshape(rows * tokens, 2, -1)
            flat_v = value[group * rows : (group + 1) * rows, text:].reshape(rows * tokens, 2, -1)
            segment = next(s for s in state.segments if s.start <= row < s.start + s.n)
            extra = segment.draws["sa64"].gather[row - segment.start] + segment.start * tokens
            if not segment.apply[layer.index]:
                extra = extra[:0]
            image = attention(
                query[b, text:],
                torch.cat([key[b], flat_k[extra]]),
                torch.cat([value[b], flat_v[extra]]),
            )
            outs.append(torch.cat([attention(query[b, :text], key[b], value[b]), image]))
        assert_output(recorder.outputs[layer.name], finish(attn, torch.stack(outs), inputs))


def test_draws_are_seeded(transformer):
    first, _, bank = write_forward(transformer, seed=3)
    again, _, bank_again = write_forward(transformer, seed=3)
    other, _, _ = write_forward(transformer, seed=4)

    def banked(state):
        return state.segments[0].draws["sa64"].banked

    assert torch.equal(banked(first), banked(again))
    for name, kv in bank["c0"][0].items():
        assert torch.equal(kv, bank_again["c0"][0][name])
    assert not torch.equal(banked(first), banked(other))


# ------------------------------------------------------------------------------ read


@pytest.mark.parametrize("mixed", [False, True])
def test_read_rows_attend_to_own_tokens_and_bank(transformer, mixed):
    """Image queries: own text + image tokens plus the bank; text queries: own tokens only.
    `mixed`: a plain call shares the forward (its row must attend as stock: the bank masked)."""
    layers = every_layer(transformer)
    state = CSAState(ALWAYS, layers)
    recorder = Recorder(transformer, layers)
    try:
        with installed_dit_csa(transformer, state):
            run(transformer, state, flux_inputs(4, seed=7), [state.open_call("write", 2, 5, "a")])
            reader = state.open_call("read", 1 if mixed else 2, 6, read_characters=("a",))
            streams = [reader, state.open_call("off", 1, 8)] if mixed else [reader]
            run(transformer, state, flux_inputs(4, seed=9), streams)
            bank = dict(state.bank["a"][0])
    finally:
        recorder.remove()
    for layer in layers:
        attn = recorder.modules[layer.name]
        inputs = recorder.inputs[layer.name]
        query, key, value = stock_qkv(attn, inputs)
        text = key.shape[1] - GRID[0] * GRID[1]
        outs = []
        for b in range(key.shape[0]):
            group, row = divmod(b, 2)
            banked_k, banked_v = (t[group].view(t.shape[1], 2, -1) for t in bank[layer.name])
            reads = not (mixed and row == 1)
            own = attention(query[b], key[b], value[b])
            if reads:
                image = attention(
                    query[b, text:], torch.cat([key[b], banked_k]), torch.cat([value[b], banked_v])
                )
                own = torch.cat([own[:text], image])
            outs.append(own)
        assert_output(recorder.outputs[layer.name], finish(attn, torch.stack(outs), inputs))


def test_bank_levels_without_sa64_bank_nothing(transformer):
    state = CSAState(ALWAYS, every_layer(transformer), BankSettings(levels=("sa32",)))
    with installed_dit_csa(transformer, state):
        run(transformer, state, flux_inputs(2), [state.open_call("write", 2, 1, "a")])
        assert state.bank["a"] == {}


def test_read_with_history_banks_its_own_samples(transformer):
    """A read frame with rolling history banks samples of its own post-RoPE image tokens."""
    layers = every_layer(transformer)
    state = CSAState(ALWAYS, layers)
    recorder = Recorder(transformer, layers)
    try:
        with installed_dit_csa(transformer, state):
            run(transformer, state, flux_inputs(2, seed=7), [state.open_call("write", 1, 5, "a")])
            reader = state.open_call("read", 1, 6, read_characters=("a",), history_key="h0")
            run(transformer, state, flux_inputs(2, seed=9), [reader])
            bank = dict(state.bank["h0"][0])
    finally:
        recorder.remove()
    banked = state.segments[0].draws["sa64"].banked
    for layer in layers:
        _, key, value = stock_qkv(recorder.modules[layer.name], recorder.inputs[layer.name])
        for kind, tensor in enumerate((key, value)):
            flat = tensor[:, TEXT:].flatten(2)
            assert torch.equal(bank[layer.name][kind], flat[:, banked])
