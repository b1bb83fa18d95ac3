"""Converted engines, stored once per user and shared by every cache (torch-free).

Converting a backbone to OpenVINO takes seconds and the result depends only on the feature
space and the OpenVINO version, not on the cache folder, so it lives in the user's engine
store (``featurize.layout.engine_store_dir()``: ``$FEATURIZE_ENGINES``, else
``~/.cache/featurize/engines``)::

    <space_id>-openvino-<openvino version>/   model.xml + model.bin, meta.json, compiled/ (OpenVINO's blob)
    requests/<digest>.json                    what an extract request resolved to on this host

Two processes converting at once each build in a private temp folder and publish it with one
atomic ``rename``; the loser deletes its copy and uses the winner's, so a reader never sees
a half-written engine. The ``requests`` records let a later ``extract`` -- into any cache,
a brand-new one included -- know the feature space, its preprocessing and its engine without
importing torch (``featurize.fastpath``).

This module and :class:`CompiledEngine` import neither torch nor OpenVINO at import time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from featurize import __version__
from featurize import cache as fc
from featurize.layout import engine_store_dir
from featurize.registry import PACKAGED_WEIGHTS, base_name

META = "meta.json"


@functools.cache
def openvino_version() -> str | None:
    """The installed OpenVINO's version, read from its package metadata (no import), or None."""
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def engine_dir(space_id: str, store: Path | None = None) -> Path:
    """The store folder of the OpenVINO engine of ``space_id`` for the installed OpenVINO."""
    store = engine_store_dir() if store is None else Path(store)
    return store / f"{space_id}-openvino-{openvino_version() or 'none'}"


def is_complete(folder: Path) -> bool:
    """A published engine folder (the IR and its meta; a folder is published whole or not at all)."""
    return (folder / "model.xml").is_file() and (folder / "model.bin").is_file() and (folder / META).is_file()


def new_temp_dir(final: Path) -> Path:
    """A private folder beside ``final`` to build an engine in before :func:`publish`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def publish(tmp: Path, final: Path) -> bool:
    """Atomically rename the finished ``tmp`` folder to ``final``; return False when another
    process published ``final`` first (``tmp`` is then deleted and the winner's folder is used).

    An incomplete ``final`` (left by an older version that wrote in place) is replaced.
    """
    for _ in range(2):
        try:
            os.rename(tmp, final)  # fails (ENOTEMPTY/EEXIST) when final exists and is not empty
            return True
        except OSError:
            if is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
            try:
                os.rename(final, stale)
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    return True


def remove_dead_temp_dirs(store: Path | None = None) -> None:
    """Delete temp folders of conversions that died (older than an hour: a live one takes seconds)."""
    import time

    store = engine_store_dir() if store is None else Path(store)
    for p in store.glob(".tmp-*"):
        try:
            if time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- request records


def host() -> dict:
    """What decides ``--device auto`` and ``--precision auto`` here, read without torch: a record
    made on this host is not used after a GPU appears or on another CPU (a shared home folder)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return {"machine": platform.machine(), "system": platform.system(),
            "bf16": "amx_bf16" in flags or "avx512_bf16" in flags,
            "nvidia": os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")}


def _request_path(key: dict, engine: str, store: Path | None) -> Path:
    store = engine_store_dir() if store is None else Path(store)
    canon = json.dumps({"request": key, "engine": engine, "host": host(), "openvino": openvino_version()},
                       sort_keys=True, separators=(",", ":"))
    return store / "requests" / f"{hashlib.sha256(canon.encode()).hexdigest()[:24]}.json"


def remember(key: dict, engine: str, record: dict, store: Path | None = None) -> None:
    """Record what ``key`` (an extract request) resolved to with ``engine`` on this host:
    ``record`` = {space_id, space (the space.json content), engine, precision, device, backbone, dim}."""
    path = _request_path(key, engine, store)
    try:
        fc._atomic_text(path, json.dumps({**record, "request": key}, sort_keys=True))
    except OSError:  # a read-only home folder only costs the torch-free start next time
        pass


def recall(key: dict, engine: str, store: Path | None = None) -> dict | None:
    """The record :func:`remember` wrote for ``key``/``engine`` on this host, or None."""
    try:
        rec = json.loads(_request_path(key, engine, store).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("request") != key or not isinstance(rec.get("space"), dict):
        return None
    return rec


# --------------------------------------------------------------------------- running a stored engine


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core, kept until exit.

    Each Core's CPU plugin installs its own signal stack (sigaltstack) on the thread that loads
    it and puts the previous one back when the Core is freed. Freed out of order (two engines,
    the first dropped first), the thread is left on a freed stack and the next Ctrl-C is a
    segfault instead of KeyboardInterrupt. One Core means one plugin, installed once.
    """
    import openvino as ov

    return ov.Core()


def compile_config(precision: str, threads: int, folder: Path | None) -> dict:
    # THROUGHPUT: OpenVINO splits the threads into streams (2 x 1 thread on 2 cores) that
    # each run a whole batch. Streams of one thread never stall at a barrier when a decode
    # worker takes their core, and two batches in flight hide the hand-over between
    # batches: 1.1-1.2x the img/s of one LATENCY stream end to end (benchmarks/RESULTS.md).
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_NUM_THREADS": threads,
    }
    if folder is not None:
        config["CACHE_DIR"] = str(folder / "compiled")
    return config


class CompiledEngine:
    """A compiled OpenVINO model: uint8 (N, 3, H, W) batches in, float32 (N, D) out.

    ``model`` is an ``ov.Model`` or the path of a stored ``model.xml`` (compiling from the path
    lets OpenVINO load its compiled blob without reading the IR at all).
    """

    name = "openvino"

    def __init__(self, model, precision: str, threads: int, dim: int, folder: Path | None = None):
        self.precision, self.threads, self.dim = precision, threads, dim
        core = openvino_core()
        self.compiled = core.compile_model(model if not isinstance(model, Path) else str(model), "CPU",
                                           compile_config(precision, threads, folder))
        self.in_flight = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests = [self.compiled.create_infer_request() for _ in range(self.in_flight)]

    def __call__(self, images) -> np.ndarray:
        """uint8 (N, 3, H, W) -> float32 (N, D) numpy (one batch, one stream)."""
        return list(self.map([(None, images)]))[0][1]

    def map(self, batches, requests=None):
        """Keep up to ``in_flight`` batches running (one per stream); yield results in order.

        ``requests``: run on these of the engine's infer requests only (so that concurrent callers,
        each with its own requests, share one compiled engine: ``featurize.distributed``)."""
        from collections import deque

        # running: (tag, request, input kept alive)
        free, running = deque(self.requests if requests is None else requests), deque()

        def finish():
            tag, req, _ = running.popleft()
            req.wait()
            out = np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
            free.append(req)
            return tag, out

        try:
            for tag, images in batches:
                x = np.ascontiguousarray(np.asarray(images), dtype=np.uint8)  # a torch tensor views as numpy
                if len(x) == 0:  # nothing to run: keep the order by finishing what runs first
                    while running:
                        yield finish()
                    yield tag, np.empty((0, self.dim), np.float32)
                    continue
                if not free:
                    yield finish()
                req = free.popleft()
                req.start_async({0: x}, share_inputs=True)
                running.append((tag, req, x))
            while running:
                yield finish()
        finally:  # abandoned (Ctrl-C, an error downstream): leave no request busy for the next map
            for _, req, _ in running:
                req.wait()


def load_stored(folder: Path, precision: str, threads: int, dim: int) -> CompiledEngine:
    """Compile a published engine folder (its compiled blob makes this well under a second)."""
    return CompiledEngine(folder / "model.xml", precision, threads, dim, folder)


def _stat(path) -> list | None:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def request_key(backbone: str, weights: str | None, device: str, precision: str) -> dict:
    """What the user asked for, plus the size/mtime of every weights file it reads.

    A finished extraction records its key next to the space id it resolved to, so a later
    run with the same key knows the space without importing torch or hashing weights.
    """
    files = {}
    if weights:
        files[os.path.realpath(weights)] = _stat(weights)
    if os.path.isdir(backbone):
        for name in sorted(os.listdir(backbone)):
            files[os.path.realpath(os.path.join(backbone, name))] = _stat(os.path.join(backbone, name))
    elif base_name(backbone) in PACKAGED_WEIGHTS and not weights:  # efficientnet_lite0@320 too
        folder = PACKAGED_WEIGHTS[base_name(backbone)].weights_folder()
        for name in sorted(os.listdir(folder)) if folder and folder.is_dir() else []:
            files[os.path.join(folder, name)] = _stat(os.path.join(folder, name))
    return {"backbone": os.path.realpath(backbone) if os.path.isdir(backbone) else backbone,
            "device": device, "precision": precision, "files": files, "featurize": __version__}
