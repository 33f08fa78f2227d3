"""Transition decoders: a keyframe pair (+ per-frame embeddings) → the frames between.

`base` holds the interface every decoder implements, `registry` loads one by its `--decoder`
name. The decoders: `crossfade`, `latent_slerp`, `animatediff`, and the first-and-last-frame
video models `wan` and `ltx` on their shared `end_frames`. `animatediff_tiny`, `wan_tiny` and
`ltx_tiny` build the tiny random pipelines the tests and `--model tiny` use; `components` loads
a real one's weights.
"""
