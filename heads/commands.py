"""What the CLI commands fit, compare, predict and report do (cli.py only parses and wires).

Each ``run_*`` prints its human-readable output and returns a JSON-able dict (metrics,
timings, file paths) that ``--json`` prints as the last line.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from featurize.errors import UserError
from featurize.layout import Cache
from featurize.options import check_out_dir, check_out_file, command_prefix, int_at_least
from heads.audit import exclusion, warn_leaks
from heads.metrics import format_metrics
from heads.predict import check_top_k
from heads.protocol import check_eval_options, evaluate, head_path, load_labelled
from heads.registry import check_head_name, describe_heads
from heads.store import cache_for_head, check_space, load_head, read_trusted_meta, save_head


@dataclass
class FitOutcome:
    """What :func:`fit_head` did: ``summary`` is what ``fit --json`` prints; the rest feeds the text."""

    summary: dict
    root: str
    n_images: int
    fit_seconds: float
    eval_seconds: float
    load_seconds: float
    n_train: int = 0
    exclude_note: str | None = None


def fit_head(cache, head="logreg", data=None, backbone=None, out=None, class_weight=None, seed=0, folds=5,
             n_jobs=None, exclude=None) -> FitOutcome:
    """Fit ``head`` on the cached features of a dataset and save it; prints nothing but the
    split-leak warning (stderr).

    Takes the cache, head name, dataset folder and backbone (latest when None), the head file
    (default under ``<cache>/heads/``), the protocol options and ``exclude``, a file of images
    (an audit CSV or a list of paths) left out of training only. Raises ``UserError`` for an
    unknown head, an empty cache or unusable labels.
    """
    check_head_name(head)  # a typo or a bad option fails before any file is read
    check_eval_options(folds, seed, n_jobs)
    if out:
        check_out_file(out)
    if head == "sgd":  # out of core: streams the shards, never loads the features
        if exclude:
            raise UserError("--exclude is not supported with --head sgd (it streams the shards); "
                            "use another head, or move the excluded images out of the folder and re-run `extract`")
        return _fit_sgd(cache, data, backbone, out, class_weight, seed, folds)
    t0 = time.perf_counter()
    lf = load_labelled(cache, data, backbone)
    load_s = time.perf_counter() - t0
    drop, excluded = exclusion(exclude, lf)
    leaks = warn_leaks(lf, drop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the extreme ends of the C sweep
        ev = evaluate(head, lf.X, lf.y, lf.splits, lf.paths, class_weight=class_weight, seed=seed, folds=folds,
                      n_jobs=n_jobs, exclude=drop)
    backbone_name = lf.space_info.get("backbone", lf.space_id)
    path = Path(out) if out else head_path(cache, lf.index_path, lf.space_id, head)
    meta = {
        "head": head, "resolved": ev.resolved, "class_weight": class_weight, "seed": seed, "folds": folds,
        "protocol": ev.protocol, "dataset": lf.root, "index_path": lf.index_path, "layout": lf.layout,
        "space_id": lf.space_id, "backbone": backbone_name, "dim": int(lf.X.shape[1]),
        "preprocess": lf.space_info.get("preprocess"), "classes": ev.classes, "n_images": int(len(lf.y)),
        "metrics": ev.metrics, "best_params": ev.best_params,
        "timings": {"load_s": round(load_s, 3), "fit_s": round(ev.fit_seconds, 3), "eval_s": round(ev.eval_seconds, 3)},
        "errors": ev.errors, "n_train": ev.n_train, "exclude": excluded, "split_leaks": leaks,
    }
    saved = save_head(path, ev.estimator, meta)
    summary = {"head": head, "resolved": ev.resolved, "dataset": lf.root, "backbone": backbone_name,
               "space_id": lf.space_id, "protocol": ev.protocol, "classes": ev.classes, "metrics": ev.metrics,
               "best_params": ev.best_params, "timings": meta["timings"], "n_train": ev.n_train,
               "exclude": {k: v for k, v in excluded.items() if k != "note"} if excluded else None,
               "split_leaks": leaks,
               "paths": {"model": saved["path"], "meta": saved["meta_path"]}, "sha256": saved["sha256"]}
    return FitOutcome(summary, lf.root, int(len(lf.y)), ev.fit_seconds, ev.eval_seconds, load_s, ev.n_train,
                      excluded["note"] if excluded else None)


def _fit_sgd(cache, data, backbone, out, class_weight, seed, folds) -> FitOutcome:
    """``fit --head sgd``: :mod:`heads.outofcore` streams the shards; saved and reported like any head."""
    from heads.outofcore import HOLDOUT_FRACTION, fit_sgd_from_cache
    from heads.protocol import MAX_KEPT_ERRORS

    r = fit_sgd_from_cache(cache, data, backbone, class_weight=class_weight, seed=seed,
                           log=lambda s: print(s, file=sys.stderr), max_errors=MAX_KEPT_ERRORS)
    plan, info = r["plan"], r["info"]
    protocol = "split" if (plan.part >= 2).any() and not (plan.part == 4).any() else f"holdout-{HOLDOUT_FRACTION:g}"
    space_info = plan.space.info()
    backbone_name = space_info.get("backbone", plan.space.space_id)
    path = Path(out) if out else head_path(cache, plan.index_path, plan.space.space_id, "sgd")
    timings = {"load_s": round(r["load_s"], 3), "fit_s": round(r["fit_s"], 3), "eval_s": round(r["eval_s"], 3)}
    meta = {
        "head": "sgd", "resolved": "sgd", "class_weight": class_weight, "seed": seed, "folds": folds,
        "protocol": protocol, "dataset": plan.root, "index_path": str(plan.index_path), "layout": plan.layout,
        "space_id": plan.space.space_id, "backbone": backbone_name, "dim": int(space_info.get("dim", 0)),
        "preprocess": space_info.get("preprocess"), "classes": plan.classes, "n_images": int(len(plan.y)),
        "metrics": r["metrics"], "best_params": info["best_params"], "timings": timings, "errors": r["errors"],
        "out_of_core": {k: info[k] for k in ("n_train", "n_tune", "tune_log_loss", "epochs_run")},
    }
    saved = save_head(path, r["estimator"], meta)
    summary = {"head": "sgd", "resolved": "sgd", "dataset": plan.root, "backbone": backbone_name,
               "space_id": plan.space.space_id, "protocol": protocol, "classes": plan.classes, "metrics": r["metrics"],
               "best_params": info["best_params"], "timings": timings, "out_of_core": meta["out_of_core"],
               "paths": {"model": saved["path"], "meta": saved["meta_path"]}, "sha256": saved["sha256"]}
    return FitOutcome(summary, plan.root, int(len(plan.y)), r["fit_s"], r["eval_s"], r["load_s"], info["n_train"])


def format_fit(o: FitOutcome) -> str:
    """The text ``fit`` prints for :func:`fit_head`'s outcome."""
    s = o.summary
    alias = f" ({s['resolved']})" if s["resolved"] != s["head"] else ""
    how = "fit on train, scored on " + "/".join(s["metrics"]) if s["protocol"] == "split" else \
        f"stratified {s['protocol'][3:]}-fold CV (mean +/- std), final head fit on " \
        f"{'all ' if o.n_train == o.n_images else ''}{o.n_train} images"
    if s["protocol"].startswith("holdout"):
        how = f"fit on the rest, scored on a random {float(s['protocol'][8:]):.0%} held out (test)"
    if "out_of_core" in s:
        ooc = s["out_of_core"]
        how += (f"; streamed from the shards: {ooc['n_train']} training rows, alpha/epochs chosen on "
                f"{ooc['n_tune']} held out of them")
    return "\n".join([
        f"head {s['head']}{alias} | {o.root} | backbone {s['backbone']} ({s['space_id']}) | {o.n_images} images, "
        f"{len(s['classes'])} classes | {how}",
        *([o.exclude_note] if o.exclude_note else []),
        format_metrics(s["metrics"]),
        f"best hyper-parameters ({'held-out chunk of' if 'out_of_core' in s else 'inner CV on'} training data): "
        f"{json.dumps(s['best_params'], default=str)}",
        f"fit time: {o.fit_seconds:.2f} s (final head)  | protocol total {o.eval_seconds:.2f} s  | "
        f"features loaded in {o.load_seconds:.2f} s",
        f"saved: {s['paths']['model']}",
    ])


def run_fit(cache, head="logreg", data=None, backbone=None, out=None, class_weight=None, seed=0, folds=5,
            n_jobs=None, exclude=None) -> dict:
    """Fit ``head`` on the cached features of a dataset, print its metrics and save it; returns a summary.

    ``head="list"`` prints the registered heads with their descriptions instead. ``exclude``
    is a file of images left out of training only (see :func:`fit_head`).
    """
    if head == "list":
        heads = describe_heads()
        for name, text in heads.items():
            print(f"{name:<12}{text}")
        return {"heads": heads}
    outcome = fit_head(cache, head, data, backbone, out, class_weight, seed, folds, n_jobs, exclude)
    print(format_fit(outcome))
    return outcome.summary


def run_compare(cache, data=None, heads=None, backbones=None, out=None, class_weight=None, seed=0, folds=5,
                n_jobs=None, quiet=False, exclude=None) -> dict:
    """Run the leaderboard, print it and write CSV + JSON; returns the rows and file paths.

    ``exclude`` is a file of images left out of training only (see :func:`fit_head`).
    """
    from featurize.cache import find_index
    from heads.compare import compare, format_leaderboard, write_leaderboard

    check_eval_options(folds, seed, n_jobs)
    if heads is not None and not heads:
        raise UserError("--heads is empty; pass comma-separated head names (e.g. logreg,svm) or leave it out for all")
    if backbones is not None and not backbones:
        raise UserError("--backbones is empty; pass comma-separated backbones or leave it out for all cached")
    ipath, _ = find_index(cache, data)
    result = compare(cache, data, heads, backbones, class_weight=class_weight, seed=seed, folds=folds,
                     n_jobs=n_jobs, log=not quiet, exclude=exclude)
    stem = Path(out) if out else Cache.of(cache).compare_stem(ipath)
    paths = write_leaderboard(result, stem)
    print(f"leaderboard for {result['dataset']} ({len(result['rows'])} runs, {result['seconds']:.1f} s)")
    if result.get("exclude"):
        print(result["exclude"].pop("note"))
    print(format_leaderboard(result))
    print(f"written: {paths['csv']}  {paths['json']}")
    if result["rows"]:  # compare keeps no heads: the last line is the command that saves the winner
        best = result["rows"][0]
        same_name = {r["space_id"] for r in result["rows"] if r["backbone"] == best["backbone"]}
        which = best["backbone"] if len(same_name) == 1 else best["space_id"]
        argv = [*command_prefix(), "fit", "--head", best["head"], "--backbone", which, "--data", result["dataset"],
                "--cache", str(cache), "--seed", str(seed), "--folds", str(folds)]
        if class_weight:
            argv += ["--class-weight", class_weight]
        if exclude:
            argv += ["--exclude", str(exclude)]
        print(f"best: {best['head']} on {which}; to save it:")
        print(" ".join(map(shlex.quote, argv)))
    return {**result, "paths": paths}


def _head_file(cache, head, model, data, backbone) -> Path:
    if model:
        return Path(model)
    from featurize.cache import find_index, resolve_space

    check_head_name(head)
    ipath, index = find_index(cache, data)
    space = resolve_space(cache, index, backbone)
    path = head_path(cache, ipath, space.space_id, head)
    if not path.exists():
        raise UserError(f"no fitted {head} head for {index.root} with {space.info().get('backbone', space.space_id)}; "
                        f"run `fit --head {head}` first (or pass --model PATH)")
    return path


def _check_backbone(meta: dict, backbone, path) -> None:
    if backbone and backbone not in (meta.get("space_id"), meta.get("backbone")):
        check_space(meta, backbone, backbone, path)  # raises, naming both spaces


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders into image paths; missing inputs become per-file errors."""
    import os

    from featurize.dataset import list_images  # torch-free folder walk shared with `extract`

    files, errors = [], []
    for p in inputs:
        if not os.path.exists(p):
            errors.append((p, "no such file or folder"))
        else:
            files.extend(list_images([p]))
    return list(dict.fromkeys(files)), errors


def run_predict(cache, inputs, head="logreg", model=None, data=None, backbone=None, top_k=3, fmt="table",
                trust=False, embed=None) -> dict:
    """Classify files/folders; prints rows to stdout (table/csv/json) and bad files to stderr.

    ``embed(space_id, paths, cache)`` embeds files not cached yet (in the cache that holds the head's
    space: ``cache``, else the one the head was fit in)."""
    from heads.predict import format_rows, predict_files

    t0 = time.perf_counter()
    check_top_k(top_k)
    path = _head_file(cache, head, model, data, backbone)
    estimator, meta = load_head(path, trust=trust)
    _check_backbone(meta, backbone, path)
    files, errors = expand_inputs(inputs)
    if not files and not errors:
        raise UserError(f"no image files in {', '.join(inputs)}; pass image files or folders of images")
    sid = meta["space_id"]
    # which head answers matters: without --model it is the one fit on the latest extracted dataset
    print(f"using head {meta.get('head')} ({path}): fit on {meta.get('dataset', '?')} with backbone "
          f"{meta.get('backbone', '?')} (space {sid})", file=sys.stderr)
    cache, moved = cache_for_head(cache, meta)
    if moved:
        print(f"using the cache {cache.root}, where the head was fit (the one given has no vectors of its space)",
              file=sys.stderr)
    from heads.audit import novelty_for

    novelty = novelty_for(cache, meta)  # None when the cache no longer holds the training rows
    rows, bad = predict_files(estimator, meta, files, cache,
                              embed=(lambda paths: embed(sid, paths, cache)) if embed else None, top_k=top_k, novelty=novelty)
    n_inputs = len(files) + len(errors)  # files found + paths that do not exist
    errors += bad
    for p, reason in errors:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    skipped = [{"path": p, "reason": r} for p, r in errors]
    if rows:
        print(json.dumps(rows, indent=1) if fmt == "json" else format_rows(rows, fmt))
    odd = [r["path"] for r in rows if r.get("unlike_training")]
    if odd:
        print(f"note: {len(odd)} of {len(rows)} images are unlike the training data (farther from its nearest "
              f"images than the audit's outlier fence {novelty.cutoff:.3f}), e.g. {odd[0]}: their labels are guesses",
              file=sys.stderr)
    if not rows:
        raise UserError(f"none of the {n_inputs} inputs could be classified (see the skipped lines); "
                        "pass readable image files", details={"errors": skipped})
    return {"model": str(path), "head": meta.get("head"), "space_id": sid, "backbone": meta.get("backbone"),
            "predictions": rows, "errors": skipped,
            "timings": {"total_s": round(time.perf_counter() - t0, 3)}}


def run_report(cache, head="logreg", model=None, data=None, backbone=None, out=None, max_errors=60,
               trust=False) -> dict:
    """Write the HTML report (+ PNGs) of a fitted head; reads only its JSON metadata, never the pickle."""
    from heads.report import build_report

    int_at_least("--max-errors", max_errors, 0, what=" (0: no gallery)")
    if out:
        check_out_dir(out)
    path = _head_file(cache, head, model, data, backbone)
    meta = read_trusted_meta(path, trust=trust)
    _check_backbone(meta, backbone, path)
    out_dir = Path(out) if out else path.with_name(f"{path.stem}-report")
    t0 = time.perf_counter()
    try:
        files = build_report(meta, out_dir, max_errors=max_errors)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a trusted but hand-edited sidecar
        raise UserError(f"{path.with_suffix('.json')} is not a head's metadata as `fit` writes it "
                        f"({type(e).__name__}: {e}); re-run `fit`") from None
    print(f"report: {files['html']}  ({len(files['pngs'])} PNGs, {files['gallery']} misclassified thumbnails, "
          f"{time.perf_counter() - t0:.1f} s)")
    return {"model": str(path), "paths": files, "metrics": meta.get("metrics")}
