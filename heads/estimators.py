"""The two estimators that scikit-learn does not ship, written to its conventions.

* ``TunedClassifier``: choose hyper-parameters by stratified cross-validation on the data
  given to ``fit`` only (so an outer split or fold never leaks into the choice), refit the
  best candidate on all of it, and optionally calibrate probabilities (SVMs have none).
* ``CosineCentroidClassifier``: one mean vector per class on the unit sphere; probabilities
  are a softmax of cosine similarities with a temperature.

Both pass ``sklearn.utils.estimator_checks.parametrize_with_checks`` (tests/test_heads_estimators.py).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def stratified_folds(y, n_splits: int, random_state=0) -> StratifiedKFold:
    """Return a shuffled StratifiedKFold with at most as many folds as the rarest class has members.

    Takes labels ``y`` and the wanted ``n_splits``; returns the splitter. Raises ``ValueError``
    when a class has fewer than two members (no fold could both train on it and score it).
    """
    _, counts = np.unique(y, return_counts=True)
    k = min(int(n_splits), int(counts.min()))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 samples per class, got {int(counts.min())}")
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=random_state)


class TunedClassifier(ClassifierMixin, BaseEstimator):
    """Pick ``param_grid`` values by inner stratified CV, refit on everything, optionally calibrate.

    Parameters
    ----------
    estimator : classifier (usually a Pipeline with its scaler, so scaling is refit per fold)
    param_grid : dict or None — candidates; one candidate (or None) skips the search
    cv : int — inner folds (capped at the rarest class count)
    scoring : str — the selection metric (``accuracy``, ``balanced_accuracy``, ``neg_log_loss`` ...)
    calibrate : bool — wrap the chosen model in sigmoid ``CalibratedClassifierCV`` for ``predict_proba``
    random_state : int — seeds the fold shuffling
    n_jobs : int or None — parallel candidate fits
    """

    def __init__(self, estimator=None, param_grid=None, cv=3, scoring="accuracy", calibrate=False,
                 random_state=0, n_jobs=None):
        self.estimator = estimator
        self.param_grid = param_grid
        self.cv = cv
        self.scoring = scoring
        self.calibrate = calibrate
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _base(self):
        if self.estimator is not None:
            return self.estimator
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=1000)

    def fit(self, X, y):
        """Search, refit and calibrate on ``(X, y)``; returns self."""
        X, y = validate_data(self, X, y, ensure_min_samples=2)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"expected at least 2 classes, got {len(self.classes_)}")
        grid = dict(self.param_grid or {})
        n_candidates = int(np.prod([len(v) for v in grid.values()])) if grid else 1
        _, counts = np.unique(y, return_counts=True)
        can_cv = counts.min() >= 2
        if n_candidates > 1 and can_cv:
            folds = stratified_folds(y, self.cv, self.random_state)
            search = GridSearchCV(self._base(), grid, cv=folds, scoring=self.scoring, refit=False,
                                  n_jobs=self.n_jobs, error_score="raise")
            search.fit(X, y)
            self.best_params_ = search.best_params_
            self.best_score_ = float(search.best_score_)
            self.cv_results_ = {k: search.cv_results_[k] for k in ("params", "mean_test_score", "std_test_score")}
        else:  # nothing to choose, or too few samples to cross-validate: first candidate
            self.best_params_ = {k: v[0] for k, v in grid.items()}
            self.best_score_ = float("nan")
            self.cv_results_ = {}
        best = clone(self._base()).set_params(**self.best_params_)
        if self.calibrate and can_cv:
            from sklearn.calibration import CalibratedClassifierCV

            best = CalibratedClassifierCV(best, method="sigmoid", ensemble=False,
                                          cv=stratified_folds(y, self.cv, self.random_state))
        self.best_estimator_ = best.fit(X, y)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.best_estimator_.predict(X)

    def predict_proba(self, X):
        """Class probabilities (columns in ``classes_`` order)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        if hasattr(self.best_estimator_, "predict_proba"):
            return self.best_estimator_.predict_proba(X)
        # uncalibrated margin classifier: a softmax of decision values is a score, not a probability
        d = self.best_estimator_.decision_function(X)
        d = np.column_stack([-d, d]) if d.ndim == 1 else d
        e = np.exp(d - d.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


class CosineCentroidClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine similarity; ``predict_proba`` = softmax(cos / temperature).

    Parameters
    ----------
    temperature : float > 0 — smaller is more confident; chosen by log-loss CV in the registry
    """

    def __init__(self, temperature=0.05):
        self.temperature = temperature

    @staticmethod
    def _unit(X):
        n = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.where(n > 0, n, 1.0)

    def fit(self, X, y):
        """Compute one unit-length mean per class; returns self."""
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        U = self._unit(np.asarray(X, dtype=np.float64))
        means = np.vstack([U[codes == k].mean(axis=0) for k in range(len(self.classes_))])
        self.centroids_ = self._unit(means)
        return self

    def decision_function(self, X):
        """Cosine similarity to each class centroid, shape (n, n_classes) ((n,) for two classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        s = self._unit(np.asarray(X, dtype=np.float64)) @ self.centroids_.T
        return s[:, 1] - s[:, 0] if len(self.classes_) == 2 else s

    def _similarity(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self._unit(np.asarray(X, dtype=np.float64)) @ self.centroids_.T

    def predict(self, X):
        s = self._similarity(X)  # checks fitted before classes_ is touched
        return self.classes_[np.argmax(s, axis=1)]

    def predict_proba(self, X):
        z = self._similarity(X) / self.temperature
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
