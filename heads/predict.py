"""Classify image files with a fitted head.

Vectors come from the cache when the file's content hash is already embedded in the head's
feature space (no torch needed); the rest go to ``embed``, a callable the CLI supplies
(``featurize.extraction.embed_paths`` bound to the head's space), so this module stays torch-free.
"""

from __future__ import annotations

import csv
import io
from typing import Callable

import numpy as np

from featurize.cache import FeatureSpace, hash_files
from featurize.errors import UserError
from featurize.options import int_at_least

Embed = Callable[[list], tuple]  # paths -> (X, ok_paths, [(path, reason)])


def cached_vectors(cache, space_id: str, paths: list[str]):
    """Look files up in the cache by content hash.

    Returns ``(found {path: vector}, missing [paths], errors [(path, reason)])``.
    """
    hashes, errors = hash_files(paths)
    found = FeatureSpace(cache, space_id).vectors_for(hashes)
    missing = [p for p in hashes if p not in found]
    return found, missing, errors


def predict_files(estimator, meta: dict, paths: list[str], cache, embed: Embed | None = None, top_k: int = 3,
                  novelty=None):
    """Predict a label, its probability and the top-k classes for each file.

    Takes the fitted head, its meta (``space_id``), file paths, the cache dir, an optional
    embedder for files not in the cache, k, and an optional ``heads.audit.Novelty`` of the
    training rows. Returns ``(rows, errors)``: rows in input order ``{path, label,
    probability, top_k: [[label, p], ...]}`` (plus ``novelty``, the mean cosine distance to
    the nearest training images, and ``unlike_training`` when a Novelty is given) and
    ``[(path, reason)]`` for files that could not be read or decoded. Never raises for a bad image.
    """
    found, missing, errors = cached_vectors(cache, meta["space_id"], paths)
    if missing and embed is not None:
        try:
            X_new, ok_new, err_new = embed(missing)
        except UserError as e:  # e.g. the backbone cannot be loaded: the cached files still get their labels
            X_new, ok_new, err_new = [], [], [(p, f"could not be embedded: {e}") for p in missing]
        found.update(zip(ok_new, X_new))
        errors += [(str(p), str(r)) for p, r in err_new]
    elif missing:
        errors += [(p, "not in the cache and no embedder available") for p in missing]
    ordered = [p for p in paths if p in found]
    if not ordered:
        return [], errors
    X = np.vstack([found[p] for p in ordered]).astype(np.float32)
    rows = rows_from_proba(ordered, estimator.predict_proba(X), estimator.classes_, top_k)
    if novelty is not None:  # a flag, not a refusal: the label is still given
        for r, far in zip(rows, novelty.score(X)):
            r.update(novelty=round(float(far), 4), unlike_training=bool(far > novelty.cutoff))
    return rows, errors


def rows_from_proba(paths: list[str], proba, classes, top_k: int = 3) -> list[dict]:
    """One row per path: ``{path, label, probability, top_k: [[label, p], ...]}`` (most probable first)."""
    classes = [str(c) for c in classes]
    k = min(check_top_k(top_k), len(classes))
    rows = []
    for p, pr in zip(paths, np.asarray(proba)):
        top = np.argsort(-pr)[:k]
        rows.append({"path": p, "label": classes[top[0]], "probability": float(pr[top[0]]),
                     "top_k": [[classes[j], float(pr[j])] for j in top]})
    return rows


def check_top_k(top_k) -> int:
    """``--top-k`` lists at least the predicted label: refuse 0 and negatives (they silently meant 1)."""
    return int_at_least("--top-k", top_k, 1)


def format_rows(rows: list[dict], fmt: str = "table") -> str:
    """Render prediction rows as ``table`` (aligned text) or ``csv``."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        flag = "unlike_training" in rows[0]
        w.writerow(["path", "label", "probability", "top_k"] + (["novelty", "unlike_training"] if flag else []))
        for r in rows:
            w.writerow([r["path"], r["label"], f"{r['probability']:.4f}",
                        ";".join(f"{lab}:{p:.4f}" for lab, p in r["top_k"])]
                       + ([f"{r['novelty']:.4f}", "yes" if r["unlike_training"] else "no"] if flag else []))
        return buf.getvalue().rstrip("\n")
    width = min(60, max([len(r["path"]) for r in rows] + [4]))
    lines = [f"{'path':<{width}}  {'label':<16}{'prob':>7}  top-k"]
    for r in rows:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        top = ", ".join(f"{lab} {p:.2f}" for lab, p in r["top_k"])
        odd = "  [unlike the training data]" if r.get("unlike_training") else ""
        lines.append(f"{path:<{width}}  {r['label'][:16]:<16}{r['probability']:>7.3f}  {top}{odd}")
    return "\n".join(lines)
