"""The captioned contact-sheet grid: frames in story order, a caption band under each.

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

import math

from PIL import Image

from storycli.render.captions import caption_metrics, wrap_text

__all__ = ["default_columns", "flatten", "make_grid"]

_MAX_DEFAULT_COLUMNS = 4


def default_columns(count: int) -> int:
    """Default grid columns for ``count`` frames: at most 4, fewest rows, rows balanced.

    ``rows = ceil(count / 4)`` and ``columns = ceil(count / rows)``: 1-4 frames are one row;
    5 -> 3+2, 6 -> 3+3, 7 -> 4+3, 8 -> 4+4, 9 -> 3x3, 10 -> 4+4+2, 12 -> 4x3.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    rows = math.ceil(count / _MAX_DEFAULT_COLUMNS)
    return math.ceil(count / rows)


def flatten(image: Image.Image, size: tuple[int, int]) -> Image.Image:
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
    boxes (see :func:`.fonts.uncovered_characters`). The band of a row fits its longest wrapped
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
    fonts, pad, line_h = caption_metrics(w)
    wrapped = [wrap_text(t, fonts, max(1, w - 2 * pad)) if t else [] for t in texts]

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
        page.paste(flatten(image, (w, h)), (x0, y0))
        if wrapped[i] and bands[r] > 0:
            # Drawn on its own white tile, so text that does not fit a fixed band is clipped.
            band = Image.new("RGB", (w, bands[r]), (255, 255, 255))
            for k, line in enumerate(wrapped[i]):
                fonts.draw(band, (w - fonts.length(line)) / 2, pad + k * line_h, line)
            page.paste(band, (x0, y0 + h))
    return page
