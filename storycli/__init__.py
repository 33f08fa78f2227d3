"""storydiff: consistent story keyframes with SDXL and Consistent Self-Attention."""

__version__ = "0.1.0"
