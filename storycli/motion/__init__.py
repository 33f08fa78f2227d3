"""Stage two: the Semantic Motion Predictor and transition videos between keyframes."""

# The transition decoders' names (motion.decoders loads them); here, so the command line can
# check `--decoder` without importing torch.
DECODERS = ("crossfade", "latent-slerp", "animatediff", "wan", "ltx")
