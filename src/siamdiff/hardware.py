"""What a measurement ran on, for the records that report it: GPU and CPU numbers differ."""

from __future__ import annotations

import platform

import torch


def device_label(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
