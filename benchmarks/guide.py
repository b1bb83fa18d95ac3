"""The backbone guide: every registered backbone and the recommended timm models, measured in one run.

    .venv/bin/python benchmarks/guide.py                 # all, 48 flower photos each, 2 rounds
    .venv/bin/python benchmarks/guide.py --n 64 --only efficientnet_lite0,efficientnet_lite2

For each backbone, in a fresh subprocess: build it, build the engine `extract` would use here
(`--engine auto`: OpenVINO on CPUs; the one-off conversion is timed apart as `setup_s`), then
embed the same N real JPEGs through featurize's own pipeline (decode workers -> engine ->
HDF5 shard writer) and time it end to end. Weights do not change speed, so every backbone
whose weights are not on this machine runs with random weights (`weights: random`); the
offline EfficientNet-Lite sizes run with their real weights, and for them the vectors of
each engine are compared with the fp32 PyTorch reference (cosine, real photos).
Cache MB per 10k images is measured from the shard file written (hash + float32 vector per
image, HDF5 overhead included). Published accuracy: ``featurize/guide.py`` (sources cited).

Writes ``benchmarks/results_guide.json`` and ``benchmarks/RESULTS_guide.md``. On a shared
machine compare ratios between rows of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))


def _photos(n: int) -> list[str]:
    """N real JPEGs: flowers (round-robin over classes) when present, else scikit-image photos re-saved."""
    flowers = DATA / "flowers"
    if flowers.is_dir():
        per = [sorted(str(p) for p in d.glob("*.jpg")) for d in sorted(flowers.iterdir()) if d.is_dir()]
        out = [p for group in zip(*per) for p in group]
        return out[:n]
    import skimage.data
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="guide-photos-"))
    names = ["chelsea", "astronaut", "coffee", "rocket"]
    out = []
    for i in range(n):
        p = tmp / f"{i}.jpg"
        Image.fromarray(getattr(skimage.data, names[i % 4])()).save(p, quality=90 - i % 7)
        out.append(str(p))
    return out


def _worker(name: str, n: int, batch: int, out: str) -> None:
    import torch

    from featurize import cache as fc
    from featurize.backbones import get_backbone, resolve_device, resolve_precision
    from featurize.engines import TorchEngine, cosine_rows, make_engine
    from featurize.images import read_image
    from featurize.pipeline import Extractor, default_workers, tune_allocator
    from featurize.registry import backbone_info
    from featurize.stages import embed

    tune_allocator()
    info = backbone_info(name)
    real = bool(info and info.offline())
    t = time.perf_counter()
    bb = get_backbone(name, pretrained=real)
    build_s = time.perf_counter() - t
    dev = resolve_device("cpu")
    prec = resolve_precision("auto", dev)
    cache = Path(tempfile.mkdtemp(prefix="guide-cache-"))
    config = bb.space_config(prec)
    space = fc.FeatureSpace(cache, fc.space_id_for(config))
    space.create({**config, "build": {"backbone": name, "weights": None}, "dim": bb.dim}, bb.dim)
    t = time.perf_counter()
    eng = make_engine(bb, dev, prec, "auto", cache_dir=cache, space_id=space.space_id)
    setup_s = time.perf_counter() - t
    photos = _photos(n)
    todo = [(f"{i:032x}", p) for i, p in enumerate(photos)]
    t = time.perf_counter()
    done = embed(Extractor(bb, eng, dev, prec, space), todo, batch, default_workers())
    written, seconds = done.written, done.seconds
    wall = time.perf_counter() - t
    shard_bytes = sum(p.stat().st_size for p in space.folder.glob("*.h5"))
    row = {"backbone": name, "weights": "real" if real else "random", "dim": bb.dim,
           "input": f"{bb.preprocess.crop}px", "engine": eng.name, "precision": prec,
           "images": written, "img_per_s": round(written / wall, 2), "wall_s": round(wall, 2),
           "decode_s": round(seconds.get("decode", 0.0), 2), "model_s": round(seconds.get("model", 0.0), 2),
           "setup_s": round(setup_s, 1), "build_s": round(build_s, 1),
           "cache_mb_per_10k": round(shard_bytes / max(written, 1) * 10_000 / 1e6, 1)}
    if real:  # every engine stays in the fp32 reference's feature space (cosine on real photos)
        batch_t = torch.stack([bb.preprocess(read_image(p)) for p in photos[:16]])
        ref = TorchEngine(bb, dev, "fp32")(batch_t)
        row["cosine_min"] = {eng.name + "-" + prec: round(float(cosine_rows(eng(batch_t), ref).min()), 4)}
        if prec != "fp32":
            row["cosine_min"]["torch-" + prec] = round(float(
                cosine_rows(TorchEngine(bb, dev, prec)(batch_t), ref).min()), 4)
    Path(out).write_text(json.dumps(row))
    shutil.rmtree(cache, ignore_errors=True)  # up to 1 GB of shards per backbone: each run left one behind


def _all_names() -> list[str]:
    from featurize.guide import RECOMMENDED_TIMM
    from featurize.registry import list_backbones

    return [r["name"] for r in list_backbones() if r["name"] != "tiny"] + RECOMMENDED_TIMM


def _table(rows: list[dict]) -> str:
    from featurize.guide import PUBLISHED

    lines = ["| backbone | weights here | D | input | img/s end to end (median) | rel. to Lite0 | cache MB / 10k imgs "
             "| ImageNet top-1 % (protocol) | source |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r["img_per_s"] for r in rows if r["backbone"] == "efficientnet_lite0" and "img_per_s" in r), None)
    for r in rows:
        p = PUBLISHED.get(r["backbone"])
        pub = f"{p.imagenet_top1:.1f} ({p.protocol})" if p else "-"
        if "error" in r:
            lines.append(f"| `{r['backbone']}` | - | - | - | failed: {r['error'][:60]} | | | {pub} | {p.source if p else ''} |")
            continue
        rel = f"{r['img_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| `{r['backbone']}` | {'offline' if r['weights'] == 'real' else 'download'} | {r['dim']} "
                     f"| {r['input']} | {r['img_per_s']:.1f} ({r['engine']} {r['precision']}) | {rel} "
                     f"| {r['cache_mb_per_10k']:.0f} | {pub} | {p.source if p else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48, help="images per backbone")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="runs per backbone, round robin; the median is reported")
    ap.add_argument("--only", default=None, help="comma-separated backbones (default: all + recommended timm)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_guide.json"))
    ap.add_argument("_worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        _worker(args._worker[0], args.n, args.batch_size, args._worker[1])
        return
    names = args.only.split(",") if args.only else _all_names()
    load = [os.getloadavg()]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeat):  # round robin: load changes hit every backbone alike
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                t = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--batch-size", str(args.batch_size),
                                    name, f.name], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
                text = Path(f.name).read_text() if p.returncode == 0 else ""
            err = p.stderr.strip().splitlines()
            row = json.loads(text) if text else {"backbone": name, "error": (err or ["?"])[-1]}
            warn = [line for line in err if line.startswith("warning:")]
            if warn:
                row["warning"] = warn[-1][:300]
            runs[name].append(row)
            load.append(os.getloadavg())
            print(f"[{rep + 1}/{args.repeat}] {name}: {row.get('img_per_s', row.get('error'))} img/s "
                  f"({time.perf_counter() - t:.0f}s, load {load[-1][0]:.1f})", flush=True)
    rows = []
    for name in names:
        ok = [r for r in runs[name] if "img_per_s" in r]
        if not ok:
            rows.append(runs[name][-1])
            continue
        row = dict(sorted(ok, key=lambda r: r["img_per_s"])[(len(ok) - 1) // 2])  # the (lower) median run
        row["img_per_s_runs"] = [r["img_per_s"] for r in ok]
        rows.append(row)
    result = {"rows": rows, "n_images": args.n, "batch_size": args.batch_size, "cpu": platform.processor() or
              platform.machine(), "cores": os.cpu_count(), "loadavg_before_each_and_after": load,
              "repeat": args.repeat, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["python benchmarks/guide.py"] + sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1))
    table = _table(rows)
    md = Path(args.out).with_name("RESULTS_guide.md")
    cos = [f"`{r['backbone']}` {r['cosine_min']}" for r in rows if r.get("cosine_min")]
    warns = [f"- `{r['backbone']}`: {r['warning']}" for r in rows if r.get("warning")]
    md.write_text(f"# Backbone guide (issue 14)\n\nCommand: `{result['command']}` ({result['when']}, {args.n} flower "
                  f"JPEGs per backbone, batch {args.batch_size}, {result['cores']} cores, shared machine: load average "
                  f"{min(x[0] for x in load):.1f} to {max(x[0] for x in load):.1f} during the run).\n\n{table}\n\n"
                  "Min cosine to the fp32 PyTorch vectors on 16 real photos (offline backbones): "
                  + "; ".join(cos) + "\n\nEngine warnings (the run fell back to PyTorch):\n" + "\n".join(warns) + "\n")
    print(table)


if __name__ == "__main__":
    main()
