"""siamdiff: Siamese-Diffusion for synthetic medical image-mask pairs."""

import logging

__version__ = "0.1.0"

# diffusers imports bitsandbytes (optim.name=adamw8bit) whenever it is installed, and its CPU
# backend then warns about a 4-bit matmul kernel that siamdiff never uses, on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
