"""Extraction: scan -> hash -> (reader -> model -> writer) -> index.

- scan: list the folder without decoding (``featurize.dataset``);
- hash: content hash of new or changed files only (unchanged size+mtime reuse the index);
- reader: DataLoader workers decode + resize on uint8 (``featurize.images``); a file that
  fails becomes a recorded status, never an exception;
- model: batched inference (``featurize.engines``) in ``inference_mode``, channels_last,
  bf16 autocast where the hardware runs it fast;
- writer: rows go to immutable HDF5 shards every few seconds (``featurize.cache``), so
  ``kill -9`` loses at most those seconds and the next run resumes.
Each stage is timed and reported in the summary.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurize import cache as fc
from featurize.backbones import Backbone, get_backbone, resolve_device, resolve_precision
from featurize.dataset import scan
from featurize.engines import TorchEngine, make_engine  # noqa: F401  (TorchEngine re-exported)
from featurize.errors import UserError
from featurize.images import ImageError, Preprocess, read_image


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
    return max(1, min(os.cpu_count() or 1, 8))


# --------------------------------------------------------------------------- reader


class ImageReader(Dataset):
    """Map-style dataset of files -> (index, uint8 crop or None, error, decode seconds)."""

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t = time.perf_counter()
        try:
            img = self.preprocess(read_image(self.paths[i]))
            return i, img, "", time.perf_counter() - t
        except ImageError as e:
            return i, None, str(e), time.perf_counter() - t
        except Exception as e:  # a decoder bug on one file must not end the run
            return i, None, f"cannot decode ({type(e).__name__}: {e})", time.perf_counter() - t


def _collate(items):
    ok = [(i, img) for i, img, err, _ in items if img is not None]
    return {
        "index": [i for i, _ in ok],
        "images": torch.stack([img for _, img in ok]) if ok else None,
        "errors": [(i, err) for i, img, err, _ in items if img is None],
        "decode_s": sum(t for *_, t in items),
    }


def _worker_init(_):
    # Ctrl-C goes to the whole process group; only the main process handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def reader(paths: list[str], preprocess: Preprocess, batch_size: int, workers: int, pin: bool = False):
    """Yield batches ``{index, images (uint8 NCHW), errors [(i, reason)], decode_s}`` in order."""
    loader = DataLoader(
        ImageReader(paths, preprocess), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None, pin_memory=pin,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    yield from loader


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
    eng = make_engine(bb, dev, prec, engine, cache_dir=cache_dir, space_id=space.space_id, lazy=True)
    space.create({**config, "build": build, "dim": bb.dim}, bb.dim)
    return Extractor(bb, eng, dev, prec, space, build)


# --------------------------------------------------------------------------- extract


@dataclass
class Timer:
    seconds: dict = field(default_factory=lambda: {"scan": 0.0, "hash": 0.0, "load_model": 0.0, "decode": 0.0,
                                                   "model": 0.0, "write": 0.0})


def _hash_entries(root: str, scan_entries, old: fc.DatasetIndex | None) -> tuple[list[str], list[str], int]:
    """Content hashes and statuses for every entry, reading only new/changed files."""
    prev = {}
    if old is not None:
        for i, p in enumerate(old.path):
            prev[p] = (old.size[i], old.mtime_ns[i], old.hash[i], old.status[i])
    hashes, statuses, hashed = [], [], 0
    for e in scan_entries:
        if e.error:
            hashes.append("")
            statuses.append(f"error: {e.error}")
            continue
        p = prev.get(e.path)
        if p and p[0] == e.size and p[1] == e.mtime_ns and p[2]:
            hashes.append(p[2])
            statuses.append(p[3])
            continue
        try:
            hashes.append(fc.content_hash(os.path.join(root, e.path)))
            statuses.append(fc.STATUS_PENDING)
            hashed += 1
        except OSError as err:
            hashes.append("")
            statuses.append(f"error: unreadable ({err.strerror or err})")
    return hashes, statuses, hashed


def _run_pipeline(ex: Extractor, todo: list[tuple[str, str]], batch_size: int, workers: int, timer: Timer,
                  progress: bool, on_error) -> tuple[int, bool]:
    """Embed ``todo`` [(hash, abspath)] into the space; return (rows written, interrupted)."""
    writer = fc.ShardWriter(ex.space)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="extract", dynamic_ncols=True, file=sys.stderr,
                   disable=None)  # None: only on a terminal, logs stay clean
    interrupted = False
    if todo and hasattr(ex.engine, "engine"):  # a LazyEngine: build it now, outside the model timing
        t = time.perf_counter()
        ex.engine.engine
        timer.seconds["load_model"] += time.perf_counter() - t
    try:
        from featurize.gpu import device_reader, gpu_decode_available

        if gpu_decode_available(ex.device):  # nvjpeg: JPEGs decode and resize on the GPU
            batches = device_reader([p for _, p in todo], ex.backbone.preprocess, batch_size, workers, ex.device)
        else:
            batches = reader([p for _, p in todo], ex.backbone.preprocess, batch_size, workers,
                             pin=ex.device.type == "cuda")
        for b in batches:
            timer.seconds["decode"] += b["decode_s"]
            for i, reason in b["errors"]:
                on_error(todo[i][0], reason)
            if b["images"] is not None:
                t = time.perf_counter()
                emb = ex.engine(b["images"])
                timer.seconds["model"] += time.perf_counter() - t
                writer.add([todo[i][0] for i in b["index"]], emb)
            if bar:
                bar.update(len(b["index"]) + len(b["errors"]))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.flush()  # what was embedded is kept, even on Ctrl-C
        timer.seconds["write"] += writer.seconds
        if bar:
            bar.close()
    return writer.rows_written, interrupted


def extract(data, cache_dir=None, backbone: str = "efficientnet_lite0", weights: str | None = None,
            batch_size: int = 32, workers: int | None = None, device: str = "auto", precision: str = "auto",
            engine: str = "auto", wait: bool = False, progress: bool = True) -> dict:
    """Embed every new or changed image of ``data`` into the cache and update its index.

    Returns a JSON-able summary (counts, per-stage seconds, cache paths). Raises
    ``UserError`` for a missing/empty folder, bad options or a concurrent run; per-file
    problems are recorded in the index and counted, never raised. On Ctrl-C the work done
    is saved and ``KeyboardInterrupt`` propagates after a one-line summary.
    """
    t_start = time.perf_counter()
    cache_dir = fc.default_cache_dir() if cache_dir is None else cache_dir
    workers = default_workers() if workers is None else workers
    if batch_size < 1 or workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    tune_allocator()
    timer = Timer()
    t = time.perf_counter()
    sc = scan(data)
    timer.seconds["scan"] = time.perf_counter() - t
    ipath = fc.index_path(cache_dir, sc.root)
    with fc.CacheLock(ipath.with_suffix(".lock"), wait=wait):
        old = None
        if ipath.exists():
            try:
                old = fc.read_index(ipath)
            except UserError as e:  # the index is derived data: rebuild it, features are kept
                print(f"warning: {e}; rebuilding it from the folder", file=sys.stderr)
        t = time.perf_counter()
        hashes, statuses, n_hashed = _hash_entries(sc.root, sc.entries, old)
        timer.seconds["hash"] = time.perf_counter() - t

        t = time.perf_counter()
        ex = build_extractor(cache_dir, backbone, weights, device, precision, engine)
        timer.seconds["load_model"] = time.perf_counter() - t
        fc.remove_dead_temp_files(ex.space.folder)
        quarantined = ex.space.quarantine_damaged()
        for q in quarantined:
            print(f"warning: moved damaged shard aside to {q}; its images are re-embedded", file=sys.stderr)
        known = ex.space.known_hashes()

        todo, seen = [], set()
        for i, (h, s) in enumerate(zip(hashes, statuses)):
            if not h or s.startswith("error"):
                continue
            if h.encode() in known:
                statuses[i] = fc.STATUS_OK
            elif h not in seen:
                seen.add(h)
                todo.append((h, os.path.join(sc.root, sc.entries[i].path)))
                statuses[i] = fc.STATUS_PENDING
            else:
                statuses[i] = fc.STATUS_PENDING

        index = fc.DatasetIndex(
            root=sc.root, layout=sc.layout, path=[e.path for e in sc.entries], label=[e.label for e in sc.entries],
            split=[e.split for e in sc.entries], hash=hashes, size=[e.size for e in sc.entries],
            mtime_ns=[e.mtime_ns for e in sc.entries], status=statuses,
            extractions=dict(old.extractions) if old else {},
        )
        fc.write_index(ipath, index)  # a killed run still leaves an index that names every file

        failed: dict[str, str] = {}
        written, interrupted = _run_pipeline(ex, todo, batch_size, workers, timer, progress,
                                             lambda h, reason: failed.__setitem__(h, reason))
        known = ex.space.known_hashes()
        for i, h in enumerate(hashes):
            if h in failed:
                statuses[i] = f"error: {failed[h]}"
            elif h and h.encode() in known:
                statuses[i] = fc.STATUS_OK
        n_ok = sum(s == fc.STATUS_OK for s in statuses)
        n_err = sum(s.startswith("error") for s in statuses)
        if not interrupted:
            index.extractions[ex.space.space_id] = {
                "backbone": ex.backbone.name, "finished_at": time.time(), "n_ok": n_ok, "n_failed": n_err,
                "precision": ex.precision, "engine": getattr(ex.engine, "name", "torch"), "device": str(ex.device),
            }
        fc.write_index(ipath, index)
        if not interrupted:
            t = time.perf_counter()
            ex.space.compact(max_shards=1)
            timer.seconds["write"] += time.perf_counter() - t

    wall = time.perf_counter() - t_start
    summary = {
        "dataset": sc.root, "layout": sc.layout, "backbone": ex.backbone.name, "space_id": ex.space.space_id,
        "dim": ex.backbone.dim, "device": str(ex.device), "precision": ex.precision,
        "engine": getattr(ex.engine, "name", "torch"),
        "images": len(sc.entries), "classes": len(index.classes), "ignored_files": sc.ignored,
        "hashed": n_hashed, "embedded": written, "cached": n_ok - written,
        "ok": n_ok, "failed": n_err, "pending": sum(s == fc.STATUS_PENDING for s in statuses),
        "errors": [{"path": p, "reason": r} for p, r in index.errors()][:50],
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()}, "wall_seconds": round(wall, 3),
        "images_per_second": round(written / timer.seconds["model"], 1) if written and timer.seconds["model"] else None,
        "index_file": str(ipath), "features_dir": str(ex.space.folder), "interrupted": interrupted,
    }
    if interrupted:
        print(f"Interrupted: {written} images embedded and saved, {summary['pending']} still pending; "
              "re-run the same command to resume.", file=sys.stderr)
        raise KeyboardInterrupt
    return summary


def format_summary(s: dict) -> str:
    """A short human summary of :func:`extract`'s result."""
    sec = s["seconds"]
    lines = [
        f"{s['dataset']}: {s['images']} images ({s['layout']} layout, {s['classes']} classes) -> "
        f"{s['ok']} ok, {s['failed']} failed, {s['ignored_files']} non-image files ignored",
        f"backbone {s['backbone']} (D={s['dim']}) on {s['device']} {s['precision']} [{s['engine']}]: "
        f"embedded {s['embedded']}, reused {s['cached']} from cache",
        "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in sec.items()) + f"; wall {s['wall_seconds']:.2f}s",
        f"cache: {s['index_file']} + {s['features_dir']}",
    ]
    for e in s["errors"][:10]:
        lines.append(f"  skipped {e['path']}: {e['reason']}")
    if s["failed"] > 10:
        lines.append(f"  ... {s['failed'] - 10} more (see --json)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- predict support


def embed_paths(paths: list[str], space_id: str, cache_dir=None, batch_size: int = 32, device: str = "auto",
                workers: int | None = None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed image files into an existing feature space, reusing cached vectors by content hash.

    Returns ``(X float32 (n_ok, D), ok_paths, errors [(path, reason)])``; new vectors are
    added to the cache. Raises ``UserError`` if the space is unknown or its weights changed.
    """
    cache_dir = fc.default_cache_dir() if cache_dir is None else cache_dir
    space = fc.FeatureSpace(cache_dir, space_id)
    info = space.info()
    errors: list[tuple[str, str]] = []
    hashes: dict[str, str] = {}
    for p in paths:
        try:
            hashes[p] = fc.content_hash(p)
        except FileNotFoundError:
            errors.append((p, "file not found (broken symlink?)"))
        except OSError as e:
            errors.append((p, f"unreadable ({e.strerror or e})"))
    known = space.known_hashes()
    todo, seen = [], set()
    for p, h in hashes.items():
        if h.encode() not in known and h not in seen:
            seen.add(h)
            todo.append((h, p))
    if todo:
        tune_allocator()
        build = info.get("build", {})
        ex = build_extractor(cache_dir, build.get("backbone", info["backbone"]), build.get("weights"), device,
                             info["precision"])
        if ex.space.space_id != space_id:
            raise UserError(f"the weights of {info['backbone']} changed since space {space_id} was extracted "
                            f"(now {ex.space.space_id}); re-run `extract` and `fit`")
        failed: dict[str, str] = {}
        _run_pipeline(ex, todo, batch_size, default_workers() if workers is None else workers, Timer(), False,
                      lambda h, reason: failed.__setitem__(h, reason))
        for p, h in list(hashes.items()):
            if h in failed:
                errors.append((p, failed[h]))
                del hashes[p]
    want = {h.encode() for h in hashes.values()}
    got_h, got_e = space.load(only=want)
    row = {h: i for i, h in enumerate(got_h.tolist())}
    ok_paths = [p for p in paths if p in hashes and hashes[p].encode() in row]
    X = got_e[[row[hashes[p].encode()] for p in ok_paths]] if ok_paths else np.empty((0, info["dim"]), np.float32)
    return X, ok_paths, errors
