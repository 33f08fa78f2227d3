"""`python -m storycli ...`: the `storydiff` command where its script is not on PATH."""

from storycli.cli import app

app(prog_name="storydiff")
