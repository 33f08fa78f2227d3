"""Many stories (or keyframe folders) in one command, and one command over many processes.

`inputs` expands what the user named into a sorted list, `shard` says which of them this process
renders (from `--shard` or the launcher's environment), `split` shares one story's frames over
the processes, and `runner` runs the list with each item's failure isolated. Imports flow one
way: the CLI and `generate` use this package; it imports neither.
"""
