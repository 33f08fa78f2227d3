"""The two kinds of failure every command reports as one sentence, and their exit codes.

`InvalidInput` is something the user can fix in what they typed or pointed at (story, option,
config, output location): exit 2. `RuntimeProblem` is the machine or its files failing the
command (weights missing, a video that cannot be written): exit 1. A batch of several stories
in which some failed exits 3 (2 when every story was invalid). Each module raises its own
subclass, so the CLI needs one rule for all commands.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INVALID = 2
EXIT_SOME_FAILED = 3  # a batch where some stories failed and others did not (or were not run)
EXIT_INTERRUPTED = 130


class InvalidInput(Exception):
    """Bad input: story, option, config file or output location (exit 2)."""


class RuntimeProblem(Exception):
    """The command could not complete on this machine (exit 1)."""
