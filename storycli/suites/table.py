"""Benchmark results as tables: 1Prompt1Story's Table 1 columns for ConsiStory+, with the
published rows beside storydiff's so the numbers can be read against each other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# 1Prompt1Story (ICLR 2025) Table 1 on ConsiStory+, SDXL, an RTX 3090: the training-free methods
# and the SDXL reference. CLIP-T is 2.5·cos on ViT-B/32 with "A photo depicts "; CLIP-I and
# DreamSim are pairwise over each set's frames with backgrounds removed (CarveKit).
PUBLISHED: list[dict[str, Any]] = [
    {"method": "SDXL (reference)", "clip_t": 0.9074, "clip_i": 0.8165, "dreamsim": 0.5292,
     "steps": 50, "peak_memory_gb": 16.04, "seconds_per_image": 13.1},
    {"method": "ConsiStory", "clip_t": 0.8769, "clip_i": 0.8737, "dreamsim": 0.3188,
     "steps": 50, "peak_memory_gb": 34.55, "seconds_per_image": 34.6},
    {"method": "StoryDiffusion", "clip_t": 0.8877, "clip_i": 0.8755, "dreamsim": 0.3212,
     "steps": 50, "peak_memory_gb": 45.61, "seconds_per_image": 25.7},
    {"method": "NPR", "clip_t": 0.8411, "clip_i": 0.8916, "dreamsim": 0.2548,
     "steps": 50, "peak_memory_gb": 16.04, "seconds_per_image": 17.2},
    {"method": "1Prompt1Story", "clip_t": 0.8942, "clip_i": 0.9117, "dreamsim": 0.1993,
     "steps": 50, "peak_memory_gb": 18.70, "seconds_per_image": 23.2},
]  # fmt: skip

# storydiff's method next to the published row it reproduces.
COUNTERPART = {
    "none": "SDXL (reference)",
    "storydiffusion": "StoryDiffusion",
    "one-prompt": "1Prompt1Story",
}
COLUMNS = [
    ("method", "method"),
    ("clip_t", "CLIP-T ↑"),
    ("clip_i", "CLIP-I ↑"),
    ("dreamsim", "DreamSim ↓"),
    ("steps", "steps"),
    ("peak_memory_gb", "GB"),
    ("seconds_per_image", "time (s)"),
]


def cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def row_cells(row: dict[str, Any]) -> list[str]:
    digits = {"peak_memory_gb": 2, "seconds_per_image": 2}
    return [cell(row.get(key), digits.get(key, 4)) for key, _ in COLUMNS]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(headers), "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*out, *(line(r) for r in rows)]) + "\n"


def consistory_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """storydiff's rows (one per method), labelled for the table."""
    rows = []
    for method, row in results["methods"].items():
        rows.append(row | {"method": f"storydiff {method}"})
    return rows


def consistory_markdown(results: dict[str, Any]) -> str:
    headers = [title for _, title in COLUMNS]
    ours = [row_cells(r) for r in consistory_rows(results)]
    published = [row_cells(r) for r in PUBLISHED]
    methods = results["methods"]
    images = sum(r["images"] for r in methods.values())
    memory = "; ".join(sorted({str(r.get("peak_memory_kind")) for r in methods.values()}))
    lines = [
        "# ConsiStory+ with storydiff",
        "",
        f"{len(results['sets'])} of {results['total_sets']} prompt sets ({images} images over "
        f"{len(methods)} method(s)); model `{results['model']}` on {results['device']}; "
        f"CLIP `{results['clip']['id']}`; {results['updated']}; storydiff "
        f"{results['storydiff_version']}.",
        "",
        markdown_table(headers, ours),
        "Published (1Prompt1Story, ICLR 2025, Table 1: SDXL on an RTX 3090, all 192 sets):",
        "",
        markdown_table(headers, published),
        "Notes:",
        "",
        '- CLIP-T: 2.5·max(cos, 0) of each frame with "A photo depicts " + its prompt; CLIP-I: '
        "mean cosine over every pair of a set's frames; DreamSim: mean distance over the same "
        "pairs (— when the `dreamsim` package is not installed). Averaged per set, then over "
        "sets.",
        "- storydiff scores whole frames; the paper removes backgrounds (CarveKit) before CLIP-I "
        "and DreamSim, which raises CLIP-I and lowers DreamSim.",
        f"- GB: peak memory ({memory}); time (s): seconds of denoising and decoding per image, "
        "model load excluded.",
        f"- storydiff {', '.join(f'{k} ≈ {v}' for k, v in COUNTERPART.items() if k in methods)}.",
        "",
    ]
    return "\n".join(lines)
