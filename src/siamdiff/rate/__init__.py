"""``siamdiff rate``: a blinded realism rating (MOS) study served as a local web page."""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use: importing the server here would make `python -m
# siamdiff.rate.server` find it already imported (runpy's RuntimeWarning).
_HOMES = {
    "build_study": "siamdiff.rate.study",
    "load_study": "siamdiff.rate.study",
    "open_study": "siamdiff.rate.study",
    "create_app": "siamdiff.rate.server",
    "serve": "siamdiff.rate.server",
    "export_results": "siamdiff.rate.export",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'siamdiff.rate' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
