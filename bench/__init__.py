"""HIE-Bench: benchmark and evaluation toolkit for neonatal HIE lesion segmentation on diffusion MRI."""

__version__ = "0.2.0"
