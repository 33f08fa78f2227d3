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

import functools
import io
import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from storycli.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "a1111_parameters",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_columns",
    "make_grid",
    "read_png_metadata",
    "save_png",
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


@functools.lru_cache(maxsize=16)
def _load_font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _caption_metrics(frame_width: int) -> tuple[_Font, int, int]:
    """Caption font, band padding and line height for frames ``frame_width`` pixels wide.

    Font size ``S = max(10, frame_width // 24)``; padding ``max(4, S // 4)`` above and below the
    text and on either side; line height = font ascent + descent + ``max(2, S // 6)``. A band
    holding ``k`` lines is ``2 * padding + k * line_height`` pixels high.
    """
    size = max(10, frame_width // 24)
    font = _load_font(size)
    pad = max(4, size // 4)
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        text_height = ascent + descent
    else:  # Pillow without FreeType: fixed-size bitmap font
        text_height = font.getbbox("Ag")[3]
    return font, pad, text_height + max(2, size // 6)


def _text_length(font: _Font, text: str) -> float:
    return font.getlength(text)


def _break_word(word: str, font: _Font, max_width: float) -> list[str]:
    """Split a word wider than ``max_width`` into pieces that fit (at least one char each)."""
    pieces: list[str] = []
    current = ""
    for ch in word:
        if current and _text_length(font, current + ch) > max_width:
            pieces.append(current)
            current = ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _wrap(text: str, font: _Font, max_width: float) -> list[str]:
    """Greedy word wrap of ``text`` to ``max_width`` pixels; explicit newlines are kept."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        words = paragraph.split()
        if not words:
            continue
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if _text_length(font, candidate) <= max_width:
                current = candidate
                continue
            if current:
                lines.append(current)
            if _text_length(font, word) <= max_width:
                current = word
            else:
                *full, current = _break_word(word, font, max_width)
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
    in black, centred, in a white band under its frame; the band of a row fits its longest
    wrapped caption (a row without captions gets no band), or is ``caption_height`` pixels for
    every row when given. Captions that are ``None`` or blank draw nothing; when no frame has a
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
    font, pad, line_h = _caption_metrics(w)
    wrapped = [_wrap(t, font, max(1, w - 2 * pad)) if t else [] for t in texts]

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
            draw = ImageDraw.Draw(band)
            for k, line in enumerate(wrapped[i]):
                tx = (w - _text_length(font, line)) / 2
                draw.text((tx, pad + k * line_h), line, font=font, fill=(0, 0, 0))
            page.paste(band, (x0, y0 + h))
    return page
