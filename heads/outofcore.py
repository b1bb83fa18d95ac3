"""The out-of-core head ``sgd``: logistic regression by SGD over the cache's shards, in bounded memory.

``fit --head sgd`` never holds the feature matrix. Memory is one chunk of ``CHUNK_ROWS`` rows,
the held-out tuning chunk and a few int arrays per row, whatever the number of images:

1. plan: the index's hash, label, split and status columns (not the paths), each labelled row
   located in a shard by its content hash;
2. statistics: mean and variance of the training rows in one streaming pass (the standardisation);
3. epochs: chunks made of blocks drawn at random across the shards (extraction writes them in
   folder order, so sequential chunks would each hold one class), standardised, then
   ``SGDClassifier.partial_fit`` on one model per ``alpha``; after each epoch every candidate is
   scored on the tuning chunk (rows held out of training) and the best (alpha, epoch) is kept;
4. scoring: the val/test rows (or a held-out part when the folder has no split) are streamed
   through the chosen head.

The same algorithm also fits arrays in memory (:class:`SGDHead`, the ``sgd`` registry entry, so
``compare`` can rank it). Torch-free, like the rest of ``heads``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featurize.errors import UserError

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strength; more rows want less (chest X-ray, 4.7k rows: 1e-1)
CHUNK_ROWS = 8192  # rows per partial_fit call (40 MB at D = 1,280)
BLOCK_ROWS = 32  # contiguous rows read at a time (160 kB at D = 1,280); a chunk gathers 256 random blocks
TUNE_FRACTION, TUNE_MAX = 0.1, 20_000  # the tuning chunk: held out of training, at most this many rows
HOLDOUT_FRACTION = 0.2  # scored part when the folder has no train/val/test split
PATIENCE = 3  # epochs without a better tuning score before stopping


def epochs_for(n_train: int) -> int:
    """About a million samples seen per candidate: 2 epochs at 500k+ rows, up to 30 on small sets."""
    return int(min(30, max(2, math.ceil(1_000_000 / max(n_train, 1)))))


def _score(model, X, y, balanced: bool) -> float:
    """Minus the log-loss on the tuning rows (class-balanced with balanced weights).

    Log-loss rather than accuracy: on a few hundred tuning rows accuracy ties across alphas and
    epochs, and the accuracy-best weak penalties give over-confident probabilities.
    """
    proba = np.clip(model.predict_proba(X), 1e-15, 1.0)
    col = {c: k for k, c in enumerate(model.classes_.tolist())}
    p = proba[np.arange(len(y)), [col[c] for c in np.asarray(y).tolist()]]
    if not balanced:
        return float(np.mean(np.log(p)))
    return float(np.mean([np.mean(np.log(p[np.asarray(y) == c])) for c in np.unique(y)]))


def fit_streaming(chunks, tune_X, tune_y, classes, *, alphas=ALPHAS, epochs=None, seed=0, class_weight=None,
                  log=None):
    """Fit standardisation + SGD logistic regression from a chunk source; return ``(pipeline, info)``.

    ``chunks(rng)`` yields ``(X float32, y)`` chunks of the training rows, every row once, in an
    order drawn from ``rng`` (sequential when None); it is iterated once for the statistics and
    once per epoch. ``tune_X``/``tune_y`` are the held-out rows that choose alpha and the epoch.
    """
    from sklearn.linear_model import SGDClassifier

    classes = np.asarray(classes)
    n, s1, s2, counts = 0, None, None, {c: 0 for c in classes.tolist()}
    for X, y in chunks(None):
        X64 = X.astype(np.float64)
        s1 = X64.sum(0) if s1 is None else s1 + X64.sum(0)
        s2 = (X64 * X64).sum(0) if s2 is None else s2 + (X64 * X64).sum(0)
        n += len(X)
        for c, k in zip(*np.unique(y, return_counts=True)):
            counts[c] += int(k)
    if not n:
        raise UserError("no training rows for the sgd head; check the dataset's train split")
    scaler = StandardScaler()
    scaler.mean_ = s1 / n
    scaler.var_ = np.maximum(s2 / n - scaler.mean_ ** 2, 0.0)
    scale = np.sqrt(scaler.var_)
    scaler.scale_ = np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)
    scaler.n_features_in_, scaler.n_samples_seen_ = len(scaler.mean_), n
    mean32, inv32 = scaler.mean_.astype(np.float32), (1.0 / scaler.scale_).astype(np.float32)
    weights = None
    if class_weight == "balanced":  # partial_fit cannot compute it: counts come from the statistics pass
        weights = {c: n / (len(classes) * k) for c, k in counts.items() if k}
    models = [SGDClassifier(loss="log_loss", alpha=a, average=True, random_state=seed, class_weight=weights)
              for a in alphas]
    tune_s = (np.asarray(tune_X, np.float32) - mean32) * inv32
    epochs = epochs or epochs_for(n)
    best, stale, history, t0 = None, 0, [], time.perf_counter()
    with ThreadPoolExecutor(max(1, min(len(models), os.cpu_count() or 1))) as pool:  # SGD runs without the GIL
        for epoch in range(epochs):
            rng = np.random.default_rng(seed * 1000 + epoch)
            for X, y in chunks(rng):
                Xs = (X - mean32) * inv32
                list(pool.map(lambda m, Xs=Xs, y=y: m.partial_fit(Xs, y, classes=classes), models))
            scores = [_score(m, tune_s, tune_y, class_weight == "balanced") for m in models]
            history.append(scores)
            k = int(np.argmax(scores))
            if best is None or scores[k] > best[0]:
                best, stale = (scores[k], alphas[k], epoch + 1, copy.deepcopy(models[k])), 0
            else:
                stale += 1
            if log and time.perf_counter() - t0 > 2:  # progress only once a run is long enough to wonder
                log(f"sgd epoch {epoch + 1}/{epochs}: tuning log-loss {-max(scores):.4f} (alpha {alphas[k]:g})")
            if stale >= PATIENCE:
                break
    score, alpha, epoch, model = best
    info = {"best_params": {"alpha": alpha, "epochs": epoch}, "tune_log_loss": -score, "n_train": n,
            "n_tune": int(len(tune_y)), "epochs_run": len(history)}
    return Pipeline([("scale", scaler), ("clf", model)]), info


class SGDHead(ClassifierMixin, BaseEstimator):
    """The ``sgd`` head on arrays in memory: the same algorithm as ``fit --head sgd`` on shards."""

    def __init__(self, alphas=ALPHAS, epochs=None, tune_fraction=TUNE_FRACTION, class_weight=None, random_state=0):
        self.alphas, self.epochs, self.tune_fraction = alphas, epochs, tune_fraction
        self.class_weight, self.random_state = class_weight, random_state

    def fit(self, X, y):
        X, y = np.asarray(X, np.float32), np.asarray(y)
        rng = np.random.default_rng(self.random_state)
        order = rng.permutation(len(y))
        n_tune = min(TUNE_MAX, max(1, int(len(y) * self.tune_fraction)))
        tune, train = order[:n_tune], np.sort(order[n_tune:])

        def chunks(r):
            rows = train if r is None else r.permutation(train)
            for k in range(0, len(rows), CHUNK_ROWS):
                yield X[rows[k:k + CHUNK_ROWS]], y[rows[k:k + CHUNK_ROWS]]

        self.pipeline_, self.info_ = fit_streaming(chunks, X[tune], y[tune], np.unique(y), alphas=tuple(self.alphas),
                                                   epochs=self.epochs, seed=self.random_state,
                                                   class_weight=self.class_weight)
        self.classes_ = self.pipeline_.classes_
        self.best_params_ = self.info_["best_params"]
        return self

    def predict(self, X):
        return self.pipeline_.predict(X)

    def predict_proba(self, X):
        return self.pipeline_.predict_proba(X)


# --------------------------------------------------------------------------- the cache as a chunk source

PARTS = ("train", "tune", "val", "test", "holdout")


@dataclass
class ShardPlan:
    """Where every labelled row of one dataset lives: shard, row, label code, part (PARTS index)."""

    shards: list
    shard: np.ndarray
    row: np.ndarray
    y: np.ndarray  # class names (object)
    part: np.ndarray
    index_row: np.ndarray
    classes: list
    index_path: Path
    root: str
    layout: str
    space: object
    n_missing: int  # labelled ok rows whose vector is not in the space

    def blocks(self, mask: np.ndarray):
        """``[(shard, start, positions in the plan)]``: the rows of ``mask`` grouped by BLOCK_ROWS blocks."""
        pos = np.flatnonzero(mask)
        pos = pos[np.lexsort((self.row[pos], self.shard[pos]))]
        key = self.shard[pos].astype(np.int64) * (1 << 40) + self.row[pos] // BLOCK_ROWS
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        ends = np.r_[starts[1:], len(pos)]
        return [(int(self.shard[pos[a]]), int(self.row[pos[a]] // BLOCK_ROWS * BLOCK_ROWS), pos[a:b])
                for a, b in zip(starts, ends)]


def _index_attrs(path: Path) -> dict:
    import json

    import h5py

    with h5py.File(path, "r") as f:
        return {"root": str(f.attrs["root"]), "layout": str(f.attrs["layout"]),
                "extractions": json.loads(f.attrs["extractions"]), "updated_at": float(f.attrs["updated_at"])}


def plan_shards(cache, data=None, backbone=None, seed=0) -> ShardPlan:
    """Read what the head needs without the paths or any vector: a :class:`ShardPlan`."""
    import h5py

    from featurize import cache as fc

    cache = fc.Cache.of(cache)
    ipath = _index_file(cache, data)
    attrs = _index_attrs(ipath)
    index = fc.DatasetIndex(root=attrs["root"], layout=attrs["layout"], extractions=attrs["extractions"])
    space = fc.resolve_space(cache, index, backbone)
    try:
        with h5py.File(ipath, "r") as f:
            hashes = f["hash"][()]
            usable = (f["status"][()] == b"ok") & (f["label"][()] != b"")
            index_row = np.flatnonzero(usable)
            labels = f["label"][()][index_row]
            splits = f["split"][()][index_row]
    except Exception as e:
        raise UserError(f"cache file {ipath} is damaged ({type(e).__name__}: {e}); delete it and re-run `extract`") \
            from None
    hashes = hashes[index_row]
    shards = space.shard_paths()
    located, shard_of, row_of = [], [], []
    for s, p in enumerate(shards):
        with h5py.File(p, "r") as f:
            h = f["hash"][()]
        located.append(h)
        shard_of.append(np.full(len(h), s, np.int32))
        row_of.append(np.arange(len(h), dtype=np.int64))
    all_h = np.concatenate(located) if located else np.empty(0, "S32")
    uniq, first = np.unique(all_h, return_index=True)  # the first copy of a hash wins, as in FeatureSpace.load
    pos = np.searchsorted(uniq, hashes)
    found = pos < len(uniq)
    found[found] = uniq[pos[found]] == hashes[found]
    n_missing = int((~found).sum())
    pos, index_row, labels, splits = pos[found], index_row[found], labels[found], splits[found]
    at = first[pos]
    shard, row = np.concatenate(shard_of)[at] if len(at) else np.empty(0, np.int32), \
        np.concatenate(row_of)[at] if len(at) else np.empty(0, np.int64)
    y = np.array([b.decode() for b in labels], dtype=object)
    part = _parts(splits, seed)
    classes = sorted(set(y[part == 0].tolist()))
    return ShardPlan(shards, shard, row, y, part, index_row, classes, ipath, attrs["root"], attrs["layout"], space,
                     n_missing)


def _index_file(cache, data):
    """The index of ``data``, else of the latest extracted folder (``find_index`` words the errors)."""
    from featurize import cache as fc

    if data is not None:
        ipath = cache.index_path(data)
        if not ipath.exists():
            fc.find_index(cache, data)  # raises the usual message
        return ipath
    found = cache.index_files()
    if not found:
        fc.find_index(cache, None)  # raises the usual message
    return max(found, key=lambda p: _index_attrs(p)["updated_at"])


def _parts(splits: np.ndarray, seed: int) -> np.ndarray:
    """Each row's part: 0 train, 1 tune (drawn from train), 2 val, 3 test, 4 held out (no split
    layout: a random fraction), -1 left out (another split)."""
    rng = np.random.default_rng(seed)
    part = np.zeros(len(splits), np.int8)
    split_names = {b.decode() for b in np.unique(splits)} if len(splits) else set()
    if "train" in split_names and split_names & {"val", "validation", "valid", "test"}:
        part[:] = -1  # rows in other splits are left out
        part[splits == b"train"] = 0
        part[np.isin(splits, [b"val", b"valid", b"validation"])] = 2
        part[splits == b"test"] = 3
    else:
        part[rng.random(len(splits)) < HOLDOUT_FRACTION] = 4
    train = np.flatnonzero(part == 0)
    n_tune = min(TUNE_MAX, max(1, int(len(train) * TUNE_FRACTION)))
    part[rng.choice(train, size=min(n_tune, len(train)), replace=False)] = 1
    return part


class _ShardReader:
    """Open shard files once; read a block's selected rows."""

    def __init__(self, plan: ShardPlan):
        import h5py

        self.plan, self.files = plan, [h5py.File(p, "r") for p in plan.shards]

    def rows(self, shard: int, start: int, positions: np.ndarray) -> np.ndarray:
        emb = self.files[shard]["emb"]
        rows = self.plan.row[positions]
        block = emb[start:min(start + BLOCK_ROWS, int(rows.max()) + 1)]
        return np.asarray(block[rows - start], np.float32)

    def chunks(self, blocks, rng=None):
        """Yield ``(X, plan positions)``: CHUNK_ROWS rows from blocks in ``rng``'s order (or in order)."""
        order = range(len(blocks)) if rng is None else rng.permutation(len(blocks))
        xs, ps, n = [], [], 0
        for k in order:
            shard, start, pos = blocks[k]
            xs.append(self.rows(shard, start, pos))
            ps.append(pos)
            n += len(pos)
            if n >= CHUNK_ROWS:
                yield self._emit(xs, ps, rng)
                xs, ps, n = [], [], 0
        if xs:
            yield self._emit(xs, ps, rng)

    @staticmethod
    def _emit(xs, ps, rng):
        X, pos = np.concatenate(xs), np.concatenate(ps)
        if rng is not None:
            perm = rng.permutation(len(pos))
            X, pos = X[perm], pos[perm]
        return X, pos

    def close(self):
        for f in self.files:
            f.close()


def _check_shards(space) -> None:
    """Check the CRC of every shard ``extract`` has not checked whole yet (chunked: bounded memory)."""
    verified = space._read_verified()
    for p in space.shard_paths():
        st = p.stat()
        if verified.get(p.name) != [st.st_size, st.st_mtime_ns]:
            space._stream_rows(p, lambda rows, start: None)  # raises UserError naming a damaged shard


def fit_sgd_from_cache(cache, data=None, backbone=None, class_weight=None, seed=0, log=None,
                       max_errors: int = 300) -> dict:
    """Fit the ``sgd`` head by streaming the shards; return estimator, metrics, the ``max_errors`` most
    confident mistakes and provenance."""
    from heads.metrics import compute_metrics

    t0 = time.perf_counter()
    plan = plan_shards(cache, data, backbone, seed)
    if len(plan.classes) < 2:
        raise UserError(f"the training rows of {plan.root} hold {len(plan.classes)} class(es); a classifier needs "
                        "at least 2 class folders")
    _check_shards(plan.space)
    reader = _ShardReader(plan)
    load_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        train_blocks = plan.blocks(plan.part == 0)
        tune_X = np.concatenate([X for X, _ in reader.chunks(plan.blocks(plan.part == 1))])
        tune_pos = np.concatenate([p for _, p in reader.chunks(plan.blocks(plan.part == 1))])

        def chunks(rng):
            for X, pos in reader.chunks(train_blocks, rng):
                yield X, plan.y[pos]

        est, info = fit_streaming(chunks, tune_X, plan.y[tune_pos], np.array(plan.classes, dtype=object), seed=seed,
                                  class_weight=class_weight, log=log)
        fit_s = time.perf_counter() - t1
        metrics, errors = {}, []
        for code, name in ((2, "val"), (3, "test"), (4, "test")):  # no split: the random hold-out is the test
            if not (plan.part == code).any():
                continue
            ys, preds, probas, positions = [], [], [], []
            for X, pos in reader.chunks(plan.blocks(plan.part == code)):
                proba = est.predict_proba(X)
                ys.append(plan.y[pos])
                probas.append(proba.astype(np.float32))
                preds.append(est.classes_[proba.argmax(1)])
                positions.append(pos)
            y, pred, proba, pos = map(np.concatenate, (ys, preds, probas, positions))
            metrics[name] = compute_metrics(y.astype(str), pred.astype(str), proba, plan.classes)
            wrong = np.flatnonzero(pred != y)
            wrong = wrong[np.argsort(-proba[wrong].max(1), kind="stable")][:max_errors - len(errors)]
            errors += [(int(plan.index_row[pos[i]]), str(y[i]), str(pred[i]), float(proba[i].max()), name)
                       for i in wrong]
    finally:
        reader.close()
    return {"estimator": est, "info": info, "metrics": metrics, "errors": _error_paths(plan, errors),
            "plan": plan, "load_s": load_s, "fit_s": fit_s, "eval_s": time.perf_counter() - t0}


def _error_paths(plan: ShardPlan, errors) -> list[dict]:
    import h5py

    if not errors:
        return []
    rows = sorted({e[0] for e in errors})
    with h5py.File(plan.index_path, "r") as f:
        paths = dict(zip(rows, f["path"][rows]))
    return [{"path": paths[r].decode() if isinstance(paths[r], bytes) else str(paths[r]), "true": t, "pred": p, "prob": prob, "part": part} for r, t, p, prob, part in errors]
