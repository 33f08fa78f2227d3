"""Scoring runs: CLIP-T / CLIP-I / DreamSim for keyframes, CLIPSIM, end-frame fidelity, LPIPS
and motion for transition videos (`storydiff evaluate`).

`clip` loads a CLIP model (real or tiny) and embeds images and texts; `metrics` holds the pure
functions over embeddings and pixel arrays; `run_scores` reads a run folder and writes
`evaluation.json`. Nothing here imports the command line.
"""

# The CLIP model the 1Prompt1Story authors score CLIP-T, CLIP-I with (their issue #12: ViT-B/32,
# cosine x 2.5 with the "A photo depicts " prefix), so numbers line up with Table 1 of the paper.
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
EVALUATION_FILE = "evaluation.json"
