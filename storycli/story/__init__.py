"""The story file: its schema, loading it with located errors, and the checks run on it.

Pure Python (no torch): `storydiff validate` and `--dry-run` never import a model library.
"""
