"""Transition decoders: a keyframe pair (+ per-frame embeddings) → the frames between.

`base` holds the interface every decoder implements, `registry` loads one by its `--decoder`
name; `crossfade`, `latent_slerp` and `animatediff` are the decoders (`animatediff_tiny` builds
the tiny random AnimateDiff stack the tests and `--model tiny` use; `wan_tiny` a tiny random
Wan2.1 first-last-frame-to-video pipeline, for the coming `wan` decoder).
"""
