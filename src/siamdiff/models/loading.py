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


WEIGHT_FILES = (".safetensors", ".bin")


def weights_variant(folder: Path) -> str | None:
    """``fp16`` for a model folder holding only ``*.fp16.*`` weights (``save_pretrained(...,
    variant="fp16")``, or a download of those files alone), which diffusers and transformers
    only find when told; None otherwise."""
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_FILES)]
    if names and all(".fp16." in name or ".fp16-" in name for name in names):
        return "fp16"
    return None


def load_complete(load: Callable[..., Any], what: str, where: str | Path, **kwargs: Any) -> Any:
    """``load(**kwargs)`` (a ``from_pretrained``, fp16-variant weights found by themselves),
    refused in one line when the checkpoint lacks tensors of the model or holds ones of
    another shape."""
    variant = weights_variant(Path(where))
    if variant and "variant" not in kwargs:
        kwargs["variant"] = variant
    model, info = load(output_loading_info=True, **kwargs)
    found = [(label, list(info.get(key) or ())) for key, label in _PROBLEMS]
    found = [(label, items) for label, items in found if items]
    if found:
        counts = ", ".join(f"{len(items)} {label}" for label, items in found)
        example = found[0][1][0]
        raise SiamdiffError(f"{what} weights are incomplete ({counts}; e.g. {example})", where)
    return model
