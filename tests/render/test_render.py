"""Tests for storycli.render (PNG metadata, atomic writes, caption grid) and storycli.atomic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from storycli import atomic, render
from storycli.render import (
    a1111_parameters,
    atomic_write_bytes,
    atomic_write_text,
    captions,
    default_columns,
    make_grid,
    read_png_metadata,
    save_png,
)
from storycli.render import fonts as caption_fonts

UNICODE = "café 東京 🐱"
W, H, GAP = 64, 48, 8
WHITE = (255, 255, 255)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.new("RGB", size, color)


def gradient(size: tuple[int, int] = (W, H)) -> Image.Image:
    im = Image.new("RGB", size)
    im.putdata(
        [(x * 3 % 256, y * 5 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    return im


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# --------------------------------------------------------------------------------------------------
# a1111_parameters


def test_a1111_with_negative() -> None:
    text = a1111_parameters(
        "a cat on a roof",
        "blurry, lowres",
        {
            "Steps": 30,
            "Sampler": "DPM++ 2M Karras",
            "CFG scale": 5.0,
            "Seed": 42,
            "Size": "1024x1024",
            "Model": "sdxl-base",
            "Version": "storydiff 0.1.0",
        },
    )
    assert text.split("\n") == [
        "a cat on a roof",
        "Negative prompt: blurry, lowres",
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 42, Size: 1024x1024, "
        "Model: sdxl-base, Version: storydiff 0.1.0",
    ]


@pytest.mark.parametrize("negative", [None, "", "   "])
def test_a1111_without_negative(negative: str | None) -> None:
    text = a1111_parameters("prompt", negative, {"Steps": 4})
    assert text == "prompt\nSteps: 4"
    assert "Negative prompt" not in text


def test_a1111_skips_none_and_keeps_order() -> None:
    text = a1111_parameters("p", None, {"Seed": 1, "Model": None, "Steps": 2, "CFG scale": 7})
    assert text.splitlines()[-1] == "Seed: 1, Steps: 2, CFG scale: 7"


def test_a1111_quoting() -> None:
    text = a1111_parameters(
        "p",
        None,
        {"A": "x, y", "B": "k: v", "C": 'say "hi"', "D": "plain text", "E": UNICODE + ", x"},
    )
    last = text.splitlines()[-1]
    assert last == ('A: "x, y", B: "k: v", C: "say \\"hi\\"", D: plain text, E: "café 東京 🐱, x"')
    assert json.loads('"say \\"hi\\""') == 'say "hi"'


def test_a1111_no_settings_line_when_empty() -> None:
    assert a1111_parameters("p", "n", {}) == "p\nNegative prompt: n"
    assert a1111_parameters("p", None, {"Seed": None}) == "p"


# --------------------------------------------------------------------------------------------------
# save_png / read_png_metadata


def test_png_round_trip_unicode(tmp_path: Path) -> None:
    image = gradient()
    params = a1111_parameters(UNICODE, "négatif 🚫", {"Seed": 7, "Model": UNICODE})
    meta = {"story": UNICODE, "frame": 3, "nested": {"ü": ["東京", 1.5, None]}}
    out = tmp_path / "frame_003.png"

    save_png(image, out, params, meta)

    got_params, got_meta = read_png_metadata(out)
    assert got_params == params
    assert got_meta == meta
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.text["storydiff"] == json.dumps(meta, sort_keys=True, ensure_ascii=False)
        assert im.mode == "RGB"
        assert im.size == image.size
        assert list(im.getdata()) == list(image.getdata())
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_003.png"]


def test_save_png_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path / "f.png"
    save_png(solid((255, 0, 0)), out, "first", {"n": 1})
    save_png(solid((0, 0, 255)), out, "second", {"n": 2})
    assert read_png_metadata(out) == ("second", {"n": 2})
    with Image.open(out) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)
    assert leftovers(tmp_path) == []


def test_save_png_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def boom(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src).name)
        assert Path(src).exists()
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", boom)
    out = tmp_path / "f.png"
    with pytest.raises(OSError, match="disk on fire"):
        save_png(solid((1, 2, 3)), out, "p", {})
    assert len(seen) == 1
    assert seen[0].startswith(".") and seen[0].endswith(".tmp")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_png_failure_keeps_existing_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "f.png"
    save_png(solid((10, 20, 30)), out, "old", {"v": "old"})
    before = out.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("nope")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        save_png(solid((200, 0, 0)), out, "new", {"v": "new"})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_save_png_unserialisable_metadata_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "f.png"
    with pytest.raises(TypeError):
        save_png(solid((0, 0, 0)), out, "p", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_save_png_keeps_alpha_and_converts_cmyk(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 40))
    save_png(rgba, tmp_path / "a.png", "p", {})
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "RGBA"
        assert im.getpixel((0, 0)) == (10, 20, 30, 40)
    save_png(Image.new("CMYK", (8, 8)), tmp_path / "c.png", "p", {})
    with Image.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB"


def test_read_png_without_chunks(tmp_path: Path) -> None:
    out = tmp_path / "plain.png"
    solid((5, 5, 5)).save(out)
    assert read_png_metadata(out) == (None, None)


def test_read_png_bad_json(tmp_path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    for name, raw in [("bad.png", "{not json"), ("list.png", "[1, 2]")]:
        info = PngInfo()
        info.add_itxt("parameters", "p")
        info.add_itxt("storydiff", raw)
        solid((5, 5, 5)).save(tmp_path / name, pnginfo=info)
        assert read_png_metadata(tmp_path / name) == ("p", None)


def test_read_png_plain_text_chunks(tmp_path: Path) -> None:
    """Files written by other tools (tEXt, as A1111 writes them) are read too."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a1111 text")
    info.add_text("storydiff", '{"k": 1}', zip=True)
    solid((5, 5, 5)).save(tmp_path / "t.png", pnginfo=info)
    assert read_png_metadata(tmp_path / "t.png") == ("a1111 text", {"k": 1})


def test_read_corrupt_file_raises_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match=r"corrupt\.png"):
        read_png_metadata(bad)


def test_read_truncated_png_raises_value_error(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    save_png(gradient((128, 128)), good, "p", {"a": 1})
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.png"):
        read_png_metadata(cut)


def test_read_missing_file_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.png"):
        read_png_metadata(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------------
# atomic helpers


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    target = tmp_path / "story.json"
    atomic_write_text(target, UNICODE + "\n")
    assert target.read_bytes() == (UNICODE + "\n").encode("utf-8")
    atomic_write_bytes(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []


def test_atomic_write_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "x.bin", b"x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_cleans_up_on_fsync_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_render_reexports_atomic_helpers() -> None:
    assert render.atomic_write_bytes is atomic.atomic_write_bytes
    assert render.atomic_write_text is atomic.atomic_write_text


# --------------------------------------------------------------------------------------------------
# make_grid


def caption_size(width: int) -> int:
    return max(10, width // 24)


def caption_metrics(width: int) -> tuple[int, int]:
    """(padding, line height) as documented in captions.caption_metrics (shipped font metrics)."""
    size = caption_size(width)
    ascent, descent = ImageFont.truetype(render.CAPTION_FONT_PATH, size).getmetrics()
    return max(4, size // 4), ascent + descent + max(2, size // 6)


def band_height(lines: int, width: int = W) -> int:
    pad, line_h = caption_metrics(width)
    return 2 * pad + lines * line_h


def cell_origin(
    index: int, cols: int, row_bands: list[int], w: int = W, h: int = H
) -> tuple[int, int]:
    r, c = divmod(index, cols)
    return GAP + c * (w + GAP), GAP + sum(h + b + GAP for b in row_bands[:r])


def region(page: Image.Image, box: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
    return list(page.crop(box).getdata())


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


@pytest.mark.parametrize(("count", "cols", "rows"), [(1, 1, 1), (3, 3, 1), (5, 3, 2)])
def test_grid_size_without_captions(count: int, cols: int, rows: int) -> None:
    page = make_grid([solid(c) for c in COLORS[:count]], [None] * count)
    assert page.mode == "RGB"
    assert page.size == (cols * W + (cols + 1) * GAP, rows * H + (rows + 1) * GAP)
    # Frames in story order, row-major, with white gaps.
    for i, color in enumerate(COLORS[:count]):
        x, y = cell_origin(i, cols, [0] * rows)
        assert page.getpixel((x + W // 2, y + H // 2)) == color
        assert page.getpixel((x, y)) == color
        assert page.getpixel((x + W - 1, y + H - 1)) == color
        assert page.getpixel((x - 1, y)) == WHITE
    assert page.getpixel((0, 0)) == WHITE


@pytest.mark.parametrize(("count", "cols", "rows"), [(1, 1, 1), (3, 3, 1), (5, 3, 2)])
def test_grid_size_with_fixed_caption_height(count: int, cols: int, rows: int) -> None:
    captions = [f"frame {i}" for i in range(count)]
    page = make_grid([solid(c) for c in COLORS[:count]], captions, caption_height=20)
    assert page.size == (cols * W + (cols + 1) * GAP, rows * (H + 20) + (rows + 1) * GAP)
    for i, color in enumerate(COLORS[:count]):
        x, y = cell_origin(i, cols, [20] * rows)
        assert page.getpixel((x + W // 2, y + H // 2)) == color


@pytest.mark.parametrize(("count", "cols", "rows"), [(1, 1, 1), (3, 3, 1), (5, 3, 2)])
def test_grid_size_with_auto_captions(count: int, cols: int, rows: int) -> None:
    page = make_grid([solid(c) for c in COLORS[:count]], ["Hi"] * count)
    band = band_height(1)
    assert page.size == (cols * W + (cols + 1) * GAP, rows * (H + band) + (rows + 1) * GAP)


def test_grid_custom_gap_and_columns() -> None:
    page = make_grid([solid(c) for c in COLORS], [None] * 5, columns=2, gap=0)
    assert page.size == (2 * W, 3 * H)
    assert page.getpixel((W + 1, 2 * H + 1)) == WHITE  # empty sixth cell
    assert page.getpixel((1, 2 * H + 1)) == COLORS[4]
    # columns larger than the frame count is capped.
    assert make_grid([solid(COLORS[0])] * 2, [None, None], columns=6, gap=0).size == (2 * W, H)


def test_default_columns() -> None:
    got = {n: default_columns(n) for n in range(1, 14)}
    assert got == {1: 1, 2: 2, 3: 3, 4: 4, 5: 3, 6: 3, 7: 4, 8: 4, 9: 3, 10: 4, 11: 4, 12: 4, 13: 4}


def test_grid_long_caption_wraps_and_grows_band() -> None:
    short = make_grid([solid(COLORS[0], (192, 128))], ["A short one"])
    text = "The little fox walks through the quiet snowy forest at dawn looking for its friend"
    long = make_grid([solid(COLORS[0], (192, 128))], [text])
    pad, line_h = caption_metrics(192)
    short_band = short.height - 128 - 2 * GAP
    long_band = long.height - 128 - 2 * GAP
    assert short_band == 2 * pad + line_h
    assert long_band > short_band
    assert (long_band - 2 * pad) % line_h == 0
    assert (long_band - 2 * pad) // line_h >= 3
    assert long.width == short.width == 192 + 2 * GAP


def test_grid_wrap_respects_frame_width() -> None:
    fonts = caption_fonts.font_chain(caption_size(192))
    font = ImageFont.truetype(render.CAPTION_FONT_PATH, caption_size(192))
    sentence = "The little fox walks through the quiet snowy forest at dawn"
    words = sentence.split()
    lines = captions.wrap_text(sentence, fonts, 180)
    assert len(lines) > 1
    assert " ".join(lines).split() == words
    # ASCII is measured with the shipped font alone.
    assert all(fonts.length(line) == font.getlength(line) <= 180 for line in lines)
    # A single unbreakable word (no spaces, e.g. CJK) is split by characters.
    pieces = captions.wrap_text("x" * 200, fonts, 50)
    assert "".join(pieces) == "x" * 200 and all(font.getlength(p) <= 50 for p in pieces)
    # ... but never between a letter and its combining accent.
    pieces = captions.wrap_text("e\u0301" * 60, fonts, 30)
    assert "".join(pieces) == "e\u0301" * 60 and len(pieces) > 1
    assert all(p.startswith("e") for p in pieces)


def test_grid_caption_drawn_only_for_captioned_frame() -> None:
    page = make_grid([solid(COLORS[0]), solid(COLORS[1])], ["Hello world", None])
    band = band_height(1)
    assert page.size == (2 * W + 3 * GAP, H + band + 2 * GAP)
    (x0, y0), (x1, y1) = cell_origin(0, 2, [band]), cell_origin(1, 2, [band])
    captioned = region(page, (x0, y0 + H, x0 + W, y0 + H + band))
    uncaptioned = region(page, (x1, y1 + H, x1 + W, y1 + H + band))
    assert any(max(px) < 128 for px in captioned)
    assert all(px == WHITE for px in uncaptioned)


def test_grid_rows_get_own_band_heights() -> None:
    """A row without captions has no band; a blank caption counts as none."""
    page = make_grid([solid(c) for c in COLORS[:2]], ["Caption", "  "], columns=1)
    band = band_height(1)
    assert page.size == (W + 2 * GAP, 2 * H + band + 3 * GAP)
    x, y = cell_origin(1, 1, [band, 0])
    assert page.getpixel((x + 1, y + 1)) == COLORS[1]


def test_grid_fixed_band_clips_overflow() -> None:
    text = "word " * 60
    page = make_grid(
        [solid(COLORS[0]), solid(COLORS[1])], [text, None], columns=1, caption_height=12
    )
    assert page.size == (W + 2 * GAP, 2 * (H + 12) + 3 * GAP)
    # The gap below the first band and the second frame are untouched by the overflowing text.
    x, y = cell_origin(1, 1, [12, 12])
    assert all(px == WHITE for px in region(page, (x, y - GAP, x + W, y)))
    assert all(px == COLORS[1] for px in region(page, (x, y, x + W, y + H)))


def test_grid_no_captions_no_bands() -> None:
    page = make_grid([solid(COLORS[0])] * 2, [None, ""], caption_height=30)
    assert page.size == (2 * W + 3 * GAP, H + 2 * GAP)


def test_grid_resizes_other_sizes() -> None:
    big = solid(COLORS[2], (200, 100))
    page = make_grid([solid(COLORS[0]), big], [None, None])
    assert page.size == (2 * W + 3 * GAP, H + 2 * GAP)
    x, y = cell_origin(1, 2, [0])
    assert region(page, (x, y, x + W, y + H)) == [COLORS[2]] * (W * H)
    assert page.getpixel((x + W, y)) == WHITE


def test_grid_flattens_alpha_and_modes() -> None:
    clear = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    grey = Image.new("L", (W, H), 100)
    page = make_grid([clear, grey], [None, None], gap=0)
    assert page.mode == "RGB"
    assert page.getpixel((1, 1)) == WHITE
    assert page.getpixel((W + 1, 1)) == (100, 100, 100)


def test_grid_errors() -> None:
    with pytest.raises(ValueError):
        make_grid([], [])
    with pytest.raises(ValueError, match="captions"):
        make_grid([solid(COLORS[0])], [None, "x"])
    with pytest.raises(ValueError, match="captions"):
        make_grid([solid(COLORS[0])] * 2, ["x"])
    with pytest.raises(ValueError):
        make_grid([solid(COLORS[0])], [None], columns=0)
    with pytest.raises(ValueError):
        make_grid([solid(COLORS[0])], [None], gap=-1)
    with pytest.raises(ValueError):
        make_grid([solid(COLORS[0])], ["x"], caption_height=-1)


# --------------------------------------------------------------------------------------------------
# Caption fonts: the shipped Noto Sans, per-character fallback, uncovered_characters

INTERNATIONAL = ["café", "niño", "straße", "—", "Ελλάδα", "Москва"]
MISSING = "\ue000"  # private use: no glyph in the shipped font (nor in ordinary system fonts)


@pytest.fixture
def shipped_font_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a clean CI machine has: no system fallback fonts, only the shipped one."""
    monkeypatch.setattr(caption_fonts, "_system_font_files", lambda: ())


def caption_band(caption: str, width: int = W) -> Image.Image:
    """The caption band under a single frame ``width`` pixels wide."""
    page = make_grid([solid(COLORS[0], (width, H))], [caption])
    return page.crop((GAP, GAP + H, GAP + width, page.height - GAP))


def test_shipped_font_and_licence_are_in_the_package() -> None:
    path = Path(render.__file__).parent.parent / "fonts" / "NotoSans-Regular.ttf"
    assert path.resolve() == render.CAPTION_FONT_PATH
    assert 100_000 < path.stat().st_size < 1_000_000
    assert ImageFont.truetype(path, 12).getname() == ("Noto Sans", "Regular")
    licence = (path.parent / "OFL.txt").read_text(encoding="utf-8")
    assert "SIL OPEN FONT LICENSE" in licence and "Version 1.1" in licence
    assert "Copyright 2015 Google LLC" in licence


def test_cmap_reader_agrees_with_freetype() -> None:
    """The cmap coverage (fontTools) says 'covered' exactly where FreeType finds a real glyph."""
    coverage = caption_fonts.font_coverage(str(render.CAPTION_FONT_PATH), 0)
    # BASIC layout looks glyphs up directly (no shaping that hides or substitutes characters).
    font = ImageFont.truetype(render.CAPTION_FONT_PATH, 12, layout_engine=ImageFont.Layout.BASIC)

    def mask(ch: str) -> tuple[tuple[int, int], bytes]:
        m = font.getmask(ch)
        return m.size, bytes(m)

    notdef = mask(MISSING)
    codes = [*range(0x20, 0x600), *range(0x1E00, 0x2100), *range(0xE000, 0xE010), 0x4E2D]
    disagree = [hex(c) for c in codes if (c in coverage) != (mask(chr(c)) != notdef)]
    assert disagree == []
    assert all(ord(ch) in coverage for ch in "éñßÖ—“”…ΕλЖМ")
    assert ord("中") not in coverage and ord(MISSING) not in coverage


@pytest.mark.usefixtures("shipped_font_only")
def test_grid_draws_accents_greek_cyrillic_and_punctuation() -> None:
    coverage = caption_fonts.font_coverage(str(render.CAPTION_FONT_PATH), 0)
    box = caption_band(MISSING)  # what a character without a glyph looks like (.notdef)
    assert any(max(px) < 128 for px in box.getdata())
    for caption in INTERNATIONAL:
        assert all(ord(ch) in coverage for ch in caption), caption
        band = caption_band(caption)
        assert any(max(px) < 128 for px in band.getdata()), caption
        for ch in caption:
            assert caption_band(ch).tobytes() != box.tobytes(), f"{ch!r} drawn as a box"
    # The band is exactly the shipped font's rendering, at the documented position.
    size = caption_size(W)
    pad, _ = caption_metrics(W)
    font = ImageFont.truetype(render.CAPTION_FONT_PATH, size)
    expected = Image.new("RGB", (W, band_height(1)), WHITE)
    x = (W - font.getlength("Москва")) / 2
    draw = ImageDraw.Draw(expected)
    draw.text((x, pad + font.getmetrics()[0]), "Москва", font=font, fill=(0, 0, 0), anchor="ls")
    assert caption_band("Москва").tobytes() == expected.tobytes()


@pytest.mark.usefixtures("shipped_font_only")
def test_uncovered_characters_shipped_font() -> None:
    texts = ["café Жук", f"{MISSING} x \ue001", MISSING, " \t\n", "👍\ufe0f a\u200db", "中文"]
    assert render.uncovered_characters(texts) == sorted([MISSING, "\ue001", "👍", "中", "文"])
    assert render.uncovered_characters(INTERNATIONAL) == []
    assert render.uncovered_characters([]) == []


def test_uncovered_characters_with_system_fonts() -> None:
    got = render.uncovered_characters(["café", "Жук", MISSING, "e\u0301"])
    assert MISSING in got
    assert not {"é", "Ж", "c", "e", "\u0301"} & set(got)


def system_has_cjk_font() -> bool:
    """Independently of the fallback search: does fontconfig list a Chinese font, or is one at
    one of the usual places?"""
    fc_list = shutil.which("fc-list")
    if fc_list:
        listed = subprocess.run([fc_list, ":lang=zh", "file"], capture_output=True, check=False)
        if listed.stdout.strip():
            return True
    return any(path.is_file() for path in caption_fonts._well_known_cjk_fonts())


def test_cjk_uses_a_system_font_or_is_reported() -> None:
    """Either way the outcome is checked: drawn with a system CJK font, or reported as missing."""
    box = caption_band(MISSING)
    han = caption_band("中")
    if system_has_cjk_font():
        assert render.uncovered_characters(["中文"]) == []
        assert han.tobytes() != box.tobytes()
        assert any(max(px) < 128 for px in han.getdata())
    else:
        assert render.uncovered_characters(["中文"]) == ["中", "文"]
        assert han.tobytes() == box.tobytes()  # the shipped font's missing-glyph box


def test_font_chain_runs_pick_first_covering_font() -> None:
    """Per-character fallback: each run goes to the first font with its glyphs; marks and
    joiners stay in their run; invisible characters no font has are dropped."""
    base = ImageFont.truetype(render.CAPTION_FONT_PATH, 20)
    CaptionFont, Coverage = caption_fonts.CaptionFont, caption_fonts.Coverage
    latin = CaptionFont(base, Coverage((0x20, 0x61), (0x20, 0x7A)))
    other = CaptionFont(base, Coverage((0x30, 0x61, 0x300), (0x39, 0x7A, 0x301)))
    chain = caption_fonts.FontChain([latin, other])
    runs = [(fonts is other, text) for fonts, text in chain.runs("ab 12\u0301c\u200d d\ue000")]
    assert runs == [(False, "ab "), (True, "12\u0301"), (False, "c d\ue000")]
    assert chain.length("ab 12c") == pytest.approx(base.getlength("ab ") + base.getlength("12c"))
    assert chain.covers("5") and not chain.covers("\ue000")


def test_scaled_bitmap_font_is_measured_and_drawn_scaled() -> None:
    """Bitmap-only fonts (colour emoji) open at a fixed strike size and are scaled to fit."""
    big = ImageFont.truetype(render.CAPTION_FONT_PATH, 80)
    coverage = caption_fonts.font_coverage(str(render.CAPTION_FONT_PATH), 0)
    chain = caption_fonts.FontChain([caption_fonts.CaptionFont(big, coverage, 0.25)])
    assert chain.length("Hello") == pytest.approx(big.getlength("Hello") / 4)
    band = Image.new("RGB", (100, 40), WHITE)
    chain.draw(band, 10, 0, "Hello")
    ink = band.convert("L").point(lambda v: 255 if v < 128 else 0).getbbox()
    assert ink is not None
    left, top, right, bottom = ink
    assert left >= 9 and right <= 10 + chain.length("Hello") + 2
    assert bottom <= chain.ascent + 2 and bottom - top < 20
