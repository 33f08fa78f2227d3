"""Stage one: run a story plan through a diffusion backbone with Consistent Self-Attention.

`generate_keyframes` is the story loop: every frame of the story in one batch of latents, stepped
by one scheduler, each step running the frames in chunks (`schedule.story_chunks`) that share a
forward. This module holds what is the same for every backbone: the phases (conditioning, latents,
CSA's calls, resume, the denoising loop, decoding), the banks loaded and saved step by step, and
checkpoints. What depends on the network is asked of a `Backbone` (`backbones/`: SDXL, FLUX.1).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from storycli.consistency.csa_state import BankSettings, CallStream, CSASettings, CSAState
from storycli.consistency.ip_adapter import Photos
from storycli.keyframes.backbones.base import Backbone, Conditioning
from storycli.keyframes.backbones.select import backbone_for
from storycli.keyframes.checkpoints import LoopCheckpoint
from storycli.keyframes.plan import GenerationCall, Plan, PlannedFrame
from storycli.keyframes.schedule import (
    Chunk,
    RenderSize,
    calls_needed,
    default_frame_batch,
    story_chunks,
)
from storycli.saved_banks import BankWriter, SavedBank

StepCallback = Callable[[int, int], None]  # (steps done in this call, total steps)
FrameCallback = Callable[[int, Image.Image, float], None]  # (frame index, image, seconds)


def csa_settings(plan: Plan) -> CSASettings:
    c = plan.story.consistency
    return CSASettings(
        sa32=c.sa32,
        sa64=c.sa64,
        warmup_steps=c.warmup_steps,
        prob_early=c.prob_early,
        prob_late=c.prob_late,
        late_from_step=c.late_from_step,
        impl=c.impl,
        sampling=c.sampling,
    )


def bank_settings(plan: Plan) -> BankSettings:
    bank = plan.story.consistency.bank
    return BankSettings(
        dtype=None if bank.dtype == "auto" else getattr(torch, bank.dtype),
        levels=tuple(bank.levels),
        max_step=bank.max_step,
    )


# ------------------------------------------------------------------------------ story loop


@dataclass
class Forward:
    """One chunk's forward, the same at every step: its plan calls and rows, their conditioning,
    and (with CSA) each call's stream of draws."""

    chunk: Chunk
    conditioning: Conditioning
    streams: list[CallStream] = field(default_factory=list)


@dataclass
class Batch:
    """The story loop's one batch of latents, a row per frame, and what stepping it needs."""

    frames: list[PlannedFrame]  # one row each
    noise: torch.Tensor  # each row's initial noise, unscaled, on the CPU
    latents: torch.Tensor  # on the device, replaced at every step
    picture_rows: list[int]  # rows of pictures (not denoised, see `noise_pictures`)
    pictures: list[torch.Tensor]  # their clean latents
    generators: list[torch.Generator]  # each row's, for schedulers that draw while stepping
    step_kwargs: dict[str, Any]


@dataclass(frozen=True)
class StepIO:
    """What the loop reads and writes at each step beside the latents."""

    saved_banks: dict[str, SavedBank]  # saved characters, their bank loaded step by step
    save_banks: Mapping[str, BankWriter]  # characters whose bank is saved as it is made
    checkpoint: LoopCheckpoint | None
    on_step: StepCallback | None
    on_call: Callable[[str], None] | None
    # Wall seconds of each step run (no device sync: on a GPU the queue fills within a step,
    # so once steady they are the device's step time; the first steps hold compiling).
    step_seconds: list[float] = field(default_factory=list)


@torch.inference_mode()
def generate_keyframes(
    pipe: Any,
    plan: Plan,
    todo: Iterable[int],
    size: RenderSize,
    on_frame: FrameCallback,
    on_step: StepCallback | None = None,
    on_call: Callable[[str], None] | None = None,
    compile_backend: str | None = None,
    frame_batch: int | None = None,
    checkpoint: LoopCheckpoint | None = None,
    save_banks: Mapping[str, BankWriter] | None = None,
    photos: Photos | None = None,
    decode_batch: int = 1,
) -> dict[str, Any]:
    """Generate the frames in `todo`, all of a story's frames advancing together step by step.

    At every step every character's references run in one forward (write: each character's
    fill its bank of that step), then the other frames, of any characters, read those banks in
    chunks of `frame_batch`, then the banks are dropped: they never hold more than one step.
    One scheduler steps the latents of every frame as one batch. Each plan call keeps its own
    seeded noise, text encoding and CSA draws, so frames equal the per-call schedule's within
    float tolerance. Frames outside `todo` run only when a needed frame depends on them
    (references), and are then not reported. `on_call(description)` announces each chunk's
    forward, `on_step(step, steps)` each finished step. `save_banks`: characters whose bank
    is written, step by step, as it is made (their write calls run even when no frame needs
    them). `photos`: the IP-Adapter photos' embeddings, the adapter loaded
    (`ip_adapter.attached_ip_adapter`). `decode_batch`: frames the VAE decodes at once.
    Returns what the manifest records of the run.
    """
    todo = set(todo)
    story = plan.story
    backbone = backbone_for(pipe)  # SDXL or FLUX.1, by the pipeline's class
    save_banks = save_banks or {}
    calls = calls_needed(plan, todo, save_banks)
    frame_batch = frame_batch or default_frame_batch(torch.device(backbone.device).type)
    chunks = story_chunks(plan, calls, frame_batch)
    frames = [plan.frames[i] for call in calls for i in call.frames]  # one row each
    cfg = backbone.guided(story.guidance)
    started = time.perf_counter()

    forwards = prepare_conditioning(backbone, plan, chunks, size, cfg)
    backbone.text_encoded()  # every prompt is encoded (FLUX: T5 leaves the GPU)
    backbone.prepare_timesteps(story.steps, size)  # 2. one scheduler for the batch
    batch = prepare_latents(backbone, frames, size, forwards[0].conditioning.dtype)
    state = prepare_csa(backbone, plan)
    io = StepIO(saved_banks(plan), save_banks, checkpoint, on_step, on_call)
    with csa_installed(backbone, state), compiled(backbone, compile_backend), backbone.freeu(plan):
        if photos is not None:
            add_photos(backbone, forwards, batch, photos, cfg)
        if state is not None:
            open_streams(state, plan, forwards)
        start = resume(backbone, batch, forwards, checkpoint)
        denoise(backbone, plan, batch, forwards, state, start, cfg, io)
        for writer in save_banks.values():
            writer.finish()
        # What only the loop needed goes before the VAE's peak (see `decode_frames`).
        forwards.clear()
        if batch.latents.device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = (time.perf_counter() - started) / len(frames)
        decode_frames(backbone, batch, chunks, todo, seconds, on_frame, decode_batch)
    backbone.release()
    return {
        "frame_batch": frame_batch,
        "unet_forwards_per_step": len(chunks),
        "peak_bank_bytes": state.peak_bank_bytes if state is not None else 0,
        "step_seconds": [round(s, 4) for s in io.step_seconds],
        "checkpoint": checkpoint.describe() if checkpoint is not None else None,
    }


# ------------------------------------------------------------------------------ 1.-4. preparing


def prepare_conditioning(
    backbone: Backbone, plan: Plan, chunks: Sequence[Chunk], size: RenderSize, cfg: bool
) -> list[Forward]:
    """1. Each chunk's conditioning (SDXL: prompts, pooled text, size ids; FLUX.1: T5 tokens,
    pooled CLIP, position ids), a plan call at a time: batch composition moves float results,
    so a frame's embeddings depend only on its own call, whichever calls share its forward, and
    a frame made again is bit-identical."""
    return [
        Forward(
            chunk,
            backbone.conditioning(
                plan, [[plan.frames[i] for i in c.frames] for c in chunk.calls], size, cfg
            ),
        )
        for chunk in chunks
    ]


def prepare_latents(
    backbone: Backbone, frames: list[PlannedFrame], size: RenderSize, dtype: torch.dtype
) -> Batch:
    """3. Initial noise, each frame's as the plan says (see plan.noise_draws), the pictures'
    latents, and generators for the schedulers that draw noise while stepping."""
    noise = backbone.initial_noise(frames, size, dtype)
    latents = backbone.initial_latents(noise)
    # Pictures (start_image, a character's image) are not denoised: at every step their row is
    # the picture's latent noised to that step's level, so the reference forward carries its
    # tokens into the character's bank; the picture itself is the frame.
    picture_rows = [r for r, f in enumerate(frames) if f.picture is not None]
    pictures = backbone.encode_pictures([frames[r].picture for r in picture_rows], size)
    generators = [torch.Generator("cpu").manual_seed(f.seed) for f in frames]
    step_kwargs = backbone.step_kwargs(generators)
    return Batch(frames, noise, latents, picture_rows, pictures, generators, step_kwargs)


def prepare_csa(backbone: Backbone, plan: Plan) -> CSAState | None:
    """4. CSA's state (None: the story does not use CSA); the bank lives for one step."""
    story = plan.story
    if not story.uses_csa:
        return None
    state = CSAState(
        csa_settings(plan),
        backbone.csa_layers(story.consistency.blocks),
        bank_settings(plan),
    )
    for name in plan.banks:
        state.bank[name] = {}  # filled from the saved character at every step
    return state


def saved_banks(plan: Plan) -> dict[str, SavedBank]:
    """The saved characters the story reads, each bank loaded a step at a time."""
    return {name: SavedBank(Path(folder)) for name, (folder, _) in plan.banks.items()}


def csa_installed(
    backbone: Backbone, state: CSAState | None
) -> contextlib.AbstractContextManager[Any]:
    """CSA's processors and hooks in the network for the story (nothing without CSA)."""
    if state is None:
        return contextlib.nullcontext()
    return backbone.installed_csa(state)


def compiled(backbone: Backbone, backend: str | None) -> contextlib.AbstractContextManager[Any]:
    """The network's blocks compiled for the story (nothing without a backend)."""
    if backend is None:
        return contextlib.nullcontext()
    return backbone.compiled(backend)


def add_photos(
    backbone: Backbone, forwards: list[Forward], batch: Batch, photos: Photos, cfg: bool
) -> None:
    """IP-Adapter photos in each forward's conditioning, for the characters its rows show."""
    for forward in forwards:
        shown = [batch.frames[r].characters for r in forward.chunk.rows]
        height, width = batch.latents.shape[-2:]
        backbone.add_photos(forward.conditioning, photos, shown, cfg, (height, width))


def open_streams(state: CSAState, plan: Plan, forwards: list[Forward]) -> None:
    """CSA: one stream of draws per plan call, in each forward's call order."""
    history = plan.story.consistency.history > 0
    for forward in forwards:
        forward.streams = [
            state.open_call(
                "off" if call.phase == "plain" else call.phase,
                n_images=len(call.frames),
                seed=call.csa_seed,
                character=call.character,
                read_characters=read_characters(plan, call),
                # Only a read call banks its own samples (`plan.history_before` lists read
                # frames only); a key on write calls stopped two characters' shared write forward.
                history_key=history_key(call.frames[0])
                if history and call.phase == "read"
                else None,
            )
            for call in forward.chunk.calls
        ]


def resume(
    backbone: Backbone, batch: Batch, forwards: list[Forward], checkpoint: LoopCheckpoint | None
) -> int:
    """5. Resume: a checkpoint of these very frames continues after its step. Returns the
    first step to run."""
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        return 0
    batch.latents = saved["latents"].to(backbone.device)
    backbone.scheduler.__dict__.update(saved["scheduler"].__dict__)
    for generator, generator_state in zip(batch.generators, saved["generators"], strict=True):
        generator.set_state(generator_state)
    every_stream = [stream for forward in forwards for stream in forward.streams]
    for stream, (generator_state, at) in zip(every_stream, saved["streams"], strict=True):
        stream.generator.set_state(generator_state)
        stream.step = at
    return saved["step"] + 1


# ------------------------------------------------------------------------------ 6. the loop


def denoise(
    backbone: Backbone,
    plan: Plan,
    batch: Batch,
    forwards: list[Forward],
    state: CSAState | None,
    start: int,
    cfg: bool,
    io: StepIO,
) -> None:
    """6. The story loop: every chunk's forward at step t, then one scheduler step for all."""
    scheduler = backbone.scheduler
    last = time.perf_counter()
    for step, t in enumerate(scheduler.timesteps):
        if step < start:
            continue
        if state is not None:
            load_banks(state, io.saved_banks, step, backbone.device)
        noise_pictures(backbone, batch, t)
        noise_pred = torch.empty_like(batch.latents)
        for forward in forwards:
            pred = chunk_prediction(backbone, plan, batch, forward, state, step, t, cfg, io)
            noise_pred[list(forward.chunk.rows)] = pred
        if state is not None:
            state.drop_step(step)  # every frame has read this step's bank
        stepped = scheduler.step(
            noise_pred, t, batch.latents, **batch.step_kwargs, return_dict=False
        )
        batch.latents = stepped[0]
        if io.on_step is not None:
            io.on_step(step + 1, plan.story.steps)
        save_checkpoint(io.checkpoint, step, plan.story.steps, backbone, batch, forwards)
        now = time.perf_counter()
        io.step_seconds.append(now - last)
        last = now


def chunk_prediction(
    backbone: Backbone,
    plan: Plan,
    batch: Batch,
    forward: Forward,
    state: CSAState | None,
    step: int,
    t: torch.Tensor,
    cfg: bool,
    io: StepIO,
) -> torch.Tensor:
    """One chunk's forward at step `t`: its rows' (guided) noise prediction, with its calls'
    CSA entered (window by window for a window call) and saved characters' banks written."""
    chunk = forward.chunk
    if io.on_call is not None:
        io.on_call(chunk.describe())
    rows = list(chunk.rows)
    window: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if state is not None:
        state.enter(forward.streams)
        if chunk.phase == "window":
            c = plan.story.consistency
            window = backbone.windowed(state, len(rows), c.window, c.stride)
    with window:
        pred = backbone.predict_noise(
            batch.latents[rows], t, forward.conditioning, cfg, plan.story.guidance
        )
    if state is not None:
        state.leave()
        write_banks(state, chunk, step, io.save_banks)
    return pred


def load_banks(
    state: CSAState, saved: Mapping[str, SavedBank], step: int, device: torch.device
) -> None:
    """Saved characters' banks of `step`, read from their files as a write forward makes one."""
    for name, bank in saved.items():
        if (layers := bank.load_step(step, device)) is not None:
            state.bank[name][step] = layers


def write_banks(
    state: CSAState, chunk: Chunk, step: int, save_banks: Mapping[str, BankWriter]
) -> None:
    """Saved characters: each step's bank written as the chunk's write calls make it."""
    for call in chunk.calls:
        writer = save_banks.get(call.character or "")
        layers = state.bank.get(call.character or "", {}).get(step)
        if call.phase == "write" and writer is not None and layers is not None:
            writer.save_step(step, layers)


def noise_pictures(backbone: Backbone, batch: Batch, t: torch.Tensor) -> None:
    """Pictures' rows: the picture's latent noised to step `t`'s level (see `prepare_latents`)."""
    if not batch.picture_rows:
        return
    device = backbone.device
    at = t.reshape(1).to(device)
    for row, clean in zip(batch.picture_rows, batch.pictures, strict=True):
        noise = batch.noise[row : row + 1].to(device)
        noisy = backbone.noise_pictures(clean[None], noise, at)
        batch.latents[row] = noisy[0].to(batch.latents.dtype)


def save_checkpoint(
    checkpoint: LoopCheckpoint | None,
    step: int,
    steps: int,
    backbone: Backbone,
    batch: Batch,
    forwards: list[Forward],
) -> None:
    """After `step`, when due: what `resume` needs to continue after it."""
    if checkpoint is None or not checkpoint.due(step, steps):
        return
    every_stream = [stream for forward in forwards for stream in forward.streams]
    checkpoint.save(
        step,
        {
            "latents": batch.latents,
            "scheduler": backbone.scheduler,
            "generators": [g.get_state() for g in batch.generators],
            "streams": [(s.generator.get_state(), s.step) for s in every_stream],
        },
    )


# ------------------------------------------------------------------------------ 7. decoding


def decode_frames(
    backbone: Backbone,
    batch: Batch,
    chunks: Sequence[Chunk],
    todo: set[int],
    seconds: float,
    on_frame: FrameCallback,
    decode_batch: int,
) -> None:
    """7. Decode `decode_batch` frames at a time and hand each frame over (pictures as they
    are). The VAE's activations at full size (in float32 when it is upcast), not the denoising
    loop, set the story's peak: it is bounded by the batch, not the story's length."""
    frames = batch.frames
    rows = [
        r
        for chunk in chunks
        for r in chunk.rows
        if frames[r].index in todo and r not in batch.picture_rows
    ]
    with backbone.decoding():  # once for every frame
        for at in range(0, len(rows), decode_batch):
            part = rows[at : at + decode_batch]
            for r, image in zip(part, backbone.decode(batch.latents[part]), strict=True):
                on_frame(frames[r].index, image, seconds)
    for r in batch.picture_rows:
        if frames[r].index in todo:
            with Image.open(frames[r].picture) as picture:  # type: ignore[arg-type]
                on_frame(frames[r].index, picture.convert("RGB"), 0.0)


# ------------------------------------------------------------------------------ plan calls


def history_key(index: int) -> str:
    """The bank entry a read frame's own samples go to, for the frames after it (history)."""
    return f"#frame{index + 1}"


def read_characters(plan: Plan, call: GenerationCall) -> tuple[str, ...]:
    """The banks a call's frames read: a read frame's characters, and with rolling history
    the read frames before it."""
    if call.phase != "read":
        return ()
    index = call.frames[0]
    return plan.frames[index].characters + tuple(history_key(j) for j in plan.history_before(index))
