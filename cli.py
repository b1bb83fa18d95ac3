"""featurize command line: parse arguments, call one library function, print.

Every command returns a JSON-able dict; with ``--json`` it is printed as the last line.
A ``UserError`` becomes a one-line message and exit code 1; anything else is a bug and
keeps its traceback. Heavy modules (torch, timm, scikit-learn) are imported inside the
command that needs them, so ``fit`` never pays for torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from featurize.errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, help="cache directory (default: $FEATURIZE_CACHE or ./cache)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _cache(args):
    from featurize.layout import Cache

    return Cache(args.cache)  # None: $FEATURIZE_CACHE or ./cache


# --------------------------------------------------------------------------- extract


def add_extract(sub) -> None:
    p = sub.add_parser("extract", help="embed an image folder once into the HDF5 cache")
    p.add_argument("data", help="image folder: data/<class>/*, data/{train,val,test}/<class>/* or flat")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="registered name, timm:<name>, or a fine-tuning run folder (see `backbones`)")
    p.add_argument("--weights", default=None, help="local .pth/.safetensors state dict (offline use)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: one per core)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 on CUDA and AMX/AVX512-BF16 CPUs, fp16 on MPS, else fp32) | fp32 | bf16 | fp16")
    p.add_argument("--engine", default="auto", help="auto|torch|openvino")
    p.add_argument("--wait", action="store_true", help="wait for another extract on the same folder instead of failing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="decode and embed on Ray Data: alone, a local runtime on all cores; auto: the cluster "
                   "`ray start` runs here; or a cluster address (ray://head:10001). Needs the ray extra")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="with --ray: model workers per node (default: one per GPU share, 1 on CPU nodes)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="with --ray: GPUs per model worker, 0 for CPU workers (default: 1 when the cluster has GPUs)")
    _common(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> dict:
    from featurize.extraction import Request, extract_folder, format_summary, process_age

    started = process_age()
    request = Request(args.backbone, args.weights, args.batch_size, args.workers, args.device, args.precision,
                      args.engine, args.wait, progress=not args.no_progress and not args.json)
    result = extract_folder(args.data, _cache(args), request, args.ray, args.workers_per_node, args.gpus_per_worker)
    summary = result.with_process_time(started).to_dict()
    print(format_summary(summary))
    return summary


def add_backbones(sub) -> None:
    p = sub.add_parser("backbones", help="list registered backbones: name, feature width, offline weights?")
    p.add_argument("--guide", action="store_true",
                   help="which to choose: published ImageNet accuracy with its source, plus recommended timm models")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_backbones)


def _backbone_guide(rows: list[dict]) -> dict:
    from featurize.guide import RECOMMENDED_TIMM, guide_rows

    offline = {r["name"]: r for r in rows}
    guide = guide_rows([r["name"] for r in rows if r["name"] != "tiny"] + RECOMMENDED_TIMM)
    print(f"{'backbone':<40}{'dim':>5}  {'weights':<9}{'ImageNet %':>10}  protocol      source")
    for g in guide:
        r = offline.get(g["backbone"])
        where = "offline" if r and r["offline"] else "download"
        top1 = f"{g['imagenet_top1']:.1f}" if g["imagenet_top1"] else "-"
        print(f"{g['backbone']:<40}{(r or {}).get('dim') or g['dim'] or '':>5}  {where:<9}{top1:>10}  {g['protocol'] or '-':<13} "
              f"{g['source'] or ''}")
    print("measured img/s and cache size per backbone: README 'Which backbone?' (benchmarks/guide.py); "
          "on your data: compare --data DIR --backbones a,b,c")
    return {"backbones": rows, "guide": guide}


def cmd_backbones(args) -> dict:
    from featurize.registry import list_backbones  # torch-free: no model is built

    rows = list_backbones()
    if args.guide:
        return _backbone_guide(rows)
    print(f"{'name':<22}{'dim':>6}  offline  source")
    for r in rows:
        print(f"{r['name']:<22}{r['dim'] or '?':>6}  {'yes' if r['offline'] else 'no ':<7}  {r['source']}")
    print(f"{'timm:<name>':<22}{'-':>6}  {'no':<7}  any timm model with its pretrained config (needs internet or --weights)")
    return {"backbones": rows}


def add_cache(sub) -> None:
    p = sub.add_parser("cache", help="what the cache holds: datasets, feature spaces, heads, engines, sizes")
    _common(p)
    p.set_defaults(func=cmd_cache)


def cmd_cache(args) -> dict:
    from featurize.inventory import describe_cache, format_inventory

    inv = describe_cache(_cache(args))
    print(format_inventory(inv))
    return inv


# --------------------------------------------------------------------------- heads: fit, compare, predict, report
# (issue 3) The work happens in heads.commands; these functions only parse and wire. Nothing here
# imports torch except predict's embedder, and only when an input file is not in the cache yet.


def _head_args(p, default_head: str | None = "logreg") -> None:
    p.add_argument("--head", default=default_head, help="head name (see `fit --head list`): logreg, svm, svm-linear, "
                   "svm-rbf, mlp, knn, centroid")
    p.add_argument("--data", default=None, help="dataset folder given to `extract` (default: the latest extracted)")
    p.add_argument("--backbone", default=None, help="backbone name or space id (default: the latest extraction)")


EXCLUDE_HELP = ("leave these images out of training (an `audit` CSV, possibly edited, or a list of paths, one per "
                "line); held-out images are still scored")


def add_fit(sub) -> None:
    p = sub.add_parser("fit", help="train a head on cached features; print held-out metrics; save it")
    _head_args(p)
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none", help="balanced: weight classes "
                   "inversely to their frequency and choose hyper-parameters by balanced accuracy")
    p.add_argument("--out", default=None, help="head file (default: <cache>/heads/<dataset>/<space>/<head>.joblib)")
    p.add_argument("--seed", type=int, default=0, help="fixes the CV folds and the stochastic heads")
    p.add_argument("--folds", type=int, default=5, help="outer CV folds when the data has no train/test split")
    p.add_argument("--n-jobs", type=int, default=None, help="parallel hyper-parameter fits (default: 1)")
    p.add_argument("--exclude", default=None, metavar="FILE", help=EXCLUDE_HELP)
    _common(p)
    p.set_defaults(func=cmd_fit)


def cmd_fit(args) -> dict:
    from heads.commands import run_fit

    return run_fit(_cache(args), head=args.head, data=args.data, backbone=args.backbone, out=args.out,
                   class_weight=None if args.class_weight == "none" else args.class_weight, seed=args.seed,
                   folds=args.folds, n_jobs=args.n_jobs, exclude=args.exclude)


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="leaderboard: every head x every cached backbone (table, CSV, JSON)")
    p.add_argument("--data", default=None, help="dataset folder (default: the latest extracted)")
    p.add_argument("--heads", default=None, help="comma-separated heads (default: all)")
    p.add_argument("--backbones", default=None,
                   help="comma-separated backbones or space ids; names not extracted yet for the dataset are "
                        "extracted first (default: all cached)")
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none", help="balanced: weight classes inversely to their frequency")
    p.add_argument("--out", default=None, help="path stem for .csv/.json (default: <cache>/reports/compare-<dataset>)")
    p.add_argument("--seed", type=int, default=0, help="fixes the CV folds and the stochastic heads")
    p.add_argument("--folds", type=int, default=5, help="outer CV folds when the data has no train/test split")
    p.add_argument("--n-jobs", type=int, default=None, help="parallel hyper-parameter fits (default: 1)")
    p.add_argument("--exclude", default=None, metavar="FILE", help=EXCLUDE_HELP)
    _common(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> dict:
    from heads.commands import run_compare

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    options = dict(heads=split(args.heads), out=args.out,
                   class_weight=None if args.class_weight == "none" else args.class_weight, seed=args.seed,
                   folds=args.folds, n_jobs=args.n_jobs, quiet=args.json, exclude=args.exclude)
    if args.backbones:  # choosing among backbones: extract what is missing first (the library layer)
        from featurize.workflow import compare_backbones

        return compare_backbones(_cache(args), args.data, split(args.backbones), **options)
    return run_compare(_cache(args), data=args.data, **options)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label image files/folders with a fitted head")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    _head_args(p)
    p.add_argument("--model", default=None, help="a head file written by `fit` (instead of --head/--data)")
    p.add_argument("--top-k", type=int, default=3, help="labels listed per image, most probable first")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="stdout format")
    p.add_argument("--trust", action="store_true", help="load a head file this tool did not write (runs pickle code)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call when a file is not cached")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps, for files not cached yet")
    _common(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> dict:
    from featurize.workflow import predict

    return predict(_cache(args), args.inputs, head=args.head, model=args.model, data=args.data,
                   backbone=args.backbone, top_k=args.top_k, fmt=args.format, trust=args.trust,
                   batch_size=args.batch_size, device=args.device)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="self-contained HTML report of a fitted head (metrics, confusion, errors)")
    _head_args(p)
    p.add_argument("--model", default=None, help="a head file written by `fit` (instead of --head/--data)")
    p.add_argument("--out", default=None, help="report folder (default: next to the head file)")
    p.add_argument("--max-errors", type=int, default=60, help="thumbnails in the error gallery")
    p.add_argument("--trust", action="store_true", help="report on a head file this tool did not write")
    _common(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> dict:
    from heads.commands import run_report

    return run_report(_cache(args), head=args.head, model=args.model, data=args.data, backbone=args.backbone,
                      out=args.out, max_errors=args.max_errors, trust=args.trust)


HEAD_COMMANDS = [add_fit, add_compare, add_predict, add_report]
# --------------------------------------------------------------------------- end of heads section


# --------------------------------------------------------------------------- audit (issue 12)


def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="suspected label errors, near-duplicates (across labels/splits) and outliers, "
                       "from the cached features (summary, CSV, JSON, --html gallery)")
    _head_args(p)
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="class weights of the head that scores every image out of sample")
    p.add_argument("--seed", type=int, default=0, help="fixes the CV folds")
    p.add_argument("--folds", type=int, default=5, help="CV folds for the out-of-sample probabilities")
    p.add_argument("--n-jobs", type=int, default=None, help="parallel hyper-parameter fits (default: 1)")
    p.add_argument("--dup-threshold", type=float, default=None,
                   help="cosine at or above which two images are near-duplicates (default: 0.85, calibrated on transformed photos)")
    p.add_argument("--html", action="store_true", help="also write an HTML gallery of every issue")
    p.add_argument("--max-gallery", type=int, default=60, help="items per issue type in the HTML gallery")
    p.add_argument("--out", default=None, help="path stem for .csv/.json/.html (default: <cache>/reports/audit-<dataset>)")
    _common(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args) -> dict:
    from heads.audit import DUP_THRESHOLD, run_audit

    return run_audit(_cache(args), data=args.data, backbone=args.backbone, head=args.head,
                     class_weight=None if args.class_weight == "none" else args.class_weight, seed=args.seed,
                     folds=args.folds, n_jobs=args.n_jobs, out=args.out, html=args.html, max_gallery=args.max_gallery,
                     threshold=DUP_THRESHOLD if args.dup_threshold is None else args.dup_threshold)


AUDIT_COMMANDS = [add_audit]
# --------------------------------------------------------------------------- end of audit section


# --------------------------------------------------------------------------- finetune (issue 4)
# LP-FT: unfreeze the backbone starting from the fitted linear probe; the glue between the probe
# (heads, torch-free) and training (featurize.finetune) is featurize.workflow.finetune.


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="stage 2: fine-tune the backbone starting from the fitted linear probe (LP-FT)")
    p.add_argument("--data", default=None, help="dataset folder given to `extract` (default: the latest extracted)")
    p.add_argument("--backbone", default=None, help="backbone name or space id of the probe (default: latest extraction)")
    p.add_argument("--probe", default=None, help="head file of the probe (default: the `fit --head logreg` file)")
    p.add_argument("--init", choices=["probe", "random"], default="probe",
                   help="probe: LP-FT (default); random: plain fine-tuning from a random head, for comparison")
    p.add_argument("--unfreeze", default="all", help="all, or last:N to train only the last N blocks")
    p.add_argument("--class-weight", choices=["balanced", "none"], default=None,
                   help="balanced: loss weighted by inverse class frequency, probe refit balanced, best epoch by "
                        "balanced accuracy (default: the probe's, as given to `fit`)")
    p.add_argument("--train-bn", action="store_true", help="update BatchNorm statistics (frozen by default)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better val score")
    p.add_argument("--keep", choices=["best", "last"], default="best",
                   help="best: the epoch with the best val score, epoch 0 (the probe) included; last: the last "
                        "epoch, when val does not look like the data to predict (default: best)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="stratified hold-out when there is no val split")
    p.add_argument("--max-train", type=int, default=None, help="train on a stratified subset of this many images")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps per epoch (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="fixes the hold-out split, augmentation and order")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--precision", default="auto", help="auto (the extraction's) |fp32|bf16|fp16")
    p.add_argument("--workers", type=int, default=None, help="image decode workers")
    p.add_argument("--out", default=None, help="run folder (default: runs/ft-NNN)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                   help="continue an interrupted run (default: the latest runs/ft-NNN)")
    p.add_argument("--trust", action="store_true", help="load a probe file this tool did not write")
    _common(p)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> dict:
    from featurize.workflow import finetune, format_finetune

    summary = finetune(
        _cache(args), args.data, args.backbone, probe=args.probe, out=args.out, resume=args.resume, trust=args.trust,
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        batch_size=args.batch_size, unfreeze=args.unfreeze, train_bn=args.train_bn, patience=args.patience, keep=args.keep,
        seed=args.seed, init=args.init, val_fraction=args.val_fraction, max_train=args.max_train,
        max_steps=args.max_steps, device=args.device, precision=args.precision, workers=args.workers,
        class_weight=args.class_weight or "keep")
    print(format_finetune(summary))
    return summary


FINETUNE_COMMANDS = [add_finetune]
# --------------------------------------------------------------------------- end of finetune section


# --------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: write scikit-learn's digits as PNGs, extract, fit logreg")
    p.add_argument("--out", default="data/digits", help="where to write the digit images")
    p.add_argument("--head", default="logreg", help="head fit on the digits after extraction")
    _common(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> dict:
    from featurize.workflow import demo

    return demo(_cache(args), args.out, head=args.head, progress=not args.json)


# --------------------------------------------------------------------------- main

COMMANDS = [add_extract, add_backbones, add_cache, add_demo] + HEAD_COMMANDS + FINETUNE_COMMANDS + AUDIT_COMMANDS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" unless X is None/False or the help already says what the default is."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers show each option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from featurize import __version__

    parser = argparse.ArgumentParser(prog="featurize", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"featurize {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # File names that are not UTF-8 are kept as Python does (lone surrogates for the raw bytes);
    # print them as those bytes, as `ls` does, instead of failing in the middle of a table.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except OSError as e:  # a full disk while fit/report/predict writes: one line, like a UserError
        from featurize.errors import DISK_FULL, disk_full_error

        if e.errno not in DISK_FULL:
            raise
        e = disk_full_error(_cache(args) if hasattr(args, "cache") else ".", e)
        print(f"Error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        return 1
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e), **e.details}, default=str))
        return 1
    except KeyboardInterrupt as e:  # featurize.errors.Interrupted carries what was saved
        print(str(e) or "Interrupted.", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
