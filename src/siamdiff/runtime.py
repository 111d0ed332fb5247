"""Where siamdiff runs: the device a record names, and which process of a launch speaks."""

from __future__ import annotations

import os
import platform
import sys

import torch


def device_label(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count: GPU and CPU numbers differ."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def notice(message: str) -> None:
    """Print a notice to stderr once per launch: only rank 0 of a launch of several processes
    (``accelerate launch``, torchrun: their WORLD_SIZE and RANK) speaks, before an Accelerator
    exists to say which process is the main one; a process on its own always does."""
    launched = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    if not launched or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
