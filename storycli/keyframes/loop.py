"""Stage one: run a story plan through an SDXL pipeline with Consistent Self-Attention."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from PIL import Image, ImageOps

from storycli.consistency.csa import (
    BankSettings,
    CSASettings,
    CSAState,
    compiled_blocks,
    csa_layers,
    installed_csa,
    windowed_unet,
)
from storycli.consistency.ip_adapter import Photos
from storycli.consistency.one_prompt import one_prompt_conditioning
from storycli.keyframes.checkpoints import LoopCheckpoint
from storycli.keyframes.plan import GenerationCall, Plan, PlannedFrame
from storycli.keyframes.schedule import RenderSize, calls_needed, default_frame_batch, story_chunks
from storycli.saved_banks import BankWriter, SavedBank

StepCallback = Callable[[int, int], None]  # (steps done in this call, total steps)
FrameCallback = Callable[[int, Image.Image, float], None]  # (frame index, image, seconds)


@contextlib.contextmanager
def freeu_enabled(pipe: Any, plan: Plan) -> Iterator[None]:
    """The story's `freeu:` settings on the UNet for the duration (diffusers' FreeU)."""
    freeu = plan.story.freeu
    if freeu is None:
        yield
        return
    pipe.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)
    try:
        yield
    finally:
        pipe.disable_freeu()


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
    unet, scheduler = pipe.unet, pipe.scheduler
    device = pipe._execution_device
    cfg = story.guidance > 1 and unet.config.time_cond_proj_dim is None
    save_banks = save_banks or {}
    calls = calls_needed(plan, todo, save_banks)
    frame_batch = frame_batch or default_frame_batch(torch.device(device).type)
    chunks = story_chunks(plan, calls, frame_batch)
    frames = [plan.frames[i] for call in calls for i in call.frames]  # one row each
    started = time.perf_counter()

    # 1. Prompts and SDXL's added conditioning (pooled text, size ids), a plan call at a time:
    # batch composition moves float results, so a frame's embeddings depend only on its own
    # call, whichever calls share its forward, and a frame made again is bit-identical.
    inputs = [
        chunk_inputs(
            [
                text_conditioning(pipe, plan, [plan.frames[i] for i in c.frames], size, cfg)
                for c in chunk.calls
            ],
            cfg,
        )
        for chunk in chunks
    ]
    dtype = inputs[0][0].dtype

    # 2. Timesteps: one scheduler for the batch (multistep schedulers keep per-sample history).
    scheduler.set_timesteps(story.steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)

    # 3. Initial noise, each frame's as the plan says (see plan.noise_draws); generators for
    # the schedulers that draw noise while stepping.
    noise = initial_noise(pipe, frames, size, dtype)
    latents = noise.to(device) * scheduler.init_noise_sigma
    # Pictures (start_image, a character's image) are not denoised: at every step their row is
    # the picture's latent noised to that step's level, so the reference forward carries its
    # tokens into the character's bank; the picture itself is the frame.
    picture_rows = [r for r, f in enumerate(frames) if f.picture is not None]
    pictures = encode_pictures(pipe, [frames[r].picture for r in picture_rows], size)
    generators = [torch.Generator("cpu").manual_seed(f.seed) for f in frames]
    step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)

    # 4. CSA: one stream of draws per plan call; the bank lives for one step.
    state: CSAState | None = None
    guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    streams: dict[int, list[Any]] = {}
    if story.uses_csa:
        state = CSAState(
            csa_settings(plan),
            csa_layers(unet, story.consistency.blocks),
            bank_settings(plan),
        )
        guard = installed_csa(unet, state)
        for name in plan.banks:
            state.bank[name] = {}  # filled from the saved character at every step
    saved_banks = {name: SavedBank(Path(folder)) for name, (folder, _) in plan.banks.items()}
    compiling: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if compile_backend is not None:
        compiling = compiled_blocks(unet, compile_backend)

    history = story.consistency.history > 0
    with guard, compiling, freeu_enabled(pipe, plan):
        # IP-Adapter photos: each chunk's image embeddings, and masks where characters' photos
        # condition only the rows that show them.
        attention_kwargs: list[dict[str, Any] | None] = [None] * len(chunks)
        if photos is not None:
            for n, ((_, added, _), chunk) in enumerate(zip(inputs, chunks, strict=True)):
                shown = [frames[r].characters for r in chunk.rows]
                added["image_embeds"], attention_kwargs[n] = photos.forward_inputs(
                    shown, cfg, tuple(latents.shape[-2:])
                )
        if state is not None:
            for n, chunk in enumerate(chunks):
                streams[n] = [
                    state.open_call(
                        "off" if call.phase == "plain" else call.phase,
                        n_images=len(call.frames),
                        seed=call.csa_seed,
                        character=call.character,
                        read_characters=read_characters(plan, call),
                        history_key=history_key(call.frames[0]) if history else None,
                    )
                    for call in chunk.calls
                ]

        # 5. Resume: a checkpoint of these very frames continues after its step.
        every_stream = [stream for chunk_streams in streams.values() for stream in chunk_streams]
        start = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            latents = saved["latents"].to(device)
            scheduler.__dict__.update(saved["scheduler"].__dict__)
            for generator, generator_state in zip(generators, saved["generators"], strict=True):
                generator.set_state(generator_state)
            for stream, (generator_state, at) in zip(every_stream, saved["streams"], strict=True):
                stream.generator.set_state(generator_state)
                stream.step = at
            start = saved["step"] + 1

        # 6. The story loop: every chunk's forward at step t, then one scheduler step for all.
        for step, t in enumerate(scheduler.timesteps):
            if step < start:
                continue
            if state is not None:
                for name, bank in saved_banks.items():
                    if (layers := bank.load_step(step, device)) is not None:
                        state.bank[name][step] = layers
            if picture_rows:
                at = t.reshape(1).to(device)
                for row, clean in zip(picture_rows, pictures, strict=True):
                    noisy = scheduler.add_noise(clean[None], noise[row : row + 1].to(device), at)
                    latents[row] = noisy[0].to(latents.dtype)
            noise_pred = torch.empty_like(latents)
            for n, chunk in enumerate(chunks):
                if on_call is not None:
                    on_call(chunk.describe())
                rows = list(chunk.rows)
                x = torch.cat([latents[rows]] * 2) if cfg else latents[rows]
                x = scheduler.scale_model_input(x, t)
                text, added, text_mask = inputs[n]
                window: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
                if state is not None:
                    state.enter(streams[n])
                    if chunk.phase == "window":
                        c = story.consistency
                        window = windowed_unet(unet, state, len(rows), c.window, c.stride)
                with window:
                    pred = unet(
                        x,
                        t,
                        encoder_hidden_states=text,
                        encoder_attention_mask=text_mask,
                        added_cond_kwargs=added,
                        cross_attention_kwargs=attention_kwargs[n],
                        return_dict=False,
                    )[0]
                if state is not None:
                    state.leave()
                    for call in chunk.calls:  # saved characters: each step's bank as it is made
                        writer = save_banks.get(call.character or "")
                        layers = state.bank.get(call.character or "", {}).get(step)
                        if call.phase == "write" and writer is not None and layers is not None:
                            writer.save_step(step, layers)
                if cfg:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + story.guidance * (cond - uncond)
                noise_pred[rows] = pred
            if state is not None:
                state.drop_step(step)  # every frame has read this step's bank
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(step + 1, story.steps)
            if checkpoint is not None and checkpoint.due(step, story.steps):
                checkpoint.save(
                    step,
                    {
                        "latents": latents,
                        "scheduler": scheduler,
                        "generators": [g.get_state() for g in generators],
                        "streams": [(s.generator.get_state(), s.step) for s in every_stream],
                    },
                )

        for writer in save_banks.values():
            writer.finish()

        # 7. Decode `decode_batch` frames at a time and hand each frame over. The VAE's
        # activations at full size (in float32 when it is upcast), not the denoising loop, set
        # the story's peak: it is bounded by the batch, not the story's length. What only the
        # loop needed goes first.
        del noise_pred
        inputs.clear()
        if latents.device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = (time.perf_counter() - started) / len(frames)
        rows = [
            r
            for chunk in chunks
            for r in chunk.rows
            if frames[r].index in todo and r not in picture_rows
        ]
        with vae_upcast(pipe.vae, "decoder"):  # once for every frame
            for at in range(0, len(rows), decode_batch):
                batch = rows[at : at + decode_batch]
                for r, image in zip(batch, decode_latents(pipe, latents[batch]), strict=True):
                    on_frame(frames[r].index, image, seconds)
        for r in picture_rows:
            if frames[r].index in todo:
                with Image.open(frames[r].picture) as picture:  # type: ignore[arg-type]
                    on_frame(frames[r].index, picture.convert("RGB"), 0.0)
    pipe.maybe_free_model_hooks()
    return {
        "frame_batch": frame_batch,
        "unet_forwards_per_step": len(chunks),
        "peak_bank_bytes": state.peak_bank_bytes if state is not None else 0,
        "checkpoint": checkpoint.describe() if checkpoint is not None else None,
    }


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


def text_conditioning(
    pipe: Any, plan: Plan, frames: list[PlannedFrame], size: RenderSize, cfg: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """The UNet's text inputs for a batch of frames, as the SDXL pipeline builds them: prompt
    embeddings, `added_cond_kwargs` (pooled embeddings, size ids), unconditional rows first
    under CFG, and the text's attention mask (None: all of it). All-empty negatives become
    SDXL's zeroed negative embeddings, as in diffusers. With 1Prompt1Story the frames'
    embeddings are reweighted and carry the identity tokens (`consistency.one_prompt`)."""
    negative = [f.negative for f in frames] if any(f.negative for f in frames) else None
    text, negative_text, pooled, negative_pooled = pipe.encode_prompt(
        prompt=[f.prompt for f in frames],
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative,
    )
    projection = (
        int(pooled.shape[-1])
        if pipe.text_encoder_2 is None
        else pipe.text_encoder_2.config.projection_dim
    )
    time_ids = pipe._get_add_time_ids(
        (size.height, size.width),
        (0, 0),
        (size.height, size.width),
        dtype=text.dtype,
        text_encoder_projection_dim=projection,
    )
    if cfg:
        text = torch.cat([negative_text, text])
        pooled = torch.cat([negative_pooled, pooled])
    ids = time_ids.to(text.device).repeat(text.shape[0], 1)
    mask = None
    if plan.story.uses_one_prompt:
        consolidated = [plan.consolidated.get(f.index) for f in frames]
        settings = plan.story.consistency.one_prompt
        text, mask = one_prompt_conditioning(pipe, consolidated, text, cfg, settings)
    return text, {"text_embeds": pooled, "time_ids": ids}, mask


def chunk_inputs(
    calls: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]], cfg: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """The text inputs of the calls sharing a forward, as one batch: under CFG each call's
    unconditional rows, then each call's conditional rows (the order of the latents)."""

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        if not cfg:
            return torch.cat(parts)
        halves = [part.chunk(2) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    text = join([c[0] for c in calls])
    added = {key: join([c[1][key] for c in calls]) for key in calls[0][1]}
    masks = [c[2] for c in calls]
    mask = None if any(m is None for m in masks) else join(masks)  # type: ignore[arg-type]
    return text, added, mask


def initial_noise(
    pipe: Any, frames: list[PlannedFrame], size: RenderSize, dtype: torch.dtype
) -> torch.Tensor:
    """The frames' starting noise (unscaled, on the CPU): for each seed, one CPU generator draws
    as many images as the frames need (`noise_index` + 1), as diffusers' `randn_tensor` does
    for one generator and a batch, and each frame takes its position's image."""
    shape = (
        pipe.unet.config.in_channels,
        size.height // pipe.vae_scale_factor,
        size.width // pipe.vae_scale_factor,
    )
    draws: dict[int, torch.Tensor] = {}
    for seed in {f.seed for f in frames}:
        count = 1 + max(f.noise_index for f in frames if f.seed == seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        draws[seed] = randn_tensor((count, *shape), generator=generator, dtype=dtype)
    return torch.stack([draws[f.seed][f.noise_index] for f in frames])


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std (SDXL's VAE has none), shaped like `like`."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (
        torch.tensor(mean).view(1, 4, 1, 1).to(like.device, like.dtype),
        torch.tensor(std).view(1, 4, 1, 1).to(like.device, like.dtype),
    )


@contextlib.contextmanager
def vae_upcast(vae: Any, side: Literal["decoder", "encoder"]) -> Iterator[None]:
    """One side of a float16 VAE whose config asks for it (`force_upcast`: SDXL's own VAE
    overflows in float16) in float32 for the duration, float16 again after (the pipeline is
    reused). Diffusers' SDXL pipeline casts the whole VAE; only these parts run, so the pixels
    are the same. An fp16-safe VAE (`force_upcast: false`) is left alone; so is a side already
    upcast by an enclosing call."""
    names = ("post_quant_conv", "decoder") if side == "decoder" else ("encoder", "quant_conv")
    parts = [part for name in names if (part := getattr(vae, name)) is not None]
    upcast = bool(vae.config.force_upcast) and next(parts[0].parameters()).dtype == torch.float16
    if not upcast:
        yield
        return
    for part in parts:
        part.to(torch.float32)
    try:
        yield
    finally:
        for part in parts:
            part.to(torch.float16)


def encode_pictures(pipe: Any, paths: list[str | None], size: RenderSize) -> list[torch.Tensor]:
    """Pictures → their clean latents at the render size (centre-cropped to its aspect ratio),
    the VAE's mean as diffusers' img2img takes it, scaled as `decode_latents` unscales."""
    if not paths:
        return []
    vae = pipe.vae
    device = get_module_execution_device(vae)
    out = []
    with vae_upcast(vae, "encoder"):
        dtype = next(iter(vae.encoder.parameters())).dtype
        for path in paths:
            with Image.open(path) as picture:  # type: ignore[arg-type]
                image = ImageOps.fit(picture.convert("RGB"), (size.width, size.height))
            pixels = pipe.image_processor.preprocess(image).to(device, dtype)
            latents = vae.encode(pixels).latent_dist.mean
            stats = latent_stats(vae, latents)
            if stats is not None:
                mean, std = stats
                latents = (latents - mean) * vae.config.scaling_factor / std
            else:
                latents = latents * vae.config.scaling_factor
            out.append(latents[0].to(pipe.unet.dtype))
    return out


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents → PIL images exactly as the SDXL pipeline decodes them (the decoder in float32
    when the VAE asks for it, see `vae_upcast`; latent mean/std when the VAE has them;
    watermark when installed)."""
    vae = pipe.vae
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    with vae_upcast(vae, "decoder"):
        latents = latents.to(next(iter(first.parameters())).dtype)
        stats = latent_stats(vae, latents)
        if stats is not None:
            mean, std = stats
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")
