"""``siamdiff rate``: a blinded realism rating (MOS) study served as a local web page."""

from siamdiff.rate.export import export_results
from siamdiff.rate.server import create_app, serve
from siamdiff.rate.study import build_study, load_study, open_study

__all__ = ["build_study", "create_app", "export_results", "load_study", "open_study", "serve"]
