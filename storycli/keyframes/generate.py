"""`storydiff generate` as a function: story file → plan → model → frames, grid, manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storycli import __version__
from storycli.batch.shard import Shard
from storycli.config import Configs
from storycli.errors import InvalidInput
from storycli.keyframes.plan import Plan, build_plan
from storycli.story.loader import load_story

if TYPE_CHECKING:
    from storycli.keyframes.checkpoints import LoopCheckpoint
    from storycli.keyframes.models import LoadedModel, ModelInfo
    from storycli.keyframes.schedule import RenderSize
    from storycli.keyframes.story_folder import StoryRun


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
    compile: bool = False  # torch.compile the UNet's/transformer's blocks (slow first step)
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
    """The story's plan; what its model's family (known before loading: a preset's, a
    folder's) cannot run is refused here, so `--dry-run` says so too."""
    story = load_story(story_path, configs, story_overrides(options))
    plan = build_plan(story, configs, story_path.parent)
    check_family(plan, plan.family)
    return plan


def model_warnings(plan: Plan, pipe: Any) -> list[str]:
    """Frames whose prompt the model's own tokenizer cuts. The plan already fits prompts to
    SDXL's CLIP vocabulary; another tokenizer (the tiny model's, a fine-tune's) may cut more.
    SDXL's two tokenizers share vocabulary and length, so the first one speaks for both.
    FLUX.1: its T5 (CLIP's pooled vector reads the first 77 tokens by design), unless the plan
    has counted with that very tokenizer already (no warning about skipping it)."""
    from storycli.story.tokens import dropped_words

    flux = type(pipe).__name__ == "FluxPipeline"
    if flux and plan.family == "flux" and not any(w.loc == ("model",) for w in plan.warnings):
        return []  # counted by the plan (`plan._flux_prompts` warns at `model` when it could not)
    tokenizer = pipe.tokenizer_2 if flux else (pipe.tokenizer or pipe.tokenizer_2)
    out = []
    for frame in plan.frames:
        dropped = dropped_words(frame.prompt, tokenizer)
        if dropped:
            out.append(
                f"frames[{frame.index}]: this model's text encoder reads at most "
                f'{tokenizer.model_max_length} tokens and drops "{dropped}"'
            )
    return out


class NotOnThisModel(InvalidInput):
    """A story feature the model's family cannot run yet (FLUX.1: see `backbones.flux`)."""


def check_family(plan: Plan, family: str | None) -> None:
    """Refuse, in one line, what the model's family cannot run yet (None: not known before
    the load; checked again after it)."""
    from storycli.keyframes.backbones.support import refusal

    problem = refusal(family, plan.story) if family is not None else None
    if problem is not None:
        raise NotOnThisModel(problem)


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


@dataclass
class _Job:
    """One story's generation as its phases share it: what was asked, then what the model
    resolves to and the folder's run made with it."""

    story_path: Path
    options: GenerateOptions
    configs: Configs
    hooks: Hooks
    plan: Plan
    # Set by `_resolve_model`, before any load: frame keys need only what the model resolves
    # to, not its weights.
    info: ModelInfo = field(init=False)  # replaced by the loaded model's when a load learns more
    size: RenderSize = field(init=False)  # kept from the first resolution: the run's size
    frame_batch: int = field(init=False)
    owned: set[int] | None = field(init=False)  # a shared story: this shard's frames, else None
    # Set by `_prepare_run` (again when a load changes `info`).
    run: StoryRun = field(init=False)
    todo: list[int] = field(init=False)  # this shard's frames still to make
    model_info: dict[str, Any] = field(init=False)  # the model as the run records it

    @property
    def folder(self) -> Path:
        return self.options.out / self.plan.story.name

    @property
    def split(self) -> Shard:
        return self.options.split

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.size.width, self.size.height)

    def load_options(self) -> dict[str, Any]:
        """The options both resolving and loading the model take."""
        return {
            "device": self.options.device,
            "dtype": self.options.dtype,
            "offload": self.options.offload,
            "vae": self.plan.story.vae,
        }


def _generate_story(
    story_path: Path,
    options: GenerateOptions,
    configs: Configs | None,
    hooks: Hooks | None,
    plan: Plan | None,
    models: Any,
    claim: contextlib.ExitStack,
) -> GenerateResult:
    """`generate_story`'s phases, in order: claim the folder, resolve the model, find the
    frames to make, load the model only if any, clean the folder, make the frames, count
    them, and (the last shard of a story) finish it with its grid, pages and manifest."""
    started = time.perf_counter()
    configs = configs or Configs()
    plan = plan or load_plan(story_path, options, configs)
    job = _Job(story_path, options, configs, hooks or Hooks(), plan)
    # Heavy imports (torch, the model stack) only in the phases: the story is valid by now.
    _claim_folder(job, claim)
    _resolve_model(job)
    _prepare_run(job)
    loaded, reused = _load_model(job, models)
    _announce_model(job, loaded)
    result = GenerateResult(
        job.folder,
        plan,
        model=job.model_info,
        size=job.dimensions,
        model_reused=reused,
        shard=job.split,
    )
    from storycli.weights.devices import reset_peak_memory

    reset_peak_memory(job.info.device)
    versions = _library_versions()
    result.removed = _clean_folder(job)
    loop = _make_frames(job, loaded, versions) if loaded is not None else {}
    memory_kind = _tally(job, result, started)
    if job.split.active and _others_pending(job):
        result.finished = False  # other shards' frames are still to come: the last one finishes
        return result
    _finish_story(job, result, versions, loop, memory_kind)
    return result


def _claim_folder(job: _Job, claim: contextlib.ExitStack) -> None:
    """Check and lock the story's folder; refuse one another story or command owns."""
    from storycli.keyframes.story_folder import StoryRun, story_folder
    from storycli.paths import check_writable_folder

    # The output location and its ownership are checked before the (slow) model load.
    check_writable_folder(job.folder, "--out")
    # Locked before anything in it is read: a second run on it is refused, not interleaved.
    story_folder(job.folder).lock(claim, "generate", shared=job.split.active, create=True)
    StoryRun(job.folder, job.story_path, job.plan, {}, job.options.overwrite).check_owner()


def _resolve_model(job: _Job) -> None:
    """What the story's model resolves to (no weights loaded), the size it renders at, its
    saved characters checked against both, and how frames are batched and shared out."""
    from storycli.keyframes.models import resolve_model
    from storycli.keyframes.schedule import default_frame_batch, render_size
    from storycli.keyframes.split import frames_of_shard

    story = job.plan.story
    job.info = resolve_model(story.model, job.configs, job.story_path.parent, **job.load_options())
    job.size = render_size(job.plan, job.info.long_side)
    check_family(job.plan, job.info.family)
    check_saved_banks(job.plan, job.info.model_id, job.dimensions)
    job.frame_batch = job.options.frame_batch or default_frame_batch(
        job.info.device.partition(":")[0]
    )
    job.owned = frames_of_shard(job.plan, job.frame_batch, job.split) if job.split.active else None


def _prepare_run(job: _Job) -> None:
    """The folder's run as made with `job.info`, and its frames (of this shard) to make."""
    from storycli.keyframes.story_folder import StoryRun

    job.model_info = job.info.describe() | {"render_size": list(job.dimensions)}
    job.run = StoryRun(job.folder, job.story_path, job.plan, job.model_info, job.options.overwrite)
    todo = job.run.pending()
    job.todo = [i for i in todo if job.owned is None or i in job.owned]


def _load_model(job: _Job, models: Any) -> tuple[LoadedModel | None, bool]:
    """Load the pipeline (or reuse the batch's) only when there is something to make; (the
    loaded model or None, whether it was reused)."""
    from storycli.keyframes.model_cache import ModelCache

    models = models or ModelCache()
    if not (job.todo or saves_characters(job.plan, job.options.save_characters)):
        return None, False
    loaded, reused = models.load(
        job.plan.story.model,
        job.configs,
        base_dir=job.story_path.parent,
        vae_slicing=job.options.vae_slicing,
        vae_tiling=job.options.vae_tiling,
        **job.load_options(),
    )
    check_family(job.plan, loaded.family)  # a hub id's, known only now
    if job.plan.story.uses_csa:  # block names the loaded network has not (FLUX.1 ranges)
        from storycli.keyframes.backbones.select import backbone_for

        backbone_for(loaded.pipe).csa_layers(job.plan.story.consistency.blocks)
    if loaded.describe() != job.info.describe():  # the load downloaded: a revision is known
        job.info = loaded
        _prepare_run(job)
    return loaded, reused


def _announce_model(job: _Job, loaded: LoadedModel | None) -> None:
    """Tell the hooks which model runs, and the prompts its tokenizer cuts."""
    hooks = job.hooks
    if hooks.on_model:
        hooks.on_model(job.info)
    # Not the tiny model's: its toy tokenizer (bytes and a few merges) cuts every real prompt,
    # which says nothing about the story (its frames are noise anyway).
    warnings = model_warnings(job.plan, loaded.pipe) if loaded and not loaded.tiny else []
    if loaded is not None and loaded.family == "flux" and job.plan.story.negative:
        # FLUX.1 is guidance-distilled: there is no unconditional half to put a negative in.
        warnings.append("negative: FLUX.1 takes no negative prompt; it is ignored")
    for warning in warnings:
        if hooks.on_warning:
            hooks.on_warning(warning)


def _library_versions() -> dict[str, str]:
    """The versions the manifest records."""
    from importlib.metadata import version  # not `import diffusers`: seconds, and not needed

    import torch

    return {
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
    }


def _checkpoint_name(split: Shard) -> str:
    """The story loop's checkpoint file (a shard's own, in a shared story)."""
    from storycli.keyframes.checkpoints import CHECKPOINT_NAME

    if not split.active:
        return CHECKPOINT_NAME
    return CHECKPOINT_NAME.replace(".pt", f"-{split.index}of{split.count}.pt")


def _clean_folder(job: _Job) -> list[Path]:
    """Remove a longer earlier story's frames (the leader only) and what a killed run's atomic
    writes left; the frames removed."""
    from storycli.keyframes.story_folder import FRAME_FILE, GRID, MANIFEST, story_folder
    from storycli.render.pages import PAGE_RE, PDF

    removed: list[Path] = []
    # Before the manifest is rewritten: it is what proves those files are ours.
    if job.split.leader:
        removed = job.run.remove_stale_frames()
    # Temp files of this folder's own names only (of a shared story: old ones only, the other
    # shards may be writing theirs now).
    ours = {f.file for f in job.plan.frames} | {GRID, MANIFEST, PDF, _checkpoint_name(job.split)}
    folder = story_folder(
        job.folder,
        lambda name: name in ours or any(p.fullmatch(name) for p in (FRAME_FILE, PAGE_RE)),
    )
    folder.remove_leftovers(min_age_seconds=600.0 if job.split.active else 0.0)
    return removed


def _make_frames(job: _Job, loaded: LoadedModel, versions: dict[str, str]) -> dict[str, Any]:
    """Run the story loop over this shard's frames, writing each as it is made; what the loop
    reports."""
    from storycli.consistency.ip_adapter import attached_ip_adapter
    from storycli.keyframes.models import set_scheduler

    story, run, hooks = job.plan.story, job.run, job.hooks
    # The adapter (if any) loads before anything is written; it must also come before CSA's
    # processors, which the story loop installs (loading it resets every processor).
    with attached_ip_adapter(loaded.pipe, story.photos()) as photo_inputs:
        writers = save_writers(
            job.plan, job.options.save_characters, job.info.model_id, job.dimensions
        )
        run.write_manifest(job.dimensions, versions, {}, complete=False)
        if loaded.family != "flux":  # FLUX.1 keeps its own flow-matching scheduler
            set_scheduler(loaded.pipe, story.scheduler)
        if hooks.on_start:
            hooks.on_start(len(job.todo), story.steps)
        checkpoint = _loop_checkpoint(job, writers)

        def on_frame(index: int, image: Any, seconds: float) -> None:
            path = run.save_frame(index, image, seconds)
            if hooks.on_frame:
                hooks.on_frame(index, path)

        from storycli.keyframes.loop import (
            generate_keyframes,  # the model stack: only when it runs
        )

        loop = generate_keyframes(
            loaded.pipe,
            job.plan,
            job.todo,
            job.size,
            on_frame=on_frame,
            on_step=hooks.on_step,
            on_call=hooks.on_call,
            compile_backend="inductor" if job.options.compile else None,
            frame_batch=job.frame_batch,
            checkpoint=checkpoint,
            save_banks=writers,
            photos=photo_inputs,
            decode_batch=job.options.decode_batch,
        )
        if checkpoint is not None:
            checkpoint.remove()  # its frames are written
    return loop


def _loop_checkpoint(job: _Job, writers: dict[str, Any]) -> LoopCheckpoint | None:
    """The story loop's checkpoint, keyed by what makes the loop's numbers: its frames'
    inputs (in loop order), how they are batched, and where they run. None when saving
    characters: that writes every step's bank as it is made, so such a run starts at step 0
    (a resumed one would save only the steps after its checkpoint)."""
    from storycli.keyframes.checkpoints import LoopCheckpoint
    from storycli.keyframes.schedule import calls_needed

    rows = [i for call in calls_needed(job.plan, job.todo, writers) for i in call.frames]
    checkpoint_key = {
        "frames": [job.run.keys[i] for i in rows],
        "frame_batch": job.frame_batch,
        "device": job.info.device,
        "compiled": job.options.compile,
    }
    if writers:
        return None
    return LoopCheckpoint(
        job.folder / _checkpoint_name(job.split),
        hashlib.sha256(json.dumps(checkpoint_key).encode()).hexdigest()[:16],
        every_steps=job.options.checkpoint_every,
    )


def _tally(job: _Job, result: GenerateResult, started: float) -> str:
    """Which frames were made, skipped or left to other shards, and what it took; the kind of
    peak memory measured."""
    from storycli.weights.devices import peak_memory

    memory, memory_kind = peak_memory(job.info.device)
    generated, owned, frames = job.run.generated, job.owned, job.plan.frames
    result.generated = sorted(generated)
    result.others = [f.index for f in frames if owned is not None and f.index not in owned]
    result.skipped = [
        f.index for f in frames if f.index not in generated and f.index not in result.others
    ]
    result.seconds = time.perf_counter() - started
    result.peak_memory_bytes = memory
    return memory_kind


def _others_pending(job: _Job) -> bool:
    """A shared story: whether other shards' frames are still to be written."""
    from storycli.keyframes.story_folder import StoryRun

    return bool(StoryRun(job.folder, job.story_path, job.plan, job.model_info).pending())


def _finish_story(
    job: _Job, result: GenerateResult, versions: dict[str, str], loop: dict[str, Any], kind: str
) -> None:
    """Write the grid, the pages and the complete manifest (every frame is written)."""
    from storycli.render import uncovered_characters

    run, split = job.run, job.split
    run.write_grid()
    pages = run.write_pages()
    missing = uncovered_characters(f.caption for f in job.plan.frames)
    if missing and job.hooks.on_warning:
        job.hooks.on_warning(
            f"grid.png: no font on this machine draws {' '.join(missing)} (shown as boxes); "
            "install a font that covers them (e.g. fonts-noto-cjk for Chinese, Japanese, Korean)"
        )
    run.write_manifest(
        job.dimensions,
        versions,
        {
            "seconds": round(result.seconds, 3),
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": kind,
            "compiled": job.options.compile,
            "story_loop": loop,
            "pages": pages,
            "pdf": "comic.pdf",
            "shard": {"index": split.index, "count": split.count} if split.active else None,
        },
    )
