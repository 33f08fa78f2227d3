"""Transition decoders: keyframe pair (+ per-frame embeddings) -> frames."""
