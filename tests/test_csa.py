"""Consistent Self-Attention on the tiny SDXL UNet: layers, phases, CFG isolation, bank, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from storycli.consistency import ConsistentSelfAttnProcessor, CSAState, csa_layers, installed_csa
from storycli.consistency.csa import CSASettings
from storycli.keyframes import generate_keyframes, render_size
from storycli.models import set_scheduler
from storycli.plan import build_plan
from storycli.story import load_story
from storycli.tiny import build_tiny_sdxl_pipeline

ALWAYS = CSASettings(sa32=0.5, sa64=0.5, warmup_steps=0, prob_early=1.0, prob_late=1.0)
LATENT = 16  # 32x32 pixels with the tiny VAE


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline()


def unet_inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1),
        },
    }


def forward(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def run_call(unet, state: CSAState, inputs: dict, phase, n, seed=1, **kw) -> torch.Tensor:
    state.begin_call(phase, n_images=n, seed=seed, **kw)
    out = forward(unet, inputs)
    state.end_call()
    return out


def test_layers_and_levels_follow_unet_place(pipe):
    up = csa_layers(pipe.unet, ["up"])
    assert [layer.name.split(".attentions")[0] for layer in up] == ["up_blocks.0"] * 4 + [
        "up_blocks.1"
    ] * 2
    assert [layer.level for layer in up] == ["sa32"] * 4 + ["sa64"] * 2
    assert [layer.index for layer in up] == list(range(6))
    every = csa_layers(pipe.unet, ["down", "mid", "up"])
    levels = {layer.name.split(".")[0] + layer.name.split(".")[1]: layer.level for layer in every}
    assert levels["down_blocks1"] == "sa64"
    assert levels["down_blocks2"] == "sa32"
    assert levels["mid_block" + "attentions"] == "sa32"
    assert all(layer.name.endswith("attn1") for layer in every)


def test_install_restores_processors_and_frees_bank(pipe):
    unet = pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    state = CSAState(ALWAYS, csa_layers(unet))
    inputs = unet_inputs(6)
    with installed_csa(unet, state):
        replaced = [
            p for p in unet.attn_processors.values() if isinstance(p, ConsistentSelfAttnProcessor)
        ]
        assert len(replaced) == 6
        run_call(unet, state, inputs, "write", 3, character="A")
        assert state.bank_bytes() > 0
    assert state.bank == {}
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert not unet._forward_pre_hooks


def test_zero_rates_equal_stock_attention(pipe):
    unet = pipe.unet
    inputs = unet_inputs(6)
    stock = forward(unet, inputs)
    zero = CSASettings(sa32=0.0, sa64=0.0, warmup_steps=0, prob_early=1.0, prob_late=1.0)
    state = CSAState(zero, csa_layers(unet))
    with installed_csa(unet, state):
        out = run_call(unet, state, inputs, "write", 3, character="A")
    assert torch.equal(out, stock)


def perturb(inputs: dict, index: int) -> dict:
    changed = {**inputs, "sample": inputs["sample"].clone()}
    changed["sample"][index] += 1.0
    return changed


def test_write_phase_mixes_references_within_a_cfg_half_only(pipe):
    unet = pipe.unet
    n = 3  # batch = [uncond x3, cond x3]
    inputs = unet_inputs(2 * n)
    state = CSAState(ALWAYS, csa_layers(unet))
    with installed_csa(unet, state):
        base = run_call(unet, state, inputs, "write", n, character="A")
        moved = run_call(unet, state, perturb(inputs, n + 1), "write", n, character="A")
    diff = (moved - base).abs().flatten(1).amax(1)
    # cond image 1 changed: cond images 0 and 2 see its tokens and change too ...
    assert diff[n + 0] > 1e-4 and diff[n + 2] > 1e-4
    # ... while the uncond half never sees the cond half.
    assert torch.all(diff[:n] == 0)

    # Control: with plain attention, images are independent.
    plain_base, plain_moved = forward(unet, inputs), forward(unet, perturb(inputs, n + 1))
    plain_diff = (plain_moved - plain_base).abs().flatten(1).amax(1)
    assert plain_diff[n + 0] == 0 and plain_diff[n + 2] == 0


def test_write_phase_without_cfg(pipe):
    unet = pipe.unet
    inputs = unet_inputs(2)
    state = CSAState(ALWAYS, csa_layers(unet))
    with installed_csa(unet, state):
        base = run_call(unet, state, inputs, "write", 2, character="A")
        moved = run_call(unet, state, perturb(inputs, 1), "write", 2, character="A")
        groups = {t.shape[0] for steps in state.bank["A"].values() for t in steps.values()}
    assert groups == {1}
    assert (moved[0] - base[0]).abs().max() > 1e-4


def test_read_phase_depends_on_the_bank_of_its_cfg_half(pipe):
    unet = pipe.unet
    n = 2
    refs = unet_inputs(2 * n, seed=1)
    frame = unet_inputs(2, seed=2)
    state = CSAState(ALWAYS, csa_layers(unet))
    with installed_csa(unet, state):
        run_call(unet, state, refs, "write", n, character="A")
        read = run_call(unet, state, frame, "read", 1, read_characters=["A"])
        # A bank written from a changed cond reference: only the read frame's cond half moves.
        run_call(unet, state, perturb(refs, n + 1), "write", n, character="A")
        read_moved = run_call(unet, state, frame, "read", 1, read_characters=["A"])
        # Two banks (two characters) are both attended to.
        run_call(unet, state, unet_inputs(2 * n, seed=3), "write", n, character="B")
        read_two = run_call(unet, state, frame, "read", 1, read_characters=["A", "B"])
        with pytest.raises(RuntimeError, match="no reference bank"):
            state.begin_call("read", n_images=1, seed=0, read_characters=["C"])
    plain = forward(unet, frame)
    assert (read - plain).abs().max() > 1e-4  # the bank changes the frame
    assert torch.equal(read_moved[0], read[0])  # uncond half untouched
    assert (read_moved[1] - read[1]).abs().max() > 1e-4  # cond half follows its bank
    assert (read_two[1] - read_moved[1]).abs().max() > 1e-4


def test_draws_are_seeded_and_bank_has_expected_shape(pipe):
    unet = pipe.unet
    inputs = unet_inputs(6)
    layers = csa_layers(unet)
    a, b, c = (CSAState(ALWAYS, layers) for _ in range(3))
    with installed_csa(unet, a):
        out_a = run_call(unet, a, inputs, "write", 3, seed=5, character="A")
        bank_a = {k: v.clone() for k, v in a.bank["A"][0].items()}
    with installed_csa(unet, b):
        out_b = run_call(unet, b, inputs, "write", 3, seed=5, character="A")
        bank_b = dict(b.bank["A"][0])
    with installed_csa(unet, c):
        out_c = run_call(unet, c, inputs, "write", 3, seed=6, character="A")
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    assert all(torch.equal(bank_a[k], bank_b[k]) for k in bank_a)
    # sa32 level is (16/4)^2 = 16 tokens, sa64 (16/2)^2 = 64; rate 0.5 → 8 and 32 per image.
    for layer in layers:
        tokens = 16 if layer.level == "sa32" else 64
        assert bank_a[layer.name].shape[:2] == (2, 3 * tokens // 2)


def test_schedule_warmup_and_probabilities():
    s = CSASettings(warmup_steps=1, prob_early=0.7, prob_late=0.9, late_from_step=20)
    assert [s.apply_probability(t) for t in (0, 1, 19, 20, 49)] == [0.0, 0.7, 0.7, 0.9, 0.9]
    layers = csa_layers(build_tiny_sdxl_pipeline().unet)
    state = CSAState(CSASettings(warmup_steps=0, prob_early=0.5, prob_late=0.5), layers)
    state.begin_call("read", n_images=1, seed=0, read_characters=[])
    applied = []
    for _ in range(400):
        state.begin_step(LATENT, LATENT)
        applied.append(state._apply.float().mean().item())
    assert 0.45 < float(np.mean(applied)) < 0.55


def test_processor_falls_back_to_plain_for_cross_attention(pipe):
    attn = pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2
    state = CSAState(ALWAYS, csa_layers(pipe.unet))
    processor = ConsistentSelfAttnProcessor(state, state.layers[0])
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    context = torch.randn(2, 77, 64)
    expected = AttnProcessor2_0()(attn, hidden, context)
    assert torch.equal(processor(attn, hidden, context), expected)


STORY = """\
characters:
  Mara: a girl with a green scarf
  Ollie: a grey cat
frames:
  - "[Mara] waves at the gate"
  - "[Ollie] sleeps on a windowsill"
  - "[Mara] walks down a street"
  - "[Ollie] chases a butterfly"
  - "[Mara] and [Ollie] walk home"
  - "[NC] a market square"
steps: 4
width: 64
height: 64
scheduler: euler
consistency: {id_length: 2, warmup_steps: 1, prob_early: 1.0, prob_late: 1.0}
"""


def render(pipe, tmp_path, consistency: dict) -> dict[int, np.ndarray]:
    path = tmp_path / "story.yaml"
    path.write_text(STORY)
    story = load_story(path, overrides={"consistency": {"id_length": 2, **consistency}})
    plan = build_plan(story)
    set_scheduler(pipe, story.scheduler)
    frames: dict[int, np.ndarray] = {}
    generate_keyframes(
        pipe,
        plan,
        range(len(plan.frames)),
        render_size(plan, None),
        on_frame=lambda i, image, _s: frames.__setitem__(i, np.asarray(image)),
    )
    return frames


def test_pipeline_zero_rates_are_pixel_identical_to_no_consistency(pipe, tmp_path):
    none = render(pipe, tmp_path, {"method": "none"})
    zero = render(pipe, tmp_path, {"sa32": 0.0, "sa64": 0.0})
    assert sorted(none) == list(range(6))
    assert all(np.array_equal(none[i], zero[i]) for i in none)
    csa = render(pipe, tmp_path, {"sa32": 1.0, "sa64": 1.0})
    changed = [i for i in none if not np.array_equal(none[i], csa[i])]
    # References and reading frames change; the [NC] frame uses plain attention throughout.
    assert 5 not in changed
    assert set(changed) >= {0, 1, 4}
    assert np.array_equal(none[5], csa[5])
