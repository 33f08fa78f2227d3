"""Consistency methods: `csa` (StoryDiffusion's Consistent Self-Attention: the attention
processor for SDXL's UNet; `csa_dit` the same in FLUX's joint attention) with `csa_state` (its
per-call draws and per-step banks), `consolidate` (1Prompt1Story's consolidated prompts and
windows, pure Python: the plan uses it), `one_prompt` (its embedding reweighting and identity
cross-attention) and `ip_adapter` (reference photos). Nothing here knows about files, the
story loop or the CLI; import the submodules themselves."""
