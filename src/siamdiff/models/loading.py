"""Pretrained weights loaded whole or not at all.

diffusers and transformers fill a tensor their checkpoint lacks with random values (or leave
it on the ``meta`` device) and only log it: a truncated download or a wrong folder would
train on noise, or fail much later far from its cause.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from siamdiff.errors import SiamdiffError

_PROBLEMS = (("missing_keys", "missing"), ("mismatched_keys", "mismatched"), ("error_msgs", "bad"))


def load_complete(load: Callable[..., Any], what: str, where: str | Path, **kwargs: Any) -> Any:
    """``load(**kwargs)`` (a ``from_pretrained``), refused in one line when the checkpoint
    lacks tensors of the model or holds ones of another shape."""
    model, info = load(output_loading_info=True, **kwargs)
    found = [(label, list(info.get(key) or ())) for key, label in _PROBLEMS]
    found = [(label, items) for label, items in found if items]
    if found:
        counts = ", ".join(f"{len(items)} {label}" for label, items in found)
        example = found[0][1][0]
        raise SiamdiffError(f"{what} weights are incomplete ({counts}; e.g. {example})", where)
    return model
