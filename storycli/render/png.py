"""PNG output: A1111-style infotext and PNG files carrying it plus storydiff's own metadata.

Pillow + stdlib only (no torch), so it can be imported and tested anywhere.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from storycli.atomic import atomic_write_bytes

__all__ = ["PARAMETERS_KEY", "STORYDIFF_KEY", "a1111_parameters", "read_png_metadata", "save_png"]

PARAMETERS_KEY = "parameters"
STORYDIFF_KEY = "storydiff"

_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


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
