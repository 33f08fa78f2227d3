"""Hostile inputs (issue 20): files that are not files, files too big to read, text too long to
trim, pictures that decode to a gigapixel, names too long for a folder. Each is one `error:` line
naming the file or field and the fix, exit 2, no traceback, nothing written, and no hang.

Commands that used to hang run in a subprocess with a timeout, so a regression fails here rather
than stopping the test run.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from storycli.cli import app
from storycli.story.loader import StoryError, load_story
from storycli.story.schema import MAX_NAME_CHARS, MAX_TEXT_CHARS
from storycli.story.tokens import CONTENT_TOKENS, count_tokens, fit_prompt

EXIT_INVALID = 2
WORDS = ("lighthouse", "keeper", "with", "red", "hair,", "yellow", "raincoat", "climbs", "stairs")


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def storydiff(*args: str | Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in its own process: a hang is a TimeoutExpired, not a stuck test run."""
    script = Path(sys.executable).with_name("storydiff")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "storycli"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def one_error(stderr: str, *needles: str) -> str:
    """The single `error:` line of `stderr`, which must contain every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[:2000]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_story(folder: Path, name: str = "story.yaml", **changes: object) -> Path:
    data: dict[str, object] = {
        "model": "tiny",
        "identity": "a small orange fox",
        "consistency": {"method": "none"},
        "frames": ["runs through a snowy forest"],
    }
    path = folder / name
    path.write_text(yaml.safe_dump(data | changes, sort_keys=False), encoding="utf-8")
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of `width`×`height` black pixels: a few hundred KB on disk, gigabytes
    once decoded. Written row by row, so the test never holds the image."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
    return path


def small_png(path: Path) -> Path:
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


# -- item 1: long prompts ------------------------------------------------------------------------


def test_trimming_a_long_prompt_is_linear() -> None:
    """It was quadratic: 4,000 words took 12.75 s (1,000 words 1.35 s)."""
    text = words(4000)
    start = time.perf_counter()
    fitted = fit_prompt(text, lambda s: f"comic panel of {s}, bold lines")
    took = time.perf_counter() - start
    assert took < 4, f"trimming 4,000 words took {took:.1f} s"
    assert fitted.trimmed and count_tokens(fitted.prompt) <= CONTENT_TOKENS
    assert fitted.prompt.endswith(", bold lines")
    kept = fitted.prompt.removeprefix("comic panel of ").removesuffix(", bold lines")
    assert text.startswith(kept) and fitted.dropped is not None
    # One more word would not have fitted: the longest prefix that fits, as before.
    longer = text[: len(kept) + 1 + len(fitted.dropped.split()[0])].rstrip(" ,;:")
    assert count_tokens(f"comic panel of {longer}, bold lines") > CONTENT_TOKENS


def test_aliases_of_a_huge_prompt_are_one_error_and_quick(tmp_path: Path) -> None:
    """A 62 KB story: one 12,000-word prompt and 1,999 YAML aliases of it (> 110 s before)."""
    text = (
        "model: tiny\nidentity: a fox\nconsistency: {method: none}\nframes:\n"
        f'  - &p "{words(12000)}"\n' + "  - *p\n" * 1999
    )
    (tmp_path / "aliases.yaml").write_text(text, encoding="utf-8")
    start = time.monotonic()
    proc = storydiff("validate", "aliases.yaml", cwd=tmp_path)
    took = time.monotonic() - start
    assert proc.returncode == EXIT_INVALID, proc.stderr[:2000]
    one_error(
        proc.stderr, "aliases.yaml:5:", "frames[0].prompt", f"{MAX_TEXT_CHARS:,}", "1999 more"
    )
    assert took < 10, f"validate took {took:.1f} s"


def test_aliases_of_a_long_prompt_validate_quickly_with_short_warnings(tmp_path: Path) -> None:
    """Just under the length limit, 2,000 frames of one long prompt trim once, not 2,000 times,
    and each warning quotes a short part of what was dropped."""
    prompt = words(2600)
    assert len(prompt) < MAX_TEXT_CHARS
    text = (
        "model: tiny\nidentity: a fox\nconsistency: {method: none}\nframes:\n"
        f'  - &p "{prompt}"\n' + "  - *p\n" * 1999
    )
    (tmp_path / "aliases.yaml").write_text(text, encoding="utf-8")
    start = time.monotonic()
    proc = storydiff("validate", "aliases.yaml", cwd=tmp_path)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[:2000]
    assert took < 10, f"validate took {took:.1f} s"
    warnings = [line for line in proc.stderr.splitlines() if "dropped" in line]
    assert len(warnings) == 2000
    assert all(len(line) < 400 and "…" in line for line in warnings), warnings[0]


def test_a_huge_identity_is_refused_with_one_line(tmp_path: Path) -> None:
    """A 10 MB identity took 60 s and 1 GB and printed 20 MB of warnings."""
    path = write_story(tmp_path, identity=words(30_000))  # ~220 KB, under the file limit
    start = time.monotonic()
    proc = storydiff("validate", path.name, cwd=tmp_path)
    assert time.monotonic() - start < 10
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, "story.yaml:", " identity: ", "characters, over the", "shorten it")
    # 10 MB of identity is a story file over the size limit: refused unread.
    path.write_text(f'identity: "{"fox " * 2_500_000}"\nframes: [runs]\n', encoding="utf-8")
    start = time.monotonic()
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert time.monotonic() - start < 5
    assert info.value.lines() == [
        f"{path}: is 9.5 MB, over the 1 MB allowed: give a .yaml story file"
    ]


@pytest.mark.parametrize("where", ["description", "mapping", "caption", "negative"])
def test_other_long_texts_are_refused(tmp_path: Path, where: str) -> None:
    long = "x " * MAX_TEXT_CHARS
    changes: dict[str, object] = {
        "description": {"identity": None, "characters": {"Mara": long}, "frames": ["[Mara] x"]},
        "mapping": {
            "identity": None,
            "characters": {"Mara": {"description": long}},
            "frames": ["[Mara] x"],
        },
        "caption": {"frames": [{"prompt": "a fox", "caption": long}]},
        "negative": {"negative": long},
    }[where]
    data = {k: v for k, v in changes.items() if v is not None}
    path = write_story(tmp_path, **data)
    if "characters" in data:
        text = path.read_text().replace("identity: a small orange fox\n", "")
        path.write_text(text)
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert len(info.value.lines()) == 1, info.value.lines()
    assert "characters, over the 20,000 allowed" in info.value.lines()[0]


# -- item 2: story files and pictures that are not (small, regular) files ------------------------


def test_a_story_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    """It read /dev/zero until 14.5 GB of memory."""
    (tmp_path / "z.yaml").symlink_to("/dev/zero")
    proc = storydiff("validate", "z.yaml", cwd=tmp_path, timeout=30)
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, "z.yaml: ", "a device, not a regular file", ".yaml story file")


def test_a_fifo_story_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.yaml")
    proc = storydiff("validate", "f.yaml", cwd=tmp_path, timeout=30)
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, "f.yaml: ", "named pipe (FIFO)")
    proc = storydiff("generate", "f.yaml", "--dry-run", cwd=tmp_path, timeout=30)
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, "f.yaml: ", "named pipe (FIFO)")


def test_a_story_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = write_story(tmp_path, name="big.yaml")
    with path.open("r+b") as handle:
        handle.truncate(2 * 2**20)  # sparse: cheap to write, 2 MB to read
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert info.value.lines() == [
        f"{path}: is 2.0 MB, over the 1 MB allowed: give a .yaml story file"
    ]


PICTURE_FIELDS = {
    "start_image": ({"start_image": "pic"}, "start_image"),
    "character image": (
        {
            "identity": None,
            "characters": {"Mara": {"description": "a fox", "image": "pic"}},
            "frames": ["[Mara] runs"],
        },
        "characters.Mara.image",
    ),
    "ip_adapter": ({"ip_adapter": {"image": "pic", "model": "tiny"}}, "ip_adapter.image"),
}


def picture_story(tmp_path: Path, case: str) -> tuple[Path, str]:
    changes, field = PICTURE_FIELDS[case]
    data = {k: v for k, v in changes.items() if v is not None}
    path = write_story(tmp_path, **data)
    if "characters" in data:
        path.write_text(path.read_text().replace("identity: a small orange fox\n", ""))
    return path, field


@pytest.mark.parametrize("case", PICTURE_FIELDS)
def test_a_fifo_picture_is_refused_without_waiting(tmp_path: Path, case: str) -> None:
    """A FIFO as `start_image` hung `validate` and `generate --dry-run`."""
    path, field = picture_story(tmp_path, case)
    os.mkfifo(tmp_path / "pic")
    for command in (["validate"], ["generate", "--dry-run"]):
        proc = storydiff(*command, path.name, cwd=tmp_path, timeout=30)
        assert proc.returncode == EXIT_INVALID, proc.stderr
        one_error(proc.stderr, f" {field}: ", "'pic' is a named pipe (FIFO)", "picture file")


def test_a_picture_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    path, _ = picture_story(tmp_path, "start_image")
    (tmp_path / "pic").symlink_to("/dev/zero")
    proc = storydiff("validate", path.name, cwd=tmp_path, timeout=30)
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, " start_image: ", "'pic' is a device, not a regular file")


def test_a_folder_as_picture_is_refused(tmp_path: Path) -> None:
    path, _ = picture_story(tmp_path, "start_image")
    (tmp_path / "pic").mkdir()
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert "'pic' is a folder, not a picture" in info.value.lines()[0]


@pytest.mark.parametrize("case", PICTURE_FIELDS)
def test_a_decompression_bomb_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    """A small PNG of 900 M pixels: `validate` printed PIL's DecompressionBombError traceback
    (exit 1), and `generate` exited 1."""
    path, field = picture_story(tmp_path, case)
    bomb_png(tmp_path / "pic", 30_000, 30_000)
    assert (tmp_path / "pic").stat().st_size < 3 * 2**20
    proc = storydiff("validate", path.name, cwd=tmp_path, timeout=60)
    assert proc.returncode == EXIT_INVALID
    one_error(proc.stderr, f" {field}: ", "decompression bomb", "use a smaller picture")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", str(path), "--out", str(out)])
    assert result.exit_code == EXIT_INVALID, result.output
    one_error(result.stderr, f" {field}: ", "decompression bomb")
    assert not out.exists() or not any(out.rglob("*"))


def test_a_picture_over_pils_warning_limit_is_refused_too(tmp_path: Path) -> None:
    """Between MAX_IMAGE_PIXELS and twice that, PIL only warns; storydiff refuses it as well."""
    path, _ = picture_story(tmp_path, "start_image")
    side = int((Image.MAX_IMAGE_PIXELS or 89_478_485) ** 0.5) + 100
    bomb_png(tmp_path / "pic", side, side)
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert "decompression bomb" in info.value.lines()[0]


def test_a_good_picture_still_loads(tmp_path: Path) -> None:
    path, _ = picture_story(tmp_path, "start_image")
    small_png(tmp_path / "pic")
    assert load_story(path).start_image == str((tmp_path / "pic").resolve())


# -- item 8: names that become file names --------------------------------------------------------


def test_a_long_character_name_is_refused_by_validate(tmp_path: Path) -> None:
    """A 300-character name passed validate, then `--save-characters` failed with Errno 36."""
    name = "M" * 300
    path = write_story(tmp_path, identity=None, characters={name: "a fox"}, frames=[f"[{name}] x"])
    path.write_text(path.read_text().replace("identity: null\n", ""))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID
    one_error(result.stderr, " characters: ", "300 characters", f"at most {MAX_NAME_CHARS}")


def test_a_name_of_the_limit_is_fine(tmp_path: Path) -> None:
    name = "M" * MAX_NAME_CHARS
    path = write_story(tmp_path, identity=None, characters={name: "a fox"}, frames=[f"[{name}] x"])
    path.write_text(path.read_text().replace("identity: null\n", ""))
    assert list(load_story(path).cast) == [name]


def test_a_long_story_name_is_refused(tmp_path: Path) -> None:
    path = write_story(tmp_path, name="story.yaml")
    path.write_text(f"name: {'n' * 150}\n" + path.read_text())
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert info.value.lines() == [
        f"{path}:1:7 name: is 150 characters; the name becomes the output folder's name, so use "
        "at most 100"
    ]


# -- item 10: one line for a UTF-16 file and a file name too long to be the default name ---------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
def test_a_utf16_story_is_one_line(tmp_path: Path, encoding: str) -> None:
    path = write_story(tmp_path)
    path.write_bytes(path.read_text().encode(encoding))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID
    one_error(result.stderr, "story.yaml: not a UTF-8 text file (it looks like UTF-16")


def test_a_binary_story_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "story.yaml"
    path.write_bytes(b"frames: [a]\n\x00\x01\x02" * 3)
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert info.value.lines() == [
        f"{path}: not a text file (it holds NUL bytes): save the story as UTF-8 text"
    ]


def test_a_default_name_too_long_is_blamed_on_the_file_name(tmp_path: Path) -> None:
    path = write_story(tmp_path, name="a" * 120 + ".yaml")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID
    line = one_error(result.stderr, " name: ", "from the file name", "120 characters", "`name:`")
    assert ":1:1" not in line
    # With a `name:`, the file name does not matter.
    path.write_text("name: short\n" + path.read_text())
    assert load_story(path).name == "short"
