"""`storydiff generate` as a function: story file → plan → model → frames, grid, manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storycli import __version__
from storycli.batch.shard import Shard
from storycli.config import Configs
from storycli.errors import InvalidInput
from storycli.keyframes.plan import Plan, build_plan
from storycli.story.loader import load_story


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
    frame_batch: int | None = None  # read/plain frames per UNet forward (None: per device)
    decode_batch: int = 1  # frames the VAE decodes at once (each adds its activations to the peak)
    checkpoint_every: int | None = None  # steps between loop checkpoints (None: a few minutes)
    split: Shard = field(default_factory=Shard)  # this process's share of the story's frames
    save_characters: Path | None = None  # write each character's bank here (saved characters)


@dataclass
class Hooks:
    """Progress callbacks; all optional."""

    on_model: Callable[[Any], None] | None = None  # (ModelInfo; loaded or not)
    on_start: Callable[[int, int], None] | None = None  # (frames to make, steps)
    on_call: Callable[[str], None] | None = None  # (the UNet forward running: which frames)
    on_step: Callable[[int, int], None] | None = None  # (step, steps) of the story loop
    on_frame: Callable[[int, Path], None] | None = None  # (frame index, file written)
    on_warning: Callable[[str], None] | None = None  # (one sentence)


@dataclass
class GenerateResult:
    folder: Path
    plan: Plan
    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    others: list[int] = field(default_factory=list)  # a shared story: other shards' frames
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)
    removed: list[Path] = field(default_factory=list)  # stale frames of a longer earlier story
    model_reused: bool = False  # the pipeline was already loaded (a batch of stories)
    finished: bool = True  # grid and manifest written (a shared story: by the last shard)
    shard: Shard = field(default_factory=Shard)

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
                    "status": "generated"
                    if f.index in self.generated
                    else "other shard"
                    if f.index in self.others
                    else "skipped",
                }
                for f in self.plan.frames
            ],
            "removed": [str(p) for p in self.removed],
            "grid": str(self.folder / "grid.png") if self.finished else None,
            "manifest": str(self.folder / "manifest.json"),
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "model_reused": self.model_reused,
            "shard": {"index": self.shard.index, "count": self.shard.count},
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


def model_warnings(plan: Plan, pipe: Any) -> list[str]:
    """Frames whose prompt the model's own tokenizer cuts. The plan already fits prompts to
    SDXL's CLIP vocabulary; another tokenizer (the tiny model's, a fine-tune's) may cut more.
    SDXL's two tokenizers share vocabulary and length, so the first one speaks for both."""
    from storycli.story.tokens import dropped_words

    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    out = []
    for frame in plan.frames:
        dropped = dropped_words(frame.prompt, tokenizer)
        if dropped:
            out.append(
                f"frames[{frame.index}]: this model's text encoder reads at most "
                f'{tokenizer.model_max_length} tokens and drops "{dropped}"'
            )
    return out


class BankMismatch(InvalidInput):
    """A saved character made under other settings than the story's."""


def character_record(plan: Plan, name: str, model_id: str, size: tuple[int, int]) -> dict:
    """What shapes a character's bank (and what made it), as a saved character records it."""
    story = plan.story
    c = story.consistency
    return {
        "character": name,
        "description": story.cast.get(name),
        "model": model_id,
        "size": list(size),
        "steps": story.steps,
        "scheduler": story.scheduler,
        "cfg": story.guidance > 1,
        "sa32": c.sa32,
        "sa64": c.sa64,
        "blocks": list(c.blocks),
        "levels": list(c.bank.levels),
        "seed": story.seed,
        "id_length": c.id_length,
        "story": story.name,
        "storydiff_version": __version__,
    }


def saves_characters(plan: Plan, folder: Path | None) -> bool:
    """Whether `--save-characters` has banks to write for this story (its loop must run)."""
    return folder is not None and plan.story.uses_csa and bool(plan.references)


def save_writers(
    plan: Plan, folder: Path | None, model_id: str, size: tuple[int, int]
) -> dict[str, Any]:
    """A bank writer per character with references, into `folder`/<name>."""
    from storycli.saved_banks import BankWriter

    if folder is None or not saves_characters(plan, folder):
        return {}
    return {
        name: BankWriter(folder / name, character_record(plan, name, model_id, size))
        for name in plan.references
    }


def check_saved_banks(plan: Plan, model_id: str, size: tuple[int, int]) -> None:
    """Refuse a saved character whose bank another model, size or setting made."""
    from storycli.saved_banks import mismatches, read_meta

    for name, (folder, _) in plan.banks.items():
        wrong = mismatches(read_meta(Path(folder)), character_record(plan, name, model_id, size))
        if wrong:
            raise BankMismatch(
                f"characters.{name}.bank: {folder} was saved under other settings ("
                + "; ".join(wrong)
                + "); save it again with this story's settings, or match them"
            )


def generate_story(
    story_path: Path,
    options: GenerateOptions,
    configs: Configs | None = None,
    hooks: Hooks | None = None,
    plan: Plan | None = None,
    models: Any = None,
) -> GenerateResult:
    """Generate (or resume) a story's keyframes. Raises StoryError, ModelUnavailable,
    OutputConflict for the user's mistakes. `plan`: the story's plan, if already loaded;
    `models`: a `ModelCache` that keeps the pipeline for the next story of a batch.

    With `options.split` of several shards this process makes only its share of the frames
    (`batch.split`); the shard that finds every frame written writes the grid and manifest.

    The story's folder is locked from the ownership check to the last write: another command
    working in it is refused (`FolderInUse`); the shards of one story hold it together."""
    with contextlib.ExitStack() as claim:
        return _generate_story(story_path, options, configs, hooks, plan, models, claim)


def _generate_story(
    story_path: Path,
    options: GenerateOptions,
    configs: Configs | None,
    hooks: Hooks | None,
    plan: Plan | None,
    models: Any,
    claim: contextlib.ExitStack,
) -> GenerateResult:
    started = time.perf_counter()
    configs = configs or Configs()
    hooks = hooks or Hooks()
    plan = plan or load_plan(story_path, options, configs)
    # Heavy imports only once the story is known to be valid.
    import torch

    from storycli.atomic import remove_temp_files
    from storycli.keyframes.checkpoints import CHECKPOINT_NAME, LoopCheckpoint
    from storycli.keyframes.model_cache import ModelCache
    from storycli.keyframes.models import ModelInfo, resolve_model, set_scheduler
    from storycli.keyframes.schedule import calls_needed, default_frame_batch, render_size
    from storycli.keyframes.split import frames_of_shard
    from storycli.keyframes.story_folder import FRAME_FILE, GRID, MANIFEST, StoryRun, peak_memory
    from storycli.locks import run_folder_lock
    from storycli.paths import check_writable_folder
    from storycli.render import uncovered_characters
    from storycli.render.pages import PAGE_RE, PDF

    story = plan.story
    folder = options.out / story.name
    # The output location and its ownership are checked before the (slow) model load.
    check_writable_folder(folder, "--out")
    # Locked before anything in it is read: a second run on it is refused, not interleaved.
    claim.enter_context(
        run_folder_lock(folder, "generate", shared=options.split.active, create=True)
    )
    StoryRun(folder, story_path, plan, {}, options.overwrite).check_owner()

    split = options.split
    models = models or ModelCache()
    load_options: dict[str, Any] = {
        "device": options.device,
        "dtype": options.dtype,
        "offload": options.offload,
        "vae": story.vae,
    }
    # Frame keys need only what the model resolves to, not its weights: the pipeline is loaded
    # only when there is something to make.
    info: ModelInfo = resolve_model(story.model, configs, story_path.parent, **load_options)
    size = render_size(plan, info.long_side)
    check_saved_banks(plan, info.model_id, (size.width, size.height))
    frame_batch = options.frame_batch or default_frame_batch(info.device.partition(":")[0])
    owned = frames_of_shard(plan, frame_batch, split) if split.active else None

    def story_run(model: ModelInfo) -> tuple[StoryRun, list[int], dict[str, Any]]:
        """The folder's run as made with `model`, and its frames (of this shard) to make."""
        described = model.describe() | {"render_size": [size.width, size.height]}
        run = StoryRun(folder, story_path, plan, described, options.overwrite)
        todo = run.pending()
        return run, [i for i in todo if owned is None or i in owned], described

    run, todo, model_info = story_run(info)
    saving = saves_characters(plan, options.save_characters)
    loaded, reused = None, False
    if todo or saving:
        loaded, reused = models.load(
            story.model,
            configs,
            base_dir=story_path.parent,
            vae_slicing=options.vae_slicing,
            vae_tiling=options.vae_tiling,
            **load_options,
        )
        if loaded.describe() != info.describe():  # the load downloaded: a revision is known
            info = loaded
            run, todo, model_info = story_run(info)
    if hooks.on_model:
        hooks.on_model(info)
    # Not the tiny model's: its toy tokenizer (bytes and a few merges) cuts every real prompt,
    # which says nothing about the story (its frames are noise anyway).
    for warning in model_warnings(plan, loaded.pipe) if loaded and not loaded.tiny else []:
        if hooks.on_warning:
            hooks.on_warning(warning)
    result = GenerateResult(
        folder,
        plan,
        model=model_info,
        size=(size.width, size.height),
        model_reused=reused,
        shard=split,
    )
    if info.device.startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()

    from importlib.metadata import version  # not `import diffusers`: seconds, and not needed

    versions = {
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
    }
    # Before the manifest is rewritten: it is what proves those files are ours.
    if split.leader:
        result.removed = run.remove_stale_frames()
    # What a killed run's atomic writes left: temp files of this folder's own names only (of
    # a shared story: old ones only, the other shards may be writing theirs now).
    checkpoint_name = (
        CHECKPOINT_NAME
        if not split.active
        else (CHECKPOINT_NAME.replace(".pt", f"-{split.index}of{split.count}.pt"))
    )
    ours = {f.file for f in plan.frames} | {GRID, MANIFEST, PDF, checkpoint_name}
    remove_temp_files(
        folder,
        lambda name: name in ours or any(p.fullmatch(name) for p in (FRAME_FILE, PAGE_RE)),
        min_age_seconds=600.0 if split.active else 0.0,
    )
    loop: dict[str, Any] = {}  # what the story loop reports, when it runs
    if loaded is not None:
        from storycli.consistency.ip_adapter import attached_ip_adapter

        # The adapter (if any) loads before anything is written; it must also come before CSA's
        # processors, which the story loop installs (loading it resets every processor).
        with attached_ip_adapter(loaded.pipe, story.photos()) as photo_inputs:
            writers = save_writers(
                plan, options.save_characters, info.model_id, (size.width, size.height)
            )
            run.write_manifest((size.width, size.height), versions, {}, complete=False)
            set_scheduler(loaded.pipe, story.scheduler)
            if hooks.on_start:
                hooks.on_start(len(todo), story.steps)
            # Keyed by what makes the loop's numbers: its frames' inputs (in loop order), how they
            # are batched, and where they run.
            rows = [i for call in calls_needed(plan, todo, writers) for i in call.frames]
            checkpoint_key = {
                "frames": [run.keys[i] for i in rows],
                "frame_batch": frame_batch,
                "device": info.device,
                "compiled": options.compile,
            }
            # Saving characters writes every step's bank as it is made: such a run starts at step
            # 0 (a resumed one would save only the steps after its checkpoint).
            checkpoint = (
                None
                if writers
                else LoopCheckpoint(
                    folder / checkpoint_name,
                    hashlib.sha256(json.dumps(checkpoint_key).encode()).hexdigest()[:16],
                    every_steps=options.checkpoint_every,
                )
            )

            def on_frame(index: int, image: Any, seconds: float) -> None:
                path = run.save_frame(index, image, seconds)
                if hooks.on_frame:
                    hooks.on_frame(index, path)

            from storycli.keyframes.loop import (
                generate_keyframes,  # the model stack: only when it runs
            )

            loop = generate_keyframes(
                loaded.pipe,
                plan,
                todo,
                size,
                on_frame=on_frame,
                on_step=hooks.on_step,
                on_call=hooks.on_call,
                compile_backend="inductor" if options.compile else None,
                frame_batch=frame_batch,
                checkpoint=checkpoint,
                save_banks=writers,
                photos=photo_inputs,
                decode_batch=options.decode_batch,
            )
            if checkpoint is not None:
                checkpoint.remove()  # its frames are written
    memory, memory_kind = peak_memory(info.device)
    result.generated = sorted(run.generated)
    result.others = [f.index for f in plan.frames if owned is not None and f.index not in owned]
    result.skipped = [
        f.index
        for f in plan.frames
        if f.index not in run.generated and f.index not in result.others
    ]
    result.seconds = time.perf_counter() - started
    result.peak_memory_bytes = memory
    if split.active and StoryRun(folder, story_path, plan, model_info).pending():
        result.finished = False  # other shards' frames are still to come: the last one finishes
        return result
    run.write_grid()
    pages = run.write_pages()
    missing = uncovered_characters(f.caption for f in plan.frames)
    if missing and hooks.on_warning:
        hooks.on_warning(
            f"grid.png: no font on this machine draws {' '.join(missing)} (shown as boxes); "
            "install a font that covers them (e.g. fonts-noto-cjk for Chinese, Japanese, Korean)"
        )
    run.write_manifest(
        (size.width, size.height),
        versions,
        {
            "seconds": round(result.seconds, 3),
            "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind,
            "compiled": options.compile,
            "story_loop": loop,
            "pages": pages,
            "pdf": "comic.pdf",
            "shard": {"index": split.index, "count": split.count} if split.active else None,
        },
    )
    return result
