"""Comic pages (`layout:`, `storydiff pages`): geometry of each layout, captions kept inside
their panels, the seeded shuffle, and the PDF."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_runs import run_cli
from PIL import Image

from storycli.render import uncovered_characters
from storycli.render.pages import (
    BLANK,
    BORDER,
    Panel,
    classic_groups,
    classic_rows,
    draw_panel,
    four_panel_pages,
    lay_out,
    pdf_bytes,
)

SIZE = (96, 64)
LONG = "a very long caption " * 30


def frames(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
        for _ in range(count)
    ]


def gutters_are_white(page: Image.Image, xs: list[int], ys: list[int]) -> bool:
    """The border stripes at the given x (columns) and y (rows) offsets hold no ink."""
    a = np.asarray(page)
    return all((a[:, x : x + BORDER] == 255).all() for x in xs) and all(
        (a[y : y + BORDER] == 255).all() for y in ys
    )


def test_four_panel_pages_are_2x2_and_captions_stay_in_their_panels() -> None:
    images = frames(5)
    pages = four_panel_pages([Panel(im, LONG) for im in images], SIZE)
    assert len(pages) == 2
    w, h = SIZE
    assert all(p.size == (2 * w + 3 * BORDER, 2 * h + 3 * BORDER) for p in pages)
    # Long captions are wrapped and cut to the panel: the borders stay white.
    xs, ys = [0, w + BORDER, 2 * w + 2 * BORDER], [0, h + BORDER, 2 * h + 2 * BORDER]
    assert all(gutters_are_white(p, xs, ys) for p in pages)
    # The last page is padded with blank panels.
    second = np.asarray(pages[1])
    blank = second[BORDER : BORDER + h, 2 * BORDER + w : 2 * BORDER + 2 * w]
    assert (blank == BLANK).all()


def test_a_caption_is_drawn_inside_its_panel_only() -> None:
    image = frames(1)[0]
    plain = np.asarray(draw_panel(Panel(image, None), SIZE))
    tile = draw_panel(Panel(image, LONG), SIZE)
    assert tile.size == SIZE
    drawn = np.asarray(tile)
    changed = np.argwhere((drawn != plain).any(axis=2))
    assert changed.size  # the caption is there
    assert changed[:, 0].min() >= SIZE[1] // 2  # in its band at the bottom, at most half
    short = np.asarray(draw_panel(Panel(image, "Hi"), SIZE))
    assert (short[: SIZE[1] // 2] == plain[: SIZE[1] // 2]).all()


def test_classic_rows_are_seeded_and_hold_every_frame() -> None:
    assert classic_groups(4) == [4] and classic_groups(8) == [4, 4]
    assert classic_groups(10) == [4, 6] and classic_groups(9) == [4, 6]
    assert classic_groups(14) == [4, 6, 4] and classic_groups(20) == [4, 6, 4, 6]
    for count in range(1, 25):
        rows = classic_rows(count, seed=3)
        assert sum(sum(r) for r in rows) >= count
        assert all(sorted(r) in ([1, 1, 2], [1, 1, 2, 2]) for r in rows)
    assert classic_rows(14, seed=3) == classic_rows(14, seed=3)  # reproducible
    assert len({str(classic_rows(14, seed=s)) for s in range(20)}) > 1  # and seeded
    pages = lay_out("classic", frames(10), [LONG] * 10, seed=3)
    assert len(pages) == 1  # two rows per page
    pages = lay_out("classic", frames(14), [None] * 14, seed=3)
    assert len(pages) == 2 and pages[0].width == pages[1].width


def test_pdf_has_one_page_per_png_page() -> None:
    pages = four_panel_pages([Panel(im, "x") for im in frames(9)], SIZE)
    data = pdf_bytes(pages)
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page(?!s)", data)) == 3


def story(tmp_path: Path, layout: str, captions: list[str]) -> Path:
    data = {
        "name": "comic",
        "model": "tiny",
        "identity": "a fox",
        "frames": [f"runs {i} #{c}" for i, c in enumerate(captions)],
        "steps": 1,
        "width": 256,
        "height": 192,
        "layout": layout,
        "consistency": {"method": "none"},
    }
    path = tmp_path / "comic.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_generate_writes_pages_and_pages_relays_them_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("generate", story(tmp_path, "four-panel", ["one"] * 6), "--out", out)
    folder = out / "comic"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pages"] == ["page_01.png", "page_02.png"] and manifest["pdf"] == "comic.pdf"
    data = (folder / "comic.pdf").read_bytes()
    assert len(re.findall(rb"/Type\s*/Page(?!s)", data)) == 2
    # Re-laid out as one grid page: nothing generated, the second page goes.
    frames_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("frame_*.png")}
    result = run_cli("pages", folder, "--layout", "grid")
    assert "1 page(s)" in result.stderr
    assert sorted(p.name for p in folder.glob("page_*.png")) == ["page_01.png"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("frame_*.png")} == frames_before
    result = run_cli("pages", tmp_path, code=2)
    assert "no manifest.json" in result.stderr
    result = run_cli("pages", folder, "--layout", "manga", code=2)
    assert "--layout manga" in result.stderr


def test_cjk_captions_render_or_warn(tmp_path: Path) -> None:
    caption = "狐狸在雪中奔跑"
    out = tmp_path / "out"
    result = run_cli("generate", story(tmp_path, "classic", [caption] * 4), "--out", out)
    if uncovered_characters([caption]):
        assert "no font on this machine draws" in result.stderr
    else:
        image = frames(1)[0]
        assert draw_panel(Panel(image, caption), SIZE).tobytes() != image.tobytes()
    assert (out / "comic" / "page_01.png").is_file()


@pytest.mark.parametrize("layout", ["grid", "four-panel", "classic"])
def test_every_layout_lays_out_any_count(layout: str) -> None:
    for count in (1, 3, 7):
        pages = lay_out(layout, frames(count), [None] * count, seed=1)
        assert pages and all(p.mode == "RGB" for p in pages)
