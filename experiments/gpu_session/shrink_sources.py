"""A smaller copy of the raw Kvasir-SEG and CVC-ClinicDB folders, in their own layouts, for
the GPU machine: images downscaled to a shorter side of ``--short-side`` px and stored as JPEG,
masks as PNG. ``siamdiff prepare`` reads the copy with the same readers, ids, groups and split
as the originals (files keep their stems; readers pair images and masks by stem, any suffix).

Kvasir-SEG's ``kavsir_bboxes.json`` is left out: it holds the original sizes, which the
reader checks. CVC-ClinicDB's README.txt (its frame -> sequence table) is copied.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from siamdiff.data.readers import load_mask, load_rgb

LAYOUTS = {  # dataset -> (image folder, mask folder, extra files copied as they are)
    "Kvasir-SEG": ("images", "masks", ()),
    "CVC-ClinicDB": ("Original", "Ground Truth", ("README.txt",)),
}


def shrunk(image: Image.Image, short_side: int, resample: Image.Resampling) -> Image.Image:
    scale = short_side / min(image.size)
    if scale >= 1:
        return image
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, resample)


def shrink_dataset(source: Path, dest: Path, short_side: int, quality: int) -> int:
    images, masks, extras = LAYOUTS[source.name]
    (dest / images).mkdir(parents=True, exist_ok=True)
    (dest / masks).mkdir(parents=True, exist_ok=True)
    for name in extras:
        shutil.copy2(source / name, dest / name)
    count = 0
    for path in sorted((source / images).iterdir()):
        image = Image.fromarray(load_rgb(path))
        shrunk(image, short_side, Image.Resampling.LANCZOS).save(
            dest / images / f"{path.stem}.jpg", quality=quality
        )
        count += 1
    for path in sorted((source / masks).iterdir()):
        mask = Image.fromarray(load_mask(path).astype("uint8") * 255)
        shrunk(mask, short_side, Image.Resampling.BILINEAR).save(dest / masks / f"{path.stem}.png")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", type=Path, nargs="+", help="Kvasir-SEG and/or CVC-ClinicDB")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short-side", type=int, default=288)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    for source in args.sources:
        if source.name not in LAYOUTS:
            parser.error(f"{source}: expected a folder named one of {', '.join(LAYOUTS)}")
        count = shrink_dataset(source, args.out / source.name, args.short_side, args.quality)
        print(f"{source.name}: {count} images -> {args.out / source.name}")


if __name__ == "__main__":
    main()
