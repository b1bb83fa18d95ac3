"""The torch half of extraction: reader -> model -> writer.

- reader: DataLoader workers decode + resize on uint8 (``featurize.loading``); a file that
  fails becomes a recorded status, never an exception (on CUDA, JPEGs decode on the GPU:
  ``featurize.gpu``);
- model: an engine (``featurize.engines``) runs batched inference in ``inference_mode``;
- writer: rows go to immutable HDF5 shards every few seconds (``featurize.cache``).
``featurize.extract`` imports this module only when there is something to embed, so a
re-run with nothing new never pays for importing torch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from featurize import cache as fc
from featurize.backbones import Backbone, get_backbone, resolve_device, resolve_precision
from featurize.engines import LazyEngine, make_engine
from featurize.fastpath import drive, finish, progress_bar
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
    """A built backbone + engine + feature space, ready to embed batches."""

    backbone: Backbone
    engine: object
    device: torch.device
    precision: str
    space: fc.FeatureSpace
    build: dict = field(default_factory=dict)


def build_extractor(cache_dir, backbone: str, weights: str | None = None, device: str = "auto",
                    precision: str = "auto", engine: str = "auto") -> Extractor:
    """Build the backbone and engine and register its feature space in the cache.

    Raises ``UserError`` for unknown backbones/devices/precisions or missing weights.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bb = get_backbone(backbone, weights=weights)
    config = bb.space_config(prec)
    space = fc.FeatureSpace(cache_dir, fc.space_id_for(config))
    build = {"backbone": backbone if not os.path.isdir(backbone) else os.path.realpath(backbone),
             "weights": os.path.realpath(weights) if weights else None}
    engine = space.engine_for(engine)  # auto keeps the engine whose vectors the space holds
    eng = make_engine(bb, dev, prec, engine, cache_dir=cache_dir, space_id=space.space_id, lazy=True)
    space.create({**config, "build": build, "dim": bb.dim}, bb.dim)
    return Extractor(bb, eng, dev, prec, space, build)


def run_pipeline(ex: Extractor, todo: list[tuple[str, str]], batch_size: int, workers: int, seconds: dict,
                  progress: bool, on_error) -> tuple[int, bool]:
    """Embed ``todo`` [(hash, abspath)] into the space; return (rows written, interrupted).

    Adds the load_model/decode/model/write seconds into ``seconds`` (updated in place) and
    calls ``on_error(hash, reason)`` for each file that cannot be decoded.
    """
    writer = fc.ShardWriter(ex.space)
    bar = progress_bar(len(todo), progress)
    interrupted = False
    batches = None
    if todo and isinstance(ex.engine, LazyEngine):  # build it now, timed as load_model (hasattr() would
        # evaluate the property, so the build - a conversion included - went untimed)
        t = time.perf_counter()
        _ = ex.engine.engine  # the property builds it
        seconds["load_model"] = seconds.get("load_model", 0.0) + time.perf_counter() - t
    if todo:  # one engine per space: a fallback engine never adds vectors to another engine's space
        ex.space.claim_engine(getattr(ex.engine, "name", "torch"))  # a LazyEngine names what it built
    try:
        from featurize.gpu import device_reader, gpu_decode_available

        if gpu_decode_available(ex.device):  # nvjpeg: JPEGs decode and resize on the GPU
            batches = device_reader([p for _, p in todo], ex.backbone.preprocess, batch_size, workers, ex.device)
        else:
            batches = reader([p for _, p in todo], ex.backbone.preprocess, batch_size, workers,
                             pin=ex.device.type == "cuda")
        drive(ex.engine, batches, todo, writer, seconds, bar, on_error)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        finish(batches, writer, bar, seconds)
    return writer.rows_written, interrupted
