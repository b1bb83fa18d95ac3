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


def _cache(args) -> str:
    from featurize.cache import default_cache_dir

    return str(args.cache or default_cache_dir())


# --------------------------------------------------------------------------- extract


def add_extract(sub) -> None:
    p = sub.add_parser("extract", help="embed an image folder once into the HDF5 cache")
    p.add_argument("data", help="image folder: data/<class>/*, data/{train,val,test}/<class>/* or flat")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="registered name, timm:<name>, or a fine-tuning run folder (see `backbones`)")
    p.add_argument("--weights", default=None, help="local .pth/.safetensors state dict (offline use)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: sized to the cores)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16|fp16")
    p.add_argument("--engine", default="auto", help="auto|torch|openvino")
    p.add_argument("--wait", action="store_true", help="wait for another extract on the same folder instead of failing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _common(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> dict:
    from featurize.extract import extract, format_summary

    summary = extract(
        args.data, cache_dir=_cache(args), backbone=args.backbone, weights=args.weights,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        engine=args.engine, wait=args.wait, progress=not args.no_progress and not args.json,
    )
    print(format_summary(summary))
    return summary


def add_backbones(sub) -> None:
    p = sub.add_parser("backbones", help="list registered backbones: name, feature width, offline weights?")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_backbones)


def cmd_backbones(args) -> dict:
    from featurize.backbones import list_backbones

    rows = list_backbones()
    print(f"{'name':<22}{'dim':>6}  offline  source")
    for r in rows:
        print(f"{r['name']:<22}{r['dim'] or '?':>6}  {'yes' if r['offline'] else 'no ':<7}  {r['source']}")
    print("timm:<name>             any timm model with its pretrained config (needs internet or --weights)")
    return {"backbones": rows}


# --------------------------------------------------------------------------- main

COMMANDS = [add_extract, add_backbones]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurize", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
