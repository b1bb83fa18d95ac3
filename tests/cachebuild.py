"""Build real featurize caches (HDF5 index + feature shards) from synthetic features, torch-free.

Used by the heads/CLI tests: the files are written through featurize.cache exactly as
`extract` writes them, only the vectors come from Gaussian blobs instead of a backbone.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from featurize.cache import DatasetIndex, FeatureSpace, content_hash, index_path, write_index


def blobs(n_per_class: list[int], dim: int = 16, sep: float = 4.0, seed: int = 0):
    """Return ``(X float32, y codes)``: one Gaussian blob per class, centres ``sep`` apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.vstack([c + rng.normal(size=(n, dim)) for c, n in zip(centres, n_per_class)]).astype(np.float32)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return X, y


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    """Write a tiny random PNG (distinct bytes per seed) and return its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def build_cache(cache: Path, root: Path, class_names: list[str], n_per_class: list[int], *, dim: int = 16,
                splits: list[str] | None = None, backbone: str = "tiny", space_id: str = "tiny-000000000001",
                images: bool = False, unlabelled: bool = False, seed: int = 0, sep: float = 4.0):
    """Write a dataset index for ``root`` and a feature space into ``cache``.

    ``splits`` gives one split name per row ('' for none); ``images=True`` writes a real tiny
    PNG per row under ``root`` (hashes are then the real content hashes, so `predict` finds them).
    Returns ``(X, labels, paths)``.
    """
    X, codes = blobs(n_per_class, dim, sep, seed)
    labels = [class_names[c] for c in codes]
    n = len(labels)
    splits = splits or [""] * n
    paths, rels, hashes = [], [], []  # the index holds root-relative paths, as `extract` writes them
    for i, (lab, sp) in enumerate(zip(labels, splits)):
        rel = Path(sp) / lab / f"img{i:04d}.png" if sp else Path(lab) / f"img{i:04d}.png"
        p = Path(root) / rel
        if images:
            write_png(p, seed * 100000 + i)
            hashes.append(content_hash(p))
        else:
            hashes.append(hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=16).hexdigest())
        paths.append(str(p))
        rels.append(rel.as_posix())
    space = FeatureSpace(Path(cache), space_id)
    # the same keys `extract` writes; the backbone name is not a real one, so nothing can re-embed here
    space.create({"backbone": backbone, "build": {"backbone": backbone, "weights": None}, "precision": "fp32",
                  "preprocess": {"resize": 8, "crop": 8}}, dim)
    space.write_shard(hashes, X)
    layout = "split" if any(splits) else ("flat" if unlabelled else "folder")
    idx = DatasetIndex(
        root=str(root), layout=layout, path=rels, label=[""] * n if unlabelled else labels, split=list(splits),
        hash=hashes, size=[1] * n, mtime_ns=[0] * n, status=["ok"] * n,
        extractions={space_id: {"backbone": backbone, "finished_at": time.time()}},
    )
    write_index(index_path(cache, root), idx)
    return X, labels, paths


def add_space(cache: Path, root: Path, backbone: str, space_id: str, dim: int = 12, seed: int = 1):
    """Add a second feature space (another backbone) for every row of an existing index."""
    from featurize.cache import read_index

    ip = index_path(cache, root)
    idx = read_index(ip)
    codes = np.unique(idx.label, return_inverse=True)[1]
    X, _ = blobs([int((codes == k).sum()) for k in range(codes.max() + 1)], dim, 4.0, seed)
    order = np.argsort(codes, kind="stable")
    Xr = np.empty_like(X)
    Xr[order] = X
    space = FeatureSpace(Path(cache), space_id)
    space.create({"backbone": backbone}, dim)
    space.write_shard(idx.hash, Xr)
    idx.extractions[space_id] = {"backbone": backbone, "finished_at": time.time()}
    write_index(ip, idx)
