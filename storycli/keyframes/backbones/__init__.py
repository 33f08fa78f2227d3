"""Backbones: the diffusion models stage one's story loop runs on, behind one small interface.

`keyframes/loop.py` knows plans, chunks, the scheduler, CSA's state and the bank files; it asks
everything that depends on the network of a `Backbone` (`base.py`): the prompts' conditioning and
the network's forward under classifier-free guidance, the latents' shape and initial noise,
pictures in and out of latent space, and which attention layers Consistent Self-Attention replaces
and how its per-forward hooks attach. SDXL's UNet pipeline (`sdxl.py`) is the first and only
implementation; a DiT backbone (FLUX: joint text-image attention, packed latents, no CFG halves)
would be a second module here, with its own answers to the same questions.
"""
