"""Many stories (or keyframe folders) in one command, and one command over many processes.

`inputs` expands what the user named into a sorted list, `shard` says which of them this process
renders (from `--shard` or the launcher's environment), and `runner` runs the list with each
item's failure isolated (one story's frames are shared by `keyframes.split`). Imports flow one
way: the CLI and the stages use this package; it imports neither.
"""
