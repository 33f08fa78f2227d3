"""Output rendering, Pillow + stdlib + fontTools only (no torch), so it imports anywhere.

- :mod:`.png`: PNG files with A1111 infotext and storydiff metadata (``save_png``,
  ``read_png_metadata``, ``a1111_parameters``).
- :mod:`.fonts`: caption fonts: the shipped Noto Sans, system fallbacks, per-font coverage
  (``uncovered_characters``).
- :mod:`.captions`: caption font size, padding, line height and word wrapping.
- :mod:`.grid`: the captioned contact-sheet grid (``make_grid``).
- :mod:`.pages`: comic pages and comic.pdf in the story's layout.

This package only re-exports the names callers import from ``storycli.render``.
"""

from __future__ import annotations

from storycli.atomic import atomic_write_bytes, atomic_write_text
from storycli.render.fonts import CAPTION_FONT_PATH, uncovered_characters
from storycli.render.grid import default_columns, make_grid
from storycli.render.png import a1111_parameters, read_png_metadata, save_png

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
