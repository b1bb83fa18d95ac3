"""A fitted linear probe as plain arrays, for the fine-tuning stage (torch-free).

``featurize.finetune`` starts fine-tuning from the linear probe (LP-FT): its classifier
layer is initialised so that ``logits = W @ x + b`` reproduces the probe's decision
function on the raw backbone features. The ``logreg`` head is
``TunedClassifier(Pipeline([StandardScaler, LogisticRegression]))``; the scaler is affine,
so it folds into the weights exactly:

    W' = W / scale,   b' = b - W' @ mean

Non-linear preprocessing (the L2 ``Normalizer`` of svm-rbf/knn/centroid) and calibrated
heads cannot be folded into one linear layer, so only linear, uncalibrated heads qualify.
"""

from __future__ import annotations

import numpy as np

from featurize.errors import UserError

LINEAR_HINT = "fine-tuning starts from a linear probe: run `fit --head logreg` first (or `finetune --init random`)"


def _final_estimator(estimator):
    """Unwrap TunedClassifier -> its refit best estimator."""
    return getattr(estimator, "best_estimator_", estimator)


def linear_params(estimator) -> dict:
    """Return ``{"W": (C, D) float64, "b": (C,) float64, "classes": [str]}`` for a fitted linear head.

    Takes a fitted ``TunedClassifier``, ``Pipeline`` or bare linear classifier. The pipeline's
    ``StandardScaler`` is folded into ``W, b``; a binary model's single decision value ``z``
    becomes two logits ``(-z/2, z/2)`` (same softmax, same argmax, smallest norm). Raises
    ``UserError`` for heads that are not one affine map (normaliser, calibration, kernels).
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    est = _final_estimator(estimator)
    steps = list(est.named_steps.values()) if isinstance(est, Pipeline) else [est]
    *pre, clf = steps
    if not hasattr(clf, "coef_") or not hasattr(clf, "intercept_"):
        raise UserError(f"the probe is a {type(clf).__name__}, not a linear classifier; {LINEAR_HINT}")
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64).reshape(-1)
    # fold preprocessing from the classifier backwards: W (s(x)) + b with s affine
    for step in reversed(pre):
        if isinstance(step, StandardScaler):
            scale = np.asarray(step.scale_ if step.scale_ is not None else 1.0, dtype=np.float64)
            mean = np.asarray(step.mean_ if step.mean_ is not None else 0.0, dtype=np.float64)
            W = W / scale
            b = b - W @ np.broadcast_to(mean, W.shape[1:])
        elif step in (None, "passthrough"):
            continue
        else:
            raise UserError(f"the probe's {type(step).__name__} step is not affine and cannot start fine-tuning; "
                            f"{LINEAR_HINT}")
    classes = [str(c) for c in clf.classes_]
    if W.shape[0] == 1 and len(classes) == 2:
        W = np.vstack([-W[0] / 2, W[0] / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    if W.shape[0] != len(classes):
        raise UserError(f"the probe has {W.shape[0]} weight rows for {len(classes)} classes; {LINEAR_HINT}")
    return {"W": W, "b": b, "classes": classes}


def refit(estimator, X, y, class_weight="keep"):
    """Refit the probe's chosen model (same hyper-parameters, e.g. C) on ``(X, y)``; return it.

    Used so the probe sees exactly the fine-tuning training rows: a hold-out carved for
    fine-tuning validation is then never trained on by either stage. ``class_weight``
    (None or "balanced") replaces the probe's own, so that LP-FT with balanced weights starts
    from a balanced probe; "keep" keeps the probe's.
    """
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import Pipeline

    chosen = _final_estimator(estimator)
    model = clone(chosen)
    old_clf = chosen.steps[-1][1] if isinstance(chosen, Pipeline) else chosen
    if isinstance(old_clf, LogisticRegressionCV):
        # a CV estimator would search C again on these rows: pin the C it chose instead
        clf = LogisticRegression(C=float(np.ravel(old_clf.C_)[0]), class_weight=old_clf.class_weight,
                                 max_iter=old_clf.max_iter, tol=old_clf.tol)
        model = Pipeline(model.steps[:-1] + [(model.steps[-1][0], clf)]) if isinstance(model, Pipeline) else clf
    if class_weight != "keep":
        last = model.steps[-1][0] if isinstance(model, Pipeline) else None
        model.set_params(**{f"{last}__class_weight" if last else "class_weight": class_weight})
    return model.fit(X, y)


def load_probe(path, space_id: str, trust: bool = False):
    """Load a saved head (``heads.store``) checked against ``space_id``; returns ``(estimator, meta)``.

    Raises ``UserError`` naming the command to run when the file does not exist, or when the
    head was fit on another feature space (another backbone or weights).
    """
    from pathlib import Path

    from heads.store import load_head

    if not Path(path).is_file():
        raise UserError(f"no fitted probe at {path}; {LINEAR_HINT}")
    return load_head(path, expect_space=space_id, trust=trust)
