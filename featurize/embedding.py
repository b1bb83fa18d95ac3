"""Embedding images for the Python API: a built backbone + engine kept across calls (torch, lazily).

:class:`Model` embeds a mixed list of file paths and in-memory images (PIL, uint8 arrays or
tensors), one row per input; with a cache, files are looked up and stored by content hash
exactly as ``extract`` does. :func:`model_for` keeps the last few built models, so a notebook
calling ``fz.embed`` or an ``Embedder`` repeatedly builds the backbone once. Importing this
module is torch-free.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from featurize.errors import UserError


def to_uint8_chw(item):
    """A PIL image, an (H, W[, C]) uint8 array or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    import torch

    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image
        from PIL import ImageOps

        from featurize.pixels import BlankImage, to_rgb

        try:
            item = np.asarray(to_rgb(ImageOps.exif_transpose(item)))
        except BlankImage as e:
            raise UserError(f"cannot embed this image: {e}") from None
    if isinstance(item, torch.Tensor):
        t = item
    else:
        a = np.asarray(item)
        if a.dtype != np.uint8:
            raise UserError(f"an image array must be uint8 (0-255), got {a.dtype}; convert it with "
                            "(a * 255).astype(np.uint8) or pass a file path")
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise UserError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}")
        a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]
        t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)  # torch wants a writable array
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise UserError(f"an image tensor must be uint8 (3, H, W); got {t.dtype} {tuple(t.shape)}")
    return t


def is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


class Model:
    """A built backbone + engine (+ its feature space in a cache), reused across calls."""

    def __init__(self, backbone, weights, cache, device, precision, engine):
        from featurize.backbones import get_backbone, resolve_device, resolve_precision
        from featurize.engines import make_engine

        self.cache = None if cache is None else Path(cache)
        if self.cache is not None:  # registers the space in the cache: vectors are cached by content hash
            from featurize.pipeline import build_extractor

            self.ex = build_extractor(self.cache, backbone, weights, device, precision, engine)
            self.backbone, self.engine, self.space = self.ex.backbone, self.ex.engine, self.ex.space
        else:
            from featurize import cache as fc

            dev = resolve_device(device)
            prec = resolve_precision(precision, dev)
            self.backbone = get_backbone(backbone, weights=weights)
            # without a cache a converted engine could not be kept, so auto means the PyTorch engine
            self.engine = make_engine(self.backbone, dev, prec, "torch" if engine == "auto" else engine, lazy=True)
            self.space, self.ex = fc.FeatureSpace(Path("."), fc.space_id_for(self.backbone.space_config(prec))), None
        self.dim = self.backbone.dim

    def __call__(self, items: list, batch_size: int, workers: int | None) -> np.ndarray:
        from featurize.options import check_batch_size, resolve_workers

        check_batch_size(batch_size)
        workers = resolve_workers(workers)
        out = np.empty((len(items), self.dim), np.float32)
        files = [i for i, x in enumerate(items) if is_path(x)]
        arrays = [i for i, x in enumerate(items) if not is_path(x)]
        if files:
            paths = [os.fspath(items[i]) for i in files]
            vectors, errors = self._files(paths, batch_size, workers)
            if errors:
                listed = "; ".join(f"{p}: {r}" for p, r in errors[:5]) + (" ..." if len(errors) > 5 else "")
                raise UserError(f"{len(errors)} of the {len(paths)} image files could not be embedded ({listed}); "
                                "remove or fix them", details={"errors": [{"path": p, "reason": r} for p, r in errors]})
            out[files] = np.stack([vectors[p] for p in paths])
        for start in range(0, len(arrays), batch_size):
            import torch

            chunk = arrays[start:start + batch_size]
            batch = torch.stack([self.backbone.preprocess(to_uint8_chw(items[i])) for i in chunk])
            out[chunk] = self.engine(batch)
        return out

    def _files(self, paths, batch_size, workers):
        if self.ex is not None:
            from featurize.extraction import embed_files

            return embed_files(self.space, paths, lambda: self.ex, batch_size, workers)
        from featurize.loading import reader

        vectors, errors = {}, []
        for b in reader(paths, self.backbone.preprocess, batch_size, workers or 0):
            errors += [(paths[i], reason) for i, reason in b["errors"]]
            if b["images"] is not None:
                vectors.update(zip((paths[i] for i in b["index"]), self.engine(b["images"])))
        return vectors, errors


@functools.lru_cache(maxsize=4)
def model_for(backbone, weights, cache, device, precision, engine) -> Model:
    return Model(backbone, weights, cache, device, precision, engine)


def as_list(images) -> list:
    if type(images).__name__ == "Tensor" and getattr(images, "ndim", 0) == 3:
        return [images]  # one (3, H, W) tensor
    if is_path(images) or (isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8):
        return [images]  # one image
    if hasattr(images, "convert") and hasattr(images, "size"):
        return [images]
    return list(images)
