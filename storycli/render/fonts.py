"""Caption fonts: the shipped Noto Sans, system fallback fonts in a fixed order, and which
characters each font covers.

Captions are drawn with Noto Sans Regular, shipped in storycli/fonts (SIL OFL 1.1, ~0.5 MB): it
covers Latin (incl. extended), Greek, Cyrillic and general punctuation on every machine. A
character it lacks is drawn with the first system font that has it (the system sans-serif,
then CJK, then emoji fonts). CJK fonts are 15-20 MB each (emoji ~10 MB), many times the rest
of the package, so they are not shipped: CJK captions need a CJK font on the machine, and
without one those characters are reported by uncovered_characters and drawn as boxes.

Coverage is read from each font's own 'cmap' table (character -> glyph map) with fontTools, not
guessed from rendered pixels: comparing a glyph's mask with the .notdef box misfires on empty
glyphs (spaces, combining marks), on fonts whose .notdef is blank, and on bitmap emoji fonts
that cannot render at arbitrary sizes; the cmap is exact and Pillow-free.
"""

from __future__ import annotations

import bisect
import functools
import os
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CAPTION_FONT_PATH",
    "CaptionFont",
    "Coverage",
    "FontChain",
    "font_chain",
    "font_coverage",
    "joins_previous",
    "uncovered_characters",
]

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

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


class Coverage:
    """The set of code points a font has glyphs for, as sorted inclusive ranges."""

    def __init__(self, starts: tuple[int, ...], ends: tuple[int, ...]) -> None:
        self.starts, self.ends = starts, ends

    @classmethod
    def of(cls, codes: Iterable[int]) -> Coverage:
        """The coverage of exactly ``codes``, merged into ranges."""
        starts: list[int] = []
        ends: list[int] = []
        for code in sorted(set(codes)):
            if ends and code == ends[-1] + 1:
                ends[-1] = code
            else:
                starts.append(code)
                ends.append(code)
        return cls(tuple(starts), tuple(ends))

    def __contains__(self, code: int) -> bool:
        k = bisect.bisect_right(self.starts, code) - 1
        return k >= 0 and code <= self.ends[k]

    def __bool__(self) -> bool:
        return bool(self.starts)


@functools.cache
def font_coverage(path: str, index: int) -> Coverage:
    """Code points face ``index`` of the TrueType/OpenType font (or collection) at ``path`` maps
    to a real glyph (not .notdef), from its best Unicode 'cmap' subtable; read once per process.

    Raises ``ValueError`` for a file that is not a TrueType/OpenType font or collection (e.g.
    WOFF, Type 1 or bitmap PCF fonts), an ``index`` it does not have, or a font without a
    Unicode cmap; ``OSError`` when it cannot be read.
    """
    from fontTools.ttLib import TTFont  # here: only caption drawing needs it (~0.1 s to import)

    with open(path, "rb") as f:
        if f.read(4) in (b"wOFF", b"wOF2"):  # web fonts: compressed, not for captions
            raise ValueError(f"{path}: not a TrueType/OpenType font")
    try:
        with TTFont(path, fontNumber=index, lazy=True) as font:
            if index != 0 and not hasattr(font.reader, "numFonts"):
                raise ValueError(f"{path}: not a font collection")
            cmap = font.getBestCmap()
            if cmap is None:
                raise ValueError(f"{path}: no Unicode cmap table")
            notdef = font.getGlyphOrder()[0]
            return Coverage.of(c for c, g in cmap.items() if g != notdef and c <= 0x10FFFF)
    except OSError:
        raise
    except Exception as exc:  # fontTools raises many kinds on damaged or unusual files
        raise ValueError(f"{path}: unreadable font ({exc})") from exc


# Printable ASCII: what we assume of Pillow's built-in font (used only when the shipped one
# cannot be opened, e.g. Pillow without FreeType); it has no file to read a cmap from.
_ASCII = Coverage((0x20,), (0x7E,))


def _invisible(ch: str) -> bool:
    """Format/control characters and variation selectors: drawn only by a font that has them,
    silently dropped otherwise (they have no visible glyph) and never reported as uncovered."""
    code = ord(ch)
    return (
        unicodedata.category(ch) in ("Cf", "Cc")
        or 0xFE00 <= code <= 0xFE0F
        or 0xE0100 <= code <= 0xE01EF
    )


def joins_previous(ch: str) -> bool:
    """Combining marks and format characters (ZWJ, variation selectors) belong to the character
    before them: they stay in its font run and a word is never broken before them."""
    return unicodedata.category(ch) in ("Mn", "Mc", "Me", "Cf")


class CaptionFont:
    """One font of the caption fallback chain at one size.

    ``scale`` is 1 except for bitmap-only fonts opened at a strike size: their runs are drawn at
    that size and resized, and measured scaled, so they match the caption size.
    """

    def __init__(self, font: _Font, coverage: Coverage, scale: float = 1.0) -> None:
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


def _open_font(path: str, index: int, size: int) -> CaptionFont | None:
    """``path`` at ``size`` pixels, or None when it cannot be read or opened."""
    try:
        coverage = font_coverage(path, index)
    except (OSError, ValueError):
        return None
    if not coverage:
        return None
    for opened_at in (size, *_BITMAP_SIZES):
        try:
            font = ImageFont.truetype(path, opened_at, index=index)
        except (OSError, ValueError, ImportError):  # ImportError: Pillow without FreeType
            continue
        return CaptionFont(font, coverage, size / opened_at)
    return None


class FontChain:
    """The caption fonts at one size: the primary (shipped) font first, then the fallbacks.

    Text is split into runs, each drawn and measured with the first font that has its
    characters, so wrapping and drawing agree. Line metrics are the primary font's.
    """

    def __init__(self, fonts: list[CaptionFont]) -> None:
        self.fonts = fonts
        primary, scale = fonts[0].font, fonts[0].scale
        if isinstance(primary, ImageFont.FreeTypeFont):
            ascent, descent = primary.getmetrics()
            self.ascent, self.descent = round(ascent * scale), round(descent * scale)
        else:  # Pillow without FreeType: fixed-size bitmap font
            self.ascent, self.descent = int(primary.getbbox("Ag")[3]), 0

    def covers(self, ch: str) -> bool:
        return any(font.covers(ch) for font in self.fonts)

    def _font_for(self, ch: str, current: CaptionFont | None) -> CaptionFont | None:
        """The font that draws ``ch`` (None: drop it); ``current`` is the open run's font."""
        # Spaces are not sticky: they take the primary font's width (an emoji font's is huge).
        if current is not None and joins_previous(ch) and current.covers(ch):
            return current
        for font in self.fonts:
            if font.covers(ch):
                return font
        if _invisible(ch):
            return None
        return self.fonts[0]  # no font has it: the primary draws its missing-glyph box

    def runs(self, text: str) -> list[tuple[CaptionFont, str]]:
        runs: list[tuple[CaptionFont, str]] = []
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
def _load_chain(size: int, files: tuple[tuple[str, int], ...]) -> FontChain:
    primary = _open_font(*files[0], size)
    if primary is None:  # broken install or no FreeType: still write a grid, ASCII only
        primary = CaptionFont(ImageFont.load_default(size=size), _ASCII)
    fallbacks = [f for f in (_open_font(path, i, size) for path, i in files[1:]) if f is not None]
    return FontChain([primary, *fallbacks])


def font_chain(size: int) -> FontChain:
    """The caption fonts at ``size`` pixels: the shipped font, then this machine's fallbacks."""
    # Keyed by the font list too, so tests can swap the system fallbacks without stale caches.
    return _load_chain(size, _font_files())


def uncovered_characters(texts: Iterable[str]) -> list[str]:
    """Characters of ``texts`` that no caption font can draw (they show as boxes in the grid).

    Sorted and unique. Whitespace and invisible format characters (zero-width joiners,
    variation selectors, controls) are ignored. The fonts are those :func:`make_grid` uses: the
    shipped Noto Sans, then the system fallbacks (sans-serif, CJK, emoji) found on this machine.
    """
    chain = font_chain(_PROBE_SIZE)
    chars = {ch for text in texts if text for ch in text}
    return sorted(
        ch for ch in chars if not ch.isspace() and not _invisible(ch) and not chain.covers(ch)
    )
