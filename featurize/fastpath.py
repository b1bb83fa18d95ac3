"""Extraction without torch, once this user's engine store holds the converted engine.

The first ``extract`` of a request on a machine imports torch, builds the backbone, converts it
(``featurize.engines``) and records in the engine store what the request resolved to: the
feature space (id, ``space.json`` content, preprocessing) and the engine
(``featurize.enginestore.remember``). Every later ``extract`` of the same request -- in any
cache, a brand-new one included -- finds that record and runs:

    Pillow/numpy decode + resize + crop (threads, ``featurize.fastdecode``)
        -> the stored OpenVINO engine (uint8 in) -> shards

importing neither torch, torchvision nor timm (2-5 s of start-up saved on every run).
Anything the record does not cover (another engine, a GPU, a preprocessing this decoder does
not reproduce) takes the full path.

``drive`` (decoded batches -> engine -> writer, with the stage timings) is shared with the
torch pipeline (``featurize.pipeline``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from featurize import cache as fc
from featurize import enginestore, fastdecode

#: ``--engine`` values the torch-free path serves (``torch`` asks for the reference engine).
LEAN_ENGINES = ("auto", "openvino")


@dataclass
class LeanExtractor:
    """What the full path's ``Extractor`` offers the extraction loop, without torch."""

    space: fc.FeatureSpace
    record: dict
    folder: object  # the engine's folder in the store
    threads: int
    _engine: object = field(default=None, repr=False)

    @property
    def preprocess(self) -> dict:
        return self.record["space"]["preprocess"]

    @property
    def engine(self):
        """The compiled stored engine, built on first use (a run with nothing to embed never loads it)."""
        if self._engine is None:
            self._engine = enginestore.load_stored(self.folder, self.record["precision"], self.threads,
                                                   int(self.record["dim"]))
        return self._engine

    def summary(self) -> dict:
        r = self.record
        return {"backbone": r["backbone"], "precision": r["precision"], "device": r["device"],
                "engine": "openvino", "dim": int(r["dim"])}


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def lean_extractor(cache_dir, key: dict, engine: str) -> LeanExtractor | None:
    """The torch-free extractor for request ``key`` when the store has its record and engine, else None.

    Registers the feature space in ``cache_dir`` (``space.json`` from the record) when new.
    """
    if engine not in LEAN_ENGINES or enginestore.openvino_version() is None:
        return None
    rec = enginestore.recall(key, engine)
    if rec is None or rec.get("engine") != "openvino" or rec.get("device") != "cpu":
        return None
    space_meta = rec["space"]
    if not fastdecode.supports(space_meta.get("preprocess", {})):
        return None
    folder = enginestore.engine_dir(rec["space_id"])
    if not enginestore.is_complete(folder):  # the store was cleared: convert again on the full path
        return None
    space = fc.FeatureSpace(cache_dir, rec["space_id"])
    if space.held_engine() not in (None, "openvino"):  # auto keeps the engine a space holds (full path)
        return None
    if not space.exists():
        config = {k: v for k, v in space_meta.items() if k not in ("space_id", "dim", "schema_version")}
        space.create(config, int(rec["dim"]))
    return LeanExtractor(space, rec, folder, cpu_cores())


def lean_for_space(cache_dir, space_id: str, device: str = "auto") -> LeanExtractor | None:
    """The torch-free extractor for an existing feature space (``predict`` of new images) when the
    store holds its OpenVINO engine and it would run on this CPU; else None (the full path)."""
    if device not in ("auto", "cpu") or enginestore.openvino_version() is None:
        return None
    if device == "auto" and enginestore.host()["nvidia"]:  # auto would pick the GPU
        return None
    space = fc.FeatureSpace(cache_dir, space_id)
    info = space.info()
    if space.held_engine() not in (None, "openvino"):  # a space never mixes engines' vectors
        return None
    folder = enginestore.engine_dir(space_id)
    if info.get("precision") not in ("fp32", "bf16") or not fastdecode.supports(info.get("preprocess", {})) \
            or not enginestore.is_complete(folder):
        return None
    record = {"space_id": space_id, "space": info, "engine": "openvino", "precision": info["precision"],
              "device": "cpu", "backbone": info.get("backbone"), "dim": int(info["dim"])}
    return LeanExtractor(space, record, folder, cpu_cores())


def drive(engine, batches, todo: list[tuple[str, str]], writer, seconds: dict, bar, on_error) -> None:
    """Feed decoded ``batches`` through ``engine.map`` into ``writer`` (rows keyed by ``todo``'s hashes).

    Adds wall seconds to ``seconds``: ``decode`` (waiting for decoded batches), ``model``
    (waiting for the engine) -- they do not overlap, so with ``write`` they add up to the loop's
    wall time -- and ``decode_cpu`` (decoding time summed over the workers, for information).
    """
    feeding = [0.0]  # seconds the engine's map spent waiting for decoded batches

    def fed():
        it = iter(batches)
        while True:
            t = time.perf_counter()
            b = next(it, None)
            feeding[0] += time.perf_counter() - t
            if b is None:
                return
            seconds["decode_cpu"] = seconds.get("decode_cpu", 0.0) + b["decode_s"]
            for i, reason in b["errors"]:
                on_error(todo[i][0], reason)
            if bar and b["errors"]:
                bar.update(len(b["errors"]))
            if b["images"] is not None:
                yield b["index"], b["images"]

    results = engine.map(fed())
    try:
        while True:
            t, f0 = time.perf_counter(), feeding[0]
            item = next(results, None)
            waited = time.perf_counter() - t
            seconds["decode"] = seconds.get("decode", 0.0) + (feeding[0] - f0)
            seconds["model"] = seconds.get("model", 0.0) + waited - (feeding[0] - f0)
            if item is None:
                break
            index, emb = item
            t = time.perf_counter()
            writer.add([todo[i][0] for i in index], emb)
            seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - t
            if bar:
                bar.update(len(index))
    finally:
        if hasattr(results, "close"):
            results.close()


def progress_bar(n: int, progress: bool, desc: str = "extract"):
    """A tqdm bar on stderr for ``n`` images, or None (no work, or progress off)."""
    if not (progress and n):
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr,
                disable=None)  # None: only on a terminal, logs stay clean


def finish(batches, writer, bar, seconds: dict) -> None:
    """End a run, on success, Ctrl-C or error: stop the reader, keep what was embedded, close the bar.

    The reader is closed now, in order: left to the garbage collector its decode workers die at
    interpreter exit, mid-transfer, printing tracebacks.
    """
    t = time.perf_counter()
    if hasattr(batches, "close"):
        batches.close()  # joins the decode workers
    seconds["decode"] = seconds.get("decode", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    writer.flush()  # what was embedded is kept, even on Ctrl-C
    seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - t
    if bar:
        bar.close()


def run_lean(ex: LeanExtractor, todo: list[tuple[str, str]], batch_size: int, workers: int, seconds: dict,
             progress: bool, on_error) -> tuple[int, bool]:
    """Embed ``todo`` [(hash, abspath)] with the stored engine, torch-free; return (rows written, interrupted)."""
    ex.space.claim_engine("openvino")  # one engine per space (featurize.cache.FeatureSpace.claim_engine)
    writer = fc.ShardWriter(ex.space)
    bar = progress_bar(len(todo), progress)
    interrupted = False
    batches = None
    try:
        t = time.perf_counter()
        engine = ex.engine
        seconds["load_model"] = seconds.get("load_model", 0.0) + time.perf_counter() - t
        batches = fastdecode.reader([p for _, p in todo], ex.preprocess, batch_size, workers)
        drive(engine, batches, todo, writer, seconds, bar, on_error)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        finish(batches, writer, bar, seconds)
    return writer.rows_written, interrupted
