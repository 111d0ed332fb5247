"""siamdiff: Siamese-Diffusion for synthetic medical image-mask pairs."""

__version__ = "0.1.0"
