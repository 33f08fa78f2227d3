"""Consistency methods: `csa` (StoryDiffusion's Consistent Self-Attention, torch),
`consolidate` (1Prompt1Story's consolidated prompts and windows, pure Python: the plan uses
it) and `one_prompt` (its embedding reweighting and identity cross-attention, torch). Nothing
here knows about files or the CLI; import the submodules themselves."""
