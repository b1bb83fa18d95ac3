"""Classification metrics as plain JSON-able dicts, and their text table."""

from __future__ import annotations

import numpy as np

SCALARS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")


def compute_metrics(y_true, y_pred, proba=None, classes=None) -> dict:
    """Score one set of predictions.

    Takes true and predicted labels, optional probabilities (columns in ``classes`` order)
    and the class list; returns a dict with ``n``, the scalars in ``SCALARS`` (``roc_auc``
    only for two classes, ``log_loss`` only with probabilities), ``per_class``
    {class: precision/recall/f1/support} and ``confusion`` (rows true, columns predicted).
    """
    from sklearn import metrics as skm

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = list(classes) if classes is not None else sorted(set(y_true) | set(y_pred))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    present = [c for c in classes if c in set(y_true)]
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        # recall averaged over the classes that occur (sklearn's balanced accuracy, without its warning)
        "balanced_accuracy": float(np.mean([r[classes.index(c)] for c in present])) if present else float("nan"),
        "macro_f1": float(np.mean([f[classes.index(c)] for c in present])) if present else float("nan"),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion": skm.confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "classes": classes,
    }
    if proba is not None:
        proba = np.clip(np.asarray(proba, dtype=np.float64), 1e-15, 1)
        proba = proba / proba.sum(axis=1, keepdims=True)
        out["log_loss"] = float(skm.log_loss(y_true, proba, labels=classes))
        if len(classes) == 2 and len(present) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y_true == classes[1], proba[:, 1]))
    return out


def summarize_folds(fold_metrics: list[dict]) -> tuple[dict, dict]:
    """Return ``(mean, std)`` of each scalar metric over cross-validation folds."""
    mean, std = {}, {}
    for k in SCALARS:
        vals = [m[k] for m in fold_metrics if k in m]
        if vals:
            mean[k], std[k] = float(np.mean(vals)), float(np.std(vals))
    return mean, std


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def format_metrics(parts: dict) -> str:
    """Render ``{part name: metrics}`` (e.g. val/test, or cv with mean/std) as a text table."""
    lines = [f"{'metric':<20}" + "".join(f"{name:>22}" for name in parts)]
    for k in SCALARS:
        cells = []
        for m in parts.values():
            if "mean" in m:  # cross-validated: mean +/- std over folds
                cells.append(f"{_fmt(m['mean'].get(k))} +/- {_fmt(m['std'].get(k))}" if k in m["mean"] else "-")
            else:
                cells.append(_fmt(m.get(k)))
        if any(c != "-" for c in cells):
            lines.append(f"{k:<20}" + "".join(f"{c:>22}" for c in cells))
    for name, m in parts.items():
        lines.append("")
        lines.append(f"per class ({name}, n={m['n']}):")
        lines.append(f"  {'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for c, v in m["per_class"].items():
            lines.append(f"  {c[:20]:<20}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>9}")
        lines.append(f"  confusion (rows true, cols predicted): {m['confusion']}")
    return "\n".join(lines)
