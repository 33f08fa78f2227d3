"""`--compile` on FLUX.1 (issue 22), on the tiny random FLUX (`--model tiny-flux`): the
transformer's double- and single-stream blocks compiled regionally with the batch size dynamic
(`backbones.base.compiled_blocks`, SDXL's path), CSA's DiT processor eager inside them. As
SDXL's test (`tests/consistency/test_csa.py`), with dynamo's counters and the cheap "eager"
backend: every graph exists after step 1, none is added in later steps across forwards of
different row counts, frames equal eager mode's bit for bit, CSA on and off; and the CLI runs
`--compile` on FLUX.1 instead of refusing it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runs import pixels, run_cli, write_story
from loop_runs import plan_story, run_loop

import storycli.keyframes.backbones.flux as flux_backbone
from storycli.keyframes.backbones.base import compiled_blocks
from storycli.keyframes.schedule import story_chunks
from storycli.weights.tiny_flux import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = [
    "[Ann] walks on a beach",
    "[Bob] reads a book",
    "[Ann] drinks tea",
    "[NC] an empty lighthouse",
    "[Bob] sings on a stage",
    "[Ann] dances in the rain",
    "[Bob] waves",
]
CSA = {
    "method": "storydiffusion",
    "id_length": 2,
    "warmup_steps": 0,
    "sa64": 0.5,
    "prob_early": 0.5,  # many skipped and applied layers, as SDXL's test
    "prob_late": 0.5,
    "blocks": ["down", "mid", "up"],  # CSA in every block of both kinds
}
FRAME_BATCH = 2  # reads of 2 and 1 rows beside the 4-row write forward


def story(consistency: dict[str, Any], name: str = "fluxcompile") -> dict[str, Any]:
    return {
        "name": name,
        "model": "tiny-flux",
        "characters": {"Ann": "a woman with red hair", "Bob": "a man with a hat"},
        "frames": FRAMES,
        "seed": 7,
        "width": 96,
        "height": 64,
        "steps": 4,
        "guidance": 3.5,
        "consistency": consistency,
        "noise": "per-frame",
    }


@pytest.fixture(scope="module")
def pipe(one_thread: None) -> Any:
    # The dev-like variant only: the guidance embedding is outside the compiled blocks, which
    # are the same in both variants (and compiling costs seconds a case on a CPU).
    return build_tiny_flux_pipeline(guidance_embeds=True)


@pytest.mark.parametrize("consistency", [CSA, {"method": "none"}], ids=["csa", "no-csa"])
def test_compiled_blocks_compile_once_not_per_step(
    pipe: Any, tmp_path: Path, consistency: dict[str, Any]
) -> None:
    """Every graph exists after the first step (forwards of different row counts share the
    blocks' graphs), none is added in later steps, pixels equal eager, and the blocks run
    eagerly again afterwards."""
    from torch._dynamo.utils import counters

    plan, size = plan_story(tmp_path / "story.yaml", story(consistency), "tiny-flux")
    rows = {len(chunk.rows) for chunk in story_chunks(plan, plan.calls, FRAME_BATCH)}
    assert len(rows) >= 2, rows  # forwards of different row counts
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled = run_loop(
        pipe,
        plan,
        size,
        compile_backend="eager",
        frame_batch=FRAME_BATCH,
        on_step=lambda _step, _steps: graphs.append(counters["stats"]["unique_graphs"]),
    )
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4, graphs  # nothing compiled after step 1
    transformer = pipe.transformer
    names = set(transformer._repeated_blocks)
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    assert {type(b).__name__ for b in blocks} == names  # both kinds were compiled
    assert all(block._compiled_call_impl is None for block in blocks)  # eager again
    eager = run_loop(pipe, plan, size, frame_batch=FRAME_BATCH)
    assert compiled.keys() == eager.keys() == set(range(len(FRAMES)))
    assert all(np.array_equal(eager[i], compiled[i]) for i in eager)


def test_cli_compiles_flux_instead_of_refusing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`generate --compile` on FLUX.1 runs the compiled path (the CLI's inductor swapped for
    "eager": a C++ build per test is minutes) and writes eager mode's pixels."""
    backends: list[str] = []

    def cheap(model: torch.nn.Module, backend: str) -> AbstractContextManager[None]:
        backends.append(backend)
        return compiled_blocks(model, "eager")

    monkeypatch.setattr(flux_backbone, "compiled_blocks", cheap)
    path = write_story(tmp_path / "story.yaml", story(CSA))
    for out, extra in ((tmp_path / "compiled", ("--compile",)), (tmp_path / "eager", ())):
        run_cli("generate", path, "--out", out, "--frame-batch", FRAME_BATCH, "-q", *extra)
    assert backends == ["inductor"]
    for n in range(1, len(FRAMES) + 1):
        name = f"fluxcompile/frame_0{n}.png"
        np.testing.assert_array_equal(
            pixels(tmp_path / "compiled" / name), pixels(tmp_path / "eager" / name)
        )
