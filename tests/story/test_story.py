"""Tests for story files: schema, YAML loading with located errors, semantic checks, `validate`.

Every bad story must give one clear message naming the file, line:col and field, exit with code 2
from the CLI, print no traceback and write nothing. Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storycli.cli import app
from storycli.config import Configs
from storycli.story.checks import story_warnings
from storycli.story.loader import StoryError, StoryIssue, load_story
from storycli.story.schema import Story

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "stories").glob("*.yaml"))
EXIT_INVALID = 2

# A valid story the cases below start from: no model download, no consistency requirements.
GOOD = """\
identity: a small orange fox with a blue scarf
model: tiny
consistency:
  method: none
frames:
  - runs through a snowy forest
"""


def write(folder: Path, text: str, name: str = "story.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of `text` (dedented) that contains `needle`."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in story text")


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def load_error(path: Path) -> StoryError:
    with pytest.raises(StoryError) as info:
        load_story(path)
    return info.value


def run_cli(*args: str | Path, columns: int = 1000):
    # A wide console: Rich must not wrap what the assertions look for (see the wrapping bug).
    return CliRunner(env={"COLUMNS": str(columns)}).invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------------
# Bad stories: (text, field, message substring, line marker). The marker is a substring of the line
# that holds the offending node (None: the problem has no position, e.g. an empty file).

BAD: list = [
    pytest.param(
        """\
        identity: x
        frames:
          - a
         - b
        """,
        "",
        "YAML syntax error",
        " - b",
        id="yaml-syntax-indent",
    ),
    pytest.param(
        "identity: x\nframes:\n\t- a\n",
        "",
        "YAML syntax error",
        "\t- a",
        id="yaml-syntax-tab",
    ),
    pytest.param("", "", "the file is empty", None, id="empty-file"),
    pytest.param("# only a comment\n", "", "the file is empty", None, id="comment-only"),
    pytest.param(
        "- a\n- b\n",
        "",
        "a story is a mapping of keys (name, frames, ...), not a list",
        "- a",
        id="list",
    ),
    pytest.param("just words\n", "", "a story is a mapping of keys", "just words", id="scalar"),
    pytest.param(
        """\
        identity: x
        seed: 1
        frames: [a]
        seed: 2
        """,
        "",
        "duplicate key 'seed'",
        "seed: 2",
        id="duplicate-key",
    ),
    pytest.param(
        """\
        identity: x
        consistency:
          method: none
          method: storydiffusion
        frames: [a]
        """,
        "",
        "duplicate key 'method'",
        "method: storydiffusion",
        id="duplicate-nested-key",
    ),
    pytest.param(
        GOOD + "colour: red\n", "colour", "unknown key", "colour:", id="unknown-top-level-key"
    ),
    pytest.param(
        """\
        identity: x
        frames: [a, b, c]
        consistency:
          method: storydiffusion
          sa23: 0.5
        """,
        "consistency.sa23",
        "unknown key",
        "sa23",
        id="unknown-consistency-key",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames:
          - prompt: runs
            capton: Go!
        """,
        "frames[0].capton",
        "unknown key",
        "capton",
        id="unknown-frame-key-capton",
    ),
    pytest.param(
        GOOD + "steps: many\n", "steps", "must be a valid integer", "steps:", id="steps-str"
    ),
    pytest.param(
        GOOD + "steps: 2.5\n", "steps", "must be a valid integer", "steps:", id="steps-float"
    ),
    pytest.param(
        GOOD + "guidance: [1]\n",
        "guidance",
        "must be a valid number",
        "guidance:",
        id="guidance-list",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames: once upon a time
        """,
        "frames",
        "must be a valid list",
        "frames:",
        id="frames-string",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames:
          - runs
          - 42
        """,
        "frames[1]",
        'a frame is a string "prompt #caption" or a mapping with `prompt`',
        "- 42",
        id="frame-number",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames:
          - caption: no prompt here
        """,
        "frames[0].prompt",
        "required",
        "caption:",
        id="frame-without-prompt",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames:
          - runs
          - "[NC]"
        """,
        "frames[1].prompt",
        "prompt is empty once tags are removed",
        "[NC]",
        id="frame-only-tags",
    ),
    pytest.param(
        """\
        identity: x
        frames: [a, b, c]
        consistency:
          sa32: 1.5
        """,
        "consistency.sa32",
        "must be less than or equal to 1",
        "sa32",
        id="sa32-above-1",
    ),
    pytest.param(
        """\
        identity: x
        frames: [a, b, c]
        consistency:
          sa64: -0.1
        """,
        "consistency.sa64",
        "must be greater than or equal to 0",
        "sa64",
        id="sa64-negative",
    ),
    pytest.param(
        """\
        identity: x
        frames: [a, b, c]
        consistency:
          prob_early: 2
        """,
        "consistency.prob_early",
        "must be less than or equal to 1",
        "prob_early",
        id="prob-early-2",
    ),
    pytest.param(
        """\
        identity: x
        frames: [a, b, c]
        consistency: {method: maybe}
        """,
        "consistency.method",
        "must be 'storydiffusion', 'one-prompt' or 'none', or a list of them (got 'maybe')",
        "consistency:",
        id="consistency-method",
    ),
    pytest.param(
        GOOD + "width: 1000\n",
        "width",
        "must be a multiple of 32 (try 992 or 1024)",
        "width:",
        id="width-not-32",
    ),
    pytest.param(
        GOOD + "height: 100\n",
        "height",
        "must be a multiple of 32 (try 96 or 128)",
        "height:",
        id="height-not-32",
    ),
    pytest.param(
        GOOD + "steps: 0\n", "steps", "must be greater than or equal to 1", "steps:", id="steps-0"
    ),
    pytest.param(
        GOOD + "guidance: -1\n",
        "guidance",
        "must be greater than or equal to 0",
        "guidance:",
        id="guidance-negative",
    ),
    pytest.param(
        """\
        identity: x
        consistency: {method: none}
        frames: []
        """,
        "frames",
        "at least 1 item",
        "frames:",
        id="frames-empty",
    ),
    pytest.param(
        """\
        characters:
          Mara: a girl with a green scarf
        consistency: {method: none}
        frames:
          - "[Mara] runs"
          - "[Bob] sleeps"
        """,
        "frames[1]",
        "unknown character tag [Bob]; defined: Mara",
        "[Bob]",
        id="undefined-tag",
    ),
    pytest.param(
        """\
        identity: a girl with a green scarf
        consistency: {method: none}
        frames:
          - runs
          - "[Mara] sleeps"
        """,
        "frames[1]",
        "tag [Mara] names a character, but this story uses `identity`",
        "[Mara]",
        id="tag-in-identity-form",
    ),
    pytest.param(
        """\
        identity: a girl with a green scarf
        characters:
          Mara: a girl with a green scarf
        consistency: {method: none}
        frames:
          - runs
        """,
        "characters",
        "give either `identity` or `characters`, not both",
        "Mara:",
        id="identity-and-characters",
    ),
    pytest.param(
        """\
        characters:
          Mara: a girl
          Ollie: a cat
        consistency:
          id_length: 2
        frames:
          - "[Mara] a"
          - "[Mara] b"
          - "[Ollie] c"
          - "[Mara] and [Ollie] d"
        """,
        "characters.Ollie",
        "character 'Ollie' is shown alone in only 1 frame(s), but consistency.id_length is 2",
        "Ollie: a cat",
        id="too-few-solo-frames",
    ),
    pytest.param(
        """\
        characters:
          Mara: a girl
          Ollie: a cat
        consistency:
          id_length: 1
        frames:
          - "[Mara] a"
        """,
        "characters.Ollie",
        "character 'Ollie' is never shown, but consistency.id_length is 1",
        "Ollie: a cat",
        id="character-never-shown",
    ),
    pytest.param(
        """\
        characters:
          Mara: a girl
          Ollie: a cat
        consistency:
          id_length: 1
        frames:
          - "[Mara] a"
          - "[Mara] and [Ollie] b"
        """,
        "characters.Ollie",
        "character 'Ollie' is never shown alone (only together with other characters), but "
        "consistency.id_length is 1",
        "Ollie: a cat",
        id="character-only-shown-with-others",
    ),
    pytest.param(
        """\
        characters:
          Ann: a girl
        consistency: {method: none}
        frames:
          - "[ann] runs"
        """,
        "frames[0]",
        "unknown character tag [ann]; defined: Ann (tags are case-sensitive: [Ann]?)",
        "[ann] runs",
        id="tag-differs-in-case",
    ),
    pytest.param(
        """\
        identity: a lighthouse keeper
        consistency:
          id_length: 1
        frames:
          - "[NC] a stormy sea"
        """,
        "identity",
        "character 'identity' is never shown",
        "identity:",
        id="identity-never-shown",
    ),
    pytest.param(
        """\
        characters:
          Mara: a girl
        consistency: {method: none}
        frames:
          - "[Mara] runs"
          - "[NC] [Mara] a market"
        """,
        "frames[1]",
        "[NC] frame cannot also show [Mara]",
        "[NC] [Mara]",
        id="nc-with-character",
    ),
    pytest.param(
        GOOD + "style: cmic\n",
        "style",
        "unknown style 'cmic'; choose one of: none, comic, anime",
        "style:",
        id="unknown-style",
    ),
    pytest.param(
        GOOD + "scheduler: eular\n",
        "scheduler",
        "unknown scheduler 'eular'; choose one of: euler, euler-a",
        "scheduler:",
        id="unknown-scheduler",
    ),
    pytest.param(
        """\
        identity: x
        scheduler: heun
        frames: [a, b, c]
        """,
        "scheduler",
        "'heun' calls the UNet 2 times per step, but Consistent Self-Attention",
        "scheduler:",
        id="second-order-scheduler-with-consistency",
    ),
    pytest.param(
        """\
        identity: x
        model: sdxll
        consistency: {method: none}
        frames: [a]
        """,
        "model",
        "unknown model 'sdxll': use a preset "
        "(sdxl, realvisxl, tiny, tiny-flux, flux-schnell, flux-dev)",
        "model:",
        id="unknown-model-preset",
    ),
    pytest.param(
        """\
        identity: x
        model: ./models/nope
        consistency: {method: none}
        frames: [a]
        """,
        "model",
        "model file or folder './models/nope' does not exist",
        "model:",
        id="missing-model-folder",
    ),
    pytest.param(
        """\
        identity: x
        model: nope.safetensors
        consistency: {method: none}
        frames: [a]
        """,
        "model",
        "model file or folder 'nope.safetensors' does not exist",
        "model:",
        id="missing-safetensors",
    ),
]


def check_single_issue(
    error: StoryError, path: Path, text: str, field: str, message: str, marker: str | None
) -> StoryIssue:
    assert len(error.issues) == 1, error.lines()
    issue = error.issues[0]
    assert issue.field == field
    assert message in issue.message
    lines = error.lines()
    assert len(lines) == 1
    if marker is None:
        assert issue.line is None and issue.column is None
        assert lines[0].startswith(f"{path}: ")
    else:
        assert issue.line == line_of(text, marker), lines[0]
        assert issue.column is not None and issue.column >= 1
        prefix = f"{path}:{issue.line}:{issue.column}"
        assert lines[0].startswith(prefix + (f" {field}: " if field else ": "))
    assert lines[0].endswith(issue.message)
    assert str(error) == lines[0]
    return issue


@pytest.mark.parametrize(("text", "field", "message", "marker"), BAD)
def test_load_story_bad_input(
    tmp_path: Path, text: str, field: str, message: str, marker: str | None
) -> None:
    path = write(tmp_path, text)
    before = files_under(tmp_path)
    check_single_issue(load_error(path), path, text, field, message, marker)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize(("text", "field", "message", "marker"), BAD)
def test_validate_cli_bad_input(
    tmp_path: Path, text: str, field: str, message: str, marker: str | None
) -> None:
    path = write(tmp_path, text)
    before = files_under(tmp_path)
    result = run_cli("validate", path)
    assert result.exit_code == EXIT_INVALID, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    where = f"{path}:{line_of(text, marker)}:" if marker else f"{path}: "
    assert f"error: {path}" in result.stderr
    assert where in result.stderr
    assert f"{field}: " in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert files_under(tmp_path) == before


def test_missing_model_path_is_resolved_from_the_story_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    story = write(tmp_path / "sub", GOOD.replace("model: tiny", "model: ./models/nope"))
    monkeypatch.chdir(tmp_path)
    error = load_error(story)
    assert f"(looked at {tmp_path / 'sub' / 'models' / 'nope'})" in error.issues[0].message
    presets = "sdxl, realvisxl, tiny, tiny-flux, flux-schnell, flux-dev"
    assert f"use a preset: {presets}" in error.issues[0].message


def test_model_paths_relative_to_story_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "sub"
    (folder / "models" / "mine").mkdir(parents=True)
    (folder / "models" / "mine" / "model_index.json").write_text("{}")
    (folder / "weights.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # neither path exists relative to the working directory
    for model in ("./models/mine", "weights.safetensors", "models/mine"):
        story = load_story(write(folder, GOOD.replace("model: tiny", f"model: {model}")))
        assert story.model == model


def test_folder_without_model_index_is_not_a_diffusers_model(tmp_path: Path) -> None:
    (tmp_path / "models" / "empty").mkdir(parents=True)
    text = GOOD.replace("model: tiny", "model: ./models/empty")
    path = write(tmp_path, text)
    error = load_error(path)
    check_single_issue(error, path, text, "model", "is a folder without model_index.json", "model:")
    result = run_cli("validate", path)
    assert result.exit_code == EXIT_INVALID
    assert "not a diffusers model folder" in result.output


def test_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    text = GOOD.replace("model: tiny", "model: ./notes.txt")
    path = write(tmp_path, text)
    check_single_issue(
        load_error(path), path, text, "model", "is a file but not a .safetensors", "model:"
    )


@pytest.mark.parametrize("model", ["sdxl", "tiny", "org/some-model", "stabilityai/sdxl-turbo"])
def test_presets_and_hub_ids_are_accepted(tmp_path: Path, model: str) -> None:
    story = load_story(write(tmp_path, GOOD.replace("model: tiny", f"model: {model}")))
    assert story.model == model


def test_second_order_scheduler_without_consistency_is_fine(tmp_path: Path) -> None:
    story = load_story(write(tmp_path, GOOD + "scheduler: heun\n"))
    assert story.scheduler == "heun"
    assert not story.uses_csa


def test_nonexistent_story_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    error = load_error(path)
    assert error.lines() == [f"{path}: no such file"]
    result = run_cli("validate", path)
    assert result.exit_code == EXIT_INVALID
    assert f"{path}: no such file" in result.output
    assert "Traceback" not in result.output
    assert not path.exists()


def test_non_utf8_story_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("identity: café\nframes: [a]\n".encode("latin-1"))
    error = load_error(path)
    assert error.lines() == [f"{path}: not a UTF-8 text file"]
    result = run_cli("validate", path)
    assert result.exit_code == EXIT_INVALID
    assert "not a UTF-8 text file" in result.output
    assert "Traceback" not in result.output


def test_folder_given_as_story(tmp_path: Path) -> None:
    error = load_error(tmp_path)
    assert error.lines() == [f"{tmp_path}: is a folder, expected a .yaml story file"]


def test_several_problems_are_all_reported_in_file_order(tmp_path: Path) -> None:
    text = """\
    identity: x
    steps: 0
    frames: [a, b, c]
    width: 1000
    colour: red
    """
    error = load_error(write(tmp_path, text))
    assert [(i.field, i.line) for i in error.issues] == [
        ("steps", 2),
        ("width", 4),
        ("colour", 5),
    ]


# --------------------------------------------------------------------------------------------------
# Good stories, defaults


def test_defaults_fill_missing_keys_and_story_values_win(tmp_path: Path) -> None:
    defaults = Configs().defaults
    story = load_story(write(tmp_path, GOOD + "steps: 12\n", name="my-story.yaml"))
    assert isinstance(story, Story)
    assert story.name == "my-story"  # from the file name
    assert story.steps == 12
    assert story.width == defaults["width"]
    assert story.scheduler == defaults["scheduler"]
    assert story.consistency.method == "none"
    # a partial `consistency` mapping is merged key by key into the defaults
    assert story.consistency.sa32 == defaults["consistency"]["sa32"]
    assert story.consistency.id_length == defaults["consistency"]["id_length"]


def test_overrides_replace_story_values_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "seed: 3\n")
    assert load_story(path, overrides={"seed": 9, "model": "sdxl"}).seed == 9
    with pytest.raises(StoryError) as info:
        load_story(path, overrides={"model": "./missing"})
    assert info.value.issues[0].field in {"model", "--model"}  # the option may be named
    assert "'./missing' does not exist" in info.value.issues[0].message


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_load(example: Path) -> None:
    story = load_story(example)
    assert story.frames


def test_names_differing_only_in_case_are_valid_but_warned(tmp_path: Path) -> None:
    text = """\
    characters:
      Ann: a girl
      ANN: a robot
      ann: a woman
      Bob: a boy
    consistency: {method: none}
    frames:
      - "[Ann] and [ANN] and [ann] and [Bob] run"
    """
    story = load_story(write(tmp_path, text))
    assert [loc for loc, _ in story_warnings(story)] == [
        ("characters", "ANN"),
        ("characters", "ann"),
    ]
    assert story_warnings(story)[0][1].startswith("'ANN' and 'Ann' differ only in case")
    assert story_warnings(load_story(write(tmp_path, GOOD, name="good.yaml"))) == []


# --------------------------------------------------------------------------------------------------
# validate CLI


def test_validate_all_examples_exits_0() -> None:
    assert len(EXAMPLES) == 8
    result = run_cli("validate", *EXAMPLES)
    assert result.exit_code == 0, result.output
    for example in EXAMPLES:
        assert f"ok {example}: {len(load_story(example).frames)} frames" in result.output
    assert "references Mara: frames 1, 3; Ollie: frames 2, 4" in result.output
    assert "error" not in result.output


def test_validate_json_gives_parseable_flags(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD + "steps: 0\n", name="bad.yaml")
    result = run_cli("validate", *EXAMPLES, bad, "--json")
    assert result.exit_code == EXIT_INVALID
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    by_file = {entry["file"]: entry for entry in document["stories"]}
    # In sorted order, as generate runs them.
    assert list(by_file) == sorted(str(p) for p in [*EXAMPLES, bad])
    for example in EXAMPLES:
        assert by_file[str(example)]["valid"] is True
        assert by_file[str(example)]["frames"] == len(load_story(example).frames)
    assert by_file[str(bad)]["valid"] is False
    assert len(by_file[str(bad)]["errors"]) == 1
    assert by_file[str(bad)]["errors"][0].startswith(f"{bad}:")
    assert "steps: must be greater than or equal to 1" in by_file[str(bad)]["errors"][0]


def test_validate_json_all_good_exits_0() -> None:
    result = run_cli("validate", "--json", *EXAMPLES)
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert [e["valid"] for e in document["stories"]] == [True] * len(EXAMPLES)


def test_validate_reports_good_and_bad_files(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD, name="good.yaml")
    bad = write(tmp_path, GOOD + "colour: red\n", name="bad.yaml")
    result = run_cli("validate", good, bad)
    assert result.exit_code == EXIT_INVALID
    assert f"ok {good}: 1 frames" in result.output
    assert f"error: {bad}:7:1 colour: unknown key" in result.output


def test_generate_bad_story_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    bad = write(tmp_path / "stories", GOOD + "width: 1000\n", name="bad.yaml")
    out = tmp_path / "out"
    result = run_cli("generate", bad, "--out", out)
    assert result.exit_code == EXIT_INVALID, result.output
    assert "width: must be a multiple of 32" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert files_under(tmp_path) == [bad.parent, bad]


def test_generate_dry_run_bad_story_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD + "style: cmic\n", name="bad.yaml")
    result = run_cli("generate", bad, "--dry-run", "--json", "--out", tmp_path / "out")
    assert result.exit_code == EXIT_INVALID
    # --json: one JSON line for the story, its failure included; the message on stderr too.
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "invalid" and record["exit_code"] == EXIT_INVALID
    assert record["input"] == str(bad)
    assert any("unknown style 'cmic'" in e for e in record["errors"])
    assert "unknown style 'cmic'" in result.stderr
    assert not (tmp_path / "out").exists()


def storydiff_command() -> list[str]:
    script = Path(sys.executable).with_name("storydiff")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from storycli.cli import main; main()"]


def test_validate_subprocess_stderr_and_exit_code(tmp_path: Path) -> None:
    text = GOOD + "steps: many\n"
    bad = write(tmp_path, text)
    proc = subprocess.run(
        [*storydiff_command(), "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_INVALID
    assert proc.stdout == ""
    line = line_of(text, "steps:")
    assert f"error: {bad}:{line}:8 steps: must be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(tmp_path) == [bad]


NO_TORCH = """
import sys
from typer.testing import CliRunner
from storycli.cli import app
args = sys.argv[1:]
result = CliRunner().invoke(app, args)
assert result.exit_code == 0, (result.exit_code, result.output)
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
assert not heavy, heavy
print("NO_TORCH_OK")
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["validate", "--help"],
        ["validate", str(REPO / "stories" / "lighthouse.yaml")],
        ["validate", "--json", *map(str, EXAMPLES)],
        ["generate", str(REPO / "stories" / "two_friends.yaml"), "--dry-run", "--json"],
    ],
    ids=["help", "validate-help", "validate", "validate-json", "generate-dry-run"],
)
def test_fast_commands_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NO_TORCH_OK" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    assert "validate" in result.output and "generate" in result.output


# --------------------------------------------------------------------------------------------------
# Regressions: each of these once failed.


@pytest.mark.parametrize(
    ("text", "field", "marker"),
    [
        (GOOD + "negative-prompt: blurry\n", "negative-prompt", "negative-prompt"),
        (
            "identity: x\nframes: [a, b, c]\nconsistency:\n  late-from-step: 20\n",
            "consistency.late-from-step",
            "late-from-step",
        ),
    ],
    ids=["top-level", "consistency"],
)
def test_unknown_key_with_dash_keeps_its_name_and_line(
    tmp_path: Path, text: str, field: str, marker: str
) -> None:
    # story._clean_loc drops every location part containing "-", so the key itself is lost.
    path = write(tmp_path, text)
    check_single_issue(load_error(path), path, text, field, "unknown key", marker)


def test_unhashable_yaml_key_is_a_story_error(tmp_path: Path) -> None:
    # _construct_mapping does `key in out` with a list key: TypeError instead of StoryError.
    path = write(tmp_path, "? [a, b]\n: 1\n" + GOOD)
    error = load_error(path)
    assert error.issues[0].line == 1


def test_identity_and_characters_give_one_message(tmp_path: Path) -> None:
    text = """\
    identity: a girl
    characters:
      Mara: a girl
    consistency: {method: none}
    frames:
      - "[Mara] runs"
    """
    path = write(tmp_path, text)
    # Also reported: "frames[0]: unknown character tag [Mara]; defined: identity".
    check_single_issue(
        load_error(path), path, text, "characters", "either `identity` or `characters`", "Mara:"
    )


@pytest.mark.parametrize(
    ("tag", "expected"),
    [("bobby", "unknown character tag [bobby]"), ("/bob", "unknown character tag [/bob]")],
    ids=["lowercase-tag-swallowed", "closing-tag-crashes"],
)
def test_error_text_is_not_read_as_rich_markup(tmp_path: Path, tag: str, expected: str) -> None:
    # cli._story_error prints user text with markup=True: "[bobby]" vanishes, "[/bob]" raises
    # rich.errors.MarkupError (traceback, exit 1).
    text = f'characters:\n  bob: a man\nconsistency: {{method: none}}\nframes:\n  - "[{tag}] b"\n'
    result = run_cli("validate", write(tmp_path, text))
    assert result.exit_code == EXIT_INVALID
    assert expected in result.output


def test_non_string_key_is_located(tmp_path: Path) -> None:
    # `yes:` is the boolean True in YAML 1.1; reported as "[1]: keys should be strings" at 1:1.
    text = GOOD + "yes: 1\n"
    path = write(tmp_path, text)
    assert load_error(path).issues[0].line == line_of(text, "yes:")


def test_ok_line_is_not_wrapped(tmp_path: Path) -> None:
    # cli.validate prints "ok PATH: N frames" without soft_wrap, so Rich wraps it at 80 columns
    # (the error lines use soft_wrap=True and stay whole).
    good = write(tmp_path / ("long-folder-name-" * 4), GOOD, name="good.yaml")
    result = run_cli("validate", good, columns=80)
    assert result.exit_code == 0
    assert f"ok {good}: 1 frames\n" in result.output


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("guidance: .inf\n", "guidance"),
        ("guidance: .nan\n", "guidance"),
        ("guidance: -.inf\n", "guidance"),
        ("consistency: {method: none, sa32: .nan}\n", "consistency.sa32"),
        ("consistency: {method: none, prob_late: .inf}\n", "consistency.prob_late"),
    ],
)
def test_non_finite_numbers_are_rejected(tmp_path: Path, line: str, field: str) -> None:
    """YAML reads `.inf`/`.nan` as floats; they validate as numbers but cannot work."""
    text = GOOD.replace("consistency:\n  method: none\n", "") + line
    if not line.startswith("consistency"):
        text += "consistency: {method: none}\n"
    error = load_error(write(tmp_path, text))
    assert [issue.field for issue in error.issues] == [field]
    assert "finite" in error.issues[0].message


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ('""', "characters.Ann", "string should have at least 1 character"),
        ("5", "characters.Ann", "must be a description (text) or a mapping with `description:`"),
        ("{image: a.png}", "characters.Ann.description", "required"),
    ],
)
def test_a_bad_character_is_one_line_without_pydantic_names(
    tmp_path: Path, value: str, field: str, message: str
) -> None:
    """A character is a text or a mapping: a bad one gets one line about what it is, not one
    per member of that union, nor pydantic's names for them."""
    path = tmp_path / "s.yaml"
    path.write_text(f'characters:\n  Ann: {value}\nframes: ["[Ann] runs"]\nmodel: tiny\n')
    result = run_cli("validate", path)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f" {field}: {message}" in lines[0], result.stderr
    assert "constrained-str" not in result.stderr and "CharacterSpec" not in result.stderr
