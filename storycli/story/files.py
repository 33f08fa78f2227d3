"""Reading files a story names without trusting them: regular files only, size
limits, text decoding.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

#: A story file over this many bytes is refused unread. Stories are a few kilobytes (1 MB is
#: thousands of frames), and PyYAML parses about a megabyte in seconds.
MAX_STORY_BYTES = 1024 * 1024


#: A picture file (`start_image`, a character's `image`, `ip_adapter.image`) over this is refused.
MAX_PICTURE_BYTES = 100 * 1024 * 1024


class FileRefused(ValueError):
    """A path that names no regular file of a sane size; the message says what it is."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path, limit: int) -> BinaryIO:
    """Open `path` (links followed) for reading if it is a regular file of at most `limit`
    bytes. A FIFO, device or socket raises `FileRefused` without blocking (O_NONBLOCK: opening
    a FIFO no one writes would wait forever); missing files and folders raise `OSError`."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise FileRefused(too_big(info.st_size, limit))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def too_big(size: int, limit: int) -> str:
    return f"is {size / 2**20:.1f} MB, over the {limit // 2**20} MB allowed"


def read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes (see `open_regular`), reading at most `limit` + 1 of them."""
    with open_regular(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew since, or its size was not told
        raise FileRefused(f"is over the {limit // 2**20} MB allowed")
    return data


def decode_story(data: bytes) -> str:
    """A story file's text; `ValueError` with one sentence when it is not UTF-8 text."""
    utf16 = "not a UTF-8 text file (it looks like UTF-16: save it as UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(utf16)
    head = data[:4096]
    if b"\x00" in head:
        # UTF-16 without a byte-order mark: every other byte of ASCII text is zero.
        zeros = max(head[0::2].count(0), head[1::2].count(0))
        if zeros * 4 >= len(head):
            raise ValueError(utf16)
        raise ValueError("not a text file (it holds NUL bytes): save the story as UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not a UTF-8 text file") from None
    if "\x00" in text:
        raise ValueError("not a text file (it holds NUL bytes): save the story as UTF-8 text")
    return text
