"""Small builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from siamdiff.config import load_config

PHANTOM_SIZE = 32  # training resolution of the tiny test runs (DHI needs a multiple of 8)


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """The built-in tiny config, shrunk to a few-second CPU run on phantom data."""
    return load_config(
        "tiny",
        [
            f"data.root={data}",
            f"run_dir={run_dir}",
            f"data.transforms.size={PHANTOM_SIZE}",
            "train.batch_size=2",
            "train.sample_count=2",
            "train.sample_steps=2",
            "train.log_every=1",
            *overrides,
        ],
    )


def two_process_command() -> list[str]:
    """``siamdiff`` as two processes of one CPU job, as a multi-GPU user launches it; the
    siamdiff arguments follow."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "siamdiff",
    ]


def two_process_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch_two_processes(*siamdiff_args: str) -> subprocess.CompletedProcess:
    """``siamdiff ARGS...`` as two processes, run to the end."""
    command = [*two_process_command(), *siamdiff_args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=two_process_env()
    )


def out_of_memory_on_call(function: Callable, call: int) -> Callable:
    """``function``, except that its ``call``-th call raises what CUDA raises when it runs out."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                "79.19 GiB of which 3.06 GiB is free. Of the allocated memory 70.1 GiB is "
                "allocated by PyTorch."
            )
        return function(*args, **kwargs)

    return wrapper
