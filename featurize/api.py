"""The Python API, for notebooks and scripts (``import featurize as fz``)::

    run = fz.extract("data/", backbone="efficientnet_lite0", cache="cache/")   # an Extraction
    ds = fz.load_features("data/", cache="cache/")        # Features: X, y, paths, classes, splits
    X = fz.embed(["a.jpg", "b.png"])                       # or PIL images / uint8 arrays
    pipe = make_pipeline(fz.Embedder("efficientnet_lite0"), LogisticRegression())
    fit = fz.fit("data/", head="svm", cache="cache/")     # a Fit: metrics and the head file
    head = fz.load_head(fit.path); head.predict(["new.jpg"])
    found = fz.audit("data/", cache="cache/")             # an Audit: label errors, duplicates, outliers
    fz.fit("data/", head="svm", cache="cache/", exclude=found.paths["csv"])

Importing this module is torch-free and fast: torch, timm and scikit-learn are imported by
the functions that need them. Errors you can fix raise ``featurize.UserError`` worded for a
Python caller (``batch_size=``, not ``--batch-size``); the CLI words the same errors for flags.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurize.errors import UserError

DEFAULT_BACKBONE = "efficientnet_lite0"

# --------------------------------------------------------------------------- errors for Python callers

_BOOL_FLAGS = {"trust", "wait", "train-bn", "no-progress", "json"}


def _flag(m: re.Match) -> str:
    name, value = m.group(1), m.group(2)
    py = name.replace("-", "_")
    if name in _BOOL_FLAGS:
        return f"{py}=True"
    return f"{py}={value.strip()}" if value else py


def _call(m: re.Match) -> str:
    """`` `fit --head logreg DATA` `` -> `` `featurize.fit('DATA', head='logreg')` ``."""
    tokens, args, i = m.group(2).split(), [], 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--"):
            key = t[2:].replace("-", "_")
            if t[2:] in _BOOL_FLAGS or i + 1 == len(tokens):
                args.append(f"{key}=True")
            else:
                args.append(f"{key}={tokens[i + 1]!r}")
                i += 1
        else:
            args.insert(sum(not a.count("=") for a in args), repr(t))
        i += 1
    return f"`featurize.{m.group(1)}({', '.join(args)})`"


def python_wording(message: str) -> str:
    """Reword a CLI-worded message for a Python caller: `` `extract DATA` `` -> ``featurize.extract('DATA')``,
    ``--batch-size`` -> ``batch_size``, ``--weights PATH`` -> ``weights=PATH``, ``--trust`` -> ``trust=True``."""
    message = re.sub(r"`(extract|fit)((?: [^`]+)?)`", _call, message)
    parts = message.split("`")  # flags inside another command's backticks stay CLI flags
    parts[::2] = [re.sub(r"--([a-z][a-z0-9-]*)( [A-Z][A-Z_]*\b)?", _flag, p) for p in parts[::2]]
    return "`".join(parts)


@contextlib.contextmanager
def _python_errors():
    try:
        yield
    except UserError as e:
        raise type(e)(python_wording(str(e)), e.details) from None


def _api(fn):
    """Public API function: its UserErrors are worded for Python callers."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _python_errors():
            return fn(*args, **kwargs)

    return wrapper


def _cache_dir(cache):
    from featurize.layout import Cache

    return Cache.of(cache)  # None: $FEATURIZE_CACHE or ./cache


# --------------------------------------------------------------------------- extract


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract` did. ``summary`` is the full JSON-able summary (``extract --json``)."""

    dataset: str
    layout: str
    backbone: str
    space_id: str
    dim: int
    images: int
    ok: int
    failed: int
    embedded: int
    cached: int
    index_file: str
    features_dir: str
    summary: dict = field(repr=False)

    @classmethod
    def from_summary(cls, s: dict) -> "Extraction":
        names = [f for f in cls.__dataclass_fields__ if f != "summary"]
        return cls(**{k: s.get(k) for k in names}, summary=s)

    def to_dict(self) -> dict:
        return dict(self.summary)


@_api
def extract(data, backbone: str = DEFAULT_BACKBONE, cache=None, *, weights: str | None = None,
            batch_size: int = 32, workers: int | None = None, device: str = "auto", precision: str = "auto",
            engine: str = "auto", wait: bool = False, progress: bool = False) -> Extraction:
    """Embed every new or changed image of the folder ``data`` into ``cache`` (default
    ``$FEATURIZE_CACHE`` or ``./cache``) and return an :class:`Extraction`.

    ``data`` is ``<class>/<image>``, ``{train,val,test}/<class>/<image>`` or a flat folder.
    Unreadable images are recorded and counted (``.failed``), never raised. Raises
    ``UserError`` for a missing/empty folder, bad options, or another extract of the same folder.
    """
    from featurize.extract import extract as run

    s = run(data, cache_dir=_cache_dir(cache), backbone=backbone, weights=weights, batch_size=batch_size,
            workers=workers, device=device, precision=precision, engine=engine, wait=wait, progress=progress)
    return Extraction.from_summary(s)


# --------------------------------------------------------------------------- cached features


@dataclass
class Features:
    """The embedded images of one dataset in one feature space, in index order.

    ``X`` float32 (n, D); ``y`` labels (``""`` for unlabelled images); ``paths`` absolute file
    paths; ``splits`` ``train``/``val``/``test`` (``""`` without a split layout); ``classes``
    the sorted label names.
    """

    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    classes: list[str]
    splits: np.ndarray
    root: str
    space_id: str
    backbone: str

    def __len__(self) -> int:
        return len(self.y)

    def split(self, name: str) -> "Features":
        """The rows of one split (``train``, ``val`` or ``test``)."""
        m = self.splits == name
        return Features(self.X[m], self.y[m], [p for p, k in zip(self.paths, m) if k], self.classes, self.splits[m],
                        self.root, self.space_id, self.backbone)


@_api
def load_features(data=None, cache=None, backbone: str | None = None) -> Features:
    """The cached features of the folder ``data`` (the latest extracted when None).

    ``backbone`` is a backbone name or feature-space id (the latest extraction when None).
    Reads only HDF5 files: no torch. Raises ``UserError`` when ``data`` was not extracted.
    """
    from featurize import cache as fc

    cache_dir = _cache_dir(cache)
    _, index = fc.find_index(cache_dir, data)
    space = fc.resolve_space(cache_dir, index, backbone)
    X, labels, splits, rel = fc.load_features(cache_dir, index, space)
    paths = [os.path.join(index.root, p) for p in rel]
    return Features(X, labels.astype(str), paths, index.classes, splits.astype(str), index.root, space.space_id,
                    space.info().get("backbone", space.space_id))


# --------------------------------------------------------------------------- embed


def _to_uint8_chw(item):
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


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


class _Model:
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
        files = [i for i, x in enumerate(items) if _is_path(x)]
        arrays = [i for i, x in enumerate(items) if not _is_path(x)]
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
            batch = torch.stack([self.backbone.preprocess(_to_uint8_chw(items[i])) for i in chunk])
            out[chunk] = self.engine(batch)
        return out

    def _files(self, paths, batch_size, workers):
        if self.ex is not None:
            from featurize.extract import embed_files

            return embed_files(self.space, paths, lambda: self.ex, batch_size, workers)
        from featurize.pipeline import reader

        vectors, errors = {}, []
        for b in reader(paths, self.backbone.preprocess, batch_size, workers or 0):
            errors += [(paths[i], reason) for i, reason in b["errors"]]
            if b["images"] is not None:
                vectors.update(zip((paths[i] for i in b["index"]), self.engine(b["images"])))
        return vectors, errors


@functools.lru_cache(maxsize=4)
def _model(backbone, weights, cache, device, precision, engine) -> _Model:
    return _Model(backbone, weights, cache, device, precision, engine)


def _as_list(images) -> list:
    if type(images).__name__ == "Tensor" and getattr(images, "ndim", 0) == 3:
        return [images]  # one (3, H, W) tensor
    if _is_path(images) or (isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8):
        return [images]  # one image
    if hasattr(images, "convert") and hasattr(images, "size"):
        return [images]
    return list(images)


@_api
def embed(images, backbone: str = DEFAULT_BACKBONE, cache=None, *, weights: str | None = None,
          batch_size: int = 32, workers: int | None = None, device: str = "auto", precision: str = "auto",
          engine: str = "auto") -> np.ndarray:
    """Embed images with a frozen backbone; returns float32 ``(n, D)``, one row per input, in order.

    ``images``: file paths, PIL images, uint8 arrays ``(H, W[, 3])``, uint8 tensors ``(3, H, W)``
    (or a mix; a 4-D ``(N, H, W, 3)`` array is N images). With ``cache`` (a folder), files are
    looked up by content hash and new vectors are added there (the same vectors ``extract``
    writes); in-memory images are always computed. The built model is kept for the next call.
    Raises ``UserError`` naming any file that cannot be read or decoded.
    """
    items = _as_list(images)
    model = _model(backbone, weights, None if cache is None else str(cache), device, precision, engine)
    if not items:
        return np.empty((0, model.dim), np.float32)
    return model(items, batch_size, workers)


# --------------------------------------------------------------------------- scikit-learn transformer


def _sklearn_base():
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin

    return ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator


def __getattr__(name):
    # Embedder subclasses scikit-learn classes; building it on first use keeps `import featurize.api`
    # free of scikit-learn's import time.
    if name == "Embedder":
        global Embedder
        Embedder = _make_embedder()
        return Embedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_embedder():
    class Embedder(*_sklearn_base()):
        """A scikit-learn transformer: images in (file paths, PIL images or uint8 arrays), backbone
        embeddings out (float32 ``(n, D)``).

        Stateless (``fit`` only builds the model and records ``D``), cache-backed when ``cache``
        is a folder, and usable in any ``Pipeline``::

            make_pipeline(fz.Embedder("efficientnet_lite0", cache="cache/"), LogisticRegression())
        """

        def __init__(self, backbone=DEFAULT_BACKBONE, cache=None, weights=None, batch_size=32, device="auto",
                     precision="auto", engine="auto"):
            self.backbone = backbone
            self.cache = cache
            self.weights = weights
            self.batch_size = batch_size
            self.device = device
            self.precision = precision
            self.engine = engine

        def _built(self) -> _Model:
            with _python_errors():
                return _model(self.backbone, self.weights, None if self.cache is None else str(self.cache),
                              self.device, self.precision, self.engine)

        def fit(self, X=None, y=None):
            """Build the backbone (nothing is learned); sets ``n_features_out_`` and ``space_id_``."""
            model = self._built()
            self._n_features_out = model.dim
            self.space_id_ = model.space.space_id
            return self

        @property
        def n_features_out_(self) -> int:
            return self._n_features_out

        def transform(self, X):
            """Embed each image of ``X``; returns float32 ``(len(X), D)``."""
            items = _as_list(X)
            model = self._built()
            if not hasattr(self, "_n_features_out"):  # stateless: transform without fit is fine
                self._n_features_out, self.space_id_ = model.dim, model.space.space_id
            with _python_errors():
                return model(items, self.batch_size, None) if items else np.empty((0, model.dim), np.float32)

        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.input_tags.two_d_array = False  # images, not a feature matrix
            tags.input_tags.string = True  # file paths
            tags.requires_fit = False
            tags.transformer_tags.preserves_dtype = []
            return tags

    Embedder.__module__, Embedder.__qualname__ = __name__, "Embedder"  # picklable as featurize.api.Embedder
    return Embedder


# --------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class Fit:
    """What :func:`fit` did: the head file, its held-out metrics and the fit summary (``fit --json``)."""

    head: str
    path: str
    space_id: str
    classes: list
    metrics: dict
    summary: dict = field(repr=False)

    def to_dict(self) -> dict:
        return dict(self.summary)


@_api
def fit(data=None, head: str = "logreg", cache=None, *, backbone: str | None = None, out=None,
        class_weight: str | None = None, seed: int = 0, folds: int = 5, n_jobs: int | None = None,
        exclude=None) -> Fit:
    """Fit a head (``logreg``, ``svm``, ``mlp``, ``knn``, ``centroid``, ...) on the cached features of
    ``data``, score it on held-out images (val/test split, else nested k-fold CV) and save it
    (default ``<cache>/heads/<dataset>/<space>/<head>.joblib``). ``exclude``: a file of images left
    out of training only (an :func:`audit` CSV or a list of paths). Torch-free."""
    from heads.commands import fit_head

    o = fit_head(_cache_dir(cache), head, data, backbone, out, class_weight, seed, folds, n_jobs, exclude)
    s = o.summary
    return Fit(s["head"], s["paths"]["model"], s["space_id"], [str(c) for c in s["classes"]], s["metrics"], s)


@dataclass(frozen=True)
class Audit:
    """What :func:`audit` found: ``rows`` has one dict per flagged image and issue (the CSV's rows)."""

    label_issues: int
    near_duplicate_groups: int
    outliers: int
    rows: list = field(repr=False)
    paths: dict = field(default_factory=dict)
    summary: dict = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.summary)


@_api
def audit(data=None, cache=None, *, backbone: str | None = None, head: str = "logreg",
          class_weight: str | None = None, seed: int = 0, folds: int = 5, n_jobs: int | None = None,
          dup_threshold: float | None = None, out=None, html: bool = False) -> Audit:
    """Suspected label errors (cleanlab on out-of-sample probabilities of ``head``), near-duplicates
    (flagged across labels and splits) and outliers in the cached features of ``data``; writes
    ``<cache>/reports/audit-<dataset>.csv/.json`` (and ``.html`` with ``html=True``). Torch-free."""
    from heads.audit import DUP_THRESHOLD, audit_to_files

    result, s = audit_to_files(_cache_dir(cache), data, backbone, head, class_weight=class_weight, seed=seed,
                               folds=folds, n_jobs=n_jobs, out=out, html=html,
                               threshold=DUP_THRESHOLD if dup_threshold is None else dup_threshold)
    return Audit(s["label_issues"]["n"], s["near_duplicates"]["n_groups"], s["outliers"]["n"], result["rows"],
                 s["paths"], s)


class Head:
    """A fitted head with its feature space: ``predict``/``predict_proba`` take images.

    Images are file paths (their cached vectors are reused by content hash; the rest are
    embedded with the head's own backbone and added to the cache), PIL images or uint8 arrays;
    a float feature matrix ``(n, D)`` of the head's space is used as is.
    """

    def __init__(self, estimator, meta: dict, path, cache: Path):
        self.estimator, self.meta, self.path, self.cache = estimator, meta, Path(path), Path(cache)

    def __repr__(self) -> str:
        return f"Head({self.meta.get('head')!r} on {self.meta.get('space_id')}, {len(self.classes_)} classes)"

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.estimator.classes_)

    def _features(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 2 and images.dtype.kind == "f":
            return images
        items = _as_list(images)
        from featurize import cache as fc

        info = fc.FeatureSpace(self.cache, self.meta["space_id"]).info()
        how = info.get("build", {})
        with _python_errors():
            model = _model(how.get("backbone", info["backbone"]), how.get("weights"), str(self.cache), "auto",
                           info["precision"], "auto")
            if model.space.space_id != self.meta["space_id"]:
                raise UserError(f"the weights of {info['backbone']} changed since {self.path} was fit "
                                f"(now space {model.space.space_id}); re-run extract and fit")
            return model(items, 32, None)

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities ``(n, n_classes)``, columns in ``classes_`` order."""
        return self.estimator.predict_proba(self._features(images))

    def predict(self, images) -> np.ndarray:
        """The predicted label of each image."""
        return self.estimator.predict(self._features(images))


class RunHead:
    """A fine-tuning run folder (``runs/ft-NNN/``) used as a classifier: backbone and head end to end."""

    def __init__(self, run_dir, device: str = "auto"):
        import json

        from featurize.registry import RUN_META

        self.path, self.device = Path(run_dir), device
        self.meta = json.loads((self.path / RUN_META).read_text())
        self.classes_ = np.asarray(self.meta["classes"])

    def __repr__(self) -> str:
        return f"RunHead({str(self.path)!r}, {len(self.classes_)} classes)"

    def predict_proba(self, images) -> np.ndarray:
        from featurize.finetune import predict_run

        paths = [os.fspath(p) for p in _as_list(images)]
        if not all(isinstance(p, str) for p in paths):
            raise UserError("a fine-tuning run predicts image files; pass file paths")
        with _python_errors():
            probs, _, ok, errors = predict_run(self.path, paths, device=self.device)
        if errors:
            raise UserError(f"{len(errors)} image files could not be read ({errors[0][0]}: {errors[0][1]}); "
                            "remove or fix them")
        return probs

    def predict(self, images) -> np.ndarray:
        return self.classes_[self.predict_proba(images).argmax(1)]


@_api
def load_head(path, cache=None, *, trust: bool = False):
    """Load a head written by ``fit`` (or a fine-tuning run folder); returns a :class:`Head`.

    The cache defaults to the one the head file sits in (``<cache>/heads/...``), else
    ``$FEATURIZE_CACHE`` or ``./cache``. Heads are pickles: a file this tool did not write is
    refused unless ``trust=True`` (only for files from a source you trust).
    """
    from featurize.registry import is_run_folder

    if is_run_folder(path):
        return RunHead(path)
    from heads.store import load_head as load

    estimator, meta = load(path, trust=trust)
    from featurize.layout import Cache

    home = Cache(cache) if cache is not None else Cache.of_head(path) or Cache()
    return Head(estimator, meta, path, home.root)
