"""Make the audit benchmark datasets under a scratch folder (never touching the shared data).

* ``flowers_flip05`` / ``flowers_flip10``: the flowers folder with 5 % / 10 % of the images moved
  (as symlinks, so the bytes and cached vectors are the same) to another class chosen at random;
  ``flipped.json`` lists the moved files with their true and given labels.
* ``flowers_dups``: every flowers image (symlinked) plus 4 transformed copies of 50 of them
  (JPEG quality 50, half size, 90 % centre crop, 5 degree rotation), written next to the original
  in the same class; ``copies.json`` maps each copy to its original.

Usage: python benchmarks/audit_data.py --src ../shared/datasets/flowers --out /tmp/i12
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def images(src: Path) -> list[Path]:
    return sorted(p for p in src.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def flipped(src: Path, out: Path, rate: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    files = images(src)
    classes = sorted({p.parent.name for p in files})
    chosen = set(rng.choice(len(files), size=int(round(rate * len(files))), replace=False).tolist())
    root = out / f"flowers_flip{int(rate * 100):02d}"
    moved = []
    for i, p in enumerate(files):
        label = p.parent.name
        if i in chosen:
            label = str(rng.choice([c for c in classes if c != p.parent.name]))
        dst = root / label / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(p.resolve(), dst)
        if i in chosen:
            moved.append({"path": f"{label}/{p.name}", "true": p.parent.name, "given": label})
    (out / f"{root.name}.json").write_text(json.dumps(moved, indent=1))
    return root


TRANSFORMS = ("jpeg50", "half", "crop90", "rot5")


def transformed(im, kind: str):
    from PIL import Image

    if kind == "half":
        return im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BILINEAR)
    if kind == "crop90":
        dx, dy = int(im.width * 0.05), int(im.height * 0.05)
        return im.crop((dx, dy, im.width - dx, im.height - dy))
    if kind == "rot5":
        return im.rotate(5, resample=Image.BICUBIC)
    return im


def duplicates(src: Path, out: Path, n: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = images(src)
    root = out / "flowers_dups"
    for p in files:
        dst = root / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(p.resolve(), dst)
    copies = {}
    for i in sorted(rng.choice(len(files), size=n, replace=False).tolist()):
        p = files[i]
        with Image.open(p) as im:
            im = im.convert("RGB")
            for kind in TRANSFORMS:
                dst = root / p.parent.name / f"dup-{kind}-{p.stem}.jpg"
                transformed(im, kind).save(dst, quality=50 if kind == "jpeg50" else 90)
                copies[f"{p.parent.name}/{dst.name}"] = f"{p.parent.name}/{p.name}"
    (out / "flowers_dups.json").write_text(json.dumps(copies, indent=1))
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1].parent / "shared/datasets/flowers"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src, out = Path(a.src), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for rate in (0.05, 0.10):
        print(flipped(src, out, rate, a.seed))
    print(duplicates(src, out, 50, a.seed))


if __name__ == "__main__":
    main()
