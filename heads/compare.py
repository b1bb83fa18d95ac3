"""Leaderboard: every head x every cached backbone of one dataset, same protocol for all."""

from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path

from featurize.errors import UserError
from heads.parallel import Progress, plan_jobs, run_tasks
from heads.protocol import evaluate, load_labelled, primary
from heads.registry import check_head_name, list_heads

COLUMNS = ("rank", "backbone", "head", "protocol", "scored_on", "accuracy", "accuracy_std", "balanced_accuracy",
           "macro_f1", "roc_auc", "log_loss", "fit_s", "eval_s", "embed_img_s", "embed_s", "best_params", "space_id")


def embed_cost(extraction: dict) -> tuple[float | None, float | None]:
    """(images/s, seconds) that embedding the dataset with a backbone took, summed over its
    extract runs (decode -> model -> write, end to end); (None, None) when not recorded."""
    n, secs = extraction.get("embedded_total"), extraction.get("embed_seconds_total")
    if not n or not secs:
        return None, None
    return round(n / secs, 2), round(secs, 1)


def compare(cache, data=None, heads=None, backbones=None, *, class_weight=None, seed=0, folds=5, n_jobs=None,
            log=True, exclude=None) -> dict:
    """Evaluate each head on each feature space of a dataset and rank them.

    Takes the cache dir, dataset folder (latest when None), head names (all distinct heads
    when None; the ``svm`` alias is covered by ``svm-linear``/``svm-rbf``), backbones (every
    cached one when None), the protocol options and ``exclude`` (a file of images left out of
    training only). Returns ``{"dataset", "rows", "seconds", "exclude", "split_leaks"}`` with
    rows sorted best first. Raises ``UserError`` for unknown heads or backbones.
    """
    from featurize.cache import find_index, resolve_space

    t0 = time.perf_counter()
    heads = [check_head_name(h) for h in (heads or list_heads(distinct=True))]
    _, index = find_index(cache, data)
    spaces = [resolve_space(cache, index, b).space_id for b in backbones] if backbones else \
        sorted(index.extractions, key=lambda s: -index.extractions[s].get("finished_at", 0))
    if not spaces:
        raise UserError(f"{index.root} has no finished extraction in {cache}; run `extract {index.root}`")
    from heads.audit import exclusion, warn_leaks

    candidates, data_of, drop_of, excluded, leaks = [], {}, {}, None, 0
    for n_space, sid in enumerate(spaces):
        lf = load_labelled(cache, data if data is not None else index.root, sid)
        data_of[sid] = lf
        drop_of[sid], excluded = exclusion(exclude, lf)
        if n_space == 0:  # the images are the same in every space: warn once
            leaks = warn_leaks(lf, drop_of[sid])
        candidates += [(sid, h) for h in heads]
    n_rows = max(len(lf.y) for lf in data_of.values())
    # candidates are independent: one per core for large data, each fit with capped BLAS threads
    jobs = plan_jobs(n_jobs, len(candidates), n_rows)
    tasks = [(h, data_of[sid].X, data_of[sid].y, data_of[sid].splits, data_of[sid].paths, class_weight, seed, folds,
              1 if jobs > 1 else n_jobs, drop_of[sid]) for sid, h in candidates]
    bar = Progress("compare", len(candidates), after=0.0 if log else None)

    def done(i, ev):
        sid, h = candidates[i]
        backbone = data_of[sid].space_info.get("backbone", sid)
        acc = primary(ev.metrics)[1].get("accuracy", float("nan"))
        bar.step(f"{backbone} {h} acc {acc:.4f} in {ev.eval_seconds:.1f} s")

    rows = []
    for (sid, h), ev in zip(candidates, run_tasks(_score, tasks, jobs, done)):
        backbone = data_of[sid].space_info.get("backbone", sid)
        img_s, embed_s = embed_cost(index.extractions.get(sid, {}))
        part, m = primary(ev.metrics)
        std = ev.metrics["cv"]["std"].get("accuracy") if part == "cv" else None
        rows.append({"backbone": backbone, "head": ev.resolved if h == "svm" else h, "protocol": ev.protocol,
                     "scored_on": part, "accuracy": m.get("accuracy"), "accuracy_std": std,
                     "balanced_accuracy": m.get("balanced_accuracy"), "macro_f1": m.get("macro_f1"),
                     "roc_auc": m.get("roc_auc"), "log_loss": m.get("log_loss"),
                     "fit_s": round(ev.fit_seconds, 3), "eval_s": round(ev.eval_seconds, 3),
                     "embed_img_s": img_s, "embed_s": embed_s, "best_params": json.dumps(ev.best_params, default=str), "space_id": sid})
    rows.sort(key=lambda r: (-(r["accuracy"] or 0), -(r["balanced_accuracy"] or 0), r["eval_s"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return {"dataset": index.root, "rows": rows, "seconds": round(time.perf_counter() - t0, 2), "exclude": excluded,
            "split_leaks": leaks}


def _score(head, X, y, splits, paths, class_weight, seed, folds, n_jobs, exclude=None):
    """One leaderboard candidate (runs in a worker for large data); the fitted head is not kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the sweep's extreme C values
        ev = evaluate(head, X, y, splits, paths, class_weight=class_weight, seed=seed, folds=folds, n_jobs=n_jobs,
                      progress=False, exclude=exclude)
    ev.estimator = None  # compare keeps no heads: do not ship them back from the workers
    return ev


def _cell(v, k):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if k.endswith(("_s", "_img_s")) else f"{v:.4f}"
    return str(v)


def format_leaderboard(result: dict) -> str:
    """Render the leaderboard as a text table."""
    cols = ("rank", "backbone", "head", "scored_on", "accuracy", "accuracy_std", "balanced_accuracy", "macro_f1",
            "log_loss", "fit_s", "eval_s", "embed_img_s", "embed_s")
    widths = {c: max(len(c), *(len(_cell(r[c], c)) for r in result["rows"])) for c in cols}
    lines = ["  ".join(f"{c:>{widths[c]}}" for c in cols)]
    for r in result["rows"]:
        lines.append("  ".join(f"{_cell(r[c], c):>{widths[c]}}" for c in cols))
    return "\n".join(lines)


def write_leaderboard(result: dict, stem) -> dict:
    """Write ``<stem>.csv`` and ``<stem>.json``; returns their paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows([{c: r.get(c) for c in COLUMNS} for r in result["rows"]])
    json_path.write_text(json.dumps(result, indent=1, default=str))
    return {"csv": str(csv_path), "json": str(json_path)}
