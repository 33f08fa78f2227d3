"""Consistent Self-Attention on FLUX.1 through the story loop (issue 22), on the tiny random
FLUX (`--model tiny-flux`): rate 0 is `method: none` bit for bit; CSA changes the frames; runs
repeat bit-identically and resume to the same pixels; several characters with `[NC]` frames;
saved characters, shards, `pages` and `evaluate` on a FLUX run; every example story renders or
is refused in one line.

(`tests/consistency/test_csa_dit.py` holds the processor against its definition; here it is
driven by the loop.)
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runs import pixels, run_cli, write_story
from loop_runs import final_latents, latent_moves, plan_story, run_loop

from storycli.keyframes.backbones.flux import FluxBackbone
from storycli.keyframes.checkpoints import LoopCheckpoint
from storycli.keyframes.plan import Plan
from storycli.keyframes.schedule import RenderSize
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = [
    "[Ann] walks on a beach",
    "[Bob] reads a book",
    "[Ann] drinks tea",
    "[NC] an empty lighthouse",
    "[Bob] sings on a stage",
    "[Ann] dances in the rain",
]
CSA = {
    "method": "storydiffusion",
    "id_length": 2,
    "warmup_steps": 0,
    "sa32": 0.5,
    "sa64": 0.5,
    "blocks": ["down", "mid", "up"],  # every block of the tiny FLUX: the biggest effect
}


def csa_story(**changes: Any) -> dict[str, Any]:
    story: dict[str, Any] = {
        "name": "fluxcsa",
        "model": "tiny-flux",
        "characters": {"Ann": "a woman with red hair", "Bob": "a man with a hat"},
        "frames": FRAMES,
        "seed": 7,
        "width": 96,
        "height": 64,
        "steps": 3,
        "guidance": 3.5,
        "consistency": CSA,
        "noise": "per-frame",  # a frame's noise alike whichever call the plan puts it in
    }
    story.update(changes)
    return story


def plan_of(tmp_path: Path, name: str = "story", **changes: Any) -> tuple[Plan, RenderSize]:
    return plan_story(tmp_path / f"{name}.yaml", csa_story(**changes), "tiny-flux")


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "dev-like"])
def pipe(request: pytest.FixtureRequest, one_thread: None) -> Any:
    return build_tiny_flux_pipeline(guidance_embeds=request.param)


# ------------------------------------------------------------------ the loop


def test_rate_zero_is_method_none(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sa32: 0, sa64: 0`: the CSA processors run (write and read phases, banks filed and
    read) but no token is borrowed. Bit for bit the same story with stock attention (a row
    that borrows nothing goes through the stock call on the same tensors); `method: none`'s
    frames within an ulp of the latents, not bit for bit: its plan groups the frames into other
    calls (no write calls), and CLIP/T5 encode each call's prompts as one batch, whose
    composition moves float results by an ulp (on SDXL too: `test_csa.py`)."""
    off = CSA | {"sa32": 0.0, "sa64": 0.0}
    plan, size = plan_of(tmp_path, "off", consistency=off)
    ours = run_loop(pipe, plan, size)
    with monkeypatch.context() as patch:
        patch.setattr(FluxBackbone, "installed_csa", lambda self, state: nullcontext(state))
        stock = run_loop(pipe, plan, size)
    assert ours.keys() == stock.keys() == set(range(len(FRAMES)))
    assert all(np.array_equal(ours[i], stock[i]) for i in ours)

    none_plan, _ = plan_of(tmp_path, "none", consistency={"method": "none"})
    by_frame = final_latents(pipe, plan, size, monkeypatch)
    plain = final_latents(pipe, none_plan, size, monkeypatch)
    for index, latents in by_frame.items():
        torch.testing.assert_close(latents, plain[index], atol=1e-5, rtol=0)


def test_csa_changes_the_frames_and_repeats_bit_identically(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, size = plan_of(tmp_path, "csa")
    first, second = run_loop(pipe, plan, size), run_loop(pipe, plan, size)
    assert first.keys() == second.keys() == set(range(len(FRAMES)))
    assert all(np.array_equal(first[i], second[i]) for i in first)
    # References and read frames move with CSA on (their final latents: the tiny FLUX's
    # random VAE could hide a change in pixels), by far more than an ulp; the [NC] frame
    # reads no bank and stays `method: none`'s, within the ulps of batch composition.
    none_plan, _ = plan_of(tmp_path, "none", consistency={"method": "none"})
    moved = latent_moves(pipe, plan, none_plan, size, monkeypatch)
    assert all(moved[i] > 1e-2 for i in (0, 1, 2, 4, 5)), moved
    assert moved[3] < 1e-5, moved
    none = run_loop(pipe, none_plan, size)
    assert not np.array_equal(first[5], none[5])  # Ann's read frame, in pixels too


def test_resume_with_csa_gives_the_same_pixels(pipe: Any, tmp_path: Path) -> None:
    """Killed after step 1's checkpoint (banks of the references saved with it), then run
    again: the very pixels of an uninterrupted run."""
    plan, size = plan_of(tmp_path, steps=4)
    whole = run_loop(pipe, plan, size)

    class Killed(Exception):
        pass

    def kill_late(done: int, _steps: int) -> None:
        if done == 3:
            raise Killed

    checkpoint = LoopCheckpoint(tmp_path / ".story-loop.pt", "key", every_steps=1)
    with pytest.raises(Killed):
        run_loop(pipe, plan, size, checkpoint=checkpoint, on_step=kill_late)
    again = LoopCheckpoint(tmp_path / ".story-loop.pt", "key", every_steps=1)
    resumed = run_loop(pipe, plan, size, checkpoint=again)
    assert again.resumed_from is not None
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[i], whole[i]) for i in whole)


def test_two_characters_history_and_chunks(
    pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame showing both characters reads both banks while its chunk's other rows read one
    or none (the per-key bias path); rolling history and temporal sampling on top. Chunking
    the read frames differently gives the same frames within the ulps of batch composition."""
    frames = [*FRAMES, "[Ann] and [Bob] share a meal", "[Bob] waves"]
    consistency = CSA | {"history": 2, "sampling": "temporal", "sa64": 0.4}
    plan, size = plan_of(tmp_path, frames=frames, consistency=consistency)
    assert any(len(f.characters) == 2 for f in plan.frames)
    single = run_loop(pipe, plan, size, frame_batch=1)
    chunked = run_loop(pipe, plan, size, frame_batch=4)
    assert single.keys() == chunked.keys() == set(range(len(frames)))
    for index in single:
        difference = np.abs(single[index].astype(int) - chunked[index].astype(int))
        assert difference.max() <= 1, index
    none_plan, _ = plan_of(tmp_path, "none", frames=frames, consistency={"method": "none"})
    ours = final_latents(pipe, plan, size, monkeypatch)
    plain = final_latents(pipe, none_plan, size, monkeypatch)
    assert (ours[6] - plain[6]).abs().max().item() > 1e-2  # the shared meal reads both banks


# ------------------------------------------------------------------ the CLI


def generate(story: Path, out: Path, *extra: str | Path, code: int = 0) -> Any:
    return run_cli("generate", story, "--out", out, "--model", "tiny-flux", *extra, code=code)


def test_saved_characters_on_flux(tmp_path: Path) -> None:
    """`--save-characters` on FLUX, then `bank:`: Ann's read frame is the first run's pixels."""
    out, saved = tmp_path / "out", tmp_path / "characters"
    first = write_story(tmp_path / "first.yaml", csa_story(name="first"))
    generate(first, out, "--save-characters", saved, "--frame-batch", "1")
    meta = json.loads((saved / "Ann" / "character.json").read_text(encoding="utf-8"))
    assert meta["complete"] is True and meta["model"] == "tiny-flux"
    reuse = {"description": "a woman with red hair", "bank": str(saved / "Ann")}
    characters = {"Ann": reuse, "Bob": "a man with a hat"}
    second = write_story(tmp_path / "second.yaml", csa_story(name="second", characters=characters))
    generate(second, out, "--frame-batch", "1")
    # Ann's read frame reads the saved bank: pixel for pixel the first run's.
    np.testing.assert_array_equal(
        pixels(out / "second" / "frame_06.png"), pixels(out / "first" / "frame_06.png")
    )
    # Bob's frames run again, his references now alone in the write forward (Ann's do not
    # run): the batch composition moves floats by an ulp, a pixel by at most one level.
    bob = pixels(out / "second" / "frame_05.png").astype(int)
    assert np.abs(bob - pixels(out / "first" / "frame_05.png")).max() <= 1


def test_shards_pages_and_evaluate_on_a_flux_run(tmp_path: Path) -> None:
    stories = tmp_path / "stories"
    for name in ("a", "b"):
        write_story(stories / f"{name}.yaml", csa_story(name=name))
    out = tmp_path / "out"
    for index in range(2):
        generate(stories, out, "--shard", f"{index}/2", "-q")
    assert all((out / name / "grid.png").is_file() for name in "ab")
    whole = tmp_path / "whole"
    generate(stories / "a.yaml", whole, "-q")
    for n in range(1, len(FRAMES) + 1):
        name = f"frame_0{n}.png"
        np.testing.assert_array_equal(pixels(out / "a" / name), pixels(whole / "a" / name))
    run_cli("pages", out / "a")
    assert (out / "a" / "page_01.png").is_file() and (out / "a" / "comic.pdf").is_file()
    run_cli("evaluate", out / "a", "--clip", "tiny", "--json")
    evaluation = json.loads((out / "a" / "evaluation.json").read_text(encoding="utf-8"))
    assert evaluation


EXAMPLES = sorted((Path(__file__).parents[2] / "stories").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_story_renders_or_is_refused_in_one_line(
    example: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from storycli.cli import app

    args = ["generate", str(example), "--model", "tiny-flux", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "-q"])
    if result.exit_code == 0:
        frames = list((tmp_path / "out").rglob("frame_*.png"))
        assert frames, result.stdout
        return
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    # Refused by design: reference photos (IP-Adapter) and 1Prompt1Story are UNet methods.
    assert "FLUX.1" in errors[0] and ("ip_adapter" in errors[0] or "one-prompt" in errors[0])
