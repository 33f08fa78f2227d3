"""Video files: reading and writing MP4s, and the synthetic moving-shape clips the predictor
tests train on."""
