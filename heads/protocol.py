"""The evaluation protocol: no test data ever touches training or hyper-parameter choice.

* split layout (``train`` plus ``val`` and/or ``test``): fit on train (hyper-parameters by
  inner CV on train only), score on val and on test, and keep that fitted head.
* otherwise: stratified k-fold cross-validation (each outer fold tunes on its own training
  part), metrics as mean +/- std over folds plus pooled out-of-fold predictions for the
  confusion matrix; then the final head is fit on everything.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurize.errors import UserError
from featurize.options import check_folds, check_n_jobs, check_seed
from heads.metrics import compute_metrics, summarize_folds
from heads.parallel import Progress, capped_threads, plan_jobs, run_tasks
from heads.registry import check_head_name, make_head, resolve_alias

MAX_KEPT_ERRORS = 300  # misclassified held-out rows kept in the head file for the report gallery


@dataclass
class LabelledFeatures:
    """The labelled rows of one dataset in one feature space."""

    X: np.ndarray
    y: np.ndarray
    splits: np.ndarray
    paths: np.ndarray
    index_path: str
    root: str
    layout: str
    space_id: str
    space_info: dict = field(default_factory=dict)


def load_labelled(cache, data=None, backbone=None) -> LabelledFeatures:
    """Read the cached features of ``data`` (latest extracted dataset when None).

    Takes the cache dir, dataset folder and backbone (name or space id; latest when None);
    returns ``LabelledFeatures`` with only labelled rows. Raises ``UserError`` for an empty
    cache, missing extraction, no labels, or fewer than two classes.
    """
    from featurize.cache import find_index, load_features, resolve_space

    ipath, index = find_index(cache, data)
    space = resolve_space(cache, index, backbone)
    check_fits_in_memory(index, space)
    X, labels, splits, paths = load_features(cache, index, space)
    if len(X) == 0:
        raise UserError(f"no embedded images for {index.root} in space {space.space_id}; run `extract {index.root}`")
    keep = np.array([bool(lab) for lab in labels], dtype=bool)
    if not keep.any():
        raise UserError(f"the images of {index.root} have no labels (flat folder); "
                        f"arrange them as {index.root}/<class>/*.jpg and re-run `extract`")
    out = LabelledFeatures(X[keep], labels[keep].astype(str), splits[keep].astype(str), paths[keep].astype(str),
                           str(ipath), index.root, index.layout, space.space_id, space.info())
    check_labels(out.y, out.splits)
    return out


def feature_bytes(n_rows: int, dim: int) -> int:
    """Memory the in-memory heads need to load ``n_rows`` vectors: the rows, plus the copy made
    when they are gathered in index order."""
    return 2 * n_rows * dim * 4


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(index, space, available: int | None = None) -> None:
    """Raise ``UserError`` (with the size, suggesting ``sgd``) when loading the features would exhaust memory.

    ``available``: bytes free (default: the system's available memory now).
    """
    n, dim = int(index.ok_mask().sum()), int(space.info().get("dim", 0))
    need, have = feature_bytes(n, dim), available if available is not None else available_memory()
    if have is not None and need > have:
        raise UserError(f"the features of {index.root} are {n:,} x {dim} float32, {need / 1e9:.1f} GB to load with "
                        f"this head, more than the {have / 1e9:.1f} GB of memory available; use `fit --head sgd`, "
                        "which streams them from the cache in bounded memory")


def has_split(splits) -> bool:
    """True when the rows carry a train split and at least one held-out split."""
    s = set(np.asarray(splits).tolist())
    return "train" in s and bool(s & {"val", "test"})


def check_eval_options(folds=5, seed=0, n_jobs=None) -> None:
    """Raise ``UserError`` for an unusable ``folds``/``seed``/``n_jobs`` (before any file is read)."""
    check_folds(folds)
    check_seed(seed)
    check_n_jobs(n_jobs)


def check_labels(y, splits=None, folds: int = 5) -> None:
    """Raise ``UserError`` unless every class can be trained and validated.

    Takes labels and optional split names; needs at least two classes in the training part
    and at least two images per class there (one for fitting, one for choosing its
    hyper-parameters).
    """
    y = np.asarray(y)
    train = y[np.asarray(splits) == "train"] if splits is not None and has_split(splits) else y
    classes, counts = np.unique(train, return_counts=True)
    where = "the train split" if splits is not None and has_split(splits) else "the dataset"
    if len(classes) < 2:
        raise UserError(f"{where} has only one class ({', '.join(map(str, classes)) or 'none'}); "
                        "a classifier needs at least 2 class folders")
    lonely = [str(c) for c, n in zip(classes, counts) if n < 2]
    if lonely:
        raise UserError(f"class {', '.join(map(repr, lonely))} has a single image in {where}; "
                        "add at least one more image to it (2+ per class, ideally 10+) or remove that class folder")


@dataclass
class Evaluation:
    """What ``evaluate`` measured and the fitted final head."""

    head: str  # the name asked for
    resolved: str  # the concrete head (svm -> svm-linear/svm-rbf)
    protocol: str  # "split" or "cv-<k>"
    metrics: dict  # {"val": ..., "test": ...} or {"cv": {... pooled, "mean": ..., "std": ...}}
    estimator: object
    classes: list
    fit_seconds: float  # fitting the final head (search included)
    eval_seconds: float  # the whole protocol, final fit included
    best_params: dict
    errors: list  # misclassified held-out rows: {path, true, pred, prob}
    n_train: int = 0  # rows the final head was fit on (after --exclude)


def _proba(est, X):
    return est.predict_proba(X) if hasattr(est, "predict_proba") else None


def _misclassified(paths, y, pred, proba, classes, part):
    """Misclassified rows (at most MAX_KEPT_ERRORS), taken in turn from each true class, the most
    confident mistakes first: the report's gallery of the first few then shows every class."""
    prob = {i: float(proba[i, classes.index(pred[i])]) if proba is not None else None
            for i in np.flatnonzero(pred != y)}
    by_class: dict[str, list[int]] = {}
    for i in sorted(prob, key=lambda i: -(prob[i] or 0.0)):  # stable: path order among equals
        by_class.setdefault(str(y[i]), []).append(i)
    order = [i for turn in itertools.zip_longest(*by_class.values()) for i in turn if i is not None]
    return [{"path": str(paths[i]), "true": str(y[i]), "pred": str(pred[i]), "prob": prob[i], "part": part}
            for i in order[:MAX_KEPT_ERRORS]]


def best_params(est) -> dict:
    """Return the hyper-parameters the inner CV chose, as JSON-able values."""
    params = getattr(est, "best_params_", None)
    if params is None:  # logreg: a Pipeline around LogisticRegressionCV
        last = est.steps[-1][1] if hasattr(est, "steps") else est
        params = {"clf__C": float(np.ravel(last.C_)[0])} if hasattr(last, "C_") else {}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _fit_fold(head, X, y, tr, te, class_weight, seed, n_jobs):
    """One outer fold (``te`` None: the final head on all rows): ``(estimator or None, pred, proba)``."""
    est = make_head(head, class_weight=class_weight, seed=seed, n_samples=len(tr), n_jobs=n_jobs)
    t = time.perf_counter()
    est.fit(X[tr], y[tr])
    fit_s = time.perf_counter() - t
    if te is None:
        return est, None, None, fit_s
    return None, est.predict(X[te]), _proba(est, X[te]), fit_s


def evaluate(head: str, X, y, splits=None, paths=None, *, class_weight=None, seed: int = 0, folds: int = 5,
             n_jobs=None, progress: bool = True, exclude=None) -> Evaluation:
    """Run the protocol for one head and return an ``Evaluation`` holding the final fitted head.

    Takes the head name, features ``X`` (n, d), labels ``y``, split names (``''`` when
    none), file paths (for the error gallery), class weighting, seed, the number of outer
    folds, and ``exclude``, a boolean mask of rows never trained on (``--exclude``): they
    are still scored when held out, so the metric covers the same images. The outer folds
    and the final fit run side by side on the cores for large data (``heads.parallel``; same
    results as one at a time); ``progress`` prints a line per finished fold on stderr once
    the run is long. Raises ``UserError`` for an unknown head or unusable labels.
    """
    check_head_name(head)
    X, y = np.asarray(X), np.asarray(y).astype(str)
    splits = np.asarray(splits if splits is not None else [""] * len(y)).astype(str)
    paths = np.asarray(paths if paths is not None else [""] * len(y)).astype(str)
    check_eval_options(folds, seed, n_jobs)
    check_labels(y, splits, folds)
    exclude = np.zeros(len(y), bool) if exclude is None else np.asarray(exclude, bool)
    if exclude.any():
        check_labels(y[~exclude], splits[~exclude], folds)  # what is left must still train every class
    t0 = time.perf_counter()
    run = _evaluate_split if has_split(splits) else _evaluate_cv
    est, classes, metrics, errors, protocol, n_train, fit_s = run(head, X, y, splits, paths, exclude, class_weight,
                                                                   seed, folds, n_jobs, progress)
    return Evaluation(
        head=head, resolved=resolve_alias(head, n_train), protocol=protocol, metrics=metrics, estimator=est,
        classes=classes, fit_seconds=fit_s, eval_seconds=time.perf_counter() - t0,
        best_params=best_params(est), errors=errors, n_train=n_train,
    )


def _evaluate_split(head, X, y, splits, paths, exclude, class_weight, seed, folds, n_jobs, progress):
    """The split protocol: fit on train, score val and test."""
    train = (splits == "train") & ~exclude
    classes = sorted(set(y[train]))
    est = make_head(head, class_weight=class_weight, seed=seed, n_samples=int(train.sum()), n_jobs=n_jobs)
    t = time.perf_counter()
    with capped_threads(1):  # the search's own workers carry the parallelism
        est.fit(X[train], y[train])
    fit_s = time.perf_counter() - t
    metrics, errors = {}, []
    for part in ("val", "test"):
        m = splits == part
        if m.any():
            pred, proba = est.predict(X[m]), _proba(est, X[m])
            metrics[part] = compute_metrics(y[m], pred, proba, classes)
            errors += _misclassified(paths[m], y[m], pred, proba, classes, part)
    return est, classes, metrics, errors, "split", int(train.sum()), fit_s


def _evaluate_cv(head, X, y, splits, paths, exclude, class_weight, seed, folds, n_jobs, progress):
    """Stratified k-fold CV (pooled out-of-fold predictions), then the final head fit on all rows."""
    from sklearn.model_selection import StratifiedKFold

    classes = sorted(set(y))
    k = min(folds, int(np.unique(y, return_counts=True)[1].min()))
    outer = [(tr[~exclude[tr]], te) for tr, te in StratifiedKFold(n_splits=k, shuffle=True,
                                                                     random_state=seed).split(X, y)]
    everything = np.flatnonzero(~exclude)
    jobs = plan_jobs(n_jobs, k + 1, len(y))
    inner_jobs = 1 if jobs > 1 else n_jobs  # no workers inside workers
    # the k outer folds and the final head on all rows are independent: one task each
    tasks = [(head, X, y, tr, te, class_weight, seed, inner_jobs) for tr, te in outer]
    tasks.append((head, X, y, everything, None, class_weight, seed, inner_jobs))
    bar = Progress(f"{head} ({k}-fold CV)", k + 1) if progress else None
    done = (lambda i, _: bar.step(f"fold {i + 1}/{k} done" if i < k else "final head fit on all rows")) \
        if bar else None
    results = run_tasks(_fit_fold, tasks, jobs, done)
    pred = np.empty(len(y), dtype=object)
    proba = np.zeros((len(y), len(classes)))
    fold_metrics = []
    for (_, te), (_, p_te, pr_te, _) in zip(outer, results[:k]):
        pred[te] = p_te
        if pr_te is not None:  # a fold may miss no class (stratified), so columns match `classes`
            proba[te] = pr_te
        fold_metrics.append(compute_metrics(y[te], pred[te], pr_te, classes))
    pred = pred.astype(str)
    pooled = compute_metrics(y, pred, proba, classes)
    pooled["mean"], pooled["std"] = summarize_folds(fold_metrics)
    pooled["folds"] = k
    est, _, _, fit_s = results[k]
    return est, classes, {"cv": pooled}, _misclassified(paths, y, pred, proba, classes, "cv"), f"cv-{k}", \
        int(len(everything)), fit_s


def primary(metrics: dict) -> tuple[str, dict]:
    """Return ``(part, scalars)`` used to rank heads: test, else val, else cross-validated mean."""
    for part in ("test", "val"):
        if part in metrics:
            return part, metrics[part]
    return "cv", metrics["cv"]["mean"]


def head_path(cache, index_path, space_id: str, head: str) -> Path:
    """Default file for a fitted head: ``<cache>/heads/<dataset>/<space_id>/<head>.joblib``."""
    from featurize.layout import Cache

    return Cache.of(cache).head_path(index_path, space_id, head)
