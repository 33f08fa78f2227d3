"""Caption text: font size, padding and line height for a frame width, and word wrapping.

Text is measured with the caption font chain (see :mod:`storycli.render.fonts`), so wrapping
agrees with how the text is drawn.
"""

from __future__ import annotations

from storycli.render.fonts import FontChain, font_chain, joins_previous

__all__ = ["caption_metrics", "wrap_text"]


def caption_metrics(frame_width: int, size: int | None = None) -> tuple[FontChain, int, int]:
    """Caption fonts, band padding and line height for frames ``frame_width`` pixels wide.

    Font size ``S = size`` when given, else ``max(10, frame_width // 24)``; padding
    ``max(4, S // 4)`` above and below the text and on either side; line height = the
    shipped font's ascent + descent + ``max(2, S // 6)`` (fallback fonts share its baseline).
    A band holding ``k`` lines is ``2 * padding + k * line_height`` pixels high.
    """
    size = size if size is not None else max(10, frame_width // 24)
    fonts = font_chain(size)
    pad = max(4, size // 4)
    return fonts, pad, fonts.ascent + fonts.descent + max(2, size // 6)


def _break_word(word: str, fonts: FontChain, max_width: float) -> list[str]:
    """Split a word wider than ``max_width`` into pieces that fit (at least one char each).

    Never splits before a combining mark or format character, nor after a zero-width joiner.
    """
    pieces: list[str] = []
    current = ""
    for ch in word:
        splittable = current and not joins_previous(ch) and current[-1] != "\u200d"
        if splittable and fonts.length(current + ch) > max_width:
            pieces.append(current)
            current = ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def wrap_text(text: str, fonts: FontChain, max_width: float) -> list[str]:
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
