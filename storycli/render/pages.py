"""Comic pages from a story's frames: `grid` (the contact sheet), `four-panel` (2×2 pages) and
`classic` (rows of 4 or 6 panels mixing full panels and stacked half panels, shuffled by the
story's seed, as StoryDiffusion's "Classic Comic Style" — with captions on the stacked panels
too, which the reference code leaves out), and one PDF of all pages.

Every panel is drawn on its own tile of exactly the panel's size, caption included (word-wrapped
to the panel, on a white band at its bottom; lines that would not fit are left out, so a
caption never leaves its panel). The PDF is written with Pillow's PDF writer: the pages are
raster images already, so a PDF library would add a dependency and nothing else.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from storycli.atomic import atomic_write_bytes
from storycli.errors import InvalidInput
from storycli.render.captions import caption_metrics, wrap_text
from storycli.render.grid import flatten, make_grid
from storycli.render.layouts import LAYOUTS

BORDER = 10  # pixels around and between panels
BACKGROUND = (255, 255, 255)
BLANK = (235, 235, 235)  # padding panels


@dataclass(frozen=True)
class Panel:
    image: Image.Image | None  # None: a blank panel padding a page or row
    caption: str | None = None


def draw_panel(panel: Panel, size: tuple[int, int], font_size: int | None = None) -> Image.Image:
    """`panel` as a tile of exactly `size`: the picture filling it, the caption on a white
    band at the bottom (as many wrapped lines as fit)."""
    width, height = size
    if panel.image is None:
        return Image.new("RGB", size, BLANK)
    tile = flatten(panel.image, size)
    text = (panel.caption or "").strip()
    if not text:
        return tile
    fonts, pad, line_height = caption_metrics(width, font_size)
    lines = wrap_text(text, fonts, max(1, width - 2 * pad))
    fit = max(0, min(len(lines), (height // 2 - 2 * pad) // max(1, line_height)))
    if fit == 0:
        return tile
    band_height = 2 * pad + fit * line_height
    band = Image.new("RGB", (width, band_height), (255, 255, 255))
    for k, line in enumerate(lines[:fit]):
        fonts.draw(band, (width - fonts.length(line)) / 2, pad + k * line_height, line)
    tile.paste(band, (0, height - band_height))
    return tile


def _padded(panels: Sequence[Panel], multiple: int) -> list[Panel]:
    missing = -len(panels) % multiple
    return [*panels, *([Panel(None)] * missing)]


def four_panel_pages(
    panels: Sequence[Panel], size: tuple[int, int], font_size: int | None = None
) -> list[Image.Image]:
    """2×2 pages in story order, the last padded with blank panels."""
    width, height = size
    pages = []
    padded = _padded(panels, 4)
    for start in range(0, len(padded), 4):
        page = Image.new("RGB", (2 * width + 3 * BORDER, 2 * height + 3 * BORDER), BACKGROUND)
        for k, panel in enumerate(padded[start : start + 4]):
            row, col = divmod(k, 2)
            x, y = BORDER + col * (width + BORDER), BORDER + row * (height + BORDER)
            page.paste(draw_panel(panel, size, font_size), (x, y))
        pages.append(page)
    return pages


def classic_groups(count: int) -> list[int]:
    """Row sizes: groups of 4 up to 8 frames, else 4, 6, 4, 6, …; the last row at least 4."""
    if count <= 8:
        return [4] * max(1, math.ceil(count / 4))
    sizes, left, k = [], count, 0
    while left > 0:
        size = 4 if k % 2 == 0 else 6
        sizes.append(size if left >= size or left > 4 else 4)
        left -= sizes[-1]
        k += 1
    return sizes


def classic_rows(count: int, seed: int) -> list[list[int]]:
    """Each row's columns, left to right: 1 = a full panel, 2 = two half panels stacked;
    rows of 4 frames are a shuffle of [1, 1, 2], rows of 6 of [1, 1, 2, 2] (one generator
    seeded with the story's seed, so a story always gets the same page)."""
    rng = random.Random(seed)
    rows = []
    for size in classic_groups(count):
        columns = [1, 1, 2] if size == 4 else [1, 1, 2, 2]
        rng.shuffle(columns)
        rows.append(columns)
    return rows


def classic_pages(
    panels: Sequence[Panel],
    size: tuple[int, int],
    seed: int,
    font_size: int | None = None,
    rows_per_page: int = 2,
) -> list[Image.Image]:
    """Rows of full and stacked half panels, every row scaled to the page's width."""
    width, height = size
    rows = classic_rows(len(panels), seed)
    queue = list(panels) + [Panel(None)] * (sum(sum(r) for r in rows) - len(panels))
    page_width = max(_row_width(r, width) for r in rows) + 2 * BORDER
    drawn = []
    for columns in rows:
        row = Image.new("RGB", (_row_width(columns, width), height), BACKGROUND)
        x = 0
        for kind in columns:
            if kind == 1:
                row.paste(draw_panel(queue.pop(0), size, font_size), (x, 0))
                x += width + BORDER
                continue
            half = (width // 2, (height - BORDER) // 2)
            for k in range(2):
                row.paste(draw_panel(queue.pop(0), half, font_size), (x, k * (half[1] + BORDER)))
            x += half[0] + BORDER
        scale = (page_width - 2 * BORDER) / row.width
        drawn.append(row.resize((page_width - 2 * BORDER, round(height * scale))))
    pages = []
    for start in range(0, len(drawn), rows_per_page):
        group = drawn[start : start + rows_per_page]
        page_height = sum(r.height for r in group) + (len(group) + 1) * BORDER
        page = Image.new("RGB", (page_width, page_height), BACKGROUND)
        y = BORDER
        for row in group:
            page.paste(row, (BORDER, y))
            y += row.height + BORDER
        pages.append(page)
    return pages


def _row_width(columns: Sequence[int], width: int) -> int:
    return sum(width if kind == 1 else width // 2 for kind in columns) + BORDER * (len(columns) - 1)


def lay_out(
    layout: str,
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    seed: int,
    font_size: int | None = None,
) -> list[Image.Image]:
    """The pages of `layout` for frames `images` (all drawn at the first one's size)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose {', '.join(LAYOUTS)}")
    if layout == "grid":
        return [make_grid(list(images), list(captions))]
    panels = [Panel(image, caption) for image, caption in zip(images, captions, strict=True)]
    size = images[0].size
    if layout == "four-panel":
        return four_panel_pages(panels, size, font_size)
    return classic_pages(panels, size, seed, font_size)


def pdf_bytes(pages: Sequence[Image.Image]) -> bytes:
    """One PDF page per image (Pillow's writer), 150 dpi."""
    buffer = io.BytesIO()
    first, *rest = [p.convert("RGB") for p in pages]
    first.save(buffer, format="PDF", save_all=True, append_images=rest, resolution=150.0)
    return buffer.getvalue()


PDF = "comic.pdf"
PAGE_FILE = "page_{:02d}.png"
PAGE_RE = re.compile(r"page_\d+\.png")


def write_pages(
    folder: Path,
    frames: Sequence[str],
    captions: Sequence[str | None],
    layout: str,
    seed: int,
    font_size: int | None = None,
    previous: Sequence[str] = (),
) -> list[str]:
    """Lay out the frame files of `folder` and write page_01.png, … and comic.pdf there
    (atomically); pages of an earlier layout beyond the new count (`previous`, as a manifest
    listed them) are removed. Returns the page file names."""
    images = []
    for name in frames:
        with Image.open(folder / name) as image:
            images.append(image.convert("RGB"))
    pages = lay_out(layout, images, captions, seed, font_size)
    names = [PAGE_FILE.format(n + 1) for n in range(len(pages))]
    for name, page in zip(names, pages, strict=True):
        buffer = io.BytesIO()
        page.save(buffer, format="PNG")
        atomic_write_bytes(folder / name, buffer.getvalue())
    atomic_write_bytes(folder / PDF, pdf_bytes(pages))
    for name in set(previous) - set(names):
        if Path(name).name == name and PAGE_RE.fullmatch(name):
            (folder / name).unlink(missing_ok=True)
    return names


class PagesError(InvalidInput):
    """A folder that is not a finished `generate` run."""


def relayout(folder: Path, layout: str | None = None, font_size: int | None = None) -> list[str]:
    """`storydiff pages`: the pages of an existing run folder from its manifest (frame files,
    captions, the story's seed, layout and caption size), nothing generated. The folder is
    locked meanwhile (another command working in it is refused), and the manifest's `pages`
    is updated, so pages of an earlier layout are removed now and by later runs."""
    from storycli.locks import run_folder_lock

    with run_folder_lock(folder, "pages"):
        return _relayout(Path(folder), layout, font_size)


def _relayout(folder: Path, layout: str | None, font_size: int | None) -> list[str]:
    from storycli.atomic import atomic_write_text, remove_temp_files
    from storycli.paths import OutputLocationError, inside_folder, write_problem

    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        frames = manifest["frames"]
        story = manifest["story"]
    except FileNotFoundError:
        raise PagesError(
            f"{folder}: no manifest.json; pass a `storydiff generate` output folder"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PagesError(f"{path}: not a storydiff manifest ({exc})") from None
    if manifest.get("complete") is False:
        raise PagesError(f"{path}: generate has not finished this story; run it again first")
    try:
        files = [f["file"] for f in frames]
    except (KeyError, TypeError) as exc:
        raise PagesError(f"{path}: not a storydiff manifest ({exc})") from None
    for i, name in enumerate(files):
        if not isinstance(name, str) or inside_folder(folder, name) is None:
            raise PagesError(
                f"{path}: frames[{i}].file {name!r} is not a file of this run folder; only "
                "its own files are read (run generate again)"
            )
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise PagesError(f"{folder / missing[0]}: listed in manifest.json but missing")
    problem = write_problem(folder)
    if problem is not None:
        raise OutputLocationError(f"{folder}: {problem}; pages are written into the run folder")
    # A killed `pages` or `generate` left these; nothing else writes here while it is locked.
    remove_temp_files(
        folder, lambda name: name in (PDF, path.name) or bool(PAGE_RE.fullmatch(name))
    )
    previous = manifest.get("pages")
    names = write_pages(
        folder,
        files,
        [f.get("caption") for f in frames],
        layout or story.get("layout", "grid"),
        int(story.get("seed", 0)),
        font_size if font_size is not None else story.get("caption_font_size"),
        previous=[p for p in previous if isinstance(p, str)] if isinstance(previous, list) else [],
    )
    # The pages now written are what later runs may remove.
    manifest["pages"] = names
    manifest["pdf"] = PDF
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return names
