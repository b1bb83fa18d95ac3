"""The torch half of extraction: reader -> model -> writer.

- reader: DataLoader workers decode + resize on uint8 (``featurize.loading``); a file that
  fails becomes a recorded status, never an exception (on CUDA, JPEGs decode on the GPU:
  ``featurize.gpu``);
- model: an engine (``featurize.engines``) runs batched inference in ``inference_mode``;
- writer: rows go to immutable HDF5 shards every few seconds (``featurize.cache``).
``featurize.stages.embed`` drives them (as it drives the lean and Ray paths); the extraction
driver imports this module only when there is something to embed, so a re-run with nothing new
never pays for importing torch.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field

import torch

from featurize import cache as fc
from featurize.backbones import Backbone, get_backbone, resolve_device, resolve_precision
from featurize.engines import LazyEngine, make_engine
from featurize.loading import ImageReader, reader, worker_init  # noqa: F401  (re-exported)
from featurize.options import resolve_workers


def tune_allocator() -> None:
    """Stop glibc from returning big activation buffers to the OS after every batch.

    With default thresholds each batch's large tensors are mmap'ed and unmapped again, so
    every batch page-faults its memory back in (2x slower on this class of CPU). Raising the
    mmap and trim thresholds keeps that memory in the heap. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


def default_workers() -> int:
    return resolve_workers(None)


# --------------------------------------------------------------------------- model


@dataclass
class Extractor:
    """A built backbone + engine + feature space: the torch path's stages (``featurize.stages.Extractor``)."""

    label = "extract"
    backbone: Backbone
    engine: object
    device: torch.device
    precision: str
    space: fc.FeatureSpace
    build: dict = field(default_factory=dict)

    def model(self):
        if isinstance(self.engine, LazyEngine):  # build it now, so that the build (a conversion included)
            _ = self.engine.engine               # is timed as load_model
        # one engine per space: a fallback engine never adds vectors to another engine's space
        self.space.claim_engine(getattr(self.engine, "name", "torch"))  # a LazyEngine names what it built
        return self.engine

    def reader(self, paths: list[str], batch_size: int, workers: int):
        from featurize.gpu import device_reader, gpu_decode_available

        if gpu_decode_available(self.device):  # nvjpeg: JPEGs decode and resize on the GPU
            return device_reader(paths, self.backbone.preprocess, batch_size, workers, self.device)
        return reader(paths, self.backbone.preprocess, batch_size, workers, pin=self.device.type == "cuda")


def build_extractor(cache, backbone: str, weights: str | None = None, device: str = "auto",
                    precision: str = "auto", engine: str = "auto") -> Extractor:
    """Build the backbone and engine and register its feature space in the cache.

    Raises ``UserError`` for unknown backbones/devices/precisions or missing weights.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bb = get_backbone(backbone, weights=weights)
    config = bb.space_config(prec)
    space = fc.FeatureSpace(cache, fc.space_id_for(config))
    build = {"backbone": backbone if not os.path.isdir(backbone) else os.path.realpath(backbone),
             "weights": os.path.realpath(weights) if weights else None}
    engine = space.engine_for(engine)  # auto keeps the engine whose vectors the space holds
    eng = make_engine(bb, dev, prec, engine, cache_dir=cache, space_id=space.space_id, lazy=True)
    space.create({**config, "build": build, "dim": bb.dim}, bb.dim)
    return Extractor(bb, eng, dev, prec, space, build)
