"""The custom estimators follow scikit-learn's conventions (its own check suite)."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from heads.estimators import CosineCentroidClassifier, TunedClassifier, stratified_folds


@parametrize_with_checks([
    TunedClassifier(LogisticRegression(max_iter=200), {"C": [0.1, 1.0]}, cv=2),
    CosineCentroidClassifier(),
])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_tuned_picks_by_inner_cv_and_refits():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (40, 5)), rng.normal(1.5, 1, (40, 5))])
    y = np.repeat(["a", "b"], 40)
    clf = TunedClassifier(LogisticRegression(max_iter=500), {"C": [1e-6, 1.0]}, cv=3).fit(X, y)
    # a C of 1e-6 shrinks everything to the prior: chance level, so the sweep must pick 1.0
    assert clf.best_params_ == {"C": 1.0}
    assert len(clf.cv_results_["mean_test_score"]) == 2
    assert clf.score(X, y) > 0.8
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0)


def test_calibrated_svm_has_probabilities():
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (30, 4)), rng.normal(2, 1, (30, 4)), rng.normal(-2, 1, (30, 4))])
    y = np.repeat([0, 1, 2], 30)
    clf = TunedClassifier(LinearSVC(), {"C": [0.01, 1.0]}, calibrate=True).fit(X, y)
    p = clf.predict_proba(X)
    assert p.shape == (90, 3) and np.all((p >= 0) & (p <= 1))
    assert (clf.classes_[p.argmax(1)] == y).mean() > 0.8


def test_centroid_temperature_sharpens_probabilities():
    X = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.9]])
    y = np.array(["x", "x", "y", "y"])
    soft = CosineCentroidClassifier(temperature=1.0).fit(X, y).predict_proba([[1.0, 0.2]])
    sharp = CosineCentroidClassifier(temperature=0.01).fit(X, y).predict_proba([[1.0, 0.2]])
    assert 0.5 < soft[0, 0] < sharp[0, 0]
    with pytest.raises(ValueError, match="temperature"):
        CosineCentroidClassifier(temperature=0).fit(X, y)


def test_stratified_folds_capped_by_rarest_class():
    assert stratified_folds(["a"] * 10 + ["b"] * 3, 5).get_n_splits() == 3
    with pytest.raises(ValueError, match="at least 2"):
        stratified_folds(["a"] * 10 + ["b"], 5)
