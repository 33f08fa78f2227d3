"""`storydiff animate` as a function: keyframes -> one MP4 per transition -> story.mp4.

For each consecutive pair of keyframes: per-frame embeddings P_1..P_L (the motion predictor, or
the linear baseline without one), a decoder turns them into L frames, written as
`transition_01_02.mp4`, ...; `story.mp4` joins them, each keyframe held `hold` seconds. An
`animate.json` manifest records inputs and keys, so a rerun redoes only what changed.

The manifest is written (`complete: false`) before the first video and after each one, and always
describes the files on disk: a run killed at any point is resumed by the same command, which
first removes the temp files the killed run left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from storycli.errors import InvalidInput
from storycli.motion.conditioning import (
    frame_embeddings,
    keyframe_embeddings,
    load_predictor_checked,
)
from storycli.motion.video.io import IMAGE_SUFFIXES
from storycli.motion.video.io import temp_target as video_temp_target
from storycli.outputs import Owner, RunFolder, TempScheme
from storycli.paths import check_writable_folder
from storycli.seeds import derive_seed

KEYFRAMES_MANIFEST = "manifest.json"  # written by `storydiff generate`
MANIFEST = "animate.json"
STORY_VIDEO = "story.mp4"
SCHEMA_VERSION = 1
FITS = ("crop", "letterbox")
# Image files a plain folder may hold that are not read as keyframes (a GIF may be animated;
# the others need codecs Pillow may lack): named in a note instead of being skipped silently.
NOT_KEYFRAME_SUFFIXES = frozenset({".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"})
_TRANSITION_FILE = re.compile(r"transition_\d+_\d+\.mp4")
# Bumped when story.mp4 is assembled differently, so that older ones are remade. 2: every
# keyframe held at least one frame, with the transitions' interior frames between them.
_STORY_ASSEMBLY = 2


class AnimateError(InvalidInput):
    """Bad input for animate (keyframes, options, predictor, output folder): one sentence."""


@dataclass(frozen=True)
class Keyframe:
    path: Path
    image: Image.Image
    prompt: str | None = None
    caption: str | None = None


@dataclass
class AnimateOptions:
    keyframes: Path
    out: Path | None = None  # default: KEYFRAMES/video
    decoder: str = "crossfade"
    model: str | None = None
    predictor: Path | None = None
    frames: int = 16
    fps: int | None = None  # default: the decoder's
    hold: float = 1.0
    quality: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    steps: int | None = None
    guidance: float | None = None
    overwrite: bool = False
    # Keyframes whose aspect ratio differs from the first one's: "crop" scales them to cover the
    # frame and keeps the centre, "letterbox" scales them to fit inside it, with black bars.
    # Crop is the default: a video is expected to fill its frame, bars that appear and vanish
    # within each transition look like a glitch, and the model decoders would animate the bars
    # as picture content. Letterbox is there for when nothing may be cut off.
    fit: str = "crop"


@dataclass
class AnimateHooks:
    """Progress callbacks; all optional."""

    on_note: Callable[[str], None] | None = None
    on_start: Callable[[int], None] | None = None  # (transitions to make)
    on_transition: Callable[[str], None] | None = None  # (description)
    on_step: Callable[[int, int], None] | None = None  # (decoder steps done, total)
    # (phase, done, total) for work on files: "encoding NAME" counts frames sent to ffmpeg (the
    # file is complete only at on_written, after ffmpeg's flush and the read-back check);
    # "assembling story.mp4" counts transitions read back.
    on_phase: Callable[[str, int, int], None] | None = None
    on_written: Callable[[Path], None] | None = None
    on_kept: Callable[[Path], None] | None = None  # (transition kept: its inputs are unchanged)


@dataclass
class AnimateResult:
    folder: Path
    transitions: list[Path] = field(default_factory=list)
    generated: list[Path] = field(default_factory=list)
    story: Path | None = None
    seconds: float = 0.0
    decoder: dict[str, Any] = field(default_factory=dict)
    removed: list[Path] = field(default_factory=list)  # stale transitions of an earlier run

    def summary(self) -> dict[str, Any]:
        """The `--json` document; `schema_version` as in generate's."""
        return {
            "schema_version": SCHEMA_VERSION,
            "folder": str(self.folder),
            "decoder": self.decoder,
            "transitions": [str(p) for p in self.transitions],
            "generated": [str(p) for p in self.generated],
            "removed": [str(p) for p in self.removed],
            "story": str(self.story) if self.story else None,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------------- keyframes


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise AnimateError(f"{path}: not a readable image ({exc}); replace or remove it") from exc


def _listed_frames(folder: Path) -> list[dict[str, Any]] | None:
    """The frames of a `generate` manifest, in story order; None if there is none."""
    path = folder / KEYFRAMES_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        frames = manifest["frames"]
        listed = [f for f in frames if isinstance(f, dict) and isinstance(f.get("file"), str)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnimateError(
            f"{path}: not a storydiff manifest ({exc}); delete it to animate the images by name"
        ) from exc
    if manifest.get("complete") is False:
        # Still being generated (or a shard of it is), or generation stopped part way.
        raise AnimateError(
            f"{path}: `storydiff generate` has not finished this story (complete: false); "
            "run generate again, then animate"
        )
    return listed


def _fit(image: Image.Image, size: tuple[int, int], fit: str) -> tuple[Image.Image, str]:
    """`image` at `size`, and what was done: resized (same aspect ratio), centre-cropped or
    letterboxed (see AnimateOptions.fit)."""
    width, height = image.size
    if width * size[1] == height * size[0]:
        return image.resize(size, Image.Resampling.LANCZOS), "resized"
    if fit == "crop":
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS), "centre-cropped"
    return ImageOps.pad(image, size, Image.Resampling.LANCZOS, color=(0, 0, 0)), "letterboxed"


def _fit_note(how: str, names: list[str], size: tuple[int, int]) -> str:
    target = f"{size[0]}x{size[1]}"
    if how == "resized":
        return f"resized {', '.join(names)} to {target} (the first keyframe's size)"
    if how == "centre-cropped":
        return (
            f"centre-cropped {', '.join(names)} to fill {target}, the first keyframe's size, "
            "keeping the aspect ratio (--fit crop; --fit letterbox keeps the whole picture, "
            "with black bars)"
        )
    return (
        f"letterboxed {', '.join(names)} into {target}, the first keyframe's size: scaled to "
        "fit, keeping the aspect ratio, with black bars (--fit letterbox)"
    )


def load_keyframes(folder: Path, fit: str = "crop") -> tuple[list[Keyframe], list[str]]:
    """Keyframes in order (a `generate` folder's manifest, else images sorted by name), all
    at the first one's size, other aspect ratios cropped or letterboxed as `fit` says.
    Returns (keyframes, notes)."""
    if fit not in FITS:
        raise AnimateError(f"--fit {fit}: choose {' or '.join(FITS)}")
    if not folder.is_dir():
        raise AnimateError(f"{folder}: not a folder of keyframes")
    notes: list[str] = []
    skipped: list[str] = []
    listed = _listed_frames(folder)
    if listed is not None:
        entries = []
        for f in listed:
            path = folder / f["file"]
            if not path.is_file():
                raise AnimateError(
                    f"{path}: listed in {KEYFRAMES_MANIFEST} but missing; run `storydiff "
                    "generate` again to remake it"
                )
            entries.append((path, f.get("prompt"), f.get("caption")))
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        entries = [(p, None, None) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [p.name for p in files if p.suffix.lower() in NOT_KEYFRAME_SUFFIXES]
    if skipped:
        notes.append(
            f"skipped {', '.join(skipped)}: only {', '.join(sorted(IMAGE_SUFFIXES))} files are "
            "keyframes (animated GIFs are not keyframes); convert them to PNG to use them"
        )
    if len(entries) < 2:
        also = f"; skipped {', '.join(skipped)} (convert to PNG)" if skipped else ""
        raise AnimateError(
            f"{folder}: {len(entries)} keyframe(s) found; a transition needs at least two "
            f"images ({', '.join(sorted(IMAGE_SUFFIXES))}){also}"
        )
    keyframes = [Keyframe(p, _open_image(p), prompt, caption) for p, prompt, caption in entries]
    size = keyframes[0].image.size
    done: dict[str, list[str]] = {}
    for i, k in enumerate(keyframes):
        if k.image.size != size:
            image, how = _fit(k.image, size, fit)
            label = (
                k.path.name
                if how == "resized"
                else f"{k.path.name} ({k.image.width}x{k.image.height})"
            )
            done.setdefault(how, []).append(label)
            keyframes[i] = Keyframe(k.path, image, k.prompt, k.caption)
    notes += [_fit_note(how, names, size) for how, names in done.items()]
    return keyframes, notes


# ------------------------------------------------------------------------------- output folder


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_video_name(name: str) -> bool:
    """A name of an MP4 animate writes."""
    return name == STORY_VIDEO or _TRANSITION_FILE.fullmatch(name) is not None


def _claim_output(
    out: Path, keyframes: Path, overwrite: bool, claim: contextlib.ExitStack
) -> tuple[RunFolder, dict[str, Any]]:
    """Lock the output folder (until `claim` closes) and return it with its previous manifest
    ({} if none), refusing a folder that holds other keyframes' videos or files not made by
    animate (unless overwriting). With `overwrite` the manifest is returned all the same: it
    still says which files animate wrote. Its leftovers are write_mp4's temp files of the
    videos and atomic_write_text's of animate.json: only those exact names, plain files."""
    check_writable_folder(out, "--out")
    folder = RunFolder(
        out, MANIFEST, temps=[TempScheme(video_temp_target, _is_video_name)], error=AnimateError
    )
    # Locked before anything in it is read: a second run on it is refused, not interleaved.
    folder.lock(claim, "animate", create=True)
    owner = Owner(
        key="keyframes",
        value=str(keyframes.resolve()),
        not_a_folder=f"{out}: exists and is not a folder; choose another --out",
        other=lambda recorded: (
            f"{out}: holds videos of other keyframes ({recorded}); choose another --out or "
            "pass --overwrite"
        ),
        foreign=(
            f"{out}: folder exists and was not made by `storydiff animate`; choose another "
            "--out or pass --overwrite"
        ),
        unreadable=(
            f"{out / MANIFEST}: not a readable animate manifest; pass --overwrite to remake "
            "the folder's videos"
        ),
    )
    return folder, folder.check_owner(owner, overwrite)


def _records(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A manifest's transition records (malformed entries of a hand-edited file dropped)."""
    records = manifest.get("transitions")
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("file"), str)]


def _written_by_animate(manifest: dict[str, Any]) -> set[str]:
    """Transition files a manifest says animate wrote. Only plain `transition_A_B.mp4` names
    count, so an edited manifest cannot point removal at any other file or folder."""
    names = [r["file"] for r in _records(manifest)]
    stale = manifest.get("stale")
    names += [n for n in stale if isinstance(n, str)] if isinstance(stale, list) else []
    return {n for n in names if _TRANSITION_FILE.fullmatch(n)}


def transition_name(a: int, b: int, count: int) -> str:
    width = max(2, len(str(count)))
    return f"transition_{a:0{width}d}_{b:0{width}d}.mp4"


# ------------------------------------------------------------------------------------- animate


def _story_frames(
    keyframes: list[Keyframe],
    transitions: list[Path],
    fps: int,
    hold: float,
    on_progress: Callable[[int, int], None] | None,
) -> list[Image.Image]:
    """story.mp4's frames: each keyframe shown max(1, round(hold·fps)) frames, in order, and
    between two keyframes their transition's interior frames (its first and last frames are
    the keyframes, shown already): K·held + (K−1)·(L−2) frames. At least one frame per keyframe,
    so that --hold 0 still shows every keyframe."""
    from storycli.motion.video.io import read_frames

    held = max(1, round(hold * fps))
    size = keyframes[0].image.size
    frames: list[Image.Image] = []
    if on_progress:
        on_progress(0, len(transitions))
    for a, keyframe in enumerate(keyframes):
        frames += [keyframe.image] * held
        if a < len(transitions):
            # Decoded frames carry write_mp4's padding to multiples of 16: crop it off again.
            interior = read_frames(transitions[a], fps, short_side=None)[1:-1]
            frames += [f if f.size == size else f.crop((0, 0, *size)) for f in interior]
            if on_progress:
                on_progress(a + 1, len(transitions))
    return frames


def animate(
    options: AnimateOptions, hooks: AnimateHooks | None = None, decoders: Any = None
) -> AnimateResult:
    """Make (or resume) the transition videos of a keyframes folder. Raises AnimateError for
    bad input, ModelUnavailable when a decoder's weights are missing. `decoders`: a
    `DecoderCache` that keeps the decoder for the next folder of a batch. The output folder is
    locked meanwhile: another command working in it is refused (`FolderInUse`)."""
    with contextlib.ExitStack() as claim:
        return _animate(options, hooks, decoders, claim)


def _animate(
    options: AnimateOptions,
    hooks: AnimateHooks | None,
    decoders: Any,
    claim: contextlib.ExitStack,
) -> AnimateResult:
    started = time.perf_counter()
    job = _check_and_claim(options, hooks or AnimateHooks(), claim)
    # Nothing is written before the decoder is loaded and every input checked.
    _load_decoder(job, decoders)
    _remove_leftovers(job)
    _plan_transitions(job)
    # Claims the folder before any video is written, so a run killed now can be resumed.
    job.save(complete=False, story_key=job.old.get("story_key"))
    _make_transitions(job)
    story_key = _make_story(job)
    _remove_stale(job)
    job.result.seconds = time.perf_counter() - started
    job.save(complete=True, story_key=story_key)
    return job.result


@dataclass
class _Job:
    """One animate call: its inputs, and what its phases found and made so far."""

    options: AnimateOptions
    hooks: AnimateHooks
    keyframes: list[Keyframe]
    folder: RunFolder
    previous: dict[str, Any]  # the folder's manifest, also with --overwrite ({} if none)
    loaded_predictor: Any
    result: AnimateResult
    decoder: Any = None
    device: str = "cpu"  # where the decoder runs (resolved from options.device)
    fps: int = 0
    k_all: Any = None  # per-keyframe embeddings; None for a decoder that uses none
    predictor: Any = None  # None: the linear baseline
    # One record per transition to make, as animate.json lists them.
    records: list[dict[str, Any]] = field(default_factory=list)
    # What each transition file on disk was made from, as far as a manifest knows: the
    # partial manifests record this, so a rerun after a kill keeps exactly what is valid.
    on_disk: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Transitions an earlier run wrote that this one does not make; removed once it is done.
    stale: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.folder.folder

    @property
    def old(self) -> dict[str, Any]:
        """What an earlier run made that may be kept: nothing with --overwrite."""
        return {} if self.options.overwrite else self.previous

    def note(self, text: str) -> None:
        if self.hooks.on_note:
            self.hooks.on_note(text)

    def phase(self, label: str) -> Callable[[int, int], None] | None:
        """A (done, total) callback reporting `label` to on_phase; None without that hook."""
        on_phase = self.hooks.on_phase
        if on_phase is None:
            return None
        return lambda done, total: on_phase(label, done, total)

    def save(self, complete: bool, story_key: str | None) -> None:
        """Write animate.json. Until complete it lists only the transition files on disk and
        what each was made from, and `stale` the files of an earlier run still to remove (kept
        across a kill)."""
        from storycli import __version__

        options, keyframes, on_disk = self.options, self.keyframes, self.on_disk
        listed = [on_disk[r["file"]] for r in self.records if r["file"] in on_disk]
        self.folder.write_manifest(
            {
                "schema_version": SCHEMA_VERSION,
                "complete": complete,
                "storydiff_version": __version__,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "keyframes": str(options.keyframes.resolve()),
                "keyframe_files": [k.path.name for k in keyframes],
                "size": list(keyframes[0].image.size),
                "decoder": self.result.decoder,
                "frames": options.frames,
                "fps": self.fps,
                "hold": options.hold,
                "quality": options.quality,
                "seed": options.seed,
                "fit": options.fit,
                "transitions": self.records if complete else listed,
                "stale": [] if complete else self.stale,
                "story": STORY_VIDEO if complete else None,
                "story_key": story_key,
            }
        )


def _check_and_claim(
    options: AnimateOptions, hooks: AnimateHooks, claim: contextlib.ExitStack
) -> _Job:
    """Check the options and keyframes, lock the output folder and check that it is ours, load
    the predictor: everything that can refuse the run before the (slow) decoder load."""
    if options.frames < 2:
        raise AnimateError(f"--frames {options.frames}: a transition needs at least 2 frames")
    if options.hold < 0:
        raise AnimateError(f"--hold {options.hold}: must be 0 or more seconds")
    keyframes, notes = load_keyframes(options.keyframes, options.fit)
    for text in notes:
        if hooks.on_note:
            hooks.on_note(text)
    out = options.out or options.keyframes / "video"
    folder, previous = _claim_output(out, options.keyframes, options.overwrite, claim)
    loaded_predictor = load_predictor_checked(options.predictor)
    return _Job(options, hooks, keyframes, folder, previous, loaded_predictor, AnimateResult(out))


def _load_decoder(job: _Job, decoders: Any) -> None:
    """The decoder (kept in `decoders` for a batch's next folder), its frame rate, the
    keyframes' embeddings and the description animate.json records."""
    from storycli.motion.decoders.registry import DecoderCache
    from storycli.motion.predictor.model import weights_path
    from storycli.weights.devices import resolve_device

    options = job.options
    decoders = decoders or DecoderCache()
    decoder = decoders.load(
        options.decoder,
        options.model,
        device=options.device,
        dtype=options.dtype,
        offload=options.offload,
        steps=options.steps,
        guidance=options.guidance,
    )
    if decoder.max_frames is not None and options.frames > decoder.max_frames:
        raise AnimateError(
            f"--frames {options.frames}: the {decoder.name} decoder makes at most "
            f"{decoder.max_frames} frames per transition"
        )
    job.decoder = decoder
    job.device = resolve_device(options.device)
    job.fps = options.fps or decoder.fps
    job.k_all, job.predictor = keyframe_embeddings(
        decoder, [k.image for k in job.keyframes], job.loaded_predictor, options.predictor, job.note
    )
    described = decoder.describe()
    if job.predictor is not None:
        weights = weights_path(options.predictor)  # type: ignore[arg-type]
        described |= {
            "predictor": str(weights.resolve()),
            "predictor_sha256": _file_digest(weights),
        }
    job.result.decoder = described


def _remove_leftovers(job: _Job) -> None:
    """Make the output folder, and remove the temp files a killed run left in it."""
    job.out.mkdir(parents=True, exist_ok=True)
    leftovers = job.folder.remove_leftovers()
    if leftovers:
        job.note(
            f"removed {len(leftovers)} leftover temp file(s) of an interrupted run: "
            f"{', '.join(p.name for p in leftovers)}"
        )


def _plan_transitions(job: _Job) -> None:
    """The record (file, key, seed) of each transition, which of them are on disk already,
    and the files of an earlier run this one does not make."""
    options, keyframes = job.options, job.keyframes
    digests = [_file_digest(k.path) for k in keyframes]
    count = len(keyframes)
    for a in range(count - 1):
        seed = derive_seed(options.seed, "transition", a)
        key = _key(
            {
                "keyframes": digests[a : a + 2],
                "size": keyframes[0].image.size,
                "fit": options.fit,
                "decoder": job.result.decoder,
                "frames": options.frames,
                "fps": job.fps,
                "quality": options.quality,
                "seed": seed,
                "prompts": [keyframes[a].prompt, keyframes[a + 1].prompt],
            }
        )
        job.records.append(
            {
                "file": transition_name(a + 1, a + 2, count),
                "from": keyframes[a].path.name,
                "to": keyframes[a + 1].path.name,
                "key": key,
                "seed": seed,
                "frames": options.frames,
            }
        )
    current = {r["file"] for r in job.records}
    job.on_disk = {
        r["file"]: r
        for r in _records(job.old)
        if r["file"] in current and (job.out / r["file"]).is_file()
    }
    job.stale = sorted(_written_by_animate(job.previous) - current)


def _make_transitions(job: _Job) -> None:
    """Decode and write each transition whose inputs changed; keep the others. The manifest
    is rewritten after each one, so a kill loses at most the video being made."""
    from storycli.motion.decoders.base import TransitionRequest
    from storycli.motion.video.io import write_mp4
    from storycli.weights.devices import peak_memory, reset_peak_memory

    hooks, options, keyframes, result = job.hooks, job.options, job.keyframes, job.result
    if hooks.on_start:
        hooks.on_start(len(job.records))
    for a, record in enumerate(job.records):
        path = job.out / record["file"]
        result.transitions.append(path)
        if job.on_disk.get(record["file"], {}).get("key") == record["key"]:
            if hooks.on_kept:
                hooks.on_kept(path)
            continue
        if hooks.on_transition:
            hooks.on_transition(f"{record['from']} → {record['to']}")
        embeddings = frame_embeddings(job.k_all, job.predictor, a, options.frames)
        request = TransitionRequest(
            start=keyframes[a].image,
            end=keyframes[a + 1].image,
            frames=options.frames,
            embeddings=embeddings,
            start_prompt=keyframes[a].prompt,
            end_prompt=keyframes[a + 1].prompt,
            seed=record["seed"],
        )
        reset_peak_memory(job.device)
        frames = job.decoder.transition(request, on_step=hooks.on_step)
        # The GPU peak of this transition (on the CPU the process's, which only grows).
        record["peak_memory_bytes"], record["peak_memory_kind"] = peak_memory(job.device)
        encoding = job.phase(f"encoding {record['file']}")
        write_mp4(path, frames, job.fps, options.quality, on_frame=encoding)
        job.on_disk[record["file"]] = record
        result.generated.append(path)
        if hooks.on_written:
            hooks.on_written(path)
        job.save(complete=False, story_key=job.old.get("story_key"))


def _make_story(job: _Job) -> str:
    """Write story.mp4 unless it is there and made from the same transitions; its key."""
    from storycli.motion.video.io import write_mp4

    options, result = job.options, job.result
    story_path = job.out / STORY_VIDEO
    story_key = _key(
        {
            "transitions": [r["key"] for r in job.records],
            "hold": options.hold,
            "assembly": _STORY_ASSEMBLY,
        }
    )
    if result.generated or not story_path.is_file() or job.old.get("story_key") != story_key:
        story_frames = _story_frames(
            job.keyframes,
            result.transitions,
            job.fps,
            options.hold,
            job.phase(f"assembling {STORY_VIDEO}"),
        )
        write_mp4(
            story_path,
            story_frames,
            job.fps,
            options.quality,
            on_frame=job.phase(f"encoding {STORY_VIDEO}"),
        )
        result.generated.append(story_path)
        if job.hooks.on_written:
            job.hooks.on_written(story_path)
    result.story = story_path
    return story_key


def _remove_stale(job: _Job) -> None:
    """Delete the transitions of an earlier run that the current keyframes no longer have."""
    result = job.result
    for name in job.stale:
        path = job.out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
            result.removed.append(path)
    if result.removed:
        job.note(
            f"removed {', '.join(p.name for p in result.removed)}: transition(s) of an earlier "
            "run that the current keyframes no longer have"
        )
