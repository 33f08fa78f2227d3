"""Stage one: a story's keyframes.

The data flows plan.py (what to generate) → schedule.py (which calls share a forward) → loop.py
(the step-synchronous denoising loop) → story_folder.py (files on disk), driven by generate.py.
The backbone (SDXL today) is reached through backbones/ and loaded by models.py.
"""
