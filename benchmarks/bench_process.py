"""Whole-process benchmarks (sections of ``benchmarks/bench.py``: same table, same JSON).

    .venv/bin/python benchmarks/bench.py --only process,mp12,heads_load --json benchmarks/results-process.json

- process:    every contender is a command a user types, timed as a process from start to exit:
              ``cli.py extract`` into a fresh cache (a) with an empty engine store (the backbone
              was never converted on this machine) and (b) with the engine store filled once
              beforehand, vs ``benchmarks/naive_tutorial.py`` (imports included), on 100, 500 and
              1,000 flower photos; and ``extract`` + ``fit --head logreg`` on a 400-image
              train/val split folder (80 flowers per class, 60 train / 20 val).
- mp12:       12 MP JPEGs (flower photos upscaled to 4032x3024 with bicubic, re-encoded at JPEG
              quality 90): img/s of the naive loop and of featurize with today's torchvision decode
              path, Pillow at full resolution and Pillow with DCT-domain downscaling (shipped), all
              on the same stored engine; per-image decode ms on one core; cosine of the vectors.
- heads_load: ``fit --head logreg`` and ``compare`` on 2,000 x 1,280 (TrashNet, Lite0) quiet and
              with one busy-loop process per core beside them.

The machine may be shared: every section records the load average before and after.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = next((p for p in (ROOT.parent / "shared" / "datasets", ROOT.parent.parent / "shared" / "datasets") if p.is_dir()),
            ROOT.parent / "shared" / "datasets")  # beside the checkout, or beside a worktree folder


def _env(store: Path) -> dict:
    return {**os.environ, "FEATURIZE_ENGINES": str(store), "PYTHONPATH": str(ROOT)}


def timed(cmd: list, env: dict, timeout: float = 1800) -> dict:
    """Run ``cmd`` as a process; its wall seconds start to exit and its last JSON line, if any."""
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    sec = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out = None
    lines = p.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        out = json.loads(lines[-1])
    return {"seconds": sec, "json": out, "load": os.getloadavg()[0]}


def _extract_cmd(folder, cache):
    return [sys.executable, ROOT / "cli.py", "extract", folder, "--cache", cache, "--json"]


def _warm_store(store: Path, work: Path) -> None:
    """Fill an engine store the way a first run does (8 other flowers, not timed)."""
    from bench import subset_folder

    if any(store.glob("*-openvino-*")):
        return
    warm = subset_folder(DATA / "trashnet", 8, work / "warm-data")
    timed(_extract_cmd(warm, work / "warm-cache"), _env(store))


def split_folder(src: Path, per_class: int, n_val: int, dst: Path, seed: int = 0) -> Path:
    """``dst/{train,val}/<class>/`` hardlinks: ``per_class`` photos of each class, ``n_val`` of them in val."""
    shutil.rmtree(dst, ignore_errors=True)
    for c in sorted(d for d in src.iterdir() if d.is_dir()):
        files = sorted(c.glob("*.jp*g"))
        random.Random(seed).shuffle(files)
        for i, f in enumerate(files[:per_class]):
            part = "val" if i < n_val else "train"
            (dst / part / c.name).mkdir(parents=True, exist_ok=True)
            os.link(f, dst / part / c.name / f.name)
    return dst


def sec_process(args, work: Path, R: dict) -> None:
    from bench import subset_folder

    store = work / "engines-converted"
    _warm_store(store, work)
    out = {"load_before": os.getloadavg(), "rows": []}
    for n in args.process_n:
        folder = subset_folder(DATA / "flowers", n, work / f"flowers-{n}")
        row = {"images": n}
        for name in ("naive", "fresh_store", "converted"):  # interleaved: load drifts hit all alike
            cache = work / f"proc-cache-{n}-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            if name == "naive":
                row[name] = timed([sys.executable, ROOT / "benchmarks" / "naive_tutorial.py", folder,
                                   work / f"naive-{n}.npy"], _env(store))
                continue
            s = store if name == "converted" else work / f"engines-empty-{n}"
            if name == "fresh_store":
                shutil.rmtree(s, ignore_errors=True)
            row[name] = timed(_extract_cmd(folder, cache), _env(s))
            shutil.rmtree(cache, ignore_errors=True)
        for name in ("fresh_store", "converted"):
            row[name]["x_naive"] = row["naive"]["seconds"] / row[name]["seconds"]
        row["first_conversion_adds"] = row["fresh_store"]["seconds"] - row["converted"]["seconds"]
        out["rows"].append(row)
    split = split_folder(DATA / "flowers", 80, 20, work / "split400")
    cache = work / "split-cache"
    shutil.rmtree(cache, ignore_errors=True)
    e = timed(_extract_cmd(split, cache), _env(store))
    f = timed([sys.executable, ROOT / "cli.py", "fit", "--head", "logreg", "--cache", cache, "--json"], _env(store))
    out["split400"] = {"extract": e, "fit": f, "seconds": e["seconds"] + f["seconds"],
                       "val_accuracy": f["json"]["metrics"]["val"]["accuracy"]}
    out["load_after"] = os.getloadavg()
    R["process"] = out


# --------------------------------------------------------------------------- 12 MP JPEGs


def make_12mp(dst: Path, n: int, seed: int = 1) -> Path:
    """``n`` flower photos upscaled (bicubic) to 4032x3024 (portrait 3024x4032), JPEG quality 90."""
    from PIL import Image

    if dst.is_dir() and sum(1 for _ in dst.rglob("*.jpg")) == n:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    files = sorted((DATA / "flowers").glob("*/*.jpg"))
    random.Random(seed).shuffle(files)
    for f in files[:n]:
        im = Image.open(f).convert("RGB")
        size = (4032, 3024) if im.width >= im.height else (3024, 4032)
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        im.resize(size, Image.Resampling.BICUBIC).save(dst / f.parent.name / f.name, quality=90)
    return dst


def w_decode_path(folder, cache, mode):
    """featurize on the stored engine with one decode path: torchvision (today's full path),
    pillow-full (DCT scaling off) or pillow-draft (shipped). Pipeline img/s + the vectors."""
    import numpy as np

    from featurize import cache as fc
    from featurize import fastdecode

    if mode == "pillow-full":
        fastdecode.DRAFT_MARGIN = 10**6  # never large enough to scale
    t = time.perf_counter()
    if mode == "torchvision":
        from featurize import loading
        from featurize.images import read_image
        from featurize.pipeline import build_extractor, default_workers
        from featurize.stages import embed

        # today's decode path for every file: torchvision decode_jpeg at full resolution + resize
        loading.decode_for_model = lambda path, preprocess: preprocess(read_image(path))
        ex = build_extractor(cache, "efficientnet_lite0")
        paths = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
        todo = [(fc.content_hash(p), p) for p in paths]
        _ = ex.engine.engine  # load outside the timing, as the others do
        t = time.perf_counter()
        written = embed(ex, todo, 32, default_workers()).written
        sec = time.perf_counter() - t
        ex.space.compact()
        sid = ex.space.space_id
    else:
        from featurize.extraction import extract

        s = extract(folder, cache_dir=cache, progress=False)
        written, sid = s["embedded"], s["space_id"]
        sec = s["wall_seconds"] - s["seconds"]["load_model"] - s["seconds"]["scan"] - s["seconds"]["hash"]
    hashes, emb = fc.FeatureSpace(cache, sid).load()
    order = np.argsort(hashes)
    np.save(Path(cache) / "vectors.npy", emb[order])
    # decode + resize + crop alone, one core, first 12 files
    paths = sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:12]
    pp = fc.FeatureSpace(cache, sid).info()["preprocess"]
    t1 = time.perf_counter()
    if mode == "torchvision":
        from featurize.images import Preprocess, read_image

        prep = Preprocess(pp["resize"], pp["crop"], tuple(pp["mean"]), tuple(pp["std"]), pp["interpolation"])
        for p in paths:
            prep(read_image(p))
    else:
        for p in paths:
            fastdecode.read_preprocessed(p, pp)
    return {"images": written, "seconds": sec, "img_s": written / sec,
            "decode_ms": (time.perf_counter() - t1) / len(paths) * 1e3}


def sec_mp12(args, work: Path, R: dict) -> None:
    import numpy as np
    from bench import run_worker

    store = work / "engines-converted"
    _warm_store(store, work)
    folder = make_12mp(work / "mp12", args.mp12_n)
    out = {"images": args.mp12_n, "made": "flowers upscaled (bicubic) to 4032x3024, JPEG quality 90",
           "load_before": os.getloadavg(), "rows": {}}
    out["rows"]["naive"] = run_worker("naive", backbone="efficientnet_lite0", weights=None, folder=str(folder))
    out["rows"]["naive"].pop("paths", None)
    for mode in ("torchvision", "pillow-full", "pillow-draft"):
        cache = work / f"mp12-cache-{mode}"
        shutil.rmtree(cache, ignore_errors=True)
        out["rows"][mode] = run_worker("decode_path", env={"FEATURIZE_ENGINES": str(store)}, folder=str(folder),
                                       cache=str(cache), mode=mode)
        out["rows"][mode]["vectors"] = str(cache / "vectors.npy")
    def cos(a, b):
        a, b = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
        c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {"mean": float(c.mean()), "min": float(c.min())}

    ref = out["rows"]["torchvision"]["vectors"]
    for mode in ("pillow-full", "pillow-draft"):
        out["rows"][mode]["cosine_to_torchvision_full"] = cos(ref, out["rows"][mode]["vectors"])
    for r in out["rows"].values():
        r["x_naive"] = r["img_s"] / out["rows"]["naive"]["img_s"]
    out["draft_vs_full_decode"] = out["rows"]["pillow-draft"]["img_s"] / out["rows"]["torchvision"]["img_s"]
    out["load_after"] = os.getloadavg()
    R["mp12"] = out


# --------------------------------------------------------------------------- heads under load


def _busy(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def sec_heads_load(args, work: Path, R: dict) -> None:
    from bench import subset_folder

    store = work / "engines-converted"
    _warm_store(store, work)
    cache = work / "heads-cache"
    folder = work / "trash2000"
    if not (cache / "datasets").is_dir():
        subset_folder(DATA / "trashnet", 2000, folder)
        timed(_extract_cmd(folder, cache), _env(store))
    cmds = {"fit logreg": [sys.executable, ROOT / "cli.py", "fit", "--head", "logreg", "--cache", cache, "--out",
                           work / "h.joblib", "--json"],
            "compare": [sys.executable, ROOT / "cli.py", "compare", "--cache", cache, "--out", work / "cmp", "--json"]}
    out = {"rows": {}, "cores": os.cpu_count()}
    for name, cmd in cmds.items():
        quiet = timed(cmd, _env(store))
        procs = _busy(os.cpu_count() or 1)
        try:
            time.sleep(1.0)
            busy = timed(cmd, _env(store))
        finally:
            for p in procs:
                p.kill()
                p.wait()
        acc = (lambda j: j["metrics"]["cv"]["mean"]["accuracy"]) if name == "fit logreg" else \
            (lambda j: j["rows"][0]["accuracy"])
        out["rows"][name] = {"quiet": quiet["seconds"], "busy": busy["seconds"], "ratio": busy["seconds"] / quiet["seconds"],
                             "load_quiet": quiet["load"], "load_busy": busy["load"],
                             "accuracy_quiet": acc(quiet["json"]), "accuracy_busy": acc(busy["json"])}
    R["heads_load"] = out


WORKERS = {"decode_path": w_decode_path}


def table(R: dict) -> str:
    L = []
    if "process" in R:
        P = R["process"]
        L.append("\n## Whole process: the commands a user types, start to exit (flowers, fresh --cache)\n")
        L.append("| images | naive tutorial script | featurize extract, never converted | x naive | "
                 "featurize extract, engine converted | x naive | first conversion adds |")
        L.append("|---|---|---|---|---|---|---|")
        for r in P["rows"]:
            n = r["images"]
            L.append(f"| {n} | {r['naive']['seconds']:.1f} s ({n / r['naive']['seconds']:.1f} img/s) | "
                     f"{r['fresh_store']['seconds']:.1f} s | {r['fresh_store']['x_naive']:.2f}x | "
                     f"{r['converted']['seconds']:.2f} s ({n / r['converted']['seconds']:.1f} img/s) | "
                     f"**{r['converted']['x_naive']:.2f}x** | {r['first_conversion_adds']:.1f} s |")
        s = P["split400"]
        L.append(f"\n400-image train/val split folder (engine converted, fresh cache): extract "
                 f"{s['extract']['seconds']:.2f} s + fit --head logreg {s['fit']['seconds']:.2f} s = "
                 f"**{s['seconds']:.2f} s** (val accuracy {s['val_accuracy']:.3f})")
        last = P["rows"][-1]["converted"]["json"]
        if last and last.get("process_seconds"):
            L.append(f"\nstages of the last converted run ({P['rows'][-1]['images']} images; they add up to "
                     f"process_seconds {last['process_seconds']:.2f} s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in last["seconds"].items()))
        L.append(f"\nload average before/after: {P['load_before'][0]:.1f} / {P['load_after'][0]:.1f}")
    if "mp12" in R:
        M = R["mp12"]
        L.append(f"\n## 12 MP JPEGs ({M['images']} {M['made']}), same stored engine\n")
        L.append("| contender | img/s | x naive | decode+resize ms/img (1 core) | cosine to torchvision full decode (mean / min) |")
        L.append("|---|---|---|---|---|")
        names = {"naive": "naive tutorial loop (PIL, fp32 torch, 0 workers)",
                 "torchvision": "featurize, torchvision full decode (before)",
                 "pillow-full": "featurize, Pillow full decode", "pillow-draft": "featurize, Pillow + DCT downscale (shipped)"}
        for k, r in M["rows"].items():
            c = r.get("cosine_to_torchvision_full")
            cs = f"{c['mean']:.5f} / {c['min']:.5f}" if c else "-"
            ms = f"{r['decode_ms']:.1f}" if "decode_ms" in r else "-"
            L.append(f"| {names[k]} | {r['img_s']:.1f} | {r['x_naive']:.2f}x | {ms} | {cs} |")
        L.append(f"\nDCT downscaling vs full decode: {M['draft_vs_full_decode']:.2f}x img/s; load average "
                 f"{M['load_before'][0]:.1f} / {M['load_after'][0]:.1f}")
    if "heads_load" in R:
        H = R["heads_load"]
        L.append(f"\n## Heads under load (2,000 x 1,280, one busy-loop process per core: {H['cores']})\n")
        L.append("| command | quiet s | busy s | busy / quiet | accuracy quiet / busy |")
        L.append("|---|---|---|---|---|")
        for k, r in H["rows"].items():
            L.append(f"| {k} | {r['quiet']:.1f} | {r['busy']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['accuracy_quiet']:.4f} / {r['accuracy_busy']:.4f} |")
    return "\n".join(L)
