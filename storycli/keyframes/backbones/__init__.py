"""Backbones: the diffusion models stage one's story loop runs on, behind one small interface.

`keyframes/loop.py` knows plans, chunks, the scheduler, CSA's state and the bank files; it asks
everything that depends on the network of a `Backbone` (`base.py`): the prompts' conditioning and
the network's forward under classifier-free guidance, the latents' shape and initial noise,
pictures in and out of latent space, and which attention layers Consistent Self-Attention replaces
and how its per-forward hooks attach. SDXL's UNet pipeline (`sdxl.py`) and FLUX.1's transformer
pipeline (`flux.py`: joint text-image attention, packed latents, flow matching, no CFG halves)
answer the same questions each its own way; `select.py` picks one by the pipeline's class.
"""
