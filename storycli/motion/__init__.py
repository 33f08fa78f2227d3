"""Stage two: the Semantic Motion Predictor and transition videos between keyframes."""
