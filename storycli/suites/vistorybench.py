"""`storydiff bench vistorybench`: ViStoryBench's stories through storydiff, written where the
benchmark's own scorer reads a method's frames, so storydiff is scored with its code unchanged.

The dataset (hub dataset `ViStoryBench/ViStoryBench`, unpacked as `data/dataset/ViStory/`) has
one folder per story, `NN/story.json`:

- `Characters`: `{key: {name_en, name_ch, prompt_en, prompt_ch, tag, num_of_appearances}}`;
- `Shots`: `[{index, "Setting Description", "Plot Correspondence", "Characters Appearing",
  "Static Shot Description", "Shot Perspective Design"}]`, each text field `{en, ch}` and
  "Characters Appearing" `{en: [keys], ch: [names]}`.

Each shot becomes a frame whose prompt is built as the benchmark's own StoryDiffusion adapter
(`adapt2storydiffusion.py`, "plot_first") builds it: `camera; plot; script; roles; setting`,
roles naming each character with its description (`Name is [Tag]`, the tag replaced by the
description), `[NC]` for a shot without characters. Out folder:

    OUT/stories/<mode>/<lang>/<NN>.yaml          the story files
    OUT/runs/<mode>/<lang>/vistory-<NN>/         generate run folders
    OUT/outputs/storydiff/<mode>/<lang>/<timestamp>/<NN>/shots/<ii>.png   what the scorer reads
    OUT/vistorybench.json                        timestamps (kept, so a rerun resumes), stories

`<mode>` is the consistency method, `<ii>` the shot's own `index` (from 01, as the dataset
numbers them). The scorer's own loader (`vistorybench/dataset_loader/read_outputs.py`) takes the
story ids directly under the timestamp folder and a story's shots from its `shots/` subfolder;
its evaluators find a shot's image by the shot's `index` (keyed by the number in the file name,
or, in older versions, as position `index - 1` of the natural-order list): named by `index`,
both find every shot. Images in `shots/` under any other name (e.g. `00.png` … of a run written
before the files were named so) are removed when the story's shots are laid out again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storycli import __version__
from storycli.atomic import atomic_write_bytes
from storycli.keyframes.model_cache import ModelCache
from storycli.story.loader import StoryError
from storycli.suites.common import (
    SCHEMA_VERSION,
    BenchError,
    BenchHooks,
    BenchOptions,
    check_methods,
    generate,
    model_value,
    read_json,
    story_yaml,
    take,
    write_if_changed,
    write_json,
)

LANGUAGES = ("en", "ch")
METHOD_DIR = "storydiff"  # the scorer's --method
STATE = "vistorybench.json"
TIMESTAMP_RE = re.compile(r"\d{8}[-_]\d{6}")  # the scorer's pattern (20250429-235959)
FIELDS = {
    "setting": "Setting Description",
    "plot": "Plot Correspondence",
    "characters": "Characters Appearing",
    "script": "Static Shot Description",
    "camera": "Shot Perspective Design",
}
# The benchmark's StoryDiffusion adapter: seed 42, 1344x768, its fixed negative prompt, one
# reference per character (id_length 1), sa32 = sa64 = 0.5.
PROTOCOL: dict[str, Any] = {
    "seed": 42,
    "width": 1344,
    "height": 768,
    "steps": 50,
    "guidance": 5.0,
    "id_length": 1,
    "negative": "bad anatomy, bad hands, missing fingers, extra fingers, three hands, three "
    "legs, bad arms, missing legs, missing arms, poorly drawn face, bad face, fused face, "
    "cloned face, three crus, fused feet, fused thigh, extra crus, ugly fingers, horn, "
    "cartoon, cg, 3d, unreal, animate, amputation, disconnected limbs",
}


@dataclass(frozen=True)
class Character:
    key: str  # the key in `Characters` (its English name), what shots list
    name: str  # in the chosen language
    prompt: str
    tag: str  # non_human, realistic_human, unrealistic_human


@dataclass(frozen=True)
class Shot:
    index: int
    setting: str
    plot: str
    characters: tuple[str, ...]  # keys into ViStory.characters
    script: str
    camera: str


@dataclass(frozen=True)
class ViStory:
    id: str  # the folder name, "01" … "80"
    path: Path  # its story.json
    characters: dict[str, Character]
    shots: tuple[Shot, ...]


# ------------------------------------------------------------------------------------ reading


def dataset_root(dataset: Path) -> Path:
    """The folder holding the story folders: DATASET itself, or its ViStory/ (as the
    benchmark's download script names it) or ViStoryBench/ (as the hub dataset unpacks)."""
    hint = (
        "download it with `hf download ViStoryBench/ViStoryBench --repo-type dataset "
        "--local-dir data/dataset` and pass data/dataset/ViStoryBench (or ViStory)"
    )
    if not dataset.is_dir():
        raise BenchError(f"--dataset {dataset}: no such folder; {hint}")
    for root in (dataset, dataset / "ViStory", dataset / "ViStoryBench"):
        if root.is_dir() and _story_folders(root):
            return root
    raise BenchError(
        f"--dataset {dataset}: no story folders (NN/story.json) in it; it should be "
        f"ViStoryBench's ViStory folder; {hint}"
    )


def _story_folders(root: Path) -> list[Path]:
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted((p for p in folders if (p / "story.json").is_file()), key=lambda p: int(p.name))


def story_ids(root: Path) -> list[str]:
    return [p.name for p in _story_folders(root)]


def _clean(text: str) -> str:
    # storydiff's prompt grammar reads [..] as character tags.
    return " ".join(text.replace("[", "(").replace("]", ")").split())


def _field(value: Any, lang: str, where: str, path: Path, kind: type = str) -> Any:
    if not isinstance(value, dict) or lang not in value:
        raise BenchError(f"{path}: {where} must be a mapping with an `{lang}` entry")
    found = value[lang]
    if not isinstance(found, kind):
        raise BenchError(f"{path}: {where}.{lang} must be a {kind.__name__}")
    return found


def load_vistory(folder: Path, lang: str = "en") -> ViStory:
    """One story of the dataset, checked: every field a frame needs, in `lang`."""
    import json

    if lang not in LANGUAGES:
        raise BenchError(f"--language {lang}: choose {' or '.join(LANGUAGES)}")
    path = folder / "story.json"
    try:
        # utf-8-sig: the benchmark's loader reads it so (some files start with a BOM).
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a readable story.json ({exc})") from exc
    if not isinstance(data, dict):
        raise BenchError(f"{path}: expected a JSON object with `Characters` and `Shots`")
    raw_characters = data.get("Characters")
    if not isinstance(raw_characters, dict):
        raise BenchError(f"{path}: `Characters` must be a mapping of character keys")
    characters = {}
    for key, entry in raw_characters.items():
        where = f"Characters.{key}"
        if not isinstance(entry, dict):
            raise BenchError(f"{path}: {where} must be a mapping")
        prompt = entry.get(f"prompt_{lang}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchError(f"{path}: {where}.prompt_{lang} must be a non-empty string")
        name = entry.get(f"name_{lang}") or entry.get("name_en") or key
        characters[key] = Character(key, str(name), _clean(prompt), str(entry.get("tag", "")))
    raw_shots = data.get("Shots")
    if not isinstance(raw_shots, list) or not raw_shots:
        raise BenchError(f"{path}: `Shots` must be a non-empty list")
    shots = []
    for i, entry in enumerate(raw_shots):
        where = f"Shots[{i}]"
        if not isinstance(entry, dict):
            raise BenchError(f"{path}: {where} must be a mapping")
        missing = [f'"{name}"' for name in FIELDS.values() if name not in entry]
        if missing:
            raise BenchError(f"{path}: {where} lacks {', '.join(missing)}")
        texts = {
            key: _clean(_field(entry[name], lang, f"{where}.{name}", path))
            for key, name in FIELDS.items()
            if key != "characters"
        }
        # Shots name characters by key in `en` (the benchmark's loader does the same).
        keys = _field(
            entry[FIELDS["characters"]], "en", f"{where}.{FIELDS['characters']}", path, list
        )
        for key in keys:
            if key not in characters:
                raise BenchError(
                    f"{path}: {where}.{FIELDS['characters']}.en names '{key}', which is not in "
                    f"`Characters` ({', '.join(characters) or 'none defined'})"
                )
        try:
            index = int(entry.get("index", i + 1))
        except (TypeError, ValueError):
            raise BenchError(f"{path}: {where}.index must be a whole number") from None
        if index < 0 or any(s.index == index for s in shots):
            raise BenchError(
                f"{path}: {where}.index {index} is negative or repeats another shot's (the scorer "
                "finds a shot's image by its index)"
            )
        shots.append(Shot(index, characters=tuple(keys), **texts))
    return ViStory(folder.name, path, characters, tuple(shots))


# ---------------------------------------------------------------------------------- converting


def _tags(story: ViStory) -> dict[str, str]:
    """A storydiff character name (the `[Tag]`) for each character key: the key itself when it
    is a valid name, else its letters and digits, else `Character<N>`; unique."""
    tags: dict[str, str] = {}
    for n, key in enumerate(story.characters, start=1):
        tag = re.sub(r"[^A-Za-z0-9 _'.-]+", "_", key).strip(" _'.-")
        if not tag or tag == "NC" or not re.match(r"[A-Za-z0-9_]", tag) or tag in tags.values():
            tag = f"Character{n}"
        tags[key] = tag
    return tags


def tagged_characters(story: ViStory, method: str) -> list[str]:
    """The characters that become storydiff characters (tags). With Consistent Self-Attention
    a character needs a shot of its own (its reference, id_length 1); one that only ever
    appears together with others is written into the prompts as plain text instead."""
    shown = [k for k in story.characters if any(k in s.characters for s in story.shots)]
    if method != "storydiffusion":
        return shown
    solo = {s.characters[0] for s in story.shots if len(s.characters) == 1}
    return [k for k in shown if k in solo]


def shot_prompt(
    story: ViStory, shot: Shot, tags: dict[str, str], tagged: list[str], method: str = ""
) -> str:
    """`camera; plot; script; roles; setting`, roles `Name is [Tag] and …`; `[NC]` first for a
    shot without characters. one-prompt encodes a frame's words without its tags (the identity
    says who), so there the roles are `Name [Tag]`: the names stay, no dangling "is"."""
    link = " " if method == "one-prompt" else " is "
    roles = " and ".join(
        story.characters[k].name
        + (f"{link}[{tags[k]}]" if k in tagged else f" is {story.characters[k].prompt}")
        for k in shot.characters
    )
    parts = [shot.camera, shot.plot, shot.script, roles, shot.setting]
    text = "; ".join(p.strip(" ;.") for p in parts if p.strip(" ;."))
    return f"[NC] {text}" if not shot.characters else text


def vistory_story(story: ViStory, method: str, options: BenchOptions) -> dict[str, Any]:
    """The storydiff story of one ViStoryBench story under one method."""
    tags = _tags(story)
    tagged = tagged_characters(story, method)
    width, height = options.size or (PROTOCOL["width"], PROTOCOL["height"])
    document: dict[str, Any] = {"name": f"vistory-{story.id}", "model": model_value(options.model)}
    if tagged:  # (a story whose characters never appear alone has none to keep consistent)
        document["characters"] = {tags[k]: story.characters[k].prompt for k in tagged}
    document |= {
        "frames": [{"prompt": shot_prompt(story, s, tags, tagged, method)} for s in story.shots],
        "negative": PROTOCOL["negative"],
        "seed": PROTOCOL["seed"] if options.seed is None else options.seed,
        "width": width,
        "height": height,
        "steps": options.steps or PROTOCOL["steps"],
        "guidance": PROTOCOL["guidance"],
        "consistency": {"method": method, "id_length": PROTOCOL["id_length"]},
    }
    return document


def output_folder(
    out: Path, mode: str, lang: str, timestamp: str, story_id: str, method_dir: str = METHOD_DIR
) -> Path:
    """Where the scorer reads a story's shots: outputs/<method>/<mode>/<lang>/<timestamp>/
    <story>/shots/."""
    return out / "outputs" / method_dir / mode / lang / timestamp / story_id / "shots"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")  # what the scorer's loader reads


def shot_file(index: int) -> str:
    """A shot's file, named by the dataset's `index` (from 1), which is how the scorer finds
    it: `shots[int(shot["index"])]` keyed by the file name's number."""
    return f"{index:02d}.png"


def _remove_stray_shots(folder: Path, keep: set[str]) -> int:
    """Remove images the scorer would read as shots but that are not this story's (files of an
    older layout named by position from 00.png, or of shots since dropped); their count."""
    stray = [
        p
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in keep
    ]
    for p in stray:
        p.unlink()
    return len(stray)


def _copy_if_changed(source: Path, target: Path) -> bool:
    data = source.read_bytes()
    if target.is_file() and target.read_bytes() == data:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return True


# -------------------------------------------------------------------------------------- running


def run_vistorybench(
    options: BenchOptions,
    dataset: Path,
    language: str = "en",
    stories: list[str] | None = None,
    timestamp: str | None = None,
    hooks: BenchHooks | None = None,
) -> dict[str, Any]:
    """Render (or resume) the chosen stories per method and lay their frames out for the
    scorer; the state document (also OUT/vistorybench.json)."""
    from storycli.paths import check_writable_folder

    hooks = hooks or BenchHooks()
    methods = check_methods(options.methods)
    _check_language_and_timestamp(language, timestamp)
    root = dataset_root(dataset)
    chosen = take(_chosen_ids(root, stories), options.limit)
    # Every story is read and checked before anything is generated.
    loaded = [load_vistory(root / sid, language) for sid in chosen]
    check_writable_folder(options.out, "--out")
    state = read_json(options.out / STATE) or {}
    stamps: dict[str, str] = dict(state.get("timestamps") or {})
    done: dict[str, Any] = dict(state.get("stories") or {})
    session = _Session(options, language, hooks, ModelCache(), done, len(methods) * len(loaded))
    now = time.strftime("%Y%m%d-%H%M%S")  # one timestamp for every mode this run starts
    for method in methods:
        slot = f"{method}/{language}"
        # One timestamp per mode and language, kept in the state file: a rerun fills the same
        # output folder instead of starting a new one.
        stamp = timestamp or stamps.get(slot) or now
        stamps[slot] = stamp
        write_json(options.out / STATE, state | {"timestamps": stamps})
        for story in loaded:
            _render_story(session, method, stamp, story)
    state = _state_document(session, root, methods, stamps)
    write_json(options.out / STATE, state)
    return state


def _check_language_and_timestamp(language: str, timestamp: str | None) -> None:
    """Refuse a language the dataset lacks and a timestamp the scorer would not find."""
    if language not in LANGUAGES:
        raise BenchError(f"--language {language}: choose {' or '.join(LANGUAGES)}")
    if timestamp is not None and not TIMESTAMP_RE.fullmatch(timestamp):
        raise BenchError(
            f"--timestamp {timestamp}: the scorer reads YYYYMMDD-HHMMSS (e.g. 20250429-235959)"
        )


def _chosen_ids(root: Path, stories: list[str] | None) -> list[str]:
    """The dataset's story ids that `--stories` names (all of them without it), in its order."""
    available = story_ids(root)
    if not stories:
        return available
    unknown = [s for s in stories if s not in available]
    if unknown:
        raise BenchError(
            f"--stories: {', '.join(unknown)} not in {root} (it has {len(available)} "
            f"stories, {available[0]} … {available[-1]})"
        )
    return [s for s in available if s in stories]


@dataclass
class _Session:
    """One `run_vistorybench` call's progress, as its stories add to it."""

    options: BenchOptions
    language: str
    hooks: BenchHooks
    models: ModelCache  # one pipeline kept across the stories
    done: dict[str, Any]  # "<method>/<lang>/<story>" → its shots (kept from earlier runs)
    count: int  # stories × methods
    number: int = 0  # of the story being rendered
    failed: list[str] = field(default_factory=list)

    def fail(self, label: str, why: str) -> None:
        """A story that fails alone: the others still run, and the command exits 3."""
        self.failed.append(label)
        if self.hooks.on_note:
            self.hooks.on_note(f"{label} failed: {why}")


def _render_story(session: _Session, method: str, stamp: str, story: ViStory) -> None:
    """Write one story's file, generate (or resume) it, lay its frames out for the scorer
    under `stamp` and write its record."""
    options, language, hooks = session.options, session.language, session.hooks
    session.number += 1
    label = f"{method} {language} {story.id}"
    if hooks.on_item:
        hooks.on_item(session.number, session.count, label)
    text = story_yaml(
        vistory_story(story, method, options),
        f"ViStoryBench story {story.id} ({story.path}), method {method}, language "
        f"{language}.\nWritten by `storydiff bench vistorybench`; edits are overwritten.",
    )
    story_path = options.out / "stories" / method / language / f"{story.id}.yaml"
    write_if_changed(story_path, text)
    record_path = options.out / "records" / method / language / f"{story.id}.json"
    try:
        made = generate(
            story_path,
            text,
            options,
            options.out / "runs" / method / language,
            f"vistory-{story.id}",
            read_json(record_path),
            session.models,
            hooks,
        )
    except StoryError as exc:
        # A story storydiff refuses (e.g. a prompt grammar clash) fails alone.
        session.fail(label, exc.lines()[0])
        return
    shots = output_folder(options.out, method, language, stamp, story.id)
    manifest = read_json(made.folder / "manifest.json") or {}
    files = [f["file"] for f in manifest.get("frames", [])]
    if len(files) != len(story.shots):  # (a damaged run folder)
        session.fail(
            label,
            f"{made.folder} has {len(files)} frames for {len(story.shots)} shots; remove it to "
            "render the story again",
        )
        return
    written = _lay_out_shots(story, made.folder, files, shots)
    record = {
        "schema_version": SCHEMA_VERSION,
        "story": story.id,
        "method": method,
        "language": language,
        "story_file": str(story_path),
        "run": str(made.folder),
        "shots": str(shots),
        "shot_count": len(files),
        "generation": made.record,
        "kept": made.kept and not written,
    }
    write_json(record_path, record)
    session.done[f"{method}/{language}/{story.id}"] = {"shots": str(shots), "count": len(files)}
    if hooks.on_done:
        hooks.on_done(label, record)


def _lay_out_shots(story: ViStory, run: Path, files: list[str], shots: Path) -> int:
    """Copy a run's frames into the scorer's `shots` folder, named by the shot's index; an
    earlier layout's files (by position from 00.png) are replaced from the run folder, nothing
    is rendered again. How many files were written or removed."""
    names = {shot_file(shot.index) for shot in story.shots}
    return sum(
        _copy_if_changed(run / name, shots / shot_file(shot.index))
        for shot, name in zip(story.shots, files, strict=True)
    ) + _remove_stray_shots(shots, names)


def _state_document(
    session: _Session, root: Path, methods: tuple[str, ...], stamps: dict[str, str]
) -> dict[str, Any]:
    """What OUT/vistorybench.json records: where the outputs are, what failed, and the
    scorer's command line per mode."""
    options, language = session.options, session.language
    outputs = (options.out / "outputs").resolve()  # printed for use from another folder
    root = root.resolve()
    # The scorer reads `<--dataset_path>/ViStory`: a dataset folder of another name (the hub
    # dataset unpacks as ViStoryBench/) must be renamed, as the benchmark's download script does.
    rename = (
        None
        if root.name == "ViStory"
        else f"the scorer reads {root.parent / 'ViStory'}: rename {root} to that first"
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "vistorybench",
        "storydiff_version": __version__,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S%z"),
        "dataset": str(root),
        "language": language,
        "model": options.model,
        "outputs": str(outputs),
        "method": METHOD_DIR,
        "timestamps": stamps,
        "stories": session.done,
        "failed": session.failed,
        "note": rename,
        "score_with": [
            f"python bench_run.py --dataset_path {root.parent} --outputs_path {outputs} "
            f"--method {METHOD_DIR} --mode {m} --language {language} "
            f"--timestamp {stamps[f'{m}/{language}']}"
            for m in methods
        ],
    }
