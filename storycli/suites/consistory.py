"""`storydiff bench consistory-plus`: the ConsiStory+ prompt sets through storydiff, scored as in
1Prompt1Story's Table 1.

Each set becomes one story per method (`identity` = style + subject, one frame per setting,
1Prompt1Story's benchmark settings: SDXL, 50 steps, CFG 5, 1024², seed 42, Euler), generated with
`generate_story` and scored with `evaluate`. Out folder:

    OUT/stories/<method>/<set>.yaml     the story files (rewritten only when they change)
    OUT/runs/<method>/<set>/            generate run folders, each with its evaluation.json
    OUT/records/<method>/<set>.json     what the table needs per set (resume: kept when done)
    OUT/consistory_plus.json, .md       the table
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storycli import __version__
from storycli.atomic import atomic_write_text
from storycli.evaluate import DEFAULT_CLIP
from storycli.keyframes.model_cache import ModelCache
from storycli.suites.common import (
    SCHEMA_VERSION,
    BenchError,
    BenchHooks,
    BenchOptions,
    check_methods,
    done_before,
    generate,
    model_value,
    read_json,
    story_yaml,
    take,
    write_if_changed,
    write_json,
)
from storycli.suites.table import PUBLISHED, consistory_markdown

DATA = Path(__file__).resolve().parent.parent / "data" / "consistory_plus.yaml"
RESULTS = "consistory_plus"  # .json and .md in OUT

# 1Prompt1Story's benchmark settings (resource/gen_benchmark.py with SDXL base: Euler, 50 steps,
# CFG 5, 1024², seed 42, no negative prompt).
PROTOCOL: dict[str, Any] = {
    "negative": "",
    "seed": 42,
    "width": 1024,
    "height": 1024,
    "steps": 50,
    "guidance": 5.0,
    "scheduler": "euler",
}
# Each method's own reference noise: StoryDiffusion's app shares a seed's noise among frames,
# 1Prompt1Story's code starts every frame from the very same noise, plain SDXL samples
# independently.
NOISE = {"none": "per-frame", "storydiffusion": "shared", "one-prompt": "identical"}


@dataclass(frozen=True)
class PromptSet:
    """One ConsiStory+ set: a subject in a style, shown in each of `settings`."""

    id: str  # <category>-<NN>, NN counting from 01 in file order
    category: str
    style: str
    subject: str
    settings: tuple[str, ...]
    concept_token: str

    @property
    def identity(self) -> str:
        """The identity prompt: style + subject, as 1Prompt1Story joins them."""
        return " ".join(p for p in (self.style.strip(), self.subject.strip()) if p)


def _text(value: Any, where: str, path: Path, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise BenchError(f"{path}: {where} must be {'a' if empty_ok else 'a non-empty'} string")
    # storydiff's prompt grammar reads [..] as character tags; the sets contain none, but a
    # hand-edited file might.
    return value.replace("[", "(").replace("]", ")").strip()


def load_sets(path: Path = DATA) -> list[PromptSet]:
    """Every prompt set of a ConsiStory+ YAML file, in file order."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"{path}: cannot read the ConsiStory+ prompt sets ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise BenchError(f"{path}: expected a mapping of categories to lists of prompt sets")
    sets = []
    for category, items in data.items():
        if not isinstance(items, list):
            raise BenchError(f"{path}: {category} must be a list of prompt sets")
        for i, item in enumerate(items):
            where = f"{category}[{i}]"
            if not isinstance(item, dict):
                raise BenchError(f"{path}: {where} must be a mapping")
            settings = item.get("settings")
            if not isinstance(settings, list) or not settings:
                raise BenchError(f"{path}: {where}.settings must be a non-empty list")
            sets.append(
                PromptSet(
                    id=f"{category}-{i + 1:02d}",
                    category=str(category),
                    style=_text(item.get("style", ""), f"{where}.style", path, empty_ok=True),
                    subject=_text(item.get("subject"), f"{where}.subject", path),
                    settings=tuple(
                        _text(s, f"{where}.settings[{j}]", path) for j, s in enumerate(settings)
                    ),
                    concept_token=str(item.get("concept_token", "")),
                )
            )
    return sets


def set_story(prompt_set: PromptSet, method: str, options: BenchOptions) -> dict[str, Any]:
    """The storydiff story of one set under one method."""
    width, height = options.size or (PROTOCOL["width"], PROTOCOL["height"])
    return {
        "name": prompt_set.id,
        "model": model_value(options.model),
        "identity": prompt_set.identity,
        "frames": [{"prompt": s} for s in prompt_set.settings],
        "negative": PROTOCOL["negative"],
        "seed": PROTOCOL["seed"] if options.seed is None else options.seed,
        "width": width,
        "height": height,
        "steps": options.steps or PROTOCOL["steps"],
        "guidance": PROTOCOL["guidance"],
        "scheduler": PROTOCOL["scheduler"],
        "noise": NOISE[method],
        "consistency": {"method": method},
    }


def _header(prompt_set: PromptSet, method: str) -> str:
    return (
        f"ConsiStory+ set {prompt_set.id} (concept: {prompt_set.concept_token}), method "
        f"{method}.\nWritten by `storydiff bench consistory-plus`; edits are overwritten."
    )


def _mean(values: list[Any]) -> float | None:
    items = [float(v) for v in values if isinstance(v, (int, float))]
    return round(sum(items) / len(items), 4) if items else None


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row: per-set metrics averaged over sets, time per image over images, the
    largest peak memory."""
    peaks = [r["generation"].get("peak_memory_bytes") for r in records]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    kinds = {r["generation"].get("peak_memory_kind") for r in records} - {None}
    frames = sum(int(r["generation"].get("frames") or 0) for r in records)
    weighted = [
        (r["generation"]["seconds_per_image"], r["generation"]["frames"])
        for r in records
        if isinstance(r["generation"].get("seconds_per_image"), (int, float))
    ]
    total = sum(n for _, n in weighted)
    return {
        "sets": len(records),
        "images": frames,
        "clip_t": _mean([r["metrics"]["clip_t"] for r in records]),
        "clip_t_cos": _mean([r["metrics"]["clip_t_cos"] for r in records]),
        "clip_i": _mean([r["metrics"]["clip_i"] for r in records]),
        "dreamsim": _mean([r["metrics"]["dreamsim"] for r in records]),
        "steps": records[0]["generation"].get("steps") if records else None,
        "peak_memory_gb": round(max(peaks) / 2**30, 2) if peaks else None,
        "peak_memory_kind": ", ".join(sorted(kinds)) or None,
        "seconds_per_image": round(sum(s * n for s, n in weighted) / total, 3) if total else None,
        "noise": NOISE.get(records[0]["method"]) if records else None,
    }


def run_consistory(
    options: BenchOptions,
    clip: str = DEFAULT_CLIP,
    hooks: BenchHooks | None = None,
    evaluate_hooks: Any = None,
    sets_file: Path = DATA,
) -> dict[str, Any]:
    """Run (or resume) the benchmark; the results document (also written to OUT)."""
    from storycli.paths import check_writable_folder

    hooks = hooks or BenchHooks()
    methods = check_methods(options.methods)
    every = load_sets(sets_file)
    chosen = take(every, options.limit)
    check_writable_folder(options.out, "--out")
    bench = _Bench(options, clip, hooks, evaluate_hooks, ModelCache())
    # Every model the work needs, before any of it: the scorer now (a CLIP that cannot be
    # loaded would otherwise stop the run after the first set was generated); the generation
    # model loads before the first frame. A rerun with every set done loads neither here.
    if not all(bench.done_before(m, s) for m in methods for s in chosen):
        bench.clip_model()
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    count, number = len(methods) * len(chosen), 0
    for method in methods:
        for prompt_set in chosen:
            number += 1
            label = f"{method} {prompt_set.id}"
            if hooks.on_item:
                hooks.on_item(number, count, label)
            records[method].append(_run_set(bench, method, prompt_set))
            if hooks.on_done:
                hooks.on_done(label, records[method][-1])
    results = _results_document(bench, every, chosen, methods, records)
    write_json(options.out / f"{RESULTS}.json", results)
    atomic_write_text(options.out / f"{RESULTS}.md", consistory_markdown(results))
    return results


@dataclass
class _Bench:
    """One `run_consistory` call: its options, and the CLIP scorer loaded once, when needed."""

    options: BenchOptions
    clip: str
    hooks: BenchHooks
    evaluate_hooks: Any
    models: ModelCache  # one generation pipeline kept across the sets
    loaded: dict[str, Any] = field(default_factory=dict)  # "clip": the scorer, once loaded

    def clip_model(self) -> Any:
        if "clip" not in self.loaded:
            from storycli.evaluate.clip import load_clip

            self.loaded["clip"] = load_clip(self.clip, self.options.device)
        return self.loaded["clip"]

    def story_of(self, method: str, prompt_set: PromptSet) -> str:
        return story_yaml(set_story(prompt_set, method, self.options), _header(prompt_set, method))

    def record_of(self, method: str, prompt_set: PromptSet) -> Path:
        return self.options.out / "records" / method / f"{prompt_set.id}.json"

    def done_before(self, method: str, prompt_set: PromptSet) -> bool:
        """Whether an earlier run already generated and scored this set under `method`."""
        return done_before(
            self.story_of(method, prompt_set),
            self.options,
            self.options.out / "runs" / method / prompt_set.id,
            read_json(self.record_of(method, prompt_set)),
        )


def _run_set(bench: _Bench, method: str, prompt_set: PromptSet) -> dict[str, Any]:
    """Write one set's story file, generate (or resume) and score it; its record (also
    written to OUT/records)."""
    from storycli.evaluate.run_scores import EvaluateOptions, evaluate_run

    options = bench.options
    text = bench.story_of(method, prompt_set)
    story_path = options.out / "stories" / method / f"{prompt_set.id}.yaml"
    write_if_changed(story_path, text)
    record_path = bench.record_of(method, prompt_set)
    previous = read_json(record_path)
    made = generate(
        story_path,
        text,
        options,
        options.out / "runs" / method,
        prompt_set.id,
        previous,
        bench.models,
        bench.hooks,
    )
    document = evaluate_run(
        EvaluateOptions(made.folder, clip=bench.clip, device=options.device, reuse=True),
        bench.evaluate_hooks,
        clip=bench.clip_model,
    )
    keyframes = document["keyframes"]
    dreamsim = keyframes["dreamsim"]
    record = {
        "schema_version": SCHEMA_VERSION,
        "set": prompt_set.id,
        "category": prompt_set.category,
        "method": method,
        "story": str(story_path),
        "run": str(made.folder),
        "generation": made.record,
        "kept": made.kept,
        "frames_generated": made.generated,
        "evaluation_key": document["key"],
        "metrics": {
            "clip_t": keyframes["clip_t"],
            "clip_t_cos": keyframes["clip_t_cos"],
            "clip_i": keyframes["clip_i"],
            "dreamsim": dreamsim.get("overall") if dreamsim["status"] == "ok" else None,
            "dreamsim_status": dreamsim["status"],
        },
        "clip": document["clip"]["id"],
    }
    write_json(record_path, record)
    return record


def _results_document(
    bench: _Bench,
    every: list[PromptSet],
    chosen: list[PromptSet],
    methods: tuple[str, ...],
    records: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The table: each method's row, every set's record, and the published numbers."""
    from storycli.weights.devices import device_description, resolve_device

    options = bench.options
    clip_info = bench.loaded["clip"].describe() if "clip" in bench.loaded else {"id": bench.clip}
    results = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "consistory-plus",
        "storydiff_version": __version__,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S%z"),
        "model": options.model,
        "device": device_description(resolve_device(options.device)),
        "clip": clip_info,
        "total_sets": len(every),
        "sets": [s.id for s in chosen],
        "methods": {m: aggregate(records[m]) for m in methods},
        "records": [r for m in methods for r in records[m]],
    }
    results["published"] = PUBLISHED
    return results
