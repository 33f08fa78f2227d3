"""Output rendering: PNG files with embedded metadata, and the captioned contact-sheet grid.

Pillow + stdlib only (no torch), so it can be imported and tested anywhere.

Grid layout (``make_grid``), with ``w x h`` the first frame's size, ``g`` the gap, ``C`` columns,
``R = ceil(n / C)`` rows and ``B_r`` the caption-band height of row ``r``::

    page width  = C * w + (C + 1) * g
    page height = R * h + sum(B_r) + (R + 1) * g

i.e. ``g`` pixels around the page border and between neighbouring cells; a cell is the frame with
its caption band directly below it (no gap between frame and band). Frame ``i`` sits at row
``i // C``, column ``i % C``, its top-left corner at
``x = g + col * (w + g)``, ``y = g + row * g + sum(h + B_k for k < row)``.
"""

from __future__ import annotations

import bisect
import functools
import io
import json
import math
import os
import shutil
import struct
import subprocess
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from storycli.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "CAPTION_FONT_PATH",
    "a1111_parameters",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_columns",
    "make_grid",
    "read_png_metadata",
    "save_png",
    "uncovered_characters",
]

PARAMETERS_KEY = "parameters"
STORYDIFF_KEY = "storydiff"

_MAX_DEFAULT_COLUMNS = 4
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


# --------------------------------------------------------------------------------------------------
# A1111 infotext


def _quote(value: object) -> str:
    """A1111's quoting: JSON-quote values containing ``,``, ``:``, ``"`` or a newline."""
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(prompt: str, negative: str | None, settings: dict[str, object]) -> str:
    """Build A1111-style infotext (what A1111 stores in a PNG's ``parameters`` chunk).

    Line 1 is the prompt; then ``Negative prompt: ...`` only when ``negative`` is not empty or
    blank; the last line is ``Key: value`` pairs joined with ``", "`` in ``settings`` order, with
    ``None`` values skipped and values quoted as A1111 does. When no setting is left, there is no
    settings line.
    """
    lines = [prompt]
    if negative and negative.strip():
        lines.append(f"Negative prompt: {negative}")
    pairs = [f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# PNG write / read


def save_png(image: Image.Image, path: Path, parameters: str, storydiff: dict[str, object]) -> None:
    """Atomically write ``image`` as a PNG at ``path`` with ``parameters`` and ``storydiff`` chunks.

    Both are stored as iTXt chunks (UTF-8), so any text round-trips; ``storydiff`` is stored as
    ``json.dumps(storydiff, sort_keys=True, ensure_ascii=False)``. The PNG is encoded in memory
    and written with :func:`storycli.atomic.atomic_write_bytes`: on failure ``path`` is left as
    it was and no temp file remains. Modes PNG cannot store (e.g. CMYK) are converted to RGB.
    """
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters)
    info.add_itxt(STORYDIFF_KEY, json.dumps(storydiff, sort_keys=True, ensure_ascii=False))
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def read_png_metadata(path: Path) -> tuple[str | None, dict[str, object] | None]:
    """Return ``(parameters, storydiff)`` read from an image written by :func:`save_png`.

    Either is ``None`` when its chunk is missing; ``storydiff`` is also ``None`` when the chunk is
    not valid JSON or not a JSON object. Raises ``ValueError`` naming the file when it is missing
    or not a readable image.
    """
    try:
        with Image.open(path) as im:
            # PngImageFile.text also finds text chunks placed after the image data (it decodes
            # the image to get there, which also catches truncated files). Note that
            # UnidentifiedImageError is an OSError.
            chunks = getattr(im, "text", None)
            if chunks is None:
                im.load()
                chunks = im.info
            chunks = dict(chunks)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{os.fspath(path)}: not a readable image ({exc})") from exc

    parameters = chunks.get(PARAMETERS_KEY)
    if not isinstance(parameters, str):
        parameters = None
    storydiff = None
    raw = chunks.get(STORYDIFF_KEY)
    if isinstance(raw, str):
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            storydiff = decoded
    return parameters, storydiff


# --------------------------------------------------------------------------------------------------
# Grid


def default_columns(count: int) -> int:
    """Default grid columns for ``count`` frames: at most 4, fewest rows, rows balanced.

    ``rows = ceil(count / 4)`` and ``columns = ceil(count / rows)``: 1-4 frames are one row;
    5 -> 3+2, 6 -> 3+3, 7 -> 4+3, 8 -> 4+4, 9 -> 3x3, 10 -> 4+4+2, 12 -> 4x3.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    rows = math.ceil(count / _MAX_DEFAULT_COLUMNS)
    return math.ceil(count / rows)


# Caption fonts.
#
# Captions are drawn with Noto Sans Regular, shipped in storycli/fonts (SIL OFL 1.1, ~0.5 MB): it
# covers Latin (incl. extended), Greek, Cyrillic and general punctuation on every machine. A
# character it lacks is drawn with the first system font that has it (the system sans-serif,
# then CJK, then emoji fonts). CJK fonts are 15-20 MB each (emoji ~10 MB), many times the rest
# of the package, so they are not shipped: CJK captions need a CJK font on the machine, and
# without one those characters are reported by uncovered_characters and drawn as boxes.
#
# Coverage is read from each font's own 'cmap' table (character -> glyph map) with a small
# reader below, not guessed from rendered pixels: comparing a glyph's mask with the .notdef box
# misfires on empty glyphs (spaces, combining marks), on fonts whose .notdef is blank, and on
# bitmap emoji fonts that cannot render at arbitrary sizes; the cmap is exact and Pillow-free.

CAPTION_FONT_PATH = Path(__file__).resolve().parent.parent / "fonts" / "NotoSans-Regular.ttf"

_BLACK = (0, 0, 0)
# Size used by uncovered_characters: coverage does not depend on size, a font just has to open.
_PROBE_SIZE = 16
# Strike sizes of common bitmap colour-emoji fonts (Noto Color Emoji: 109; Apple: 20-160), which
# FreeType refuses to open at any other size; such a font is drawn at its strike and scaled.
_BITMAP_SIZES = (109, 160, 136, 128, 96, 64, 48, 40, 32, 26, 20)
# fontconfig queries for fallbacks, best first: the default sans (symbols, arrows, other
# scripts), CJK fonts (Simplified Chinese first: its Han set is the largest), then emoji.
_FC_PATTERNS = (
    "sans-serif",
    "sans-serif:lang=zh-cn",
    "sans-serif:lang=ja",
    "sans-serif:lang=ko",
    "sans-serif:lang=zh-tw",
    "emoji",
    ":lang=und-zsye",
)
_FC_TIMEOUT_S = 10
_SFNT_VERSIONS = (b"\x00\x01\x00\x00", b"OTTO", b"true")


def _windows_fonts() -> Path:
    return Path(os.environ.get("WINDIR", "C:/Windows")) / "Fonts"


def _well_known_cjk_fonts() -> list[Path]:
    """CJK font files at their usual places (Linux distributions, macOS, Windows)."""
    linux_noto = [
        Path(f"/usr/share/fonts/{folder}/NotoSansCJK-Regular.ttc")
        for folder in ("opentype/noto", "noto-cjk", "google-noto-cjk", "opentype/noto-cjk")
    ]
    return [
        *linux_noto,
        Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
        Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
        Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
        Path("/System/Library/Fonts/PingFang.ttc"),
        Path("/System/Library/Fonts/Hiragino Sans GB.ttc"),
        Path("/System/Library/Fonts/AppleSDGothicNeo.ttc"),
        _windows_fonts() / "msyh.ttc",
        _windows_fonts() / "YuGothR.ttc",
        _windows_fonts() / "malgun.ttf",
    ]


def _well_known_fonts() -> list[Path]:
    """Fallback font files at their usual places, for machines without fontconfig (macOS,
    Windows, minimal Linux images): CJK, then broad symbol fonts, then emoji; face 0 of
    collections."""
    windows = _windows_fonts()
    return [
        *_well_known_cjk_fonts(),
        Path("/System/Library/Fonts/Supplemental/Arial Unicode.ttf"),
        Path("/Library/Fonts/Arial Unicode.ttf"),
        windows / "seguisym.ttf",
        Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
        Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
        Path("/usr/share/fonts/google-noto-color-emoji/NotoColorEmoji.ttf"),
        Path("/System/Library/Fonts/Apple Color Emoji.ttc"),
        windows / "seguiemj.ttf",
    ]


def _fc_match(fc_match: str, pattern: str) -> tuple[str, int] | None:
    try:
        done = subprocess.run(
            [fc_match, "-f", r"%{file}\n%{index}\n", pattern],
            capture_output=True,
            timeout=_FC_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = os.fsdecode(done.stdout).splitlines()
    if done.returncode != 0 or len(lines) < 2 or not lines[0] or not lines[1].isdigit():
        return None
    return lines[0], int(lines[1])


@functools.lru_cache(maxsize=1)
def _system_font_files() -> tuple[tuple[str, int], ...]:
    """Fallback fonts on this machine as ``(path, face index)``, best first; found once."""
    found: list[tuple[str, int]] = []
    fc_match = shutil.which("fc-match")
    if fc_match:
        found += [m for m in (_fc_match(fc_match, p) for p in _FC_PATTERNS) if m is not None]
    found += [(str(path), 0) for path in _well_known_fonts() if path.is_file()]
    return tuple(dict.fromkeys(found))


def _font_files() -> tuple[tuple[str, int], ...]:
    """Caption fonts in fallback order: the shipped font, then the system fallbacks."""
    return ((str(CAPTION_FONT_PATH), 0), *_system_font_files())


def _read_cmap_table(path: str, index: int) -> bytes:
    """The raw 'cmap' table of face ``index`` of a TrueType/OpenType font or collection."""
    with open(path, "rb") as f:
        header = f.read(12)
        if header[:4] == b"ttcf":
            (faces,) = struct.unpack_from(">I", header, 8)
            if not 0 <= index < faces:
                raise ValueError(f"{path}: no face {index}")
            f.seek(12 + 4 * index)
            (start,) = struct.unpack(">I", f.read(4))
            f.seek(start)
            header = f.read(12)
        elif index != 0:
            raise ValueError(f"{path}: not a font collection")
        if header[:4] not in _SFNT_VERSIONS:  # e.g. WOFF, Type 1 or bitmap (PCF) fonts
            raise ValueError(f"{path}: not a TrueType/OpenType font")
        (tables,) = struct.unpack_from(">H", header, 4)
        records = f.read(16 * tables)
        for k in range(tables):
            tag, _checksum, offset, length = struct.unpack_from(">4sIII", records, 16 * k)
            if tag == b"cmap":
                f.seek(offset)  # table offsets count from the file start, in collections too
                return f.read(length)
    raise ValueError(f"{path}: no cmap table")


def _subtable_ranges(data: bytes, off: int) -> list[tuple[int, int]]:
    """Inclusive code point ranges one cmap subtable maps to a glyph other than .notdef (0)."""
    (fmt,) = struct.unpack_from(">H", data, off)
    out: list[tuple[int, int]] = []
    if fmt == 4:  # BMP segments: every font has one
        seg_x2 = struct.unpack_from(">H", data, off + 6)[0]
        n = seg_x2 // 2
        ends = struct.unpack_from(f">{n}H", data, off + 14)
        starts = struct.unpack_from(f">{n}H", data, off + 16 + seg_x2)
        deltas = struct.unpack_from(f">{n}H", data, off + 16 + 2 * seg_x2)
        ro_at = off + 16 + 3 * seg_x2
        range_offsets = struct.unpack_from(f">{n}H", data, ro_at)
        for k in range(n):
            start, end = starts[k], min(ends[k], 0xFFFE)  # 0xFFFF ends the table, no glyph
            if start > end:
                continue
            if range_offsets[k] == 0:  # glyph = code + delta: .notdef for at most one code
                zero = -deltas[k] & 0xFFFF
                if start <= zero <= end:
                    out += [(a, b) for a, b in ((start, zero - 1), (zero + 1, end)) if a <= b]
                else:
                    out.append((start, end))
                continue
            # Otherwise glyph ids come from glyphIdArray, addressed relative to this offset.
            at = ro_at + 2 * k + range_offsets[k]
            glyphs = struct.unpack_from(f">{end - start + 1}H", data, at)
            out += [
                (start + i, start + i)
                for i, g in enumerate(glyphs)
                if g and (g + deltas[k]) & 0xFFFF
            ]
    elif fmt in (12, 13):  # 32-bit groups (astral planes: emoji, CJK extension B...)
        (groups,) = struct.unpack_from(">I", data, off + 12)
        for k in range(groups):
            start, end, glyph = struct.unpack_from(">III", data, off + 16 + 12 * k)
            if glyph == 0:
                if fmt == 13:  # format 13 maps the whole group to one glyph
                    continue
                start += 1  # format 12 counts up from the first glyph: only `start` is .notdef
            if start <= end:
                out.append((start, min(end, 0x10FFFF)))
    elif fmt == 0:  # legacy single-byte table
        out += [(c, c) for c, g in enumerate(data[off + 6 : off + 262]) if g]
    elif fmt == 6:  # trimmed table
        first, count = struct.unpack_from(">HH", data, off + 6)
        glyphs = struct.unpack_from(f">{count}H", data, off + 10)
        out += [(first + i, first + i) for i, g in enumerate(glyphs) if g]
    return out


def _cmap_ranges(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Merged ``(starts, ends)`` of the code points the Unicode cmap subtables map to a glyph."""
    (count,) = struct.unpack_from(">H", data, 2)
    ranges: list[tuple[int, int]] = []
    seen: set[int] = set()
    for k in range(count):
        platform, encoding, offset = struct.unpack_from(">HHI", data, 4 + 8 * k)
        # Unicode platform (encoding 5 is variation sequences, not a map) or Windows BMP/full.
        is_unicode = (platform == 0 and encoding != 5) or (platform == 3 and encoding in (1, 10))
        if not is_unicode or offset in seen:
            continue
        seen.add(offset)
        try:
            ranges += _subtable_ranges(data, offset)
        except struct.error:  # a truncated subtable: use the others
            continue
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(ranges):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return tuple(starts), tuple(ends)


class _Coverage:
    """The set of code points a font has glyphs for, as sorted inclusive ranges."""

    def __init__(self, starts: tuple[int, ...], ends: tuple[int, ...]) -> None:
        self.starts, self.ends = starts, ends

    def __contains__(self, code: int) -> bool:
        k = bisect.bisect_right(self.starts, code) - 1
        return k >= 0 and code <= self.ends[k]

    def __bool__(self) -> bool:
        return bool(self.starts)


@functools.cache
def _coverage(path: str, index: int) -> _Coverage:
    """Coverage of a font file, read once per process; raises OSError/ValueError/struct.error."""
    return _Coverage(*_cmap_ranges(_read_cmap_table(path, index)))


# Printable ASCII: what we assume of Pillow's built-in font (used only when the shipped one
# cannot be opened, e.g. Pillow without FreeType); it has no file to read a cmap from.
_ASCII = _Coverage((0x20,), (0x7E,))


def _invisible(ch: str) -> bool:
    """Format/control characters and variation selectors: drawn only by a font that has them,
    silently dropped otherwise (they have no visible glyph) and never reported as uncovered."""
    code = ord(ch)
    return (
        unicodedata.category(ch) in ("Cf", "Cc")
        or 0xFE00 <= code <= 0xFE0F
        or 0xE0100 <= code <= 0xE01EF
    )


def _joins_previous(ch: str) -> bool:
    """Combining marks and format characters (ZWJ, variation selectors) belong to the character
    before them: they stay in its font run and a word is never broken before them."""
    return unicodedata.category(ch) in ("Mn", "Mc", "Me", "Cf")


class _CaptionFont:
    """One font of the caption fallback chain at one size.

    ``scale`` is 1 except for bitmap-only fonts opened at a strike size: their runs are drawn at
    that size and resized, and measured scaled, so they match the caption size.
    """

    def __init__(self, font: _Font, coverage: _Coverage, scale: float = 1.0) -> None:
        self.font, self.coverage, self.scale = font, coverage, scale

    def covers(self, ch: str) -> bool:
        return ord(ch) in self.coverage

    def length(self, text: str) -> float:
        return self.font.getlength(text) * self.scale

    def draw(self, band: Image.Image, x: float, baseline: float, ascent: int, text: str) -> None:
        font = self.font
        if not isinstance(font, ImageFont.FreeTypeFont):  # bitmap font: no anchors, top-left
            ImageDraw.Draw(band).text((x, baseline - ascent), text, font=font, fill=_BLACK)
            return
        # embedded_color draws colour (emoji) glyphs in colour; plain fonts are unaffected.
        if self.scale == 1:
            ImageDraw.Draw(band).text(
                (x, baseline), text, font=font, fill=_BLACK, anchor="ls", embedded_color=True
            )
            return
        left, top, right, bottom = font.getbbox(text, anchor="ls")
        if right <= left or bottom <= top:
            return
        tile = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text(
            (-left, -top), text, font=font, fill=(0, 0, 0, 255), anchor="ls", embedded_color=True
        )
        size = (max(1, round(tile.width * self.scale)), max(1, round(tile.height * self.scale)))
        tile = tile.resize(size, Image.Resampling.LANCZOS)
        band.paste(tile, (round(x + left * self.scale), round(baseline + top * self.scale)), tile)


def _open_font(path: str, index: int, size: int) -> _CaptionFont | None:
    """``path`` at ``size`` pixels, or None when it cannot be read or opened."""
    try:
        coverage = _coverage(path, index)
    except (OSError, ValueError, struct.error):
        return None
    if not coverage:
        return None
    for opened_at in (size, *_BITMAP_SIZES):
        try:
            font = ImageFont.truetype(path, opened_at, index=index)
        except (OSError, ValueError, ImportError):  # ImportError: Pillow without FreeType
            continue
        return _CaptionFont(font, coverage, size / opened_at)
    return None


class _FontChain:
    """The caption fonts at one size: the primary (shipped) font first, then the fallbacks.

    Text is split into runs, each drawn and measured with the first font that has its
    characters, so wrapping and drawing agree. Line metrics are the primary font's.
    """

    def __init__(self, fonts: list[_CaptionFont]) -> None:
        self.fonts = fonts
        primary, scale = fonts[0].font, fonts[0].scale
        if isinstance(primary, ImageFont.FreeTypeFont):
            ascent, descent = primary.getmetrics()
            self.ascent, self.descent = round(ascent * scale), round(descent * scale)
        else:  # Pillow without FreeType: fixed-size bitmap font
            self.ascent, self.descent = int(primary.getbbox("Ag")[3]), 0

    def covers(self, ch: str) -> bool:
        return any(font.covers(ch) for font in self.fonts)

    def _font_for(self, ch: str, current: _CaptionFont | None) -> _CaptionFont | None:
        """The font that draws ``ch`` (None: drop it); ``current`` is the open run's font."""
        # Spaces are not sticky: they take the primary font's width (an emoji font's is huge).
        if current is not None and _joins_previous(ch) and current.covers(ch):
            return current
        for font in self.fonts:
            if font.covers(ch):
                return font
        if _invisible(ch):
            return None
        return self.fonts[0]  # no font has it: the primary draws its missing-glyph box

    def runs(self, text: str) -> list[tuple[_CaptionFont, str]]:
        runs: list[tuple[_CaptionFont, str]] = []
        for ch in text:
            font = self._font_for(ch, runs[-1][0] if runs else None)
            if font is None:
                continue
            if runs and runs[-1][0] is font:
                runs[-1] = (font, runs[-1][1] + ch)
            else:
                runs.append((font, ch))
        return runs

    def length(self, text: str) -> float:
        return sum(font.length(run) for font, run in self.runs(text))

    def draw(self, band: Image.Image, x: float, top: float, text: str) -> None:
        """Draw one line of ``text`` in black with its top-left at ``(x, top)``."""
        baseline = top + self.ascent
        for font, run in self.runs(text):
            font.draw(band, x, baseline, self.ascent, run)
            x += font.length(run)


@functools.lru_cache(maxsize=16)
def _load_chain(size: int, files: tuple[tuple[str, int], ...]) -> _FontChain:
    primary = _open_font(*files[0], size)
    if primary is None:  # broken install or no FreeType: still write a grid, ASCII only
        primary = _CaptionFont(ImageFont.load_default(size=size), _ASCII)
    fallbacks = [f for f in (_open_font(path, i, size) for path, i in files[1:]) if f is not None]
    return _FontChain([primary, *fallbacks])


def _font_chain(size: int) -> _FontChain:
    # Keyed by the font list too, so tests can swap the system fallbacks without stale caches.
    return _load_chain(size, _font_files())


def uncovered_characters(texts: Iterable[str]) -> list[str]:
    """Characters of ``texts`` that no caption font can draw (they show as boxes in the grid).

    Sorted and unique. Whitespace and invisible format characters (zero-width joiners,
    variation selectors, controls) are ignored. The fonts are those :func:`make_grid` uses: the
    shipped Noto Sans, then the system fallbacks (sans-serif, CJK, emoji) found on this machine.
    """
    chain = _font_chain(_PROBE_SIZE)
    chars = {ch for text in texts if text for ch in text}
    return sorted(
        ch for ch in chars if not ch.isspace() and not _invisible(ch) and not chain.covers(ch)
    )


def _caption_metrics(frame_width: int, size: int | None = None) -> tuple[_FontChain, int, int]:
    """Caption fonts, band padding and line height for frames ``frame_width`` pixels wide.

    Font size ``S = size`` when given, else ``max(10, frame_width // 24)``; padding
    ``max(4, S // 4)`` above and below the text and on either side; line height = the
    shipped font's ascent + descent + ``max(2, S // 6)`` (fallback fonts share its baseline).
    A band holding ``k`` lines is ``2 * padding + k * line_height`` pixels high.
    """
    size = size if size is not None else max(10, frame_width // 24)
    fonts = _font_chain(size)
    pad = max(4, size // 4)
    return fonts, pad, fonts.ascent + fonts.descent + max(2, size // 6)


def _break_word(word: str, fonts: _FontChain, max_width: float) -> list[str]:
    """Split a word wider than ``max_width`` into pieces that fit (at least one char each).

    Never splits before a combining mark or format character, nor after a zero-width joiner.
    """
    pieces: list[str] = []
    current = ""
    for ch in word:
        splittable = current and not _joins_previous(ch) and current[-1] != "\u200d"
        if splittable and fonts.length(current + ch) > max_width:
            pieces.append(current)
            current = ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _wrap(text: str, fonts: _FontChain, max_width: float) -> list[str]:
    """Greedy word wrap of ``text`` to ``max_width`` pixels; explicit newlines are kept."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        words = paragraph.split()
        if not words:
            continue
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if fonts.length(candidate) <= max_width:
                current = candidate
                continue
            if current:
                lines.append(current)
            if fonts.length(word) <= max_width:
                current = word
            else:
                *full, current = _break_word(word, fonts, max_width)
                lines.extend(full)
        if current:
            lines.append(current)
    return lines


def _flatten(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB copy of ``image`` at ``size``; transparency is composited onto white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def make_grid(
    images: list[Image.Image],
    captions: list[str | None],
    columns: int | None = None,
    caption_height: int | None = None,
    gap: int = 8,
) -> Image.Image:
    """Lay the frames out in story order (row-major) on one white RGB page, captions below each.

    ``columns`` defaults to :func:`default_columns` and is capped at ``len(images)``. Every frame
    is resized to the first frame's size. A caption is word-wrapped to the frame width and drawn
    in black, centred, in a white band under its frame, in the shipped Noto Sans; characters it
    lacks (CJK, emoji, ...) use system fonts that have them, and those no font has are drawn as
    boxes (see :func:`uncovered_characters`). The band of a row fits its longest wrapped
    caption (a row without captions gets no band), or is ``caption_height`` pixels for every
    row when given. Captions that are ``None`` or blank draw nothing; when no frame has a
    caption there are no bands at all. See the module docstring for the exact arithmetic.

    Raises ``ValueError`` for an empty list, ``captions`` of a different length than ``images``,
    ``columns < 1``, ``gap < 0`` or ``caption_height < 0``.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; they must match")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if caption_height is not None and caption_height < 0:
        raise ValueError(f"caption_height must be >= 0, got {caption_height}")

    count = len(images)
    cols = min(columns if columns is not None else default_columns(count), count)
    rows = math.ceil(count / cols)
    w, h = images[0].size

    texts = [c if c is not None and c.strip() else None for c in captions]
    fonts, pad, line_h = _caption_metrics(w)
    wrapped = [_wrap(t, fonts, max(1, w - 2 * pad)) if t else [] for t in texts]

    bands = [0] * rows
    if any(texts):
        for r in range(rows):
            row_lines = wrapped[r * cols : (r + 1) * cols]
            if caption_height is not None:
                bands[r] = caption_height
            elif any(row_lines):
                bands[r] = 2 * pad + max(len(lines) for lines in row_lines) * line_h

    page_w = cols * w + (cols + 1) * gap
    page_h = rows * h + sum(bands) + (rows + 1) * gap
    page = Image.new("RGB", (page_w, page_h), (255, 255, 255))

    row_tops = []
    y = gap
    for r in range(rows):
        row_tops.append(y)
        y += h + bands[r] + gap

    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * (w + gap), row_tops[r]
        page.paste(_flatten(image, (w, h)), (x0, y0))
        if wrapped[i] and bands[r] > 0:
            # Drawn on its own white tile, so text that does not fit a fixed band is clipped.
            band = Image.new("RGB", (w, bands[r]), (255, 255, 255))
            for k, line in enumerate(wrapped[i]):
                fonts.draw(band, (w - fonts.length(line)) / 2, pad + k * line_h, line)
            page.paste(band, (x0, y0 + h))
    return page
