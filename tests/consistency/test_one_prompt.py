"""1Prompt1Story (`consistency.method: one-prompt`): consolidated prompts and their windows,
Singular-Value Reweighting against the formulas, identity-preserving cross-attention, and
whole stories on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cli_runs import pixels, run_cli

from storycli.config import Configs
from storycli.consistency.consolidate import Consolidated, consolidated_frames
from storycli.consistency.one_prompt import (
    TokenSets,
    one_prompt_conditioning,
    reweight,
    singular_value_reweight,
    token_sets,
)
from storycli.keyframes.plan import build_plan
from storycli.story.loader import load_story
from storycli.story.schema import OnePrompt
from storycli.story.tokens import CONTENT_TOKENS, count_tokens
from storycli.weights.tiny import build_tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = dict(
    reweight="svr",
    enhance={"alpha": -0.01, "beta": 1.0},
    suppress={"alpha": 0.01, "beta": 0.05},
    eot_scale=0.9,
    naive_enhance=2.0,
    naive_suppress=0.5,
    ipca=True,
    max_frames=10,
)


def settings(**changes: Any) -> OnePrompt:
    return OnePrompt.model_validate(DEFAULTS | changes)


def svr_by_hand(rows: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    u, sigma, vh = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    return (u * (beta * np.exp(-alpha * sigma) * sigma)) @ vh


# Rows: 0 SOT, 1 identity, 2-3 the expressed frame, 4-5 another frame, 6-7 a third, 8-9 EOT.
SETS = TokenSets(identity_end=2, parts=((2, 4), (4, 6), (6, 8)), eot_start=8)


def hand_made() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(10, 6, generator=generator) * 20


def test_singular_value_reweight_is_the_formula() -> None:
    x = hand_made()[2:6]
    out = singular_value_reweight(x, alpha=0.01, beta=0.05)
    sigma = np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False)
    expected = 0.05 * np.exp(-0.01 * sigma) * sigma
    np.testing.assert_allclose(np.linalg.svd(out.numpy(), compute_uv=False), expected, rtol=1e-4)
    np.testing.assert_allclose(out.numpy(), svr_by_hand(x.numpy(), 0.01, 0.05), atol=1e-4)


@pytest.mark.parametrize("mode", ["svr", "svr-eot", "naive"])
def test_reweight_matches_the_formulas(mode: str) -> None:
    x = hand_made()
    out = reweight(x, SETS, settings(reweight=mode)).numpy().astype(np.float64)
    expected = x.numpy().astype(np.float64)
    eot = [8, 9]
    if mode == "naive":
        expected[2:4] *= 2.0
        expected[4:8] *= 0.5
    else:
        # Suppress the other frames one set at a time, then enhance the frame's own.
        suppress, enhance = (0.01, 0.05), (-0.01, 1.0)
        for (start, end), (alpha, beta) in [
            ((4, 6), suppress),
            ((6, 8), suppress),
            ((2, 4), enhance),
        ]:
            rows = list(range(start, end)) + (eot if mode == "svr" else [])
            expected[rows] = svr_by_hand(expected[rows], alpha, beta)
            if mode == "svr-eot":
                expected[eot] *= 0.9
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(out[:2], x.numpy()[:2])  # start token and identity untouched
    # Enhancing raises the frame's own energy, suppressing lowers the others'.
    if mode != "svr-eot":
        assert np.linalg.norm(out[2:4]) > np.linalg.norm(x.numpy()[2:4])
    assert np.linalg.norm(out[4:8]) < 0.6 * np.linalg.norm(x.numpy()[4:8])


def story_data(frames: list[str], **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "op",
        "model": "tiny",
        "style": "comic",
        "characters": {"Ann": "a woman with red hair"},
        "frames": frames,
        "seed": 4,
        "width": 256,
        "height": 192,
        "steps": 2,
        "scheduler": "euler",
        "consistency": {"method": "one-prompt"},
    }
    return data | changes


def write(tmp_path: Path, data: dict[str, Any], name: str = "story.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_windows_respect_the_token_budget_on_a_long_story(tmp_path: Path) -> None:
    frames = [
        f"[Ann] walks through the crowded market number {i} looking at fruit and old books"
        for i in range(30)
    ]
    frames[7] = "[NC] an empty street at night"
    configs = Configs()
    story = load_story(write(tmp_path, story_data(frames)), configs)
    plan = build_plan(story, configs)
    assert set(plan.consolidated) == set(range(30)) - {7}  # [NC] frames are not consolidated
    # The same windows without the 10-frame cap: where one is longer, the budget did not stop it.
    uncapped = consolidated_frames(story, configs.styles["comic"].prompt, 30)
    for index, consolidated in plan.consolidated.items():
        assert consolidated.frames[0] == index  # the frame itself first
        assert count_tokens(consolidated.prompt) <= CONTENT_TOKENS  # counted in tokens
        assert plan.frames[index].prompt == consolidated.prompt
        assert 1 <= len(consolidated.frames) < 10  # these texts are long: fewer than 10 fit
        # The window is the next frames in story order, circularly, [NC] skipped.
        pool = [i for i in range(30) if i != 7]
        start = pool.index(index)
        assert list(consolidated.frames) == [
            pool[(start + n) % len(pool)] for n in range(len(consolidated.frames))
        ]
        # As many as fit: one more frame would overflow.
        if len(uncapped[index].frames) > len(consolidated.frames):
            pytest.fail("the window stopped before the budget")
    assert not plan.warnings
    short = build_plan(load_story(write(tmp_path, story_data(["[Ann] runs"] * 12)), configs))
    assert {len(c.frames) for c in short.consolidated.values()} == {10}  # max_frames


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    return build_tiny_sdxl_pipeline()


def test_token_sets_find_each_piece(tiny_pipe: Any) -> None:
    tokenizer = tiny_pipe.tokenizer
    consolidated = Consolidated(
        "comic book panel, ",
        "a woman with red hair",
        ("walks in the park", "drinks tea"),
        ", bold ink lines",
        (0, 1),
    )
    sets = token_sets(tokenizer, consolidated)
    ids = tokenizer(consolidated.prompt, padding="max_length", max_length=77).input_ids

    def decode(start: int, end: int) -> str:
        return tokenizer.decode(ids[start:end]).replace(" ,", ",").strip()

    assert decode(1, sets.identity_end) == "comic book panel, a woman with red hair"
    assert [decode(*span) for span in sets.parts] == ["walks in the park", "drinks tea"]
    assert ids[sets.eot_start] == tokenizer.eos_token_id
    assert decode(sets.parts[-1][1], sets.eot_start) == ", bold ink lines"


def encode(pipe: Any, prompts: list[str]) -> torch.Tensor:
    text, negative, _, _ = pipe.encode_prompt(
        prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    return torch.cat([negative, text])


def test_identity_keys_ignore_frame_tokens(tiny_pipe: Any) -> None:
    first = Consolidated("", "a woman with red hair", ("walks in the park", "sleeps"), "", (0, 1))
    second = Consolidated("", "a woman with red hair", ("flies a kite high", "eats"), "", (2, 3))
    chunk = [first, second, None]  # the last frame is an [NC] frame
    text = encode(tiny_pipe, [first.prompt, second.prompt, "an empty street"])
    out, mask = one_prompt_conditioning(tiny_pipe, chunk, text.clone(), True, settings())
    assert out.shape == (6, 154, text.shape[-1]) and mask is not None
    end = token_sets(tiny_pipe.tokenizer, first).identity_end
    # Unconditional rows and the [NC] frame: no identity key is kept (plain attention).
    for row in (0, 1, 2, 5):
        assert mask[row, 77:].sum() == 0
    # Conditional rows keep exactly the start token and identity of the appended half...
    for row in (3, 4):
        assert mask[row, :77].all() and mask[row, 77 : 77 + end].all()
        assert mask[row, 77 + end :].sum() == 0
    # ...which are the same for both frames although their frame words differ (CLIP is causal):
    torch.testing.assert_close(out[3, 77 : 77 + end], out[4, 77 : 77 + end])
    # and they are the embedding before reweighting, while the frame half is reweighted.
    torch.testing.assert_close(out[3, 77 : 77 + end], text[3, :end])
    assert not torch.allclose(out[3, :77], text[3])
    torch.testing.assert_close(out[5, :77], text[5])  # [NC]: untouched
    torch.testing.assert_close(out[:3, :77], text[:3])  # unconditional: untouched
    plain, no_mask = one_prompt_conditioning(
        tiny_pipe, chunk, text.clone(), True, settings(ipca=False)
    )
    assert no_mask is None and plain.shape == text.shape
    torch.testing.assert_close(plain, out[:, :77])


FRAMES = ["[Ann] walks in the park", "[Ann] drinks tea", "[NC] an empty street", "[Ann] sings"]


def test_one_prompt_stories_run_end_to_end(tmp_path: Path) -> None:
    runs = {
        "none": {"method": "none"},
        "one-prompt": {"method": "one-prompt"},
        "no-ipca": {"method": "one-prompt", "one_prompt": {"ipca": False}},
        "naive": {"method": "one-prompt", "one_prompt": {"reweight": "naive"}},
        "both": {"method": ["storydiffusion", "one-prompt"], "id_length": 2},
    }
    images = {}
    for name, consistency in runs.items():
        data = story_data(FRAMES, name=name, consistency=consistency)
        run_cli("generate", write(tmp_path, data, f"{name}.yaml"), "--out", tmp_path / "out")
        images[name] = [pixels(tmp_path / "out" / name / f"frame_0{i}.png") for i in range(1, 5)]
    for name in ("one-prompt", "no-ipca", "naive", "both"):
        assert not np.array_equal(images[name][0], images["none"][0]), name
    assert not np.array_equal(images["one-prompt"][0], images["no-ipca"][0])
    # [NC] frames render from their own prompt: as without one-prompt.
    np.testing.assert_array_equal(images["one-prompt"][2], images["none"][2])
    # Frames made again alone (resume) are the same.
    (tmp_path / "out" / "one-prompt" / "frame_04.png").unlink()
    data = story_data(FRAMES, name="one-prompt", consistency=runs["one-prompt"])
    run_cli("generate", write(tmp_path, data, "one-prompt.yaml"), "--out", tmp_path / "out")
    np.testing.assert_array_equal(
        pixels(tmp_path / "out" / "one-prompt" / "frame_04.png"), images["one-prompt"][3]
    )


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (["one-prompt", "one-prompt"], "at most once"),
        (["none", "one-prompt"], "cannot be combined"),
        ([], "at least one method"),
        ("two-prompt", "storydiffusion"),
    ],
)
def test_bad_methods_are_refused(tmp_path: Path, method: Any, message: str) -> None:
    path = write(tmp_path, story_data(FRAMES, consistency={"method": method}))
    result = run_cli("validate", path, code=2)
    assert message in result.stderr and "consistency.method" in result.stderr


def official_frames(identity: str, texts: list[str], window: int) -> list[tuple[str, str, list]]:
    """The official rule written out (byliutao/1Prompt1Story@34e22ac, utils.py 228–266): per
    frame, the prompt encoded, the text expressed and the texts suppressed, in order."""
    fits, joined = 0, identity
    for text in texts:  # the window: as many frames as keep the *word* count under 77
        joined += " " + text
        if len(joined.split()) >= 77:
            break
        fits += 1
    window = min(window, fits)
    if window < len(texts):  # circular windows, the frame first
        rolled = [[texts[(i + j) % len(texts)] for j in range(window)] for i in range(len(texts))]
        return [(f"{identity} {' '.join(w)}", w[0], w[1:]) for w in rolled]
    story = f"{identity} {' '.join(texts)}"  # everything fits: one prompt, story order
    return [(story, t, texts[:i] + texts[i + 1 :]) for i, t in enumerate(texts)]


def official_rows(tokenizer: Any, prompt: str, text: str) -> list[int]:
    """A text's rows as the official code finds them (first matching token run) plus EOT."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    words = tokenizer(text, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(words)] == words)
    eot = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    return sorted({*range(start, start + len(words)), *eot})


@pytest.mark.parametrize(("count", "max_frames"), [(3, 10), (4, 4), (3, 2), (5, 3)])
def test_prompts_and_token_sets_follow_the_official_rule(
    tmp_path: Path, tiny_pipe: Any, count: int, max_frames: int
) -> None:
    frames = [
        "[Ann] walks in the park",
        "[Ann] drinks tea",
        "[Ann] sings",
        "[Ann] reads a book",
        "[Ann] flies a kite",
    ][:count]
    story = load_story(write(tmp_path, story_data(frames)), Configs())
    ours = consolidated_frames(story, "{prompt}", max_frames)
    texts = [f.split("] ", 1)[1] for f in frames]
    official = official_frames("a woman with red hair", texts, max_frames)
    assert [ours[i].prompt for i in range(count)] == [prompt for prompt, _, _ in official]
    for i, (prompt, express, suppress) in enumerate(official):
        sets = token_sets(tiny_pipe.tokenizer, ours[i])
        # The sets reweighted, in the order reweighted: each suppressed text, then the frame's.
        steps = [(sets.rows(n, True, 77), up) for n, up in sets.steps()]
        expected = [(official_rows(tiny_pipe.tokenizer, prompt, t), False) for t in suppress]
        assert steps == [*expected, (official_rows(tiny_pipe.tokenizer, prompt, express), True)]
    if count <= max_frames:  # story order: every frame encodes the same prompt
        assert {ours[i].prompt for i in range(count)} == {official[0][0]}
        assert [ours[i].express for i in range(count)] == list(range(count))
    else:
        assert all(ours[i].frames[0] == i and ours[i].express == 0 for i in range(count))


def test_story_order_around_nc_frames_and_repeated_texts(tmp_path: Path) -> None:
    frames = ["[Ann] runs", "[NC] an empty street", "[Ann] sleeps", "[Ann] runs"]
    story = load_story(write(tmp_path, story_data(frames)), Configs())
    plan = build_plan(story, Configs())
    assert set(plan.consolidated) == {0, 2, 3}
    assert {plan.frames[i].prompt for i in (0, 2, 3)} == {plan.consolidated[0].prompt}
    assert plan.consolidated[0].frames == (0, 2, 3)
    # Equal texts express the first of them (what the frame's prompt and own text determine).
    assert [plan.consolidated[i].express for i in (0, 2, 3)] == [0, 1, 0]


def test_singular_value_reweight_runs_in_float64() -> None:
    x = hand_made()[2:6].double()
    # The official code: SVD of the rows' transpose, in float64.
    expected = svr_by_hand(x.numpy().T, 0.01, 0.05).T
    out = singular_value_reweight(x, alpha=0.01, beta=0.05)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    # A float32 embedding: the float64 result, rounded once.
    single = singular_value_reweight(x.float(), alpha=0.01, beta=0.05)
    assert single.dtype == torch.float32
    np.testing.assert_array_max_ulp(single.numpy(), expected.astype(np.float32), maxulp=1)
