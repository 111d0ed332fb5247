"""Offline evaluation of synthetic image-mask sets.

- :mod:`.features`: Fréchet distance, KID, CMMD on any feature vectors.
- :mod:`.segmenter`: train / load / run the polyp segmenters (segmentation-models-pytorch).
- :mod:`.utility`: segmentation utility, real vs real + synthetic (the paper's protocol).
- :mod:`.standard`: Inception FID / KID, LPIPS, CLIP-I, CMMD when their weights are on disk.
- :mod:`.metrics`: ``evaluate`` -> metrics.json, the CLI table and the HTML report.

Submodules are imported where used: they pull in torch and friends.
"""
