"""The comic layouts' names (torch- and Pillow-free, for the CLI's option check)."""

LAYOUTS = ("grid", "four-panel", "classic")
