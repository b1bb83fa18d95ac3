"""The library layer that joins featurize (backbones, cache, fine-tuning) and heads (classifiers).

``featurize``'s core modules never import ``heads`` and ``heads`` never imports torch; what
needs both lives here and nowhere else, called by the CLI (one call per command) and by the
Python API (``featurize.api``):

- :func:`predict` classifies files with a fitted head (embedding what the cache lacks) or
  with a fine-tuning run folder end to end, and says which head, dataset and space it used;
- :func:`finetune` starts LP-FT from the fitted linear probe (:func:`probe_for`) or resumes a run;
- :func:`demo` writes the digits, extracts and fits.

Importing this module is torch-free; torch loads only when an image must be embedded or trained on.
"""

from __future__ import annotations

import sys
import time

from featurize.errors import UserError
from featurize.layout import Cache, latest_run_dir, next_run_dir
from featurize.registry import is_run_folder

# --------------------------------------------------------------------------- predict


def predict(cache, inputs: list[str], head: str = "logreg", model=None, data=None, backbone=None, top_k: int = 3,
            fmt: str = "table", trust: bool = False, batch_size: int = 32, device: str = "auto") -> dict:
    """Classify image files/folders; prints the rows (table/csv/json) to stdout, the files skipped and
    the head used to stderr; returns the ``predict --json`` dict.

    ``model`` is a head file or a fine-tuning run folder; otherwise the ``head`` fitted on ``data``
    with ``backbone`` (latest extraction when None) is used.
    """
    from featurize.options import check_batch_size
    from heads.predict import check_top_k

    check_batch_size(batch_size)  # checked even when every input is cached
    check_top_k(top_k)
    if is_run_folder(model):
        return _predict_with_run(inputs, model, top_k, fmt, batch_size, device)
    from heads.commands import run_predict

    cache = Cache.of(cache)

    def embed(space_id: str, paths: list[str], cache):  # the cache that holds the head's space
        from featurize.extraction import embed_paths  # torch: only for files not embedded yet

        return embed_paths(paths, space_id, cache, batch_size=batch_size, device=device)

    return run_predict(cache, inputs, head=head, model=model, data=data, backbone=backbone, top_k=top_k, fmt=fmt,
                       trust=trust, embed=embed)


def _predict_with_run(inputs, run_dir, top_k, fmt, batch_size, device) -> dict:
    """``predict --model runs/ft-NNN/``: the fine-tuned backbone and classifier, end to end."""
    import json

    from featurize import finetune as ft
    from heads.commands import expand_inputs
    from heads.predict import format_rows, rows_from_proba

    t0 = time.perf_counter()
    files, errors = expand_inputs(inputs)
    if not files and not errors:
        raise UserError(f"no image files in {', '.join(inputs)}; pass image files or folders of images")
    print(f"using fine-tuning run {run_dir}", file=sys.stderr)
    probs, classes, ok, bad = ft.predict_run(run_dir, files, batch_size=batch_size, device=device)
    errors += bad
    rows = rows_from_proba(ok, probs, classes, top_k)
    for p, reason in errors:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    if not rows:
        raise UserError(f"none of the {len(files) + len(errors)} inputs could be classified (see the skipped lines)")
    print(json.dumps(rows, indent=1) if fmt == "json" else format_rows(rows, fmt))
    return {"model": str(run_dir), "head": "finetune", "predictions": rows,
            "errors": [{"path": p, "reason": r} for p, r in errors],
            "timings": {"total_s": round(time.perf_counter() - t0, 3)}}


# --------------------------------------------------------------------------- demo


def demo(cache, out="data/digits", head: str = "logreg", progress: bool = True,
         backbone: str = "efficientnet_lite0") -> dict:
    """The offline demo: write scikit-learn's digits as PNGs under ``out``, extract them with the
    offline default backbone (``backbone``: tests use ``tiny``) and fit ``head``; prints as
    ``extract`` and ``fit`` do."""
    from featurize.demo import write_digits
    from featurize.extraction import extract, format_summary
    from heads.commands import run_fit

    folder = write_digits(out)
    print(f"wrote scikit-learn's 1,797 handwritten digits to {folder}/<digit>/*.png")
    summary = extract(str(folder), Cache.of(cache), backbone=backbone, progress=progress)
    print(format_summary(summary))
    return {"extract": summary, "fit": run_fit(Cache.of(cache), head=head, data=str(folder))}


# --------------------------------------------------------------------------- finetune (LP-FT)


def refit_probe(estimator, X, paths, plan, class_weight="keep") -> tuple[object, dict]:
    """Refit a fitted linear probe (same hyper-parameters) on the fine-tuning train rows only, so the
    hold-out stays unseen; returns ``(fitted, {"W", "b", "classes", "val_accuracy", "test_accuracy"})``.

    ``X`` and ``paths`` are the cached rows of the dataset (paths relative to its root), ``plan``
    the fine-tuning split (``featurize.finetune.plan_data``); ``class_weight`` (None or
    "balanced") replaces the probe's own ("keep").
    """
    import numpy as np

    from heads.linear import linear_params, refit

    linear_params(estimator)  # refuse a non-linear head before spending time on the refit
    row = {p: i for i, p in enumerate(paths)}
    take = lambda rows: (X[[row[p] for p, _ in rows]], np.array([plan.classes[y] for _, y in rows]))  # noqa: E731
    fitted = refit(estimator, *take(plan.train), class_weight=class_weight)
    out = linear_params(fitted)
    for part in ("val", "test"):
        rows = getattr(plan, part)
        if rows:
            Xp, yp = take(rows)
            out[f"{part}_accuracy"] = float((fitted.predict(Xp) == yp).mean())
    return fitted, out


def probe_for(cache, index_path, space_id: str, X, paths, plan, probe=None, trust: bool = False,
              class_weight="keep") -> dict:
    """The saved logreg probe of a dataset and space (or the head file ``probe``), refit on the
    fine-tuning train rows and folded to ``W, b`` (:func:`refit_probe`), with its file and choices.

    ``class_weight``: None or "balanced" for the refit; "keep" keeps what `fit` was given. The
    weights used are returned under ``class_weight``.
    """
    from heads.linear import load_probe

    path = probe or Cache.of(cache).head_path(index_path, space_id, "logreg")
    est, meta = load_probe(path, space_id, trust=trust)
    if class_weight == "keep":
        class_weight = meta.get("class_weight")
    _, out = refit_probe(est, X, list(paths), plan, class_weight=class_weight)
    return {**out, "file": str(path), "head": meta.get("head"), "best_params": meta.get("best_params"),
            "class_weight": class_weight}


def space_with_probe(cache, index_path, index):
    """The latest extraction that has a fitted logreg probe: after ``extract --backbone runs/ft-001/``
    the newest space is the fine-tuned one, which has no probe yet. None when no space has one."""
    from featurize.cache import FeatureSpace, extractions_newest_first

    cache = Cache.of(cache)
    for sid, _ in extractions_newest_first(index):
        if cache.head_path(index_path, sid, "logreg").is_file():
            return FeatureSpace(cache.root, sid)
    return None


def finetune(cache=None, data=None, backbone=None, *, probe=None, out=None, resume=None, trust: bool = False,
             log=None, **options) -> dict:
    """Fine-tune a backbone from its fitted linear probe (LP-FT), or continue a run; returns the summary.

    ``resume`` is a run folder or ``"latest"`` (the other arguments are then ignored). Otherwise
    the features of ``data`` with ``backbone`` (default: the latest extraction that has a logreg
    probe) give the split and the probe; ``options`` are :class:`featurize.finetune.FinetuneConfig`
    fields (``epochs``, ``lr``, ``unfreeze``, ``init``, ``class_weight`` ...). ``out`` defaults to the
    next ``runs/ft-NNN``. ``class_weight`` None, "none" or "balanced" applies to the probe refit and the
    loss alike; left out, a run takes the probe's (what `fit --class-weight` was given).
    """
    from featurize import finetune as ft

    if resume:
        return ft.train(latest_run_dir() if resume == "latest" else resume, log=log)
    from featurize.cache import find_index, load_features, resolve_space

    cache = Cache.of(cache)
    asked = options.pop("class_weight", "keep")
    cfg = ft.FinetuneConfig(**options, class_weight=None if asked in ("keep", "none", None) else asked)
    ipath, index = find_index(cache, data)
    space = resolve_space(cache, index, backbone)
    if backbone is None and cfg.init == "probe" and not probe:
        space = space_with_probe(cache, ipath, index) or space
    X, labels, splits, paths = load_features(cache, index, space)
    ft.parse_unfreeze(cfg.unfreeze)
    plan = ft.plan_data(index.root, paths, labels, splits, cfg.val_fraction, cfg.seed, cfg.max_train)
    init = probe_for(cache, ipath, space.space_id, X, paths, plan, probe, trust,
                     class_weight="keep" if asked == "keep" else cfg.class_weight) if cfg.init == "probe" else None
    if init is not None and asked == "keep":
        cfg.class_weight = init["class_weight"]
    run = ft.start_run(plan, space.info(), cfg, out or next_run_dir(), init)
    return ft.train(run, log=log)


def format_finetune(s: dict) -> str:
    """The one line ``finetune`` prints for :func:`finetune`'s summary."""
    return (f"{s['run']}: best epoch {s['best_epoch']} val_acc {s['best_val_accuracy']:.4f} "
            f"(epoch 0 = {s['init']} init: {s['epoch0_val_accuracy']:.4f})"
            + (f"; test_acc {s['test_accuracy_best']:.4f} (epoch 0: {s['test_accuracy_epoch0']:.4f})"
               if s.get("test_accuracy_best") is not None else "")
            + (f"; test balanced acc {s['test_balanced_accuracy_best']:.4f} (epoch 0: "
               f"{s['test_balanced_accuracy_epoch0']:.4f})" if s.get("test_balanced_accuracy_best") is not None else "")
            + f"; {s['train_seconds']:.0f}s training")


# --------------------------------------------------------------------------- compare across backbones


def compare_backbones(cache=None, data=None, backbones=None, *, log=None, **compare_options) -> dict:
    """Choose a backbone: extract whatever is missing for each of ``backbones``, then rank every
    backbone x head on ``data`` (``heads.commands.run_compare``), the embedding cost beside the accuracy.

    ``backbones`` are names (``efficientnet_lite2``, ``timm:NAME``, a run folder) or space ids;
    names are extracted incrementally (a backbone already extracted costs a cache lookup and no
    torch import). ``data`` defaults to the latest extracted dataset. ``compare_options`` go to
    ``run_compare`` (heads, class_weight, seed, folds, out, n_jobs, quiet, exclude). Returns its
    result plus ``extractions`` (what each backbone's extract did). Raises ``UserError`` as
    ``extract`` and ``compare`` do.
    """
    from featurize.cache import FeatureSpace, find_index
    from featurize.extraction import extract
    from heads.commands import run_compare

    log = log or sys.stderr
    cache = Cache.of(cache)
    if data is None:
        data = find_index(cache, None)[1].root
    done = []
    for name in backbones or []:
        if FeatureSpace(cache.root, name).exists():  # a space id names vectors already cached
            continue
        s = extract(data, cache, backbone=name, progress=False)
        done.append({k: s.get(k) for k in ("backbone", "space_id", "embedded", "cached", "images_per_second",
                                           "wall_seconds")})
        rate = f" at {s['images_per_second']:.1f} img/s" if s.get("images_per_second") else ""
        print(f"extract {name}: {s['embedded']} embedded{rate}, {s['cached']} already cached "
              f"({s['wall_seconds']:.1f} s)", file=log, flush=True)
    result = run_compare(cache, data, backbones=list(backbones) if backbones else None, **compare_options)
    return {**result, "extractions": done}
