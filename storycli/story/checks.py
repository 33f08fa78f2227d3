"""What the schema alone cannot say about a story: models, VAEs, pictures and saved banks that must
exist, prompts that must fit, characters that must be known.

Each check returns `(location, message)` pairs; `load_story` turns them into a `StoryError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from warnings import catch_warnings, simplefilter

from storycli.config import SCHEDULERS, Configs
from storycli.saved_banks import read_meta
from storycli.story.files import MAX_PICTURE_BYTES, FileRefused, open_regular
from storycli.story.schema import (
    NO_CHARACTER_TAG,
    TAG_RE,
    CharacterSpec,
    IPAdapter,
    Loc,
    Story,
    frame_characters,
    frame_tags,
    single_character_frames,
)

# Single-file checkpoints: SDXL's .safetensors/.ckpt; a FLUX.1 transformer also as GGUF.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
VAE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_model_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.lower().endswith(MODEL_FILE_SUFFIXES)
        or "\\" in model
    )


def resolve_model_path(model: str, base_dir: Path) -> Path:
    path = Path(model).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def local_model_path(model: str, base_dir: Path) -> Path | None:
    """The file or folder a `model` value names, or None when it is a preset or hub id."""
    path = resolve_model_path(model, base_dir)
    return path if is_model_path(model) or path.exists() else None


def weights_identity(value: str, base_dir: Path) -> str:
    """A `model:`/`vae:` value as what it loads: a local file or folder's resolved path, else
    the value itself (a hub id)."""
    local = local_model_path(value, base_dir)
    return str(local.resolve()) if local is not None else value


def check_vae(vae: str, base_dir: Path) -> str | None:
    """Return a problem with a `vae` value, or None. Hub ids are not checked here."""
    path = local_model_path(vae, base_dir)
    if path is not None:
        if not path.exists():
            return f"VAE file or folder '{vae}' does not exist (looked at {path}); fix the path"
        if path.is_dir() and not (path / "config.json").is_file():
            return f"'{vae}' is a folder without config.json, not a diffusers VAE folder"
        if path.is_file() and not path.name.lower().endswith(VAE_FILE_SUFFIXES):
            return f"'{vae}' is a file but not a .safetensors or .ckpt VAE"
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", vae):
        return None  # a hub id; whether it is cached is known only when loading
    return (
        f"unknown VAE '{vae}': use a hub id like madebyollin/sdxl-vae-fp16-fix, a local "
        "diffusers VAE folder or a .safetensors file"
    )


def check_model(model: str, configs: Configs, base_dir: Path) -> str | None:
    """Return a problem with a `model` value, or None. Hub ids are not checked here."""
    if model in configs.presets:
        return None
    path = local_model_path(model, base_dir)
    if path is not None:
        if not path.exists():
            return (
                f"model file or folder '{model}' does not exist (looked at {path}); "
                "fix the path, or use a preset: " + ", ".join(configs.presets)
            )
        if path.is_dir() and not (path / "model_index.json").exists():
            return f"'{model}' is a folder without model_index.json, not a diffusers model folder"
        if path.is_file() and not path.name.lower().endswith(MODEL_FILE_SUFFIXES):
            return f"'{model}' is a file but not a .safetensors, .ckpt or .gguf checkpoint"
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return None  # a hub id; whether it is cached is known only when loading
    return (
        f"unknown model '{model}': use a preset ({', '.join(configs.presets)}), "
        "a hub id like org/name, a local diffusers folder or a .safetensors file"
    )


def check_story(story: Story, configs: Configs, base_dir: Path) -> list[tuple[Loc, str]]:
    """Every problem the schema cannot see in `story`, as `(location, message)` pairs.

    In a fixed order: its settings (model, VAE, style, scheduler), its frames' tags, its
    pictures and saved banks, its consistency settings; then, only when nothing else is wrong,
    whether each character has its references. Relative paths are read from `base_dir`."""
    if story.identity is not None and story.characters is not None:
        # Checking tags against either cast would only add contradictory messages.
        return [(("characters",), "give either `identity` or `characters`, not both")]
    problems = _check_settings(story, configs, base_dir)
    problems += _check_tags(story)
    problems += check_pictures(story, base_dir)
    problems += check_banks(story, base_dir)
    problems += _check_consistency(story)
    # Counting references is meaningful only once every tag and picture is known to be right.
    if story.uses_csa and story.consistency.mode == "reference" and not problems:
        problems += _check_references(story)
    return problems


def _check_settings(story: Story, configs: Configs, base_dir: Path) -> list[tuple[Loc, str]]:
    """The story's model, VAE, style and scheduler."""
    problems: list[tuple[Loc, str]] = []
    if (problem := check_model(story.model, configs, base_dir)) is not None:
        problems.append((("model",), problem))
    if story.vae is not None and (problem := check_vae(story.vae, base_dir)) is not None:
        problems.append((("vae",), problem))
    if story.style is not None and story.style not in configs.styles:
        problems.append(
            (
                ("style",),
                f"unknown style '{story.style}'; choose one of: {', '.join(configs.styles)}",
            )
        )
    spec = SCHEDULERS.get(story.scheduler)
    if spec is None:
        problems.append(
            (
                ("scheduler",),
                f"unknown scheduler '{story.scheduler}'; choose one of: {', '.join(SCHEDULERS)}",
            )
        )
    elif spec.unet_calls_per_step > 1 and story.uses_csa:
        problems.append(
            (
                ("scheduler",),
                f"'{story.scheduler}' calls the UNet {spec.unet_calls_per_step} times per step, "
                "but Consistent Self-Attention schedules by step; use a first-order scheduler "
                "such as euler, ddim or dpmpp-2m-karras",
            )
        )
    return problems


def _check_tags(story: Story) -> list[tuple[Loc, str]]:
    """Each frame's tags name known characters, `[NC]` stands alone, and some prompt is left."""
    problems: list[tuple[Loc, str]] = []
    defined = story.cast
    for i, frame in enumerate(story.frames):
        tags = frame_tags(frame.prompt)
        names = [t for t in tags if t != NO_CHARACTER_TAG]
        for name in names:
            if story.characters is None:
                problems.append(
                    (
                        ("frames", i),
                        f"tag [{name}] names a character, but this story uses `identity`; "
                        "define characters under `characters:` to use tags",
                    )
                )
            elif name not in defined:
                # Tags are case-sensitive: point at the name that differs only in case.
                alike = [d for d in defined if d.casefold() == name.casefold()]
                hint = f" (tags are case-sensitive: [{alike[0]}]?)" if alike else ""
                problems.append(
                    (
                        ("frames", i),
                        f"unknown character tag [{name}]; defined: {', '.join(defined)}{hint}",
                    )
                )
        if NO_CHARACTER_TAG in tags and names:
            problems.append(
                (("frames", i), f"[{NO_CHARACTER_TAG}] frame cannot also show [{names[0]}]")
            )
        stripped = TAG_RE.sub("", frame.prompt).strip(" ,")
        if not stripped and not names:
            problems.append((("frames", i, "prompt"), "prompt is empty once tags are removed"))
    return problems


def _check_consistency(story: Story) -> list[tuple[Loc, str]]:
    """Consistency settings that contradict each other."""
    problems: list[tuple[Loc, str]] = []
    if story.consistency.history and not (story.uses_csa and story.consistency.mode == "reference"):
        problems.append(
            (
                ("consistency", "history"),
                "rolling history is read by Consistent Self-Attention in reference mode: use "
                "method storydiffusion with mode reference, or history 0",
            )
        )
    if story.consistency.stride > story.consistency.window:
        problems.append(
            (("consistency", "stride"), "must not exceed consistency.window (frames would skip)")
        )
    return problems


def _check_references(story: Story) -> list[tuple[Loc, str]]:
    """Reference mode: each character without a saved bank is shown alone in at least
    `id_length` frames (its first ones are its references)."""
    problems: list[tuple[Loc, str]] = []
    singles = single_character_frames(story)
    shown = {name for frame in story.frames for name in frame_characters(story, frame.prompt)}
    need = story.consistency.id_length
    for name in story.cast:
        if name in story.banks():
            continue  # read from its saved bank: it has no references
        have = len(singles[name])
        if have < need:
            where = ("characters", name) if story.characters is not None else ("identity",)
            if have:
                used = f"is shown alone in only {have} frame(s)"
            elif name in shown:
                # Frames with two characters are no references: say why they do not count.
                used = "is never shown alone (only together with other characters)"
            else:
                used = "is never shown"
            problems.append(
                (
                    where,
                    f"character '{name}' {used}, but consistency.id_length is {need}: "
                    f"its first {need} solo frames are its references; add solo frames or "
                    "lower id_length",
                )
            )
    return problems


def picture_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def adapter_source(adapter: IPAdapter, base_dir: Path) -> str:
    """Where the adapter loads from: a local folder (absolute), else the hub id or `tiny`."""
    model = picture_path(adapter.model, base_dir)
    return str(model.resolve()) if model.is_dir() else adapter.model


def check_pictures(story: Story, base_dir: Path) -> list[tuple[Loc, str]]:
    """Pictures must be readable images, and frame 1 of a `start_image` must show one
    character (the picture's); a character's `image` needs a frame showing it alone."""
    from PIL import Image, UnidentifiedImageError

    problems: list[tuple[Loc, str]] = []
    where: list[tuple[Loc, str]] = []
    if story.start_image is not None:
        where.append((("start_image",), story.start_image))
        shown = frame_characters(story, story.frames[0].prompt)
        if len(shown) != 1:
            what = "no character" if not shown else f"{len(shown)} characters"
            problems.append(
                (
                    ("frames", 0),
                    f"frame 1 is the start_image, so it must show one character (it shows "
                    f"{what}); describe the picture's character in it",
                )
            )
    photos = story.photos()
    for owner, adapter in photos:
        at: Loc = ("ip_adapter",) if owner is None else ("characters", owner, "ip_adapter")
        where.append(((*at, "image"), adapter.image))
        # One adapter and one image encoder per pipeline: every photo goes through the same.
        for key, mine, first in (
            ("variant", adapter.variant, photos[0][1].variant),
            ("model", adapter_source(adapter, base_dir), adapter_source(photos[0][1], base_dir)),
        ):
            if mine != first:
                problems.append(
                    (
                        (*at, key),
                        f"is '{mine}' but the first photo's is '{first}': a story's photos "
                        f"share one IP-Adapter (give every ip_adapter the same {key})",
                    )
                )
    singles = single_character_frames(story)
    for name, spec in (story.characters or {}).items():
        if isinstance(spec, CharacterSpec) and spec.image is not None:
            where.append((("characters", name, "image"), spec.image))
            if not singles[name]:
                problems.append(
                    (
                        ("characters", name, "image"),
                        f"the picture is {name}'s first frame that shows it alone, but no frame "
                        "shows it alone; add one",
                    )
                )
    for loc, value in where:
        path = picture_path(value, base_dir)
        try:
            # A FIFO would hang and a huge file or a decompression bomb (a small PNG of a
            # gigapixel) exhaust memory: only regular files, and PIL's pixel limit as an error.
            with open_regular(path, MAX_PICTURE_BYTES) as handle, catch_warnings():
                simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    image.verify()
        except FileNotFoundError:
            problems.append((loc, f"picture '{value}' does not exist (looked at {path})"))
        except IsADirectoryError:
            problems.append((loc, f"'{value}' is a folder, not a picture; name a picture file"))
        except FileRefused as exc:
            problems.append((loc, f"'{value}' {exc}; name a picture file"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            problems.append(
                (
                    loc,
                    f"'{value}' decodes to more than {Image.MAX_IMAGE_PIXELS:,} pixels (a "
                    "decompression bomb?); use a smaller picture",
                )
            )
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            problems.append((loc, f"'{value}' is not a readable image ({exc})"))
    return problems


def check_banks(story: Story, base_dir: Path) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for name, spec in (story.characters or {}).items():
        if not isinstance(spec, CharacterSpec) or spec.bank is None:
            continue
        loc: Loc = ("characters", name, "bank")
        if spec.image is not None:
            problems.append((loc, "give a saved `bank` or an `image`, not both"))
        elif not story.uses_csa:
            problems.append(
                (
                    loc,
                    "a saved bank is read by Consistent Self-Attention: use method storydiffusion",
                )
            )
        else:
            try:
                read_meta(picture_path(spec.bank, base_dir))
            except ValueError as exc:
                problems.append((loc, str(exc)))
    return problems


def story_warnings(story: Story) -> list[tuple[Loc, str]]:
    """Things a valid story probably did not mean (the plan carries them as warnings)."""
    warnings: list[tuple[Loc, str]] = []
    first: dict[str, str] = {}
    for name in story.characters or {}:
        other = first.setdefault(name.casefold(), name)
        if other != name:
            # Both are valid, but a tag typed in the wrong case silently picks the other one.
            warnings.append(
                (
                    ("characters", name),
                    f"'{name}' and '{other}' differ only in case; tags are case-sensitive, so "
                    f"[{name}] and [{other}] are two characters: rename one",
                )
            )
    return warnings
