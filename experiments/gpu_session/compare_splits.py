"""Do two prepared datasets hold the same records in the same splits? For the shrunk copy that
travels to the GPU machine against the originals, both prepared at the same size:

    siamdiff prepare --source kvasir-seg=.carry/data/Kvasir-SEG \\
        --source cvc-clinicdb=.carry/data/CVC-ClinicDB --out /tmp/shrunk-128 --size 128
    python experiments/gpu_session/compare_splits.py \\
        experiments/polyp_siamese_vs_maskonly/out/data /tmp/shrunk-128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from siamdiff.data.manifest import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("copy", type=Path)
    args = parser.parse_args()
    original = {r.id: r for r in load_manifest(args.original).records}
    copy = {r.id: r for r in load_manifest(args.copy).records}
    shared = sorted(original.keys() & copy.keys())
    same_split = sum(original[i].split == copy[i].split for i in shared)
    coverage = np.array([abs(original[i].coverage - copy[i].coverage) for i in shared])
    print(
        f"records: {len(original)} original, {len(copy)} copy, {len(shared)} in both, "
        f"{same_split} in the same split; mask coverage differs by "
        f"{100 * coverage.mean():.3f} percentage points on average "
        f"({100 * coverage.max():.3f} at most)"
    )


if __name__ == "__main__":
    main()
