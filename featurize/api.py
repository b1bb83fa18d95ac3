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

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurize.embedding import as_list, model_for
from featurize.errors import UserError, python_errors, python_wording  # noqa: F401
from featurize.extraction import Extraction  # noqa: F401  (fz.Extraction: what fz.extract returns)
from featurize.registry import DEFAULT_BACKBONE

# --------------------------------------------------------------------------- errors for Python callers

def _api(fn):
    """Public API function: its UserErrors are worded for Python callers."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with python_errors():
            return fn(*args, **kwargs)

    return wrapper


def _plain(x):
    """``x`` with numpy strings (class names and paths read from HDF5) as ``str``: results print as
    ``{'daisy': ...}`` in a notebook, not ``{np.str_('daisy'): ...}``."""
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return str(x) if isinstance(x, str) and type(x) is not str else x


def _cache_of(cache):
    from featurize.layout import Cache

    return Cache.of(cache)  # None: $FEATURIZE_CACHE or ./cache


# --------------------------------------------------------------------------- extract


@_api
def extract(data, backbone: str = DEFAULT_BACKBONE, cache=None, *, weights: str | None = None,
            batch_size: int = 32, workers: int | None = None, device: str = "auto", precision: str = "auto",
            engine: str = "auto", wait: bool = False, progress: bool = False, ray: str | None = None,
            workers_per_node: int | None = None, gpus_per_worker: float | None = None) -> Extraction:
    """Embed every new or changed image of the folder ``data`` into ``cache`` (default
    ``$FEATURIZE_CACHE`` or ``./cache``) and return an :class:`Extraction`.

    ``data`` is ``<class>/<image>``, ``{train,val,test}/<class>/<image>`` or a flat folder.
    Unreadable images are recorded and counted (``.failed``), never raised. Raises
    ``UserError`` for a missing/empty folder, bad options, or another extract of the same folder.
    ``ray`` (``"local"``, ``"auto"`` or a cluster address) decodes and embeds on Ray Data, as
    ``extract --ray`` does (``workers_per_node``, ``gpus_per_worker`` as its flags).
    """
    from featurize.extraction import Request, extract_folder

    request = Request(backbone, weights, batch_size, workers, device, precision, engine, wait, progress)
    return extract_folder(data, _cache_of(cache), request, ray, workers_per_node, gpus_per_worker)


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

    cache = _cache_of(cache)
    _, index = fc.find_index(cache, data)
    space = fc.resolve_space(cache, index, backbone)
    X, labels, splits, rel = fc.load_features(cache, index, space)
    if len(X) == 0:  # e.g. a first extract still running: its index lists every image as pending
        pending = sum(s == fc.STATUS_PENDING for s in index.status)
        why = f" ({pending} of {len(index.status)} images pending: an extract is running or was interrupted)" \
            if pending else ""
        raise UserError(f"no embedded images for {index.root} in space {space.space_id}{why}; "
                        f"run fz.extract({index.root!r}) to finish it")
    paths = [os.path.join(index.root, p) for p in rel]
    return Features(X, labels.astype(str), paths, index.classes, splits.astype(str), index.root, space.space_id,
                    space.info().get("backbone", space.space_id))


# --------------------------------------------------------------------------- embed


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
    items = as_list(images)
    model = model_for(backbone, weights, None if cache is None else str(cache), device, precision, engine)
    if not items:
        return np.empty((0, model.dim), np.float32)
    return model(items, batch_size, workers)


# --------------------------------------------------------------------------- scikit-learn transformer


def __getattr__(name):
    # Embedder subclasses scikit-learn classes: imported on first use, so `import featurize.api`
    # does not pay scikit-learn's import time.
    if name == "Embedder":
        from featurize.embedder import Embedder

        return Embedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    o = fit_head(_cache_of(cache), head, data, backbone, out, class_weight, seed, folds, n_jobs, exclude)
    s = o.summary
    s = _plain(s)
    return Fit(s["head"], s["paths"]["model"], s["space_id"], s["classes"], s["metrics"], s)


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

    result, s = audit_to_files(_cache_of(cache), data, backbone, head, class_weight=class_weight, seed=seed,
                               folds=folds, n_jobs=n_jobs, out=out, html=html,
                               threshold=DUP_THRESHOLD if dup_threshold is None else dup_threshold)
    s = _plain(s)
    return Audit(s["label_issues"]["n"], s["near_duplicates"]["n_groups"], s["outliers"]["n"], _plain(result["rows"]),
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
        items = as_list(images)
        from featurize import cache as fc

        info = fc.FeatureSpace(self.cache, self.meta["space_id"]).info()
        how = info.get("build", {})
        with python_errors():
            model = model_for(how.get("backbone", info["backbone"]), how.get("weights"), str(self.cache), "auto",
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

        paths = [os.fspath(p) for p in as_list(images)]
        if not all(isinstance(p, str) for p in paths):
            raise UserError("a fine-tuning run predicts image files; pass file paths")
        with python_errors():
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
    ``$FEATURIZE_CACHE`` or ``./cache``, else (when that one lacks the head's feature space) the
    cache the head was fit in. Heads are pickles: a file this tool did not write is
    refused unless ``trust=True`` (only for files from a source you trust).
    """
    from featurize.registry import is_run_folder

    if is_run_folder(path):
        return RunHead(path)
    from heads.store import load_head as load

    estimator, meta = load(path, trust=trust)
    from featurize.layout import Cache

    if cache is not None:
        return Head(estimator, meta, path, Cache(cache).root)
    from heads.store import cache_for_head

    home = Cache.of_head(path) or Cache()
    try:
        home, _ = cache_for_head(home, meta)  # else the cache it was fit in
    except UserError:  # neither: a feature matrix still predicts; files fail when embedded
        pass
    return Head(estimator, meta, path, home.root)
