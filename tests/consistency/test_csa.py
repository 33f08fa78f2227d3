"""Consistent Self-Attention on the tiny SDXL UNet: layers, phases, CFG isolation, bank, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from per_call_schedule import generate_keyframes_per_call

from storycli.consistency.csa import ConsistentSelfAttnProcessor
from storycli.consistency.csa_state import BankSettings, CSASettings, CSAState
from storycli.keyframes.backbones.sdxl import csa_layers, installed_csa
from storycli.keyframes.loop import generate_keyframes
from storycli.keyframes.models import set_scheduler
from storycli.keyframes.plan import build_plan
from storycli.keyframes.schedule import render_size, story_chunks
from storycli.story.loader import load_story
from storycli.weights.tiny import build_tiny_sdxl_pipeline

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
        groups = {t.shape[1] for steps in state.bank["A"].values() for t in steps.values()}
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
        assert bank_a[layer.name].shape[:3] == (2, 2, 3 * tokens // 2)  # (k/v, CFG, ...)


def test_schedule_warmup_and_probabilities():
    s = CSASettings(warmup_steps=1, prob_early=0.7, prob_late=0.9, late_from_step=20)
    assert [s.apply_probability(t) for t in (0, 1, 19, 20, 49)] == [0.0, 0.7, 0.7, 0.9, 0.9]
    layers = csa_layers(build_tiny_sdxl_pipeline().unet)
    state = CSAState(CSASettings(warmup_steps=0, prob_early=0.5, prob_late=0.5), layers)
    state.begin_call("read", n_images=1, seed=0, read_characters=[])
    applied = []
    for _ in range(400):
        state.begin_step(LATENT, LATENT)
        applied.append(float(np.mean(state.segments[0].apply)))
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


def render(
    pipe,
    tmp_path,
    consistency: dict,
    compile_backend: str | None = None,
    per_call: bool = False,
    frame_batch: int = 1,
    text: str = STORY,
    on_step=None,
    **story_overrides,
) -> dict[int, np.ndarray]:
    path = tmp_path / "story.yaml"
    path.write_text(text)
    overrides = {"consistency": {"id_length": 2, **consistency}, **story_overrides}
    story = load_story(path, overrides=overrides)
    plan = build_plan(story)
    set_scheduler(pipe, story.scheduler)
    frames: dict[int, np.ndarray] = {}
    run = generate_keyframes_per_call if per_call else generate_keyframes
    extra = (
        {}
        if per_call
        else {"frame_batch": frame_batch, "compile_backend": compile_backend, "on_step": on_step}
    )
    run(
        pipe,
        plan,
        range(len(plan.frames)),
        render_size(plan, None),
        on_frame=lambda i, image, _s: frames.__setitem__(i, np.asarray(image).astype(int)),
        **extra,
    )
    return frames


def test_pipeline_zero_rates_are_pixel_identical_to_no_consistency(pipe, tmp_path):
    # frame_batch 2: both references of each character in one forward, as the write forward
    # holds them (batch composition alone moves float results by an ulp).
    none = render(pipe, tmp_path, {"method": "none"}, frame_batch=2)
    zero = render(pipe, tmp_path, {"sa32": 0.0, "sa64": 0.0}, frame_batch=2)
    assert sorted(none) == list(range(6))
    assert all(np.array_equal(none[i], zero[i]) for i in none)
    none = render(pipe, tmp_path, {"method": "none"})  # the [NC] frame alone in its forward
    csa = render(pipe, tmp_path, {"sa32": 1.0, "sa64": 1.0})
    changed = [i for i in none if not np.array_equal(none[i], csa[i])]
    # References and reading frames change; the [NC] frame uses plain attention throughout.
    assert 5 not in changed
    assert set(changed) >= {0, 1, 4}
    assert np.array_equal(none[5], csa[5])


def test_compiled_blocks_compile_once_per_shape_not_per_step(pipe, tmp_path):
    """`--compile` compiles the transformer blocks (regional compilation), the batch size
    dynamic: every graph exists after the first step (write and read forwards of different
    sizes share them), none is added in later steps, pixels match eager, and the blocks run
    eagerly again afterwards."""
    from torch._dynamo.utils import counters

    consistency = {"prob_early": 0.5, "prob_late": 0.5}  # many skipped and applied layers
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled = render(
        pipe,
        tmp_path,
        consistency,
        compile_backend="eager",
        frame_batch=3,
        text=THREE_STORY,
        on_step=lambda _step, _steps: graphs.append(counters["stats"]["unique_graphs"]),
        steps=4,
    )
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4, graphs  # nothing compiled after step 1
    # Forwards of 6, 3 and 2 rows (×2 for CFG) ran through the same graphs.
    plan = build_plan(load_story(tmp_path / "story.yaml"))
    assert len({len(c.rows) for c in story_chunks(plan, plan.calls, 3)}) >= 3
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert all(block._compiled_call_impl is None for block in blocks)  # eager again
    eager = render(pipe, tmp_path, consistency, frame_batch=3, text=THREE_STORY, steps=4)
    assert all(np.array_equal(eager[i], compiled[i]) for i in eager)


def test_write_calls_of_different_sizes_share_one_forward(pipe):
    """Two characters' write calls (2 and 3 references, CFG) in one forward give each call's
    outputs and bank as its own forward does: rows sample only their own call's images, the
    shorter call's rows padded and masked, each call's skip flags its own."""
    unet = pipe.unet
    settings = CSASettings(sa32=0.5, sa64=0.5, warmup_steps=0, prob_early=0.5)
    a, b = unet_inputs(2 * 2, seed=1), unet_inputs(2 * 3, seed=2)

    def rows(value, n):  # [uncond rows, cond rows] of a call
        return value[:n], value[n:]

    def joined(x, y):
        if isinstance(x, dict):
            return {k: joined(x[k], y[k]) for k in x}
        if x.ndim == 0:
            return x
        (xu, xc), (yu, yc) = rows(x, 2), rows(y, 3)
        return torch.cat([xu, yu, xc, yc])

    alone, banks = [], {}
    for inputs, n, seed, name in ((a, 2, 5, "A"), (b, 3, 6, "B")):
        state = CSAState(settings, csa_layers(unet))
        with installed_csa(unet, state):
            stream = state.open_call("write", n, seed, character=name)
            for _ in range(3):  # a few steps: different skip flags each
                state.enter([stream])
                out = forward(unet, inputs)
                state.leave()
            alone.append(out)
            banks[name] = {k: v.clone() for k, v in state.bank[name][2].items()}
    state = CSAState(settings, csa_layers(unet))
    with installed_csa(unet, state):
        streams = [
            state.open_call("write", 2, 5, character="A"),
            state.open_call("write", 3, 6, character="B"),
        ]
        for _ in range(3):
            state.enter(streams)
            together = forward(unet, joined(a, b))
            state.leave()
        shared = {name: dict(state.bank[name][2]) for name in ("A", "B")}
    expected = joined(alone[0], alone[1])
    assert (together - expected).abs().max() < 1e-4
    for name in ("A", "B"):
        assert all((shared[name][k] - banks[name][k]).abs().max() < 1e-4 for k in banks[name])


# --- fast path, sampling strategies, bank options -------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "temporal"])
@pytest.mark.parametrize("cfg_groups", [1, 2])
def test_fast_path_matches_reference_implementation(pipe, sampling, cfg_groups):
    unet = pipe.unet
    n = 3
    inputs = unet_inputs(cfg_groups * n, seed=4)
    outputs, banks = {}, {}
    for impl in ("reference", "fast"):
        settings = CSASettings(
            sa32=0.5, sa64=0.5, warmup_steps=0, prob_early=1.0, impl=impl, sampling=sampling
        )
        state = CSAState(settings, csa_layers(unet))
        with installed_csa(unet, state):
            outputs[impl] = run_call(unet, state, inputs, "write", n, seed=9, character="A")
            banks[impl] = {k: v.clone() for k, v in state.bank["A"][0].items()}
    assert (outputs["fast"] - outputs["reference"]).abs().max() < 1e-5
    assert banks["fast"].keys() == banks["reference"].keys()
    assert all(torch.equal(banks["fast"][k], banks["reference"][k]) for k in banks["fast"])
    assert not torch.equal(outputs["fast"], forward(unet, inputs))  # CSA did something


def sources_of(state: CSAState, level: str) -> torch.Tensor:
    """For each image, how many of its extra tokens come from each image (n×n counts)."""
    draw = state.segments[0].draws[level]
    n = state.segments[0].n
    source = draw.gather // draw.tokens
    return torch.stack([torch.bincount(row, minlength=n) for row in source])


def test_temporal_sampling_draws_from_earlier_frames_with_a_bias():
    layers = csa_layers(build_tiny_sdxl_pipeline().unet)
    settings = CSASettings(sa32=0.5, sa64=0.5, warmup_steps=0, sampling="temporal")
    state = CSAState(settings, layers)
    state.begin_call("write", n_images=5, seed=0, character="A")
    state.begin_step(LATENT, LATENT)
    counts = sources_of(state, "sa64")  # 64 tokens per image, k = 32, K = min(4·32, 64) = 64
    total = counts.sum(dim=1)
    assert torch.all(total == 64)
    for i in range(1, 5):
        assert counts[i, i:].sum() == 0  # only earlier frames
        earlier = counts[i, :i].tolist()[::-1]  # nearest first
        assert earlier == sorted(earlier, reverse=True)  # nearer frames give more
    # weights 1, 1/2, 1/4, 1/8 (nearest first) over 64 tokens; the remainder goes to the nearest
    assert counts[4].tolist() == [4, 8, 17, 35, 0]
    assert counts[0, 0] == 0 and counts[0, 1] > counts[0, 4]  # the first frame looks ahead
    # Each source's tokens are distinct (no token drawn twice for the same image).
    draw = state.segments[0].draws["sa64"]
    assert all(len(set(row.tolist())) == len(row) for row in draw.gather)

    uniform = CSAState(CSASettings(warmup_steps=0), layers)
    uniform.begin_call("write", n_images=5, seed=0, character="A")
    uniform.begin_step(LATENT, LATENT)
    flat = sources_of(uniform, "sa64")
    assert torch.all(flat == 32 * (1 - torch.eye(5, dtype=torch.long)))


def test_temporal_counts_cap_at_available_tokens():
    from storycli.consistency.csa_state import temporal_counts

    counts = temporal_counts(n=4, total=10, tokens=4, decay=0.5)
    assert counts.sum(dim=1).tolist() == [10, 4, 8, 10]  # image 1 has one source of 4 tokens
    assert int(counts.max()) <= 4


def test_bank_options_dtype_levels_and_steps(pipe):
    unet = pipe.unet
    inputs = unet_inputs(4)
    frame = unet_inputs(2, seed=8)

    def bank_and_read(bank: BankSettings):
        state = CSAState(ALWAYS, csa_layers(unet), bank)
        with installed_csa(unet, state):
            run_call(unet, state, inputs, "write", 2, character="A")
            entries = dict(state.bank["A"].get(0, {}))
            read = run_call(unet, state, frame, "read", 1, read_characters=["A"])
        return entries, read

    full, read_full = bank_and_read(BankSettings())
    # The bank holds the sampled tokens' keys and values: (2, CFG groups, k, channels).
    assert all(t.shape[:2] == (2, 2) for t in full.values())

    half, read_half = bank_and_read(BankSettings(dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert sum(t.numel() * 2 for t in half.values()) == sum(t.numel() * 2 for t in full.values())
    assert (read_half - read_full).abs().max() < 0.05

    coarse, read_coarse = bank_and_read(BankSettings(levels=("sa32",)))
    assert {name.split(".")[0] + name.split(".")[1] for name in coarse} == {"up_blocks0"}
    assert not torch.equal(read_coarse, read_full)

    none, read_none = bank_and_read(BankSettings(max_step=0))
    assert none == {}
    assert torch.equal(read_none, forward(unet, frame))  # nothing banked: plain attention


def test_hundred_frame_story_runs(pipe, tmp_path):
    frames = "\n".join(f'  - "walks through scene {i}"' for i in range(100))
    path = tmp_path / "long.yaml"
    path.write_text(
        "identity: a fox\nsteps: 2\nwidth: 64\nheight: 64\nscheduler: euler\n"
        f"consistency: {{id_length: 4, warmup_steps: 0, prob_early: 1.0}}\nframes:\n{frames}\n"
    )
    plan = build_plan(load_story(path))
    set_scheduler(pipe, "euler")
    seen: list[int] = []
    generate_keyframes(
        pipe,
        plan,
        range(100),
        render_size(plan, None),
        on_frame=lambda i, image, _s: seen.append(i) if image.size == (64, 64) else None,
    )
    assert sorted(seen) == list(range(100))


# --- sliding-window mode ----------------------------------------------------------------------


def test_window_starts_cover_every_frame():
    from storycli.consistency.csa import window_starts

    assert window_starts(3, 4, 2) == [0]
    assert window_starts(8, 4, 2) == [0, 2, 4]
    assert window_starts(9, 4, 2) == [0, 2, 4, 5]
    assert window_starts(5, 2, 1) == [0, 1, 2, 3]


def test_window_at_least_story_length_equals_joint_csa(pipe):
    from storycli.keyframes.backbones.sdxl import windowed_unet

    unet = pipe.unet
    n = 4
    inputs = unet_inputs(2 * n, seed=6)
    joint_state = CSAState(ALWAYS, csa_layers(unet))
    with installed_csa(unet, joint_state):
        joint = run_call(unet, joint_state, inputs, "write", n, seed=3, character="A")
    state = CSAState(ALWAYS, csa_layers(unet))
    with installed_csa(unet, state), windowed_unet(unet, state, frames=n, window=n + 2, stride=1):
        windowed = run_call(unet, state, inputs, "window", n, seed=3)
    assert torch.equal(windowed, joint)
    assert state.bank == {}  # windows keep no bank
    assert "forward" not in unet.__dict__  # the UNet's own forward is back


def test_window_frames_only_see_their_windows(pipe):
    from storycli.keyframes.backbones.sdxl import windowed_unet

    unet = pipe.unet
    frames = 5
    inputs = unet_inputs(2 * frames, seed=7)
    state = CSAState(ALWAYS, csa_layers(unet))

    def run(batch: dict) -> torch.Tensor:
        with windowed_unet(unet, state, frames=frames, window=2, stride=1):
            return run_call(unet, state, batch, "window", frames, seed=3)

    with installed_csa(unet, state):
        base = run(inputs)
        moved = run(perturb(inputs, frames + 0))  # cond frame 0 (windows [0,1])
    diff = (moved - base).abs().flatten(1).amax(1)
    assert diff[frames + 1] > 1e-4  # shares window [0, 1]
    assert torch.all(diff[frames + 2 :] == 0)  # never in a window with frame 0
    assert torch.all(diff[:frames] == 0)  # other CFG half


def test_window_mode_story_runs_and_plans_one_windowed_call(pipe, tmp_path):
    frames = "\n".join(f'  - "walks through scene {i}"' for i in range(6))
    path = tmp_path / "win.yaml"
    path.write_text(
        "identity: a fox\nsteps: 2\nwidth: 64\nheight: 64\nscheduler: euler\n"
        "consistency: {mode: window, window: 3, stride: 2, id_length: 9, warmup_steps: 0}\n"
        f'frames:\n{frames}\n  - "[NC] an empty field"\n'
    )
    plan = build_plan(load_story(path))  # id_length does not apply in window mode
    assert [(c.phase, c.frames) for c in plan.calls] == [
        ("window", tuple(range(6))),
        ("plain", (6,)),
    ]
    assert plan.references == {}
    set_scheduler(pipe, "euler")
    seen: dict[int, np.ndarray] = {}
    generate_keyframes(
        pipe,
        plan,
        range(7),
        render_size(plan, None),
        on_frame=lambda i, image, _s: seen.__setitem__(i, np.asarray(image)),
    )
    assert sorted(seen) == list(range(7))


@pytest.mark.parametrize("sampling", ["uniform", "temporal"])
def test_id_length_one_runs_and_its_bank_is_read(pipe, tmp_path, sampling):
    """A write batch of one reference has no other image to sample: it attends to its own
    tokens only (so it equals plain attention), yet its samples fill the bank other frames
    read."""
    kwargs = {"sa32": 1.0, "sa64": 1.0, "sampling": sampling}
    one = render(pipe, tmp_path, {**kwargs, "id_length": 1})
    # The two references share the write forward: plain frames 1 and 2 share one too.
    plain = render(pipe, tmp_path, {"method": "none", "id_length": 1}, frame_batch=2)
    assert sorted(one) == list(range(6))
    # Frames 1 and 2 are the lone references of Mara and Ollie: plain attention, same pixels.
    assert np.array_equal(one[0], plain[0]) and np.array_equal(one[1], plain[1])
    # Frame 3 reads Mara's one-image bank, so it differs from plain attention.
    assert not np.array_equal(one[2], plain[2])


def test_window_mode_with_one_character_frame_runs(pipe, tmp_path):
    path = tmp_path / "lone.yaml"
    path.write_text(
        "identity: a fox\nsteps: 2\nwidth: 64\nheight: 64\nscheduler: euler\n"
        "consistency: {mode: window, warmup_steps: 0, prob_early: 1.0}\n"
        'frames:\n  - "walks alone"\n  - "[NC] an empty field"\n'
    )
    plan = build_plan(load_story(path))
    assert [(c.phase, c.frames) for c in plan.calls] == [("window", (0,)), ("plain", (1,))]
    set_scheduler(pipe, "euler")
    seen: dict[int, np.ndarray] = {}
    generate_keyframes(
        pipe,
        plan,
        range(2),
        render_size(plan, None),
        on_frame=lambda i, image, _s: seen.__setitem__(i, np.asarray(image)),
    )
    assert sorted(seen) == [0, 1]


# ------------------------------------------------------------------------------ story loop

WINDOW_STORY = """\
identity: a fox
frames:
  - "runs through the snow"
  - "sleeps in a tree"
  - "[NC] an empty field"
  - "jumps over a stream"
  - "watches the stars"
steps: 4
width: 64
height: 64
scheduler: euler
consistency: {mode: window, window: 3, stride: 2, warmup_steps: 1, prob_early: 0.8}
"""


# Three characters with 2 or 3 references each, reads of one, two and three characters and
# [NC] frames between them: read forwards mix banks of different widths and plain rows.
THREE_STORY = """\
characters:
  Mara: a girl with a green scarf
  Ollie: a grey cat
  Pip: a small robot
frames:
  - "[Mara] waves at the gate"
  - "[Ollie] sleeps on a windowsill"
  - "[Pip] beeps in the garden"
  - "[Mara] walks down a street"
  - "[Ollie] chases a butterfly"
  - "[Pip] rolls over the grass"
  - "[Mara] reads a book"
  - "[Ollie] naps in the sun"
  - "[NC] a market square"
  - "[Mara] and [Ollie] walk home"
  - "[Pip] waits by the door"
  - "[Mara], [Ollie] and [Pip] have dinner"
  - "[Ollie] and [Pip] play"
  - "[NC] the moon over the roofs"
steps: 3
width: 64
height: 64
scheduler: euler
consistency: {id_length: 2, warmup_steps: 1, prob_early: 1.0, prob_late: 1.0}
"""


@pytest.mark.parametrize(
    ("case", "consistency", "overrides", "frame_batch"),
    [
        ("two characters", {"prob_early": 0.6, "prob_late": 0.6}, {}, 1),
        ("read batches with mixed skips", {"prob_early": 0.5, "prob_late": 0.5}, {}, 3),
        ("no CFG", {}, {"guidance": 1.0}, 2),
        ("temporal sampling", {"sampling": "temporal", "id_length": 2}, {}, 1),
        ("multistep scheduler", {}, {"scheduler": "dpmpp-2m-karras"}, 2),
        ("ancestral scheduler", {}, {"scheduler": "euler-a", "noise": "per-frame"}, 1),
        ("no consistency", {"method": "none"}, {}, 4),
        ("window mode", {}, {"text": WINDOW_STORY}, 2),
        ("three characters, mixed reads", {"prob_early": 0.7}, {"text": THREE_STORY}, 4),
        ("three characters, one frame a forward", {}, {"text": THREE_STORY}, 1),
        ("three references each", {"id_length": 3}, {"text": THREE_STORY}, 3),
    ],
)
def test_story_loop_equals_the_per_call_schedule(
    pipe, tmp_path, case, consistency, overrides, frame_batch
):
    """All frames advancing step by step through one scheduler give the frames of one full
    pipeline call per plan call (each call's own noise and CSA draws), to float rounding."""
    overrides = dict(overrides)
    text = overrides.pop("text", STORY)
    loop = render(pipe, tmp_path, consistency, frame_batch=frame_batch, text=text, **overrides)
    reference = render(pipe, tmp_path, consistency, per_call=True, text=text, **overrides)
    assert sorted(loop) == sorted(reference)
    worst = max(int(np.abs(loop[i] - reference[i]).max()) for i in loop)
    assert worst <= 2, f"{case}: frames differ by up to {worst}/255"


def test_story_loop_bank_never_holds_more_than_one_step(pipe, tmp_path, monkeypatch):
    seen: list[int] = []
    drop = CSAState.drop_step

    def recording(self, step):
        seen.append(self.banked_steps())
        drop(self, step)
        assert self.banked_steps() == 0

    monkeypatch.setattr(CSAState, "drop_step", recording)
    render(pipe, tmp_path, {"prob_early": 1.0, "prob_late": 1.0})
    assert seen == [0] + [1] * 3  # warm-up step banks nothing, then one step at a time


def test_story_chunks_batch_across_characters(tmp_path):
    """Every character's references share one write forward; reads of any characters and
    plain frames share forwards of `frame_batch` calls."""
    path = tmp_path / "story.yaml"
    path.write_text(STORY)
    plan = build_plan(load_story(path))
    chunks = story_chunks(plan, plan.calls, frame_batch=4)
    # Plain frames first among the others: rows reading as many banks stay side by side.
    assert [[f for call in c.calls for f in call.frames] for c in chunks] == [[0, 2, 1, 3], [5, 4]]
    assert [c.phase for c in chunks] == ["write", "read"]
    assert (
        chunks[0].describe()
        == "references of Mara (frames 1, 3), references of Ollie (frames 2, 4)"
    )


@pytest.mark.parametrize("frame_batch", [1, 2, 3, 4])
def test_two_friends_runs_at_most_one_forward_more_than_stock(frame_batch):
    """stories/two_friends.yaml: 2 characters, 9 frames. Forwards per step with CSA against the
    same story without (issue 19's target: at most stock's + 1)."""
    story_file = Path(__file__).parents[2] / "stories" / "two_friends.yaml"
    counts = {}
    for method in ("none", "storydiffusion"):
        story = load_story(
            story_file, overrides={"consistency": {"method": method, "id_length": 2}}
        )
        plan = build_plan(story)
        counts[method] = len(story_chunks(plan, plan.calls, frame_batch))
    assert counts["storydiffusion"] <= counts["none"] + 1, counts
    if frame_batch == 4:  # the GPU default: one write forward, reads in two, stock in two
        assert counts == {"none": 2, "storydiffusion": 3}


def test_layers_are_indexed_in_forward_order(pipe):
    """With `mid` among the blocks, a layer's index (which picks its skip flag) follows the order
    the UNet's forward runs the layers: down, mid, up (not `attn_processors`' down, up, mid)."""
    unet = pipe.unet
    layers = csa_layers(unet, ("down", "mid", "up"))
    ran: list[str] = []
    modules = dict(unet.named_modules())
    handles = [
        modules[layer.name].register_forward_pre_hook(
            lambda m, a, name=layer.name: ran.append(name)
        )
        for layer in layers
    ]
    try:
        with torch.inference_mode():
            unet(**unet_inputs(1))
    finally:
        for handle in handles:
            handle.remove()
    assert [layer.name for layer in layers] == ran
    assert [layer.index for layer in layers] == list(range(len(layers)))
    kinds = [layer.name.split(".")[0] for layer in layers]
    assert kinds.index("mid_block") < kinds.index("up_blocks")


@pytest.mark.parametrize("noise", ["shared", "identical", "per-frame"])
def test_initial_noise_modes(pipe, tmp_path, noise):
    """`shared` (default): a character's references draw their noise as one batch from one
    generator seeded with the story seed (so they differ), as StoryDiffusion's app does; every
    other frame starts from that seed's one-image noise. `identical`: all frames the same.
    `per-frame`: frame i from seed + i."""
    from diffusers.utils.torch_utils import randn_tensor

    from storycli.keyframes.backbones.sdxl import initial_noise

    path = tmp_path / "story.yaml"
    path.write_text(STORY)
    plan = build_plan(load_story(path, overrides={"noise": noise, "seed": 11}))
    size = render_size(plan, None)
    noise_of = initial_noise(pipe, list(plan.frames), size, torch.float32)
    shape = (4, size.height // pipe.vae_scale_factor, size.width // pipe.vae_scale_factor)

    def app_batch(seed: int, n: int) -> torch.Tensor:
        return randn_tensor((n, *shape), generator=torch.Generator().manual_seed(seed))

    mara, ollie = plan.references["Mara"], plan.references["Ollie"]  # (0, 2), (1, 3)
    if noise == "shared":
        batch = app_batch(11, 2)
        assert torch.equal(noise_of[list(mara)], batch)
        assert torch.equal(noise_of[list(ollie)], batch)
        assert not torch.equal(noise_of[0], noise_of[2])
        assert torch.equal(noise_of[4], batch[0]) and torch.equal(noise_of[5], batch[0])
    elif noise == "identical":
        assert all(torch.equal(noise_of[i], app_batch(11, 1)[0]) for i in range(6))
    else:
        assert all(torch.equal(noise_of[i], app_batch(11 + i, 1)[0]) for i in range(6))


def test_freeu_changes_pixels_and_off_matches_no_freeu(pipe, tmp_path):
    app = {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.2}
    base = render(pipe, tmp_path, {})
    on = render(pipe, tmp_path, {}, freeu=app)
    neutral = render(pipe, tmp_path, {}, freeu={"s1": 1.0, "s2": 1.0, "b1": 1.0, "b2": 1.0})
    assert all(np.abs(on[i] - base[i]).max() > 4 for i in base)
    # Identity scales change nothing but the Fourier filter's float rounding.
    assert max(int(np.abs(neutral[i] - base[i]).max()) for i in base) <= 1
    assert all(np.array_equal(render(pipe, tmp_path, {})[i], base[i]) for i in base)  # undone
    assert pipe.unet.up_blocks[0].__dict__.get("b1") is None
