"""The offline demo dataset: scikit-learn's handwritten digits written out as PNG files.

scikit-learn ships the 1,797 8x8 digit scans inside its wheel, so this needs no network.
Each is upscaled to 64x64 (nearest neighbour, so the pixels stay the scanned ones) and
saved as ``<folder>/<digit>/<i>.png``: an ordinary labelled image folder. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurize.options import check_out_dir


def write_digits(folder: str | Path = "data/digits", size: int = 64) -> Path:
    """Write the digits as ``folder/<0-9>/<i>.png`` (skipping files already there); return the folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = check_out_dir(folder, "--out")
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        path = folder / str(label) / f"{i:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (255 - img * (255 / 16)).astype(np.uint8)  # dark ink on white paper, like a scan
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB").save(path)
    return folder
