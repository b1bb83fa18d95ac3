"""The heads registry: one decorated factory per head name.

A factory takes keyword arguments ``class_weight``, ``seed``, ``n_samples`` (a hint: how
many rows the head will be trained on, used to size grids and pick the SVM kernel) and
``n_jobs``, and returns an unfitted scikit-learn estimator. Every head is a
``TunedClassifier`` around a ``Pipeline`` whose first step scales or L2-normalises, so the
scaler and the hyper-parameter choice are both refit inside each cross-validation fold
(``logreg`` is a ``Pipeline`` around ``LogisticRegressionCV``, for speed).

From Python::

    from heads import make_head
    clf = make_head("logreg", class_weight="balanced").fit(X_train, y_train)
"""

from __future__ import annotations

import difflib
from typing import Callable

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from featurize.errors import UserError
from heads.estimators import CosineCentroidClassifier, TunedClassifier

_REGISTRY: dict[str, dict] = {}

# Above this many training rows the default `svm` is linear: kernel SVMs cost O(n^2) memory/time
# and on deep features a linear boundary is usually as accurate.
RBF_MAX_SAMPLES = 4000
INNER_FOLDS = 3
PARALLEL_MIN_SAMPLES = 2000
LARGE_SAMPLES = 4000


def register(name: str, description: str, alias_of: str | None = None) -> Callable:
    """Decorator: register ``factory`` under ``name``; returns the factory unchanged."""

    def wrap(factory: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} is already registered")
        _REGISTRY[name] = {"factory": factory, "description": description, "alias_of": alias_of}
        return factory

    return wrap


def list_heads(distinct: bool = False) -> list[str]:
    """Return the registered head names; ``distinct=True`` leaves out aliases (``svm``)."""
    return [n for n, s in _REGISTRY.items() if not (distinct and s["alias_of"])]


def describe_heads() -> dict[str, str]:
    """Return ``{name: one-line description}`` for every registered head."""
    return {n: s["description"] for n, s in _REGISTRY.items()}


def check_head_name(name: str) -> str:
    """Return ``name`` if registered; raises ``UserError`` listing the valid names otherwise."""
    if name in _REGISTRY:
        return name
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=1)  # names are lower case: SVM -> svm
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown head {name!r}; {hint}valid heads: {', '.join(_REGISTRY)}")


def make_head(name: str, *, class_weight: str | None = None, seed: int = 0, n_samples: int | None = None,
              n_jobs: int | None = None):
    """Build the unfitted estimator for head ``name``.

    Takes the head name and options (``class_weight`` None or "balanced"); returns a
    scikit-learn classifier. Raises ``UserError`` for an unknown name.
    """
    spec = _REGISTRY[check_head_name(name)]
    if class_weight not in (None, "balanced"):
        raise UserError(f"--class-weight must be 'balanced' or 'none', got {class_weight!r}")
    return spec["factory"](class_weight=class_weight, seed=seed, n_samples=n_samples, n_jobs=n_jobs)


def resolve_alias(name: str, n_samples: int | None = None) -> str:
    """Return the concrete head behind an alias (``svm`` -> ``svm-linear``/``svm-rbf``)."""
    check_head_name(name)
    if name == "svm":
        return "svm-rbf" if n_samples is None or n_samples <= RBF_MAX_SAMPLES else "svm-linear"
    return name


def _scoring(class_weight):
    # with balanced class weights the user says minority errors matter: select by balanced accuracy
    return "balanced_accuracy" if class_weight == "balanced" else "accuracy"


def _jobs(n_jobs, n_samples):
    # worker processes pay off only on larger data; on a few hundred rows their start-up dominates
    if n_jobs is not None:
        return n_jobs
    return -1 if n_samples is not None and n_samples >= PARALLEL_MIN_SAMPLES else None


def _inner_folds(n_samples):
    # above a few thousand rows 2 folds of half the data choose as reliably as 3, and cost about
    # half (kernel SVMs are super-linear in n): this keeps svm-rbf within seconds on 5k rows
    return 2 if n_samples is not None and n_samples > LARGE_SAMPLES else INNER_FOLDS


def _tuned(steps, grid, *, class_weight, seed, n_jobs, calibrate=False, scoring=None, n_samples=None):
    return TunedClassifier(Pipeline(steps), grid, cv=_inner_folds(n_samples), scoring=scoring or _scoring(class_weight),
                           calibrate=calibrate, random_state=seed, n_jobs=_jobs(n_jobs, n_samples))


@register("logreg", "multinomial logistic regression, C swept over 1e-4..1e1 on a warm-started path")
def _logreg(*, class_weight, seed, n_samples, n_jobs):
    from sklearn.linear_model import LogisticRegressionCV

    # LogisticRegressionCV warm-starts each C from the previous solution, ~2x faster than a grid
    # search. Its scaler is fit on the whole training part (unsupervised, and never on held-out data).
    folds = INNER_FOLDS if n_samples is None else max(2, min(INNER_FOLDS, n_samples // 2))
    clf = LogisticRegressionCV(Cs=list(np.logspace(-4, 1, 6)), cv=_LogregFolds(folds, seed), l1_ratios=(0.0,),
                               scoring=_scoring(class_weight), class_weight=class_weight, max_iter=1000, tol=1e-3,
                               n_jobs=_jobs(n_jobs, n_samples), use_legacy_attributes=False, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


class _LogregFolds:
    """A CV splitter for LogisticRegressionCV that, like TunedClassifier, caps folds at the rarest class."""

    def __init__(self, n_splits=3, random_state=0):
        self.n_splits, self.random_state = n_splits, random_state

    def split(self, X, y, groups=None):
        from heads.estimators import stratified_folds

        return stratified_folds(y, self.n_splits, self.random_state).split(X, y)

    def get_n_splits(self, X=None, y=None, groups=None):
        return self.n_splits


@register("svm-linear", "linear SVM (LinearSVC), C swept 1e-4..1e-2, sigmoid-calibrated probabilities")
def _svm_linear(*, class_weight, seed, n_samples, n_jobs):
    from sklearn.svm import LinearSVC

    # standardised deep features are nearly separable: C above 1e-2 converges slowly (minutes on
    # trashnet) and was never chosen on the three datasets
    clf = LinearSVC(class_weight=class_weight, random_state=seed, max_iter=2000, tol=1e-3)
    return _tuned([("scale", StandardScaler()), ("clf", clf)], {"clf__C": list(np.logspace(-4, -2, 3))},
                  class_weight=class_weight, seed=seed, n_jobs=n_jobs, n_samples=n_samples, calibrate=True)


@register("svm-rbf", "RBF-kernel SVM on L2-normalised features, C in {1, 10} x gamma in {1, 4}, calibrated probabilities")
def _svm_rbf(*, class_weight, seed, n_samples, n_jobs):
    from sklearn.svm import SVC

    # on unit vectors squared distances lie in [0, 4], so gamma around 1 is the natural scale
    clf = SVC(kernel="rbf", class_weight=class_weight, cache_size=1000, random_state=seed)
    return _tuned([("scale", Normalizer()), ("clf", clf)], {"clf__C": [1.0, 10.0], "clf__gamma": [1.0, 4.0]},
                  class_weight=class_weight, seed=seed, n_jobs=n_jobs, n_samples=n_samples, calibrate=True)


@register("svm", "SVM with the kernel sized to the data: RBF up to 4,000 training rows, linear above",
          alias_of="svm-rbf|svm-linear")
def _svm(*, class_weight, seed, n_samples, n_jobs):
    name = resolve_alias("svm", n_samples)
    return _REGISTRY[name]["factory"](class_weight=class_weight, seed=seed, n_samples=n_samples, n_jobs=n_jobs)


@register("mlp", "one hidden layer of 128 ReLU units, early stopping, L2 alpha in {1e-3, 1e-1}")
def _mlp(*, class_weight, seed, n_samples, n_jobs):
    from sklearn.neural_network import MLPClassifier

    # MLPClassifier has no class_weight; balanced selection (scoring) is still honoured
    # early stopping on a 10 % validation cut keeps it to seconds; it needs a few hundred rows
    clf = MLPClassifier(hidden_layer_sizes=(128,), early_stopping=n_samples is None or n_samples >= 200,
                        n_iter_no_change=5, max_iter=60, random_state=seed)
    return _tuned([("scale", StandardScaler()), ("clf", clf)], {"clf__alpha": [1e-3, 1e-1]},
                  class_weight=class_weight, seed=seed, n_jobs=n_jobs, n_samples=n_samples)


@register("knn", "k nearest neighbours by cosine distance, distance-weighted, k in {1, 5, 15, 25}")
def _knn(*, class_weight, seed, n_samples, n_jobs):
    from sklearn.neighbors import KNeighborsClassifier

    ks = [1, 5, 15, 25]
    if n_samples is not None:  # an inner training fold holds about (1 - 1/folds) of the rows
        ks = [k for k in ks if k <= max(1, int(n_samples * (INNER_FOLDS - 1) / INNER_FOLDS))] or [1]
    clf = KNeighborsClassifier(weights="distance", algorithm="brute")
    return _tuned([("scale", Normalizer()), ("clf", clf)], {"clf__n_neighbors": ks},
                  class_weight=class_weight, seed=seed, n_jobs=n_jobs, n_samples=n_samples)


@register("centroid", "nearest class mean by cosine similarity; softmax temperature chosen by log-loss")
def _centroid(*, class_weight, seed, n_samples, n_jobs):
    return _tuned([("scale", Normalizer()), ("clf", CosineCentroidClassifier())],
                  {"clf__temperature": [0.01, 0.03, 0.1]},
                  class_weight=class_weight, seed=seed, n_jobs=n_jobs, n_samples=n_samples, scoring="neg_log_loss")


@register("sgd", "out-of-core logistic regression by SGD: `fit` streams the shards in bounded memory (features "
          "larger than memory); alpha and epochs chosen on a held-out chunk")
def _sgd(*, class_weight, seed, n_samples, n_jobs):
    from heads.outofcore import SGDHead

    return SGDHead(class_weight=class_weight, random_state=seed)
