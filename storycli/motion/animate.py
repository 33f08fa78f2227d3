"""`storydiff animate` as a function: keyframes -> one MP4 per transition -> story.mp4.

For each consecutive pair of keyframes: per-frame embeddings P_1..P_L (the motion predictor, or
the linear baseline without one), a decoder turns them into L frames, written as
`transition_01_02.mp4`, ...; `story.mp4` joins them, each keyframe held `hold` seconds. An
`animate.json` manifest records inputs and keys, so a rerun redoes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..atomic import atomic_write_text
from ..plan import derive_seed
from .video import IMAGE_SUFFIXES

KEYFRAMES_MANIFEST = "manifest.json"  # written by `storydiff generate`
MANIFEST = "animate.json"
STORY_VIDEO = "story.mp4"
SCHEMA_VERSION = 1


class AnimateError(Exception):
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


@dataclass
class AnimateHooks:
    """Progress callbacks; all optional."""

    on_note: Callable[[str], None] | None = None
    on_start: Callable[[int], None] | None = None  # (transitions to make)
    on_transition: Callable[[str], None] | None = None  # (description)
    on_step: Callable[[int, int], None] | None = None
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

    def summary(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "decoder": self.decoder,
            "transitions": [str(p) for p in self.transitions],
            "generated": [str(p) for p in self.generated],
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
        frames = json.loads(path.read_text(encoding="utf-8"))["frames"]
        return [f for f in frames if isinstance(f, dict) and isinstance(f.get("file"), str)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnimateError(
            f"{path}: not a storydiff manifest ({exc}); delete it to animate the images by name"
        ) from exc


def load_keyframes(folder: Path) -> tuple[list[Keyframe], list[str]]:
    """Keyframes in order (a `generate` folder's manifest, else images sorted by name), all
    at the first one's size. Returns (keyframes, notes)."""
    if not folder.is_dir():
        raise AnimateError(f"{folder}: not a folder of keyframes")
    notes: list[str] = []
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
        paths = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        entries = [(p, None, None) for p in paths]
    if len(entries) < 2:
        raise AnimateError(
            f"{folder}: {len(entries)} keyframe(s) found; a transition needs at least two "
            f"images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    keyframes = [Keyframe(p, _open_image(p), prompt, caption) for p, prompt, caption in entries]
    size = keyframes[0].image.size
    resized = [k.path.name for k in keyframes if k.image.size != size]
    if resized:
        notes.append(
            f"resized {', '.join(resized)} to {size[0]}x{size[1]} (the first keyframe's size)"
        )
        keyframes = [
            k
            if k.image.size == size
            else Keyframe(
                k.path, k.image.resize(size, Image.Resampling.LANCZOS), k.prompt, k.caption
            )
            for k in keyframes
        ]
    return keyframes, notes


# ------------------------------------------------------------------------------- output folder


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_owner(out: Path, keyframes: Path, overwrite: bool) -> dict[str, Any]:
    """The previous manifest of this output folder, if it belongs to these keyframes."""
    if out.exists() and not out.is_dir():
        raise AnimateError(f"{out}: exists and is not a folder; choose another --out")
    previous = _read_manifest(out)
    if overwrite:
        return {}
    if previous == {}:
        raise AnimateError(
            f"{out / MANIFEST}: not a readable animate manifest; pass --overwrite to remake "
            "the folder's videos"
        )
    if previous is None:
        if out.exists() and any(out.iterdir()):
            raise AnimateError(
                f"{out}: folder exists and was not made by `storydiff animate`; choose another "
                "--out or pass --overwrite"
            )
        return {}
    if previous.get("keyframes") != str(keyframes.resolve()):
        raise AnimateError(
            f"{out}: holds videos of other keyframes ({previous.get('keyframes')}); choose "
            "another --out or pass --overwrite"
        )
    return previous


def transition_name(a: int, b: int, count: int) -> str:
    width = max(2, len(str(count)))
    return f"transition_{a:0{width}d}_{b:0{width}d}.mp4"


# ------------------------------------------------------------------------------------- animate


def _load_predictor(options: AnimateOptions) -> Any:
    """The --predictor checkpoint (None without one), loaded before the decoder so that a
    missing or broken one fails fast, whichever decoder is asked for."""
    from .predictor import PredictorError, load_predictor

    if options.predictor is None:
        return None
    try:
        return load_predictor(options.predictor)
    except PredictorError as exc:
        raise AnimateError(str(exc)) from exc


def _embeddings(
    decoder: Any, keyframes: list[Keyframe], predictor: Any, options: AnimateOptions, note
) -> Any:
    """Per-keyframe embeddings K and the predictor (None: linear baseline), if the decoder
    uses embeddings."""
    from .predictor import weights_path

    encoder = decoder.image_encoder
    if encoder is None:
        if predictor is not None:
            note(f"--predictor ignored: the {decoder.name} decoder does not use embeddings")
        return None, None
    if predictor is not None:
        config = predictor.config
        if config.dim != encoder.dim:
            raise AnimateError(
                f"{weights_path(options.predictor)}: the predictor works on {config.dim}-d "
                f"embeddings but the {decoder.name} decoder's image encoder ({encoder.name}) "
                f"gives {encoder.dim}-d ones; use a predictor trained on that encoder"
            )
        if config.encoder and config.encoder != encoder.name:
            note(
                f"the predictor was trained on {config.encoder} embeddings, decoding on "
                f"{encoder.name}"
            )
    return encoder.encode([k.image for k in keyframes]), predictor


def _predict(k_all: Any, predictor: Any, a: int, frames: int) -> Any:
    import torch

    from .predictor import lerp_embeddings

    start, end = k_all[a : a + 1], k_all[a + 1 : a + 2]
    with torch.inference_mode():
        if predictor is None:
            return lerp_embeddings(start, end, frames)[0]
        return predictor(start, end, frames)[0]


def animate(options: AnimateOptions, hooks: AnimateHooks | None = None) -> AnimateResult:
    """Make (or resume) the transition videos of a keyframes folder. Raises AnimateError for
    bad input, ModelUnavailable when a decoder's weights are missing."""
    from .decoders import load_decoder
    from .decoders.base import TransitionRequest
    from .predictor import weights_path
    from .video import read_frames, write_mp4

    started = time.perf_counter()
    hooks = hooks or AnimateHooks()

    def note(text: str) -> None:
        if hooks.on_note:
            hooks.on_note(text)

    if options.frames < 2:
        raise AnimateError(f"--frames {options.frames}: a transition needs at least 2 frames")
    if options.hold < 0:
        raise AnimateError(f"--hold {options.hold}: must be 0 or more seconds")
    keyframes, notes = load_keyframes(options.keyframes)
    for text in notes:
        note(text)
    out = options.out or options.keyframes / "video"
    previous = _check_owner(out, options.keyframes, options.overwrite)
    loaded_predictor = _load_predictor(options)

    # Nothing is written before the decoder is loaded and every input checked.
    decoder = load_decoder(
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
    fps = options.fps or decoder.fps
    k_all, predictor = _embeddings(decoder, keyframes, loaded_predictor, options, note)
    described = decoder.describe()
    if predictor is not None:
        weights = weights_path(options.predictor)  # type: ignore[arg-type]
        described |= {
            "predictor": str(weights.resolve()),
            "predictor_sha256": _file_digest(weights),
        }
    result = AnimateResult(out, decoder=described)
    out.mkdir(parents=True, exist_ok=True)
    digests = [_file_digest(k.path) for k in keyframes]
    old_keys = {t.get("file"): t.get("key") for t in previous.get("transitions", [])}
    records: list[dict[str, Any]] = []
    count = len(keyframes)
    pairs = list(range(count - 1))
    if hooks.on_start:
        hooks.on_start(len(pairs))
    for a in pairs:
        name = transition_name(a + 1, a + 2, count)
        seed = derive_seed(options.seed, "transition", a)
        key = _key(
            {
                "keyframes": digests[a : a + 2],
                "size": keyframes[0].image.size,
                "decoder": described,
                "frames": options.frames,
                "fps": fps,
                "quality": options.quality,
                "seed": seed,
                "prompts": [keyframes[a].prompt, keyframes[a + 1].prompt],
            }
        )
        path = out / name
        record = {"file": name, "from": keyframes[a].path.name, "to": keyframes[a + 1].path.name}
        records.append(record | {"key": key, "seed": seed, "frames": options.frames})
        result.transitions.append(path)
        if path.is_file() and old_keys.get(name) == key:
            if hooks.on_kept:
                hooks.on_kept(path)
            continue
        if hooks.on_transition:
            hooks.on_transition(f"{record['from']} → {record['to']}")
        request = TransitionRequest(
            start=keyframes[a].image,
            end=keyframes[a + 1].image,
            frames=options.frames,
            embeddings=None if k_all is None else _predict(k_all, predictor, a, options.frames),
            start_prompt=keyframes[a].prompt,
            end_prompt=keyframes[a + 1].prompt,
            seed=seed,
        )
        frames = decoder.transition(request, on_step=hooks.on_step)
        write_mp4(path, frames, fps, options.quality)
        result.generated.append(path)
        if hooks.on_written:
            hooks.on_written(path)
        _write_manifest(out, options, described, fps, records, keyframes, complete=False)

    story_path = out / STORY_VIDEO
    story_key = _key({"transitions": [r["key"] for r in records], "hold": options.hold})
    if result.generated or not story_path.is_file() or previous.get("story_key") != story_key:
        held = round(options.hold * fps)
        size = keyframes[0].image.size
        story_frames: list[Image.Image] = [keyframes[0].image] * held
        for a, path in enumerate(result.transitions):
            # The transition's first frame is the keyframe just held: skip it. Decoded frames
            # carry write_mp4's padding to multiples of 16: crop it off again.
            decoded = read_frames(path, fps, short_side=None)[1:]
            story_frames += [f if f.size == size else f.crop((0, 0, *size)) for f in decoded]
            story_frames += [keyframes[a + 1].image] * held
        write_mp4(story_path, story_frames, fps, options.quality)
        result.generated.append(story_path)
        if hooks.on_written:
            hooks.on_written(story_path)
    result.story = story_path
    result.seconds = time.perf_counter() - started
    _write_manifest(
        out, options, described, fps, records, keyframes, complete=True, story_key=story_key
    )
    return result


def _write_manifest(
    out: Path,
    options: AnimateOptions,
    decoder: dict[str, Any],
    fps: int,
    transitions: list[dict[str, Any]],
    keyframes: list[Keyframe],
    complete: bool,
    story_key: str | None = None,
) -> None:
    from .. import __version__

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        "storydiff_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "keyframes": str(options.keyframes.resolve()),
        "keyframe_files": [k.path.name for k in keyframes],
        "size": list(keyframes[0].image.size),
        "decoder": decoder,
        "frames": options.frames,
        "fps": fps,
        "hold": options.hold,
        "quality": options.quality,
        "seed": options.seed,
        "transitions": transitions,
        "story": STORY_VIDEO if complete else None,
        "story_key": story_key,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
