"""`storydiff generate` as a function: story file → plan → model → frames, grid, manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Configs
from .plan import Plan, build_plan
from .story import load_story


@dataclass
class GenerateOptions:
    out: Path = Path("outputs")
    model: str | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    overwrite: bool = False
    compile: bool = False  # torch.compile the UNet (slow first steps, faster after)


@dataclass
class Hooks:
    """Progress callbacks; all optional."""

    on_model: Callable[[Any], None] | None = None  # (LoadedModel)
    on_start: Callable[[int, int, int], None] | None = None  # (frames to make, calls, steps)
    on_call: Callable[[str], None] | None = None  # (description of the pipeline call)
    on_step: Callable[[int, int], None] | None = None  # (step, steps)
    on_frame: Callable[[int, Path], None] | None = None  # (frame index, file written)


@dataclass
class GenerateResult:
    folder: Path
    plan: Plan
    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)

    def summary(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "name": self.plan.story.name,
            "folder": str(self.folder),
            "model": self.model,
            "size": list(self.size),
            "frames": [
                {
                    "frame": f.number,
                    "file": str(self.folder / f.file),
                    "status": "generated" if f.index in self.generated else "skipped",
                }
                for f in self.plan.frames
            ],
            "grid": str(self.folder / "grid.png"),
            "manifest": str(self.folder / "manifest.json"),
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def story_overrides(options: GenerateOptions) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if options.model is not None:
        overrides["model"] = options.model
    if options.seed is not None:
        overrides["seed"] = options.seed
    return overrides


def load_plan(story_path: Path, options: GenerateOptions, configs: Configs) -> Plan:
    return build_plan(load_story(story_path, configs, story_overrides(options)), configs)


def generate_story(
    story_path: Path,
    options: GenerateOptions,
    configs: Configs | None = None,
    hooks: Hooks | None = None,
    plan: Plan | None = None,
) -> GenerateResult:
    """Generate (or resume) a story's keyframes. Raises StoryError, ModelUnavailable,
    OutputConflict for the user's mistakes. `plan`: the story's plan, if already loaded."""
    started = time.perf_counter()
    configs = configs or Configs()
    hooks = hooks or Hooks()
    plan = plan or load_plan(story_path, options, configs)
    # Heavy imports only once the story is known to be valid.
    import torch

    from .keyframes import calls_needed, generate_keyframes, render_size
    from .models import load_pipeline, set_scheduler
    from .runs import StoryRun, peak_memory

    story = plan.story
    folder = options.out / story.name
    # Ownership is checked before the (slow) model load; frame keys need the model, after it.
    StoryRun(folder, story_path, plan, {}, options.overwrite).check_owner()

    loaded = load_pipeline(
        story.model,
        configs,
        base_dir=story_path.parent,
        device=options.device,
        dtype=options.dtype,
        offload=options.offload,  # type: ignore[arg-type]
        vae_slicing=options.vae_slicing,
        vae_tiling=options.vae_tiling,
    )
    if hooks.on_model:
        hooks.on_model(loaded)
    size = render_size(plan, loaded.long_side)
    model_info = loaded.describe() | {"render_size": [size.width, size.height]}
    run = StoryRun(folder, story_path, plan, model_info, options.overwrite)
    todo = run.pending()
    result = GenerateResult(folder, plan, model=model_info, size=(size.width, size.height))
    if loaded.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    import diffusers
    import transformers

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if todo:
        run.write_manifest((size.width, size.height), versions, {}, complete=False)
        set_scheduler(loaded.pipe, story.scheduler)
        calls = calls_needed(plan, todo)
        if hooks.on_start:
            hooks.on_start(len(todo), len(calls), story.steps)

        def on_frame(index: int, image: Any, seconds: float) -> None:
            path = run.save_frame(index, image, seconds)
            if hooks.on_frame:
                hooks.on_frame(index, path)

        generate_keyframes(
            loaded.pipe,
            plan,
            todo,
            size,
            on_frame=on_frame,
            on_step=hooks.on_step,
            on_call=hooks.on_call,
            compile_backend="inductor" if options.compile else None,
        )
    memory, memory_kind = peak_memory(loaded.device)
    result.generated = sorted(run.generated)
    result.skipped = [f.index for f in plan.frames if f.index not in run.generated]
    if options.overwrite:
        run.remove_stale_frames()
    run.write_grid()
    result.seconds = time.perf_counter() - started
    result.peak_memory_bytes = memory
    run.write_manifest(
        (size.width, size.height),
        versions,
        {
            "seconds": round(result.seconds, 3),
            "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind,
            "compiled": options.compile,
        },
    )
    return result
