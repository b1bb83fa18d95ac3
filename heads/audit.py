"""Audit a labelled dataset from its cached features (torch-free): suspected label errors,
near-duplicates (flagging those across labels and across splits) and outliers.

* **Label errors**: every image gets class probabilities from a head that never saw it
  (stratified k-fold over all labelled rows, the folds ``fit`` uses without a split), then
  cleanlab's confident learning (``cleanlab.filter.find_label_issues``) picks the suspects,
  ranked by cleanlab's label quality score.
* **Near-duplicates**: cosine similarity of the embeddings after signed square-root ("power")
  normalisation and centring on the dataset's mean, as in image retrieval: raw features share
  a large common component (every chest X-ray is at cosine 0.9 of every other), centring
  removes it, so one threshold means the same on photos and X-rays. The threshold is
  calibrated on real transformed copies of flower photos (``benchmarks/RESULTS_audit.md``).
  A pixel-level signal joins it: a pair whose 255-bit perceptual hashes (:mod:`heads.pixelhash`)
  differ in at most ``PIXEL_BITS`` bits is a near-duplicate as soon as its cosine reaches
  ``PIXEL_FLOOR``: a half-size or re-encoded copy keeps its pixels' layout while its embedding
  can move as far as another photo of the same kind. Hashes are computed once per file and
  cached by content hash.
  The search is exact (blocked matrix products, O(N^2 D)): 3.7 s at 5,840 images on a loaded
  2-core machine, minutes at 5 x 10^4; nothing approximate takes over above that yet.
* **Outliers**: mean cosine distance (power-normalised, not centred: centring on one
  dataset's mean pulls unrelated images towards it) to the k nearest other images, flagged
  above Tukey's fence Q3 + 1.5 IQR of the dataset's own scores; ``predict`` scores new
  images against the training rows the same way (:class:`Novelty`).

``run_audit`` is what ``featurize audit`` calls; ``audit`` returns the findings as a dict.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurize.errors import UserError
from featurize.options import command_prefix
from heads.audit_html import dup_rule_text  # the summary line and the gallery state the rule alike

DUP_THRESHOLD = 0.85  # cosine on power-normalised, centred embeddings; calibration in benchmarks/RESULTS_audit.md
PIXEL_BITS = 24  # of the 255-bit pHash: copies differ in <= 22, the closest different chest X-rays in 38
PIXEL_FLOOR = 0.30  # the cosine a pixel-hash pair still needs (guards against look-alike blank images)
OUTLIER_K = 5  # neighbours averaged for the outlier score
FENCE_IQR = 1.5  # Tukey's fence Q3 + 1.5 IQR: 0-3 % of a dataset, 93-100 % of another dataset's images
BLOCK_ROWS = 1024  # rows per block of the similarity pass (BLOCK_ROWS x N float32 at a time)
TOP_SHOWN = 10  # items per issue in the terminal summary and the --json line


def power(X) -> np.ndarray:
    """Signed square root of the features (float32)."""
    Z = np.asarray(X, dtype=np.float32)
    return np.sign(Z) * np.sqrt(np.abs(Z))


def unit_rows(X, center=None) -> np.ndarray:
    """Power-normalise, subtract ``center`` (a mean of power-normalised rows) when given, then
    L2-normalise each row (float32); a zero row stays zero."""
    Z = power(X)
    if center is not None:
        Z = Z - center
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(n > 0, n, 1.0)


def _top(S, kk: int) -> np.ndarray:
    """The ``kk`` largest values of each row of ``S``, largest first."""
    return -np.sort(-np.partition(S, -kk, axis=1)[:, -kk:], axis=1)


def _upper_pairs(S, s: int, threshold: float):
    """``(i, j, value)`` of the block ``S`` (rows ``s``...) at or above ``threshold`` with i < j."""
    rows = np.arange(s, s + len(S))
    cols = min(s + len(S), S.shape[1])
    S[:, :cols][np.arange(cols)[None, :] <= rows[:, None]] = -np.inf
    i, j = np.nonzero(S >= threshold)
    return i + s, j, S[i, j]


def _sorted_pairs(pi, pj, ps):
    pairs = np.column_stack([np.concatenate(pi), np.concatenate(pj)]) if pi else np.empty((0, 2), int)
    sims = np.concatenate(ps) if ps else np.empty(0, np.float32)
    order = np.argsort(-sims, kind="stable")
    return pairs[order], sims[order]


def similarity_pass(U, threshold: float, k: int, ref=None, block: int = BLOCK_ROWS):
    """One blocked pass over cosine similarities.

    Takes unit rows ``U`` (n, d), a pair threshold, ``k``, and optional reference rows
    ``ref`` (m, d). Without ``ref``: returns ``(pairs (p, 2) int with i < j, sims (p,),
    topk (n, k))``, the pairs of rows at or above ``threshold`` and each row's ``k`` largest
    similarities to the other rows. With ``ref``: pairs are (row of U, row of ref) and
    ``topk`` is against ``ref``.
    """
    R = U if ref is None else ref
    n, m = len(U), len(R)
    kk = max(0, min(k, m - (1 if ref is None else 0)))
    topk = np.zeros((n, kk), dtype=np.float32)
    pi, pj, ps = [], [], []
    for s in range(0, n, block):
        S = U[s:s + block] @ R.T
        rows = np.arange(s, min(s + block, n))
        if ref is None:
            S[rows - s, rows] = -np.inf  # not its own neighbour
        if kk:
            topk[rows] = _top(S, kk)
        if ref is None:
            i, j, v = _upper_pairs(S, s, threshold)
        else:
            i, j = np.nonzero(S >= threshold)
            i, v = i + s, S[i, j]
        pi.append(i)
        pj.append(j)
        ps.append(v)
    return (*_sorted_pairs(pi, pj, ps), topk)


@dataclass
class PixelHashes:
    """Perceptual hashes of the rows (``has`` False where the file could not be hashed) and the
    rule that makes a pair a near-duplicate by its pixels."""

    codes: np.ndarray  # (n, pixelhash.WORDS) uint64
    has: np.ndarray  # (n,) bool
    max_bits: int = PIXEL_BITS
    floor: float = PIXEL_FLOOR

    def distance(self, i, j) -> np.ndarray:
        """Differing bits of rows ``i`` and ``j`` (-1 where either has no hash)."""
        from heads.pixelhash import hamming

        i, j = np.asarray(i, int), np.asarray(j, int)
        d = hamming(self.codes[i], self.codes[j]) if len(i) else np.empty(0, np.int64)
        return np.where(self.has[i] & self.has[j], d, -1)

    def close(self, i, j) -> np.ndarray:
        d = self.distance(i, j)
        return (d >= 0) & (d <= self.max_bits)


def audit_pass(X, threshold: float, k: int, block: int = BLOCK_ROWS, pixels: PixelHashes | None = None):
    """Near-duplicate pairs and k-NN similarities of ``X`` in one pass over its Gram matrix.

    Pairs use the centred cosine (:func:`dup_rows`), neighbours the uncentred one
    (:func:`unit_rows`); both follow from the same block ``Z Z^T`` of the power-normalised rows
    Z, since (z_i - m).(z_j - m) = z_i.z_j - z_i.m - z_j.m + m.m. With ``pixels``, a pair below
    ``threshold`` but at or above ``pixels.floor`` is kept when its pixel hashes are close.
    Returns ``(pairs, sims, topk)`` as :func:`similarity_pass` does without ``ref``.
    """
    Z = power(X)
    m = Z.mean(axis=0)
    sq = np.einsum("ij,ij->i", Z, Z)
    a = Z @ m
    norm = np.sqrt(np.maximum(sq, 1e-30))
    norm_c = np.sqrt(np.maximum(sq - 2 * a + m @ m, 1e-30))
    n = len(Z)
    kk = max(0, min(k, n - 1))
    topk = np.zeros((n, kk), dtype=np.float32)
    pi, pj, ps = [], [], []
    for s in range(0, n, block):
        G = Z[s:s + block] @ Z.T
        rows = np.arange(s, min(s + block, n))
        if kk:
            S = G / norm[rows, None] / norm[None, :]
            S[rows - s, rows] = -np.inf  # not its own neighbour
            topk[rows] = _top(S, kk)
        C = (G - a[rows, None] - a[None, :] + m @ m) / norm_c[rows, None] / norm_c[None, :]
        i, j, v = _upper_pairs(C, s, threshold if pixels is None else min(threshold, pixels.floor))
        if pixels is not None:
            keep = v >= threshold
            keep[~keep] = pixels.close(i[~keep], j[~keep])
            i, j, v = i[keep], j[keep], v[keep]
        pi.append(i)
        pj.append(j)
        ps.append(np.minimum(v, 1.0))  # rounding can put a copy a hair above 1
    return (*_sorted_pairs(pi, pj, ps), topk)


def dup_rows(X) -> np.ndarray:
    """The rows compared for near-duplicates: power-normalised, centred on their mean, unit length."""
    return unit_rows(X, power(X).mean(axis=0))


def fence(scores) -> float:
    """Tukey's fence Q3 + 1.5 IQR of ``scores`` (inf when there are none)."""
    if len(scores) == 0:
        return float("inf")
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q3 + FENCE_IQR * (q3 - q1))


# --------------------------------------------------------------------------- label errors


def out_of_sample_proba(head, X, y, *, class_weight=None, seed=0, folds=5, n_jobs=None):
    """Class probabilities for every row from a head fit on the other folds.

    The outer folds of ``heads.protocol.evaluate`` without a split (stratified, shuffled with
    ``seed``, at most as many folds as the rarest class has images), run the same way (one
    worker per core for large data, BLAS threads capped). Returns ``(proba (n, c), classes, k)``.
    """
    from sklearn.model_selection import StratifiedKFold

    from heads.parallel import Progress, plan_jobs, run_tasks
    from heads.protocol import _fit_fold

    classes = sorted(set(y))
    k = min(folds, int(np.unique(y, return_counts=True)[1].min()))
    outer = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y))
    jobs = plan_jobs(n_jobs, k, len(y))
    tasks = [(head, X, y, tr, te, class_weight, seed, 1 if jobs > 1 else n_jobs) for tr, te in outer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the sweep's extreme C values
        bar = Progress(f"audit: {head} out-of-sample probabilities ({k}-fold CV)", k)  # stderr, once it is long
        results = run_tasks(_fit_fold, tasks, jobs, lambda i, _: bar.step(f"fold {i + 1} scored"))
    proba = np.zeros((len(y), len(classes)))
    for (_, te), (_, _, p, _) in zip(outer, results):
        proba[te] = p  # stratified: every fold has every class, so the columns match `classes`
    return proba, classes, k


def label_issues(y, proba, classes) -> dict:
    """cleanlab's confident learning on out-of-sample probabilities.

    Returns ``{"mask", "quality", "suggested", "noise_rate", "per_class"}``: the flagged rows,
    each row's label quality (0..1, low = suspect), the most probable class, cleanlab's
    estimate of the fraction of wrong labels, and the flagged count per given label.
    """
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    codes = np.searchsorted(classes, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = find_label_issues(codes, proba, filter_by="both", n_jobs=1)
        quality = get_label_quality_scores(codes, proba, method="self_confidence")
        joint = estimate_joint(codes, proba)
    suggested = np.asarray(classes)[proba.argmax(axis=1)]
    per_class = {c: int(np.sum(mask & (y == c))) for c in classes}
    return {"mask": mask, "quality": quality, "suggested": suggested,
            "noise_rate": float(1.0 - np.trace(joint)), "per_class": per_class}


# --------------------------------------------------------------------------- duplicates


def groups_of(pairs, n: int) -> list[list[int]]:
    """Connected components of the pair graph, each sorted, largest first (singletons left out)."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comp: dict[int, list[int]] = {}
    for i in {int(x) for x in np.ravel(pairs)}:
        comp.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in comp.values()), key=lambda g: (-len(g), g[0]))


def _keeper(group, splits) -> int:
    # keep a held-out member (dropping the training copy ends the leak and leaves the test set whole)
    held = [i for i in group if splits[i] in ("val", "test")]
    return (held or group)[0]


def duplicate_groups(pairs, sims, labels, splits, bits=None) -> list[dict]:
    """Describe each group: members, the one kept, whether it crosses labels or splits, its
    highest cosine and (given each pair's pixel-hash ``bits``, -1 for none) its fewest differing bits."""
    bits = np.full(len(pairs), -1) if bits is None else np.asarray(bits)
    best: dict[int, float] = {}
    fewest: dict[int, int] = {}
    for (a, b), s, d in zip(pairs.tolist(), sims.tolist(), bits.tolist()):
        for i in (a, b):
            best[i] = max(best.get(i, -1.0), s)
            if d >= 0:
                fewest[i] = min(fewest.get(i, d), d)
    out = []
    for g in groups_of(pairs, len(labels)):
        px = [fewest[i] for i in g if i in fewest]
        out.append({"members": g, "keep": _keeper(g, splits), "max_cosine": max(best[i] for i in g),
                    "min_pixel_bits": min(px) if px else -1, "cross_label": len({labels[i] for i in g}) > 1,
                    "cross_split": len({splits[i] for i in g if splits[i]}) > 1})
    return out


def split_leaks(X, splits, train_mask=None, threshold: float = DUP_THRESHOLD, pixels: PixelHashes | None = None):
    """Held-out rows (val/test) with a near-duplicate among the training rows.

    Takes the features, split names, an optional mask of the training rows actually
    used (``--exclude`` removes some) and optional pixel hashes of the rows (the audit's rule:
    close hashes count from ``pixels.floor``). Returns ``[(held-out row, train row, cosine)]``,
    one per held-out row, most similar first.
    """
    splits = np.asarray(splits).astype(str)
    train = (splits == "train") if train_mask is None else np.asarray(train_mask, bool)
    held = np.flatnonzero(np.isin(splits, ("val", "test")))
    if not train.any() or not len(held):
        return []
    tr = np.flatnonzero(train)
    U = dup_rows(X)  # centred on every row, as in `audit`
    pairs, sims, _ = similarity_pass(U[held], threshold if pixels is None else min(threshold, pixels.floor), 0,
                                     ref=U[tr])
    if pixels is not None:
        keep = (sims >= threshold) | pixels.close(held[pairs[:, 0]], tr[pairs[:, 1]])
        pairs, sims = pairs[keep], sims[keep]
    seen, out = set(), []
    for (a, b), s in zip(pairs.tolist(), sims.tolist()):
        if a not in seen:
            seen.add(a)
            out.append((int(held[a]), int(tr[b]), float(s)))
    return out


def leak_warning(leaks, paths, n_held: int) -> str | None:
    """The one-line warning fit/compare print when held-out images have a copy in train."""
    if not leaks:
        return None
    h, t, s = leaks[0]
    return (f"warning: {len(leaks)} of {n_held} held-out images have a near-duplicate in train (cosine >= "
            f"{DUP_THRESHOLD:.2f} or the same pixels), e.g. {paths[h]} ~ {paths[t]} ({s:.3f}); held-out scores are "
            "inflated: run `audit` for the list, `fit --exclude` it")


# --------------------------------------------------------------------------- outliers and novelty


def outlier_scores(topk) -> np.ndarray:
    """Mean cosine distance to the k nearest neighbours, one per row."""
    return (1.0 - topk.mean(axis=1)).astype(np.float64) if topk.shape[1] else np.zeros(len(topk))


@dataclass
class Novelty:
    """Scores new images against the training rows: is it unlike anything the head was trained on?"""

    ref: np.ndarray  # unit rows of the training images
    cutoff: float
    k: int = OUTLIER_K

    @classmethod
    def fit(cls, X, k: int = OUTLIER_K) -> "Novelty":
        U = unit_rows(X)
        _, _, topk = similarity_pass(U, np.inf, k)
        return cls(U, fence(outlier_scores(topk)), k)

    def score(self, X) -> np.ndarray:
        _, _, topk = similarity_pass(unit_rows(X), np.inf, self.k, ref=self.ref)
        return outlier_scores(topk)


def novelty_for(cache, meta: dict) -> Novelty | None:
    """The novelty reference of a saved head: its dataset's training rows in its feature space.

    Returns None (no flag, not an error) when the cache no longer holds them.
    """
    from featurize.cache import FeatureSpace, find_index, load_features

    try:
        _, index = find_index(cache, meta["dataset"])
        X, labels, splits, _ = load_features(cache, index, FeatureSpace(cache, meta["space_id"]))
    except (UserError, KeyError, OSError):
        return None
    keep = np.array([bool(lab) for lab in labels], bool)
    if meta.get("protocol") == "split":
        keep &= np.asarray(splits).astype(str) == "train"
    return Novelty.fit(X[keep]) if keep.sum() > OUTLIER_K else None


# --------------------------------------------------------------------------- the audit


def pixel_hashes(cache, lf, compute: bool = True) -> tuple[PixelHashes, dict]:
    """The perceptual hashes of the loaded rows (cached by content hash) and the pass's stats;
    ``compute=False`` reads only the cached ones (no image is decoded)."""
    from featurize.cache import read_index
    from heads.pixelhash import dataset_hashes

    index = read_index(lf.index_path)
    key = {p: h for p, h, st in zip(index.path, index.hash, index.status) if st == "ok"}
    codes, has, stats = dataset_hashes(cache, lf.root, lf.paths, [key.get(p, "") for p in lf.paths], compute)
    return PixelHashes(codes, has), stats


def audit(cache, data=None, backbone=None, head="logreg", *, class_weight=None, seed=0, folds=5, n_jobs=None,
          threshold: float = DUP_THRESHOLD, k: int = OUTLIER_K, pixels: bool = True) -> dict:
    """Find suspected label errors, near-duplicates and outliers in a dataset's cached features.

    Takes the cache dir, dataset folder (latest extracted when None), backbone (latest when
    None), the head whose out-of-sample probabilities feed cleanlab and the protocol options,
    the duplicate threshold, k, and whether pixel hashes join the embeddings for duplicates.
    Returns a JSON-able dict: summary per issue and ``rows``,
    one per flagged (image, issue). Raises ``UserError`` for unusable labels (flat folder,
    one class, a class with one image) or an unknown head.
    """
    from featurize.options import number_in
    from heads.protocol import check_eval_options, load_labelled
    from heads.registry import check_head_name

    check_head_name(head)  # a typo or a bad option fails before any file is read
    check_eval_options(folds, seed, n_jobs)
    number_in("--dup-threshold", threshold, 0.0, 1.0, low_open=True)
    t0 = time.perf_counter()
    lf = load_labelled(cache, data, backbone)
    t_load = time.perf_counter()
    proba, classes, kfold = out_of_sample_proba(head, lf.X, lf.y, class_weight=class_weight, seed=seed, folds=folds,
                                                n_jobs=n_jobs)
    t_proba = time.perf_counter()
    li = label_issues(lf.y, proba, classes)
    t_clean = time.perf_counter()
    ph, ph_stats = pixel_hashes(cache, lf) if pixels else (None, None)
    t_pix = time.perf_counter()
    pairs, sims, topk = audit_pass(lf.X, threshold, k, pixels=ph)
    bits = ph.distance(pairs[:, 0], pairs[:, 1]) if ph is not None else np.full(len(pairs), -1)
    groups = duplicate_groups(pairs, sims, lf.y, lf.splits, bits)
    scores = outlier_scores(topk)
    cutoff = fence(scores)
    t_sim = time.perf_counter()

    rows = _label_rows(lf, li) + _duplicate_rows(lf, groups)
    flagged_out = np.flatnonzero(scores > cutoff)
    rows += _outlier_rows(lf, scores, flagged_out)
    return {
        "dataset": lf.root, "backbone": lf.space_info.get("backbone", lf.space_id), "space_id": lf.space_id,
        "head": head, "protocol": f"cv-{kfold}", "seed": seed, "n_images": int(len(lf.y)), "classes": classes,
        "layout": lf.layout, "index_path": lf.index_path,
        "label_issues": {"n": int(li["mask"].sum()), "per_class": li["per_class"],
                         "estimated_noise_rate": round(li["noise_rate"], 4),
                         "top": [r for r in rows if r["issue"] == "label"][:TOP_SHOWN]},
        "near_duplicates": _duplicates_summary(lf, threshold, pixels, ph_stats, pairs, sims, bits, groups),
        "outliers": {"k": k, "cutoff": round(cutoff, 4), "n": int(len(flagged_out)),
                     "top": [r for r in rows if r["issue"] == "outlier"][:TOP_SHOWN]},
        "rows": rows,
        "timings": {"load_s": round(t_load - t0, 3), "proba_s": round(t_proba - t_load, 3),
                    "cleanlab_s": round(t_clean - t_proba, 3), "pixel_hash_s": round(t_pix - t_clean, 3),
                    "similarity_s": round(t_sim - t_pix, 3),
                    "total_s": round(time.perf_counter() - t0, 3)},
    }


def _row(lf, i: int, issue: str, score: float, suggested="", partner="", cross_label="", cross_split="") -> dict:
    """One flagged (image, issue): a row of the audit's CSV."""
    return {"path": lf.paths[i], "issue": issue, "score": round(float(score), 4), "label": lf.y[i],
            "suggested": suggested, "partner": partner, "split": lf.splits[i], "cross_label": cross_label,
            "cross_split": cross_split}


def _label_rows(lf, li: dict) -> list[dict]:
    """Suspected label errors, most suspicious first."""
    return [_row(lf, i, "label", 1.0 - float(li["quality"][i]), suggested=str(li["suggested"][i]))
            for i in sorted(np.flatnonzero(li["mask"]), key=lambda i: li["quality"][i])]


def _duplicate_rows(lf, groups: list[dict]) -> list[dict]:
    """Every near-duplicate but the one each group keeps, with its cosine to the kept image."""
    U = dup_rows(lf.X)
    return [_row(lf, i, "near_duplicate", float(U[i] @ U[g["keep"]]), partner=lf.paths[g["keep"]],
                 cross_label=int(g["cross_label"]), cross_split=int(g["cross_split"]))
            for g in groups for i in g["members"] if i != g["keep"]]


def _outlier_rows(lf, scores: np.ndarray, flagged: np.ndarray) -> list[dict]:
    """Outliers, farthest first."""
    return [_row(lf, i, "outlier", scores[i]) for i in flagged[np.argsort(-scores[flagged], kind="stable")]]


def _duplicates_summary(lf, threshold: float, pixels: bool, ph_stats, pairs, sims, bits, groups) -> dict:
    """The ``near_duplicates`` section: the rule, the counts, the groups and the top pairs."""
    paths, y, splits = lf.paths, lf.y, lf.splits

    def pair_item(a, b, s, d):
        return {"path": paths[a], "partner": paths[b], "cosine": round(float(s), 4), "pixel_bits": int(d),
                "labels": [y[a], y[b]], "splits": [splits[a], splits[b]]}

    return {
        "threshold": threshold, "pixel_rule": {"max_bits": PIXEL_BITS, "of_bits": 255, "min_cosine": PIXEL_FLOOR}
        if pixels else None, "pixel_hashes": ph_stats, "n_pairs": int(len(pairs)),
        "n_pixel_pairs": int(np.sum(sims < threshold)), "n_groups": len(groups),
        "n_images": sum(len(g["members"]) for g in groups),
        "cross_label_groups": sum(g["cross_label"] for g in groups),
        "cross_split_groups": sum(g["cross_split"] for g in groups),
        "groups": [{**g, "members": [paths[i] for i in g["members"]], "keep": paths[g["keep"]],
                    "labels": [y[i] for i in g["members"]], "splits": [splits[i] for i in g["members"]]}
                   for g in groups],
        "top": [pair_item(a, b, s, d) for (a, b), s, d in zip(pairs[:TOP_SHOWN].tolist(), sims[:TOP_SHOWN],
                                                               bits[:TOP_SHOWN])],
    }


# --------------------------------------------------------------------------- outputs

CSV_COLUMNS = ("path", "issue", "score", "label", "suggested", "partner", "split", "cross_label", "cross_split")


def write_audit(result: dict, stem) -> dict:
    """Write ``<stem>.csv`` (one row per flagged image and issue) and ``<stem>.json``; returns their paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows([{c: r.get(c, "") for c in CSV_COLUMNS} for r in result["rows"]])
    json_path.write_text(json.dumps(result, indent=1, default=str))
    return {"csv": str(csv_path), "json": str(json_path)}


def format_audit(result: dict) -> str:
    """The terminal summary: counts per issue type and the top items of each."""
    li, nd, out = result["label_issues"], result["near_duplicates"], result["outliers"]
    lines = [f"audit of {result['dataset']} | backbone {result['backbone']} ({result['space_id']}) | "
             f"{result['n_images']} images, {len(result['classes'])} classes | head {result['head']}, out-of-sample "
             f"probabilities by stratified {result['protocol'][3:]}-fold CV"]
    per = ", ".join(f"{c} {n}" for c, n in li["per_class"].items() if n)
    lines.append(f"suspected label errors: {li['n']} (cleanlab's estimated noise rate "
                 f"{100 * li['estimated_noise_rate']:.1f} %){'; by given label: ' + per if per else ''}")
    for r in li["top"]:
        lines.append(f"  quality {1 - r['score']:.3f}  {r['label']} -> {r['suggested']}  {r['path']}")
    by_px = f", {nd['n_pixel_pairs']} of them by pixels" if nd.get("pixel_rule") else ""
    lines.append(f"near-duplicates ({dup_rule_text(nd)}): {nd['n_pairs']} pairs{by_px} in {nd['n_groups']} groups "
                 f"({nd['n_images']} images); {nd['cross_label_groups']} groups with different labels, "
                 f"{nd['cross_split_groups']} across splits")
    for p in nd["top"]:
        tag = [f"{lab}{'/' + sp if sp else ''}" for lab, sp in zip(p["labels"], p["splits"])]
        lines.append(f"  {p['cosine']:.3f}  {p['path']} ({tag[0]}) ~ {p['partner']} ({tag[1]})")
    lines.append(f"outliers (mean cosine distance to the {out['k']} nearest > {out['cutoff']:.3f}): {out['n']}")
    for r in out["top"]:
        lines.append(f"  {r['score']:.3f}  {r['path']} ({r['label']})")
    return "\n".join(lines)


def audit_to_files(cache, data=None, backbone=None, head="logreg", *, class_weight=None, seed=0, folds=5,
                   n_jobs=None, threshold: float = DUP_THRESHOLD, out=None, html: bool = False,
                   max_gallery: int = 60) -> tuple[dict, dict]:
    """Audit and write CSV + JSON (+ the HTML gallery) under ``<cache>/reports/`` (or ``out``), printing
    nothing; returns ``(result, summary)``: :func:`audit`'s dict and the ``audit --json`` dict
    (counts, top items, file paths, the refit command)."""
    from featurize.layout import Cache
    from featurize.options import check_out_file, int_at_least

    int_at_least("--max-gallery", max_gallery, 0)
    if out:
        check_out_file(out)
    result = audit(cache, data, backbone, head, class_weight=class_weight, seed=seed, folds=folds, n_jobs=n_jobs,
                   threshold=threshold)
    stem = Path(out) if out else Cache.of(cache).audit_stem(result["index_path"])
    paths = write_audit(result, stem)
    if html:
        from heads.audit_html import build_gallery

        paths["html"] = build_gallery(result, stem.with_name(stem.name + ".html"), max_items=max_gallery)
    summary = {k: v for k, v in result.items() if k != "rows"}
    summary["near_duplicates"] = {k: v for k, v in result["near_duplicates"].items() if k != "groups"}
    summary.update(n_flagged_images=len({r["path"] for r in result["rows"]}), paths=paths, refit_command=None)
    if result["rows"]:  # the command that refits without them, on the same data, backbone and cache
        argv = [*command_prefix(), "fit", "--head", head, "--data", result["dataset"], "--backbone",
                result["backbone"], "--cache", str(cache), "--exclude", paths["csv"]]
        summary["refit_command"] = " ".join(map(shlex.quote, argv))
    return result, summary


def run_audit(cache, data=None, backbone=None, head="logreg", **options) -> dict:
    """``featurize audit``: :func:`audit_to_files`, then print the summary; returns the --json dict."""
    result, summary = audit_to_files(cache, data, backbone, head, **options)
    print(format_audit(result))
    print(f"written: {'  '.join(summary['paths'].values())}")
    if summary["refit_command"]:  # the last line
        print("to refit without the flagged images (edit the CSV first to keep some):")
        print(summary["refit_command"])
    return summary


# --------------------------------------------------------------------------- --exclude


def read_exclude(file, root: str, paths) -> tuple[np.ndarray, list[str]]:
    """Which rows an exclude file names.

    Takes an audit CSV (its ``path`` column) or a plain list of paths, one per line (paths
    relative to the dataset root, absolute, or relative to the working directory), the dataset
    root and the rows' root-relative paths. Returns ``(mask over rows, names not in the
    dataset)``. Raises ``UserError`` when the file cannot be read.
    """
    try:
        text = Path(file).read_text()
    except OSError as e:
        raise UserError(f"cannot read the exclude file {file} ({e.strerror or e}); pass an audit CSV or a list "
                        "of image paths, one per line") from None
    lines = text.splitlines()
    if lines and "path" in next(csv.reader([lines[0]])):
        names = [r["path"] for r in csv.DictReader(lines) if r.get("path")]
    else:
        names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    row = {str(p): i for i, p in enumerate(paths)}
    real_root = os.path.realpath(root)
    mask, unknown = np.zeros(len(paths), bool), []
    for name in dict.fromkeys(names):
        rel = name
        if name not in row:
            full = os.path.realpath(name if os.path.isabs(name) else os.path.abspath(name))
            rel = os.path.relpath(full, real_root) if full.startswith(real_root + os.sep) else name
        if rel in row:
            mask[row[rel]] = True
        else:
            unknown.append(name)
    return mask, unknown


def exclude_note(n_excluded: int, unknown: list[str], file) -> str:
    """One line for the fit/compare summary: how many training images were left out, and unknown names."""
    note = f"excluded {n_excluded} training images listed in {file} (held-out images are still scored)"
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        note += f"; {len(unknown)} listed paths are not in this dataset and were ignored: {shown}"
    return note


def exclusion(exclude, lf) -> tuple:
    """``(rows left out of training, summary dict or None)`` for ``--exclude FILE`` on loaded features."""
    from heads.protocol import has_split

    if not exclude:
        return None, None
    mask, unknown = read_exclude(exclude, lf.root, lf.paths)
    if has_split(lf.splits):
        mask &= np.asarray(lf.splits) == "train"  # held-out images are scored whatever the file says
    n = int(mask.sum())
    return mask, {"file": str(exclude), "excluded": n, "unknown": unknown, "note": exclude_note(n, unknown, exclude)}


def warn_leaks(lf, drop=None) -> int:
    """Print one warning line when held-out images have a near-duplicate among the training rows; returns how many."""
    from heads.protocol import has_split

    if not has_split(lf.splits):
        return 0
    from featurize.layout import Cache

    train = np.asarray(lf.splits) == "train"
    # the pixel hashes an earlier `audit` cached (fit decodes no image): its copies warn here too
    pixels, _ = pixel_hashes(Cache.of_index(lf.index_path), lf, compute=False)
    leaks = split_leaks(lf.X, lf.splits, train if drop is None else train & ~drop,
                        pixels=pixels if pixels.has.any() else None)
    line = leak_warning(leaks, lf.paths, int(np.isin(lf.splits, ("val", "test")).sum()))
    if line:
        print(line, file=sys.stderr)
    return len(leaks)
