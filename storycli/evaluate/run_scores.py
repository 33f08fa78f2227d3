"""Score a run folder and write `evaluation.json` into it (`storydiff evaluate`).

A `generate` run (manifest.json) gets the keyframe metrics: CLIP-T of each frame against the
prompt its text encoder saw, CLIP-I per character and overall, DreamSim when installed. An
`animate` run (a run folder with video/, or the video folder itself: animate.json) gets the
video metrics per transition: CLIPSIM-first, CLIPSIM-frames, end-frame fidelity, motion, LPIPS
when installed. Everything is read and checked before any model loads, and evaluation.json is
written once, atomically, at the end: a failure leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from storycli import __version__
from storycli.atomic import atomic_write_text
from storycli.errors import InvalidInput
from storycli.evaluate import DEFAULT_CLIP, EVALUATION_FILE
from storycli.evaluate import metrics as m
from storycli.paths import OutputLocationError, inside_folder, write_problem

GENERATE_MANIFEST = "manifest.json"  # written by `storydiff generate`
ANIMATE_MANIFEST = "animate.json"  # written by `storydiff animate`
VIDEO_FOLDER = "video"  # animate's default output folder inside a run
SCHEMA_VERSION = 1
# Bumped when a metric is computed differently, so that a cached evaluation.json is redone.
METRICS_VERSION = 1
EVAL_EXTRA = "pip install 'storydiff[eval]'"


class EvaluateError(InvalidInput):
    """A folder that cannot be evaluated (not a run, missing or corrupt files): one sentence."""


@dataclass
class EvaluateOptions:
    run: Path
    clip: str = DEFAULT_CLIP
    device: str = "auto"
    # Keep an evaluation.json whose inputs (frames, videos, CLIP model) are unchanged: the
    # benchmarks' resume. The command itself always scores again.
    reuse: bool = False


@dataclass
class EvaluateHooks:
    """Progress callbacks; all optional."""

    on_note: Callable[[str], None] | None = None
    on_model: Callable[[Any], None] | None = None  # (ClipModel)
    on_phase: Callable[[str, int, int], None] | None = None  # (what, done, total)


@dataclass
class _Frame:
    number: int
    file: str
    prompt: str
    characters: list[str]
    image: Image.Image


@dataclass
class _Transition:
    file: str
    start: str
    end: str
    frames: list[np.ndarray]  # RGB uint8, cropped to the keyframes' size
    target: Image.Image  # the keyframe it should end on, as animate saw it
    source: Image.Image  # the keyframe it starts from


@dataclass
class _Run:
    """What a run folder holds, read and checked."""

    folder: Path
    frames: list[_Frame] = field(default_factory=list)
    frame_keys: list[Any] = field(default_factory=list)
    video: Path | None = None
    transitions: list[_Transition] = field(default_factory=list)
    transition_keys: list[Any] = field(default_factory=list)
    decoder: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "+".join(k for k, on in (("generate", self.frames), ("animate", self.video)) if on)


# ------------------------------------------------------------------------------------ reading


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluateError(
            f"{path}: not a readable {what} ({exc}); run the command again"
        ) from exc
    if not isinstance(data, dict):
        raise EvaluateError(f"{path}: not a {what} (a JSON object was expected)")
    return data


def _open_image(path: Path, listed_in: Path) -> Image.Image:
    if not path.is_file():
        raise EvaluateError(
            f"{path}: listed in {listed_in.name} but missing; run the command that made it again"
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes it all inside the try
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise EvaluateError(
            f"{path}: not a readable image ({exc}); run the command that made it again"
        ) from exc


def _own_prompts(manifest: dict[str, Any], count: int) -> list[str] | None:
    """Each frame's own prompt when generation encoded another text: a one-prompt frame is
    encoded from the consolidated prompt of a window of frames (the manifest records that), but
    CLIP-T scores a frame against its own prompt (identity + frame), as 1Prompt1Story does. It
    is the prompt plain generation would encode: tags replaced, style applied, fitted to 77
    tokens. None: the manifest's prompts are the frames' own."""
    from pydantic import ValidationError

    from storycli.config import ConfigFileError, Configs
    from storycli.keyframes.plan import expand_prompt
    from storycli.story.schema import Story
    from storycli.story.tokens import fit_prompt

    try:
        story = Story.model_validate(manifest.get("story"))
    except ValidationError:
        return None  # another version's manifest: its prompts are all there is
    if not story.uses_one_prompt or len(story.frames) != count:
        return None
    try:
        style = Configs().styles[story.style] if story.style else None
    except (ConfigFileError, KeyError):
        return None
    wrap = style.apply if style else str
    return [fit_prompt(expand_prompt(story, f.prompt), wrap).prompt for f in story.frames]


def _read_generate(folder: Path, run: _Run) -> None:
    path = folder / GENERATE_MANIFEST
    manifest = _read_json(path, "storydiff manifest")
    if manifest.get("complete") is False:
        raise EvaluateError(
            f"{path}: `storydiff generate` has not finished this story (complete: false); run "
            "generate again, then evaluate"
        )
    frames = manifest.get("frames")
    if not isinstance(frames, list) or not frames:
        raise EvaluateError(f"{path}: field `frames` is missing or empty; not a generate run")
    own = _own_prompts(manifest, len(frames))
    for i, entry in enumerate(frames):
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), str) for k in ("file", "prompt")
        )
        if not ok or not isinstance(entry.get("characters", []), list):
            raise EvaluateError(
                f"{path}: frames[{i}] lacks `file`, `prompt` or `characters`; not a storydiff "
                "manifest (run generate again)"
            )
        if inside_folder(folder, entry["file"]) is None:
            raise EvaluateError(
                f"{path}: frames[{i}].file {entry['file']!r} is not a file of this run folder; "
                "only its own files are read (run generate again)"
            )
        run.frames.append(
            _Frame(
                number=int(entry.get("frame", i + 1)),
                file=entry["file"],
                prompt=own[i] if own else entry["prompt"],
                characters=[str(c) for c in entry.get("characters", [])],
                image=_open_image(folder / entry["file"], path),
            )
        )
        run.frame_keys.append([entry["file"], entry.get("key"), _digest(folder / entry["file"])])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _decode_mp4(path: Path, size: tuple[int, int]) -> list[np.ndarray]:
    """Every frame of an MP4 (no resampling), cropped to `size`: animate pads frames at the
    bottom and right to multiples of 16, and the padding is no part of the picture."""
    from storycli.motion.video.io import VideoError, decode_every_frame

    width, height = size
    try:
        frames = [frame[:height, :width] for frame in decode_every_frame(path)]
    except VideoError as exc:
        raise EvaluateError(
            f"{path}: not a readable video ({exc}); run `storydiff animate` again to remake it"
        ) from exc
    if len(frames) < 2:
        raise EvaluateError(
            f"{path}: {len(frames)} decodable frame(s), a transition has at least 2; run "
            "`storydiff animate` again to remake it"
        )
    return frames


def _read_animate(video: Path, run: _Run) -> None:
    from storycli.motion.animate import load_keyframes

    path = video / ANIMATE_MANIFEST
    manifest = _read_json(path, "storydiff animate manifest")
    if manifest.get("complete") is not True:
        raise EvaluateError(
            f"{path}: `storydiff animate` has not finished (complete: false); run animate "
            "again, then evaluate"
        )
    transitions = manifest.get("transitions")
    keyframes = manifest.get("keyframes")
    if not isinstance(transitions, list) or not transitions or not isinstance(keyframes, str):
        raise EvaluateError(f"{path}: field `transitions` or `keyframes` missing; not animate's")
    keyframe_folder = Path(keyframes)
    if not keyframe_folder.is_dir():
        raise EvaluateError(
            f"{path}: its keyframes folder {keyframe_folder} does not exist any more; end-frame "
            "fidelity needs the keyframes"
        )
    # The keyframes exactly as animate saw them (brought to the first one's size, `fit`).
    loaded, _ = load_keyframes(keyframe_folder, str(manifest.get("fit", "crop")))
    by_name = {k.path.name: k.image for k in loaded}
    size = loaded[0].image.size
    for i, entry in enumerate(transitions):
        names = ("file", "from", "to")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in names):
            raise EvaluateError(f"{path}: transitions[{i}] lacks `file`, `from` or `to`")
        for key in ("from", "to"):
            if entry[key] not in by_name:
                raise EvaluateError(
                    f"{path}: transitions[{i}].{key} {entry[key]} is not a keyframe of "
                    f"{keyframe_folder} any more; run `storydiff animate` again"
                )
        if inside_folder(video, entry["file"]) is None:
            raise EvaluateError(
                f"{path}: transitions[{i}].file {entry['file']!r} is not a file of this video "
                "folder; only its own files are read (run `storydiff animate` again)"
            )
        mp4 = video / entry["file"]
        if not mp4.is_file():
            raise EvaluateError(
                f"{mp4}: listed in {ANIMATE_MANIFEST} but missing; run `storydiff animate` again"
            )
        run.transitions.append(
            _Transition(
                file=entry["file"],
                start=entry["from"],
                end=entry["to"],
                frames=_decode_mp4(mp4, size),
                target=by_name[entry["to"]],
                source=by_name[entry["from"]],
            )
        )
        run.transition_keys.append([entry["file"], entry.get("key"), _digest(mp4)])
    run.video = video
    run.decoder = manifest.get("decoder") if isinstance(manifest.get("decoder"), dict) else {}


def read_run(folder: Path) -> _Run:
    """Read and check everything evaluate needs from a run folder (no model is loaded)."""
    folder = Path(folder)
    hint = (
        "pass a `storydiff generate` output folder (e.g. outputs/lighthouse), or the video/ "
        "folder `storydiff animate` wrote"
    )
    if not folder.is_dir():
        raise EvaluateError(f"{folder}: no such folder; {hint}")
    run = _Run(folder)
    has_manifest = (folder / GENERATE_MANIFEST).is_file()
    if (folder / ANIMATE_MANIFEST).is_file():
        video: Path | None = folder
    elif (folder / VIDEO_FOLDER / ANIMATE_MANIFEST).is_file():
        video = folder / VIDEO_FOLDER
    else:
        video = None
    if not has_manifest and video is None:
        raise EvaluateError(
            f"{folder}: not a storydiff run folder (it has neither {GENERATE_MANIFEST} from "
            f"`storydiff generate` nor {ANIMATE_MANIFEST} from `storydiff animate`); {hint}"
        )
    if has_manifest:
        _read_generate(folder, run)
    if video is not None:
        _read_animate(video, run)
    return run


def _key(run: _Run, clip: str) -> str:
    data = {
        "frames": run.frame_keys,
        "transitions": run.transition_keys,
        "clip": clip,
        "metrics": METRICS_VERSION,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------- optional metrics


def _cache_dir(name: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "storydiff" / name


def unavailable(exc: BaseException) -> str:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return f"unavailable: {reason}"


def _dreamsim(device: str) -> tuple[Callable[[Image.Image, Image.Image], float] | None, str]:
    """DreamSim's distance (lower: more alike), or None and why not. An optional extra: it pulls
    torchvision and downloads its weights on first use, so its absence is a status, not an
    error."""
    try:
        from dreamsim import dreamsim
    except ImportError:
        return None, "not installed"
    try:
        model, preprocess = dreamsim(
            pretrained=True, device=device, cache_dir=str(_cache_dir("dreamsim"))
        )
    except Exception as exc:  # weights not downloadable offline, a broken install
        return None, unavailable(exc)

    def distance(a: Image.Image, b: Image.Image) -> float:
        import torch

        with torch.inference_mode():
            return float(model(preprocess(a).to(device), preprocess(b).to(device)).item())

    return distance, "ok"


def _lpips(device: str) -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """LPIPS (AlexNet) between two RGB uint8 arrays, or None and why not (optional extra)."""
    try:
        import lpips
    except ImportError:
        return None, "not installed"
    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:
        return None, unavailable(exc)

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        import torch

        def tensor(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            return t.unsqueeze(0).to(device)

        with torch.inference_mode():
            return float(net(tensor(a), tensor(b)).item())

    return distance, "ok"


# ------------------------------------------------------------------------------------ scoring


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _score_keyframes(run: _Run, clip: Any, hooks: EvaluateHooks) -> dict[str, Any]:
    phase = hooks.on_phase
    total = len(run.frames)
    if phase:
        phase("keyframes", 0, total)
    images = clip.embed_images([f.image for f in run.frames])
    texts = [m.CLIP_T_PREFIX + f.prompt for f in run.frames]
    cosines = m.clip_t(images, clip.embed_texts(texts))
    if phase:
        phase("keyframes", total, total)
    frames = [
        {
            "frame": f.number,
            "file": f.file,
            "characters": f.characters,
            "text": text,
            "clip_t_cos": _round(cos),
            "clip_t": _round(m.clip_score(cos)),
        }
        for f, text, cos in zip(run.frames, texts, cosines, strict=True)
    ]
    # A character's frames: every frame that shows it (frames without anyone, [NC], count for
    # nobody). Overall = all characters' pairs together, which for one subject (ConsiStory+)
    # is exactly 1Prompt1Story's per-set mean.
    names = list(dict.fromkeys(c for f in run.frames for c in f.characters))
    shown = {n: [i for i, f in enumerate(run.frames) if n in f.characters] for n in names}
    pairs: list[float] = []
    characters: dict[str, Any] = {}
    for name, rows in shown.items():
        values = m.pairwise_cosines(images[rows]) if len(rows) > 1 else []
        pairs += values
        characters[name] = {
            "frames": [run.frames[i].number for i in rows],
            "pairs": len(values),
            "clip_i": _round(m.mean(values)),
        }
    dreamsim = _score_dreamsim(run, shown, clip.device, hooks)
    return {
        "frames": frames,
        "clip_t": _round(m.mean(m.clip_score(c) for c in cosines)),
        "clip_t_cos": _round(m.mean(cosines)),
        "clip_i": _round(m.mean(pairs)),
        "characters": characters,
        "dreamsim": dreamsim,
    }


def _score_dreamsim(
    run: _Run, shown: dict[str, list[int]], device: str, hooks: EvaluateHooks
) -> dict[str, Any]:
    from itertools import combinations

    distance, status = _dreamsim(device)
    if distance is None:
        if hooks.on_note:
            hooks.on_note(f"DreamSim {status}" + (f" ({EVAL_EXTRA})" if "not" in status else ""))
        return {"status": status}
    every: list[float] = []
    per: dict[str, float | None] = {}
    for name, rows in shown.items():
        values = [
            distance(run.frames[i].image, run.frames[j].image) for i, j in combinations(rows, 2)
        ]
        every += values
        per[name] = _round(m.mean(values))
    return {"status": "ok", "overall": _round(m.mean(every)), "characters": per}


def _score_video(run: _Run, clip: Any, hooks: EvaluateHooks) -> dict[str, Any]:
    distance, lpips_status = _lpips(clip.device)
    if distance is None and hooks.on_note:
        hooks.on_note(
            f"LPIPS {lpips_status}" + (f" ({EVAL_EXTRA})" if "not" in lpips_status else "")
        )
    rows = []
    total = len(run.transitions)
    for done, t in enumerate(run.transitions):
        if hooks.on_phase:
            hooks.on_phase("transitions", done, total)
        pictures = [Image.fromarray(f) for f in t.frames]
        embeds = clip.embed_images([*pictures, t.source, t.target])
        frames, source, target = embeds[:-2], embeds[-2], embeds[-1]
        row: dict[str, Any] = {
            "file": t.file,
            "from": t.start,
            "to": t.end,
            "frames": len(t.frames),
            "clipsim_first": _round(m.clipsim_first(frames)),
            "clipsim_frames": _round(m.clipsim_frames(frames)),
            "end_fidelity": _round(m.cosine(frames[-1], target)),
            "start_fidelity": _round(m.cosine(frames[0], source)),
            "motion": _round(m.motion_magnitude(t.frames)),
        }
        if distance is not None:
            target_pixels = np.asarray(t.target.convert("RGB"))
            row["lpips_frames"] = _round(m.mean(distance(a, b) for a, b in pairwise(t.frames)))
            row["lpips_end"] = _round(distance(t.frames[-1], target_pixels))
        rows.append(row)
    if hooks.on_phase:
        hooks.on_phase("transitions", total, total)

    def average(key: str) -> float | None:
        return _round(m.mean(r[key] for r in rows if r.get(key) is not None))

    lpips: dict[str, Any] = {"status": lpips_status}
    if distance is not None:
        lpips |= {"frames": average("lpips_frames"), "end": average("lpips_end")}
    assert run.video is not None
    return {
        "folder": str(run.video),
        "decoder": run.decoder,
        "transitions": rows,
        "clipsim_first": average("clipsim_first"),
        "clipsim_frames": average("clipsim_frames"),
        "end_fidelity": average("end_fidelity"),
        "start_fidelity": average("start_fidelity"),
        "motion": average("motion"),
        "lpips": lpips,
    }


PROTOCOL = {
    "clip_t": 'cosine of each frame to "A photo depicts " + its final prompt (what the text '
    "encoder saw: tags replaced by descriptions, style applied), cut at 77 tokens; clip_t is "
    "2.5 * max(cos, 0) (1Prompt1Story's scale), clip_t_cos the raw cosine",
    "clip_i": "mean cosine over all pairs of the frames that show a character; overall: every "
    "character's pairs together",
    "dreamsim": "mean DreamSim distance over the same pairs (lower: more alike)",
    "background": "whole frames, no background removal (1Prompt1Story removes backgrounds with "
    "CarveKit first, which raises CLIP-I and lowers DreamSim)",
    "video": "clipsim_first: mean cosine of each video frame to the first; clipsim_frames: of "
    "consecutive frames; end_fidelity: last frame to the keyframe it ends on; motion: mean "
    "absolute difference of consecutive frames' pixels in [0, 1] (0: a still video)",
}


def evaluate_run(
    options: EvaluateOptions, hooks: EvaluateHooks | None = None, clip: Any = None
) -> dict[str, Any]:
    """Score a run folder and write its evaluation.json; the document written.

    `clip`: an already loaded `ClipModel`, or a function that loads `options.clip` (a benchmark
    scores many runs with one model, loaded only when a run needs scoring); None: `options.clip`
    is loaded once everything on disk has been read and checked. Raises EvaluateError for a
    folder that cannot be evaluated, ModelUnavailable for weights. The run folder is locked
    meanwhile: another command working in it is refused (`FolderInUse`)."""
    from storycli.locks import run_folder_lock

    with run_folder_lock(Path(options.run), "evaluate"):
        return _evaluate_run(options, hooks, clip)


def _evaluate_run(
    options: EvaluateOptions, hooks: EvaluateHooks | None, clip: Any
) -> dict[str, Any]:
    hooks = hooks or EvaluateHooks()
    started = time.perf_counter()
    run = read_run(options.run)
    loaded = clip is not None and not callable(clip)
    key = _key(run, clip.name if loaded else options.clip)
    out = run.folder / EVALUATION_FILE
    if options.reuse and out.is_file():
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(out.read_text(encoding="utf-8"))
            if isinstance(previous, dict) and previous.get("key") == key:
                return previous
    # Before any model loads or metric is computed: evaluation.json must be writable there.
    problem = write_problem(run.folder)
    if problem is not None:
        raise OutputLocationError(
            f"{run.folder}: {problem}; evaluate writes {EVALUATION_FILE} into the run folder"
        )
    if clip is None:
        from storycli.evaluate.clip import load_clip

        clip = load_clip(options.clip, options.device)
    elif not loaded:
        clip = clip()
    if hooks.on_model:
        hooks.on_model(clip)
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "storydiff_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.folder),
        "kind": run.kind,
        "key": key,
        "clip": clip.describe(),
        "protocol": PROTOCOL,
        "keyframes": _score_keyframes(run, clip, hooks) if run.frames else None,
        "video": _score_video(run, clip, hooks) if run.video is not None else None,
    }
    document["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return document


def summary_rows(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) pairs for a console table: the run-level numbers of a document."""

    def show(value: Any) -> str:
        return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    rows: list[tuple[str, str]] = []
    keys = document.get("keyframes")
    if keys:
        rows += [
            ("CLIP-T (2.5·cos)", show(keys["clip_t"])),
            ("CLIP-T (cosine)", show(keys["clip_t_cos"])),
            ("CLIP-I", show(keys["clip_i"])),
        ]
        for name, c in keys["characters"].items():
            rows.append((f"  CLIP-I {name}", f"{show(c['clip_i'])} ({c['pairs']} pairs)"))
        ds = keys["dreamsim"]
        rows.append(("DreamSim", show(ds.get("overall")) if ds["status"] == "ok" else ds["status"]))
    video = document.get("video")
    if video:
        rows += [
            ("CLIPSIM-first", show(video["clipsim_first"])),
            ("CLIPSIM-frames", show(video["clipsim_frames"])),
            ("end-frame fidelity", show(video["end_fidelity"])),
            ("motion", show(video["motion"])),
        ]
        lp = video["lpips"]
        rows.append(
            (
                "LPIPS frames / end",
                f"{show(lp['frames'])} / {show(lp['end'])}"
                if lp["status"] == "ok"
                else lp["status"],
            )
        )
    return rows
