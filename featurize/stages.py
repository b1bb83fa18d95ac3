"""reader -> model -> writer: the three stages of embedding, one interface whatever the engine.

Every way of embedding -- the torch-free lean path (``featurize.fastpath``), the torch path
(``featurize.pipeline``) and Ray (``featurize.distributed``) -- is an :class:`Extractor`: it
opens a :class:`Reader` over the files and hands over its :class:`Model`; :func:`embed` drives
them into a :class:`Writer` (the feature space's ``ShardWriter``) and returns what happened as
an :class:`Embedded`. Torch-free: the torch path brings its own reader and model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from featurize import cache as fc

#: a decoded batch, as every reader yields it:
#: ``{"index": [positions in todo], "images": array or None, "errors": [(position, reason)], "decode_s": float}``
#: plus optionally ``"notes": [(position, [message])]``, what the decoders said about each file
#: (``featurize.decodenotes``: recorded, never printed)
#: plus optionally ``"waited": "model"`` when the reader already ran the model (Ray: decode and model run
#: together on the cluster), so the wait for it is counted as the model's.
Batch = dict


class Reader(Protocol):
    """Decoded batches of the files, in order; ``close`` stops its workers (Ctrl-C included)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def close(self) -> None: ...


class Model(Protocol):
    """An engine: ``map`` yields ``(index, vectors float32 (n, D))`` for each ``(index, images)``."""

    name: str

    def map(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]: ...


class Writer(Protocol):
    """Where vectors go, keyed by content hash (``featurize.cache.ShardWriter``)."""

    rows_written: int

    def add(self, hashes: list[str], vectors) -> None: ...

    def flush(self) -> None: ...


class Extractor(Protocol):
    """One engine's stages for one feature space."""

    space: fc.FeatureSpace
    label: str  # the progress bar's

    def model(self) -> Model:
        """The engine, built now (timed as ``load_model``); the space is claimed for its engine."""

    def reader(self, paths: list[str], batch_size: int, workers: int) -> Reader: ...


@dataclass(frozen=True)
class Embedded:
    """What :func:`embed` did: rows written, whether Ctrl-C stopped it, the files that failed
    (``{hash: reason}``), its wall seconds by stage (``load_model``, ``decode``, ``model``,
    ``write``; ``decode_cpu`` is decoding summed over the workers, for information) and what the
    decoders said about the files (``{hash: [message]}``)."""

    written: int = 0
    interrupted: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


def embed(ex: Extractor, todo: list[tuple[str, str]], batch_size: int, workers: int,
          progress: bool = False) -> Embedded:
    """Embed ``todo`` [(hash, abspath)] into ``ex.space``: reader -> model -> writer.

    Ctrl-C stops it with what was embedded kept (``interrupted``); any other error propagates
    after the written rows are flushed.
    """
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    writer = fc.ShardWriter(ex.space)
    bar = progress_bar(len(todo), progress, ex.label)
    batches, interrupted = None, False
    try:
        t = time.perf_counter()
        model = ex.model()
        seconds["load_model"] = time.perf_counter() - t
        batches = ex.reader([p for _, p in todo], batch_size, workers)
        drive(model, batches, todo, writer, seconds, bar, failed.__setitem__, notes.__setitem__)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        finish(batches, writer, bar, seconds)
    return Embedded(writer.rows_written, interrupted, failed, seconds, notes)


def _add(seconds: dict, stage: str, s: float) -> None:
    seconds[stage] = seconds.get(stage, 0.0) + s


def drive(model: Model, batches: Reader, todo: list[tuple[str, str]], writer: Writer, seconds: dict, bar,
          on_error, on_note=None) -> None:
    """Feed decoded ``batches`` through ``model.map`` into ``writer`` (rows keyed by ``todo``'s hashes).

    Adds wall seconds to ``seconds`` (this call's own dict, from :func:`embed`): ``decode``
    (waiting for decoded batches), ``model`` (waiting for the engine) -- they do not overlap, so
    with ``write`` they add up to the loop's wall time -- and ``decode_cpu``.
    """
    feeding = [0.0]  # seconds the model's map spent waiting for decoded batches

    def fed():
        it = iter(batches)
        while True:
            t = time.perf_counter()
            b = next(it, None)
            waited = time.perf_counter() - t
            feeding[0] += waited
            if b is None:
                _add(seconds, "decode", waited)
                return
            _add(seconds, b.get("waited", "decode"), waited)
            _add(seconds, "decode_cpu", b["decode_s"])
            for i, reason in b["errors"]:
                on_error(todo[i][0], reason)
            for i, said in b.get("notes", ()) if on_note else ():
                on_note(todo[i][0], said)
            if bar and b["errors"]:
                bar.update(len(b["errors"]))
            if b["images"] is not None:
                yield b["index"], b["images"]

    results = model.map(fed())
    try:
        while True:
            t, f0 = time.perf_counter(), feeding[0]
            item = next(results, None)
            _add(seconds, "model", time.perf_counter() - t - (feeding[0] - f0))
            if item is None:
                break
            index, emb = item
            t = time.perf_counter()
            writer.add([todo[i][0] for i in index], emb)
            _add(seconds, "write", time.perf_counter() - t)
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


def finish(batches, writer: Writer, bar, seconds: dict) -> None:
    """End a run, on success, Ctrl-C or error: stop the reader, keep what was embedded, close the bar.

    The reader is closed now, in order: left to the garbage collector its decode workers die at
    interpreter exit, mid-transfer, printing tracebacks.
    """
    t = time.perf_counter()
    if hasattr(batches, "close"):
        batches.close()  # joins the decode workers
    _add(seconds, "decode", time.perf_counter() - t)
    t = time.perf_counter()
    writer.flush()  # what was embedded is kept, even on Ctrl-C
    _add(seconds, "write", time.perf_counter() - t)
    if bar:
        bar.close()
