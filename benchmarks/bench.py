"""featurize benchmark suite: one command, a table on stdout, JSON on disk.

    .venv/bin/python benchmarks/bench.py            # quick mode (tutorial recipe cut to 2 epochs)
    .venv/bin/python benchmarks/bench.py --full     # the tutorial's full 25 epochs (~30 min here)

Sections (``--only`` picks some):
- extract:    end-to-end img/s over the same real JPEGs, same backbone, same run: the naive
              tutorial loop (ImageFolder + DataLoader 0 workers + PIL transforms + fp32) vs
              featurize with each engine; model-only img/s (pre-decoded batch) so the decode
              share shows; cosine of every engine's vectors to the naive fp32 vectors.
- classifier: time to a trained, evaluated classifier on flowers, one stratified 80/20
              split (seed 0): featurize extract + logreg head vs the PyTorch tutorial's
              "ConvNet as fixed feature extractor" (SGD lr 1e-3 momentum 0.9, StepLR 7/0.1,
              RandomResizedCrop + flip, backbone re-run every epoch, batch 4).
- cachehit:   first run vs cache-hit re-run on chest_xray (5,840 images), in-process and CLI.
- rss:        peak RSS (main process + decode workers) of extraction at several N.
- knobs:      decode workers x engine threads x batch size for the OpenVINO path.
- process, mp12, heads_load: whole-process timings of the commands a user types, 12 MP JPEGs,
              heads next to busy cores (``benchmarks/bench_process.py``; one command, < 10 min:
              ``--only process,mp12,heads_load``).

Every measurement runs in a fresh subprocess (allocator settings, thread pools and caches
do not leak between contenders). On a shared machine compare ratios, not absolute numbers.
ResNet-50 runs with random-init weights (torchvision weights cannot be downloaded here):
speed does not depend on the values of the weights, so its speed ratios hold, but its
cosine numbers are not meaningful and are not reported.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = next((p for p in (ROOT.parent / "shared" / "datasets", ROOT.parent.parent / "shared" / "datasets") if p.is_dir()),
            ROOT.parent / "shared" / "datasets")  # beside the checkout, or beside a worktree folder
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_process  # noqa: E402  (whole-process sections: process, mp12, heads_load)

# --------------------------------------------------------------------------- harness helpers


def _tree_rss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of ``pid`` and all its descendants.

    Summed RSS counts the shared pages (torch's libraries, the parent's memory the workers
    inherit) once per process; PSS splits them, so summed PSS is the memory actually used.
    """
    rss = pss = 0
    stack, seen = [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return rss, pss


def run_worker(task: str, env: dict | None = None, timeout: float = 3600, memory: bool = False, **kw) -> dict:
    """Run ``bench.py _worker TASK`` in a fresh process; return its JSON (+ peak tree RSS/PSS if ``memory``).

    Memory sampling reads ``smaps_rollup`` of every process of the tree (about 15 ms of CPU
    each, ten times a second): on 2 cores that steals a third of a core from whatever runs,
    so only the memory section samples; speed runs do not.
    """
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "_worker", task, json.dumps(kw), out]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    done = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        while memory and not done.is_set():
            rss, pss = _tree_rss(proc.pid)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate(timeout=timeout)
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {task} failed:\n{err[-3000:]}")
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    if memory:
        res["peak_rss_mb"] = round(peak / 2**20, 1)  # summed RSS (shared pages counted per process)
        res["peak_pss_mb"] = round(peak_pss / 2**20, 1)  # summed PSS (memory actually used)
    return res


def subset_folder(src: Path, n: int, dst: Path, seed: int = 0) -> Path:
    """``dst/<class>/<file>`` hardlinks (symlinks across devices) to ``n`` files of ``src``, classes balanced."""
    import random

    classes = sorted(d for d in src.iterdir() if d.is_dir())
    files = {c: sorted(c.glob("*.jp*g")) for c in classes}
    rng = random.Random(seed)
    for c in classes:
        rng.shuffle(files[c])
    picked, i = [], 0
    while len(picked) < n and any(i < len(f) for f in files.values()):
        picked += [(c, files[c][i]) for c in classes if i < len(files[c])]
        i += 1
    shutil.rmtree(dst, ignore_errors=True)
    for c, f in picked[:n]:
        (dst / c.name).mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst / c.name / f.name)
        except OSError:
            os.symlink(f, dst / c.name / f.name)
    return dst


def random_weights(backbone: str, path: Path) -> str:
    """A random-init state dict for a torchvision backbone (speed runs only)."""
    if not path.exists():
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(backbone, weights=None).state_dict(), path)
    return str(path)


# --------------------------------------------------------------------------- workers (run in subprocesses)


def _backbone(name: str, weights: str | None):
    from featurize.backbones import get_backbone

    return get_backbone(name, weights=weights)


def w_naive(backbone, weights, folder, limit_s=None):
    """The tutorial loop: ImageFolder + DataLoader(0 workers) + PIL transforms + fp32 eager model."""
    import numpy as np
    import torch
    from torchvision import datasets, transforms

    bb = _backbone(backbone, weights)
    pp = bb.preprocess
    tf = transforms.Compose([
        transforms.Resize(pp.resize, interpolation=transforms.InterpolationMode(pp.interpolation)),
        transforms.CenterCrop(pp.crop), transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)])
    ds = datasets.ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, num_workers=0)
    model = bb.model.eval()
    outs = []
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            outs.append(model(x).numpy())
    sec = time.perf_counter() - t
    X = np.concatenate(outs)
    np.save(Path(folder).parent / f"naive-{backbone}.npy", X)
    return {"images": len(X), "seconds": sec, "img_s": len(X) / sec,
            "paths": [os.path.relpath(p, folder) for p, _ in ds.samples]}


def w_featurize(backbone, weights, folder, engine, cache, warm_folder=None, workers=None, batch_size=32,
                threads=None, model_only=True):
    """featurize extract with one engine; conversion/compile done beforehand on ``warm_folder``."""
    import numpy as np

    from featurize import cache as fc
    from featurize import engines
    from featurize.extraction import extract

    if threads:
        engines.default_engine_threads = lambda: threads
    kw = dict(cache_dir=cache, backbone=backbone, weights=weights, engine=engine, progress=False,
              workers=workers, batch_size=batch_size)
    prep = None
    if warm_folder:
        t = time.perf_counter()
        w = extract(warm_folder, **kw)
        prep = {"seconds": time.perf_counter() - t, "load_model": w["seconds"]["load_model"]}
    s = extract(folder, **kw)
    pipeline = s["wall_seconds"] - s["seconds"]["load_model"]
    res = {"engine": s["engine"], "precision": s["precision"], "images": s["embedded"], "seconds": pipeline,
           "img_s": s["embedded"] / pipeline, "wall_seconds": s["wall_seconds"], "stages": s["seconds"],
           "first_build": prep, "workers": workers, "batch_size": batch_size}
    ipath, index = fc.find_index(cache, folder)
    space = fc.resolve_space(cache, index, s["space_id"])
    X, _, _, paths = fc.load_features(cache, index, space)
    order = np.argsort(paths.astype(str))
    np.save(Path(folder).parent / f"fz-{backbone}-{engine}.npy", X[order])
    res["paths"] = sorted(paths.astype(str).tolist())
    if model_only:  # the engine alone on a pre-decoded batch of the same images
        from featurize.pipeline import build_extractor, reader

        ex = build_extractor(cache, backbone, weights, engine=engine)
        paths_abs = [str(Path(folder) / p) for p in res["paths"][:64]]
        batch = next(iter(reader(paths_abs, ex.backbone.preprocess, 64, 0)))["images"]
        eng, b = ex.engine, batch[:32]
        eng(b)
        # through map(), as extraction runs it (OpenVINO keeps one batch in flight per stream)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 6 or n < 96:
            n += sum(len(e) for _, e in eng.map((None, b) for _ in range(4)))
        res["model_only_img_s"] = n / (time.perf_counter() - t)
        # decode + resize alone, one core
        from featurize.images import read_image

        t = time.perf_counter()
        for p in paths_abs:
            ex.backbone.preprocess(read_image(p))
        res["decode_ms"] = (time.perf_counter() - t) / len(paths_abs) * 1e3
    return res


def w_featurize_classifier(folder, cache, test_paths):
    """Time from nothing to a fitted + evaluated logreg head on the fixed split."""
    import numpy as np

    from featurize import cache as fc
    from featurize.extraction import extract

    t0 = time.perf_counter()
    s = extract(folder, cache_dir=cache, progress=False)
    t_extract = time.perf_counter() - t0
    from heads.registry import make_head

    ipath, index = fc.find_index(cache, folder)
    space = fc.resolve_space(cache, index, s["space_id"])
    X, labels, _, paths = fc.load_features(cache, index, space)
    test = set(test_paths)
    is_test = np.array([p in test for p in paths.astype(str)])
    head = make_head("logreg", seed=0, n_samples=int((~is_test).sum()))
    head.fit(X[~is_test], labels[~is_test].astype(str))
    acc = float((head.predict(X[is_test]) == labels[is_test].astype(str)).mean())
    total = time.perf_counter() - t0
    return {"seconds": total, "extract_seconds": t_extract, "fit_eval_seconds": total - t_extract,
            "load_model_seconds": s["seconds"]["load_model"], "engine": s["engine"], "precision": s["precision"],
            "accuracy": acc, "n_train": int((~is_test).sum()), "n_test": int(is_test.sum())}


def w_tutorial(folder, test_paths, epochs):
    """PyTorch tutorial "ConvNet as fixed feature extractor", same backbone, same split."""
    import torch
    from PIL import Image
    from torch import nn
    from torchvision import transforms

    torch.manual_seed(0)
    bb = _backbone("efficientnet_lite0", None)
    pp = bb.preprocess
    norm = transforms.Normalize(pp.mean, pp.std)
    tf_train = transforms.Compose([transforms.RandomResizedCrop(pp.crop), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    tf_val = transforms.Compose([transforms.Resize(pp.resize), transforms.CenterCrop(pp.crop),
                                 transforms.ToTensor(), norm])
    classes = sorted(d.name for d in Path(folder).iterdir() if d.is_dir())
    items = sorted((str(p), classes.index(p.parent.name)) for c in classes for p in (Path(folder) / c).glob("*.jpg"))
    test = set(test_paths)
    train_items = [it for it in items if os.path.relpath(it[0], folder) not in test]
    val_items = [it for it in items if os.path.relpath(it[0], folder) in test]

    class DS(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            p, y = self.items[i]
            return self.tf(Image.open(p).convert("RGB")), y

    workers = min(4, os.cpu_count() or 1)  # the tutorial uses 4 workers; this machine has 2 cores
    loaders = {"train": torch.utils.data.DataLoader(DS(train_items, tf_train), batch_size=4, shuffle=True,
                                                    num_workers=workers),
               "val": torch.utils.data.DataLoader(DS(val_items, tf_val), batch_size=4, shuffle=False,
                                                  num_workers=workers)}
    backbone = bb.model.eval()  # frozen, BatchNorm on running stats (kinder than the tutorial's train())
    fc_layer = nn.Linear(bb.dim, len(classes))
    opt = torch.optim.SGD(fc_layer.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    crit = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    hist = []
    for ep in range(epochs):
        for phase in ("train", "val"):
            fc_layer.train(phase == "train")
            correct = n = 0
            for x, y in loaders[phase]:
                with torch.no_grad():
                    f = backbone(x)
                with torch.set_grad_enabled(phase == "train"):
                    out = fc_layer(f)
                    loss = crit(out, y)
                    if phase == "train":
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                correct += int((out.argmax(1) == y).sum())
                n += len(y)
            if phase == "train":
                sched.step()
            else:
                hist.append({"epoch": ep + 1, "val_acc": correct / n, "elapsed": time.perf_counter() - t0})
    total = time.perf_counter() - t0
    return {"seconds": total, "epochs": epochs, "accuracy_final": hist[-1]["val_acc"],
            "accuracy_best": max(h["val_acc"] for h in hist), "history": hist,
            "seconds_per_epoch": total / epochs, "n_train": len(train_items), "n_test": len(val_items),
            "workers": workers}


def w_cachehit(folder, cache):
    from featurize.extraction import extract

    t = time.perf_counter()
    s1 = extract(folder, cache_dir=cache, progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    s2 = extract(folder, cache_dir=cache, progress=False)
    second = time.perf_counter() - t
    return {"images": s1["images"], "first_seconds": first, "first_img_s": s1["embedded"] / first,
            "engine": s1["engine"], "rerun_seconds_in_process": second, "rerun_embedded": s2["embedded"],
            "rerun_stages": s2["seconds"]}


def w_extract_only(folder, cache, engine="auto"):
    from featurize.extraction import extract

    t = time.perf_counter()
    s = extract(folder, cache_dir=cache, progress=False, engine=engine)
    return {"images": s["images"], "embedded": s["embedded"], "seconds": time.perf_counter() - t,
            "engine": s["engine"]}


WORKERS = {"naive": w_naive, "featurize": w_featurize, "featurize_classifier": w_featurize_classifier,
           "tutorial": w_tutorial, "cachehit": w_cachehit, "extract_only": w_extract_only}
WORKERS.update(bench_process.WORKERS)


# --------------------------------------------------------------------------- sections


def cosines(a_npy: Path, b_npy: Path) -> dict:
    import numpy as np

    a, b = np.load(a_npy), np.load(b_npy)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(c.mean()), "min": float(c.min())}


def sec_extract(args, work: Path, R: dict) -> None:
    from featurize.backbones import cpu_has_fast_bf16  # noqa: F401

    cases = [("efficientnet_lite0", None, args.n)]
    if not args.skip_resnet:
        cases.append(("resnet50", random_weights("resnet50", work / "resnet50-random.pth"), args.n_resnet))
    out = {}
    for backbone, weights, n in cases:
        folder = subset_folder(DATA / "flowers", n, work / f"sub-{backbone}" / "images")
        warm = subset_folder(DATA / "trashnet", 8, work / f"warm-{backbone}")
        rows = {}
        print(f"[extract] {backbone}: naive loop on {n} images ...", file=sys.stderr)
        rows["naive"] = run_worker("naive", backbone=backbone, weights=weights, folder=str(folder))
        for engine in args.engines:
            print(f"[extract] {backbone}: featurize --engine {engine} ...", file=sys.stderr)
            cache = work / f"cache-{backbone}-{engine}"
            shutil.rmtree(cache, ignore_errors=True)
            r = run_worker("featurize", backbone=backbone, weights=weights, folder=str(folder), engine=engine,
                           cache=str(cache), warm_folder=str(warm))
            assert r["paths"] == rows["naive"]["paths"], "featurize and the naive loop saw different images"
            if weights is None:
                r["cosine_to_naive_fp32"] = cosines(folder.parent / f"fz-{backbone}-{engine}.npy",
                                                    folder.parent / f"naive-{backbone}.npy")
            rows[engine] = r
        base = rows["naive"]["img_s"]
        for r in rows.values():
            r["ratio_vs_naive"] = r["img_s"] / base
            r.pop("paths", None)
        out[backbone] = {"images": n, "weights": "pretrained" if weights is None else "random init (speed only)",
                         "rows": rows}
    R["extract"] = out


def _split(folder: Path) -> list[str]:
    from sklearn.model_selection import train_test_split

    items = sorted(p for p in folder.glob("*/*.jpg"))
    labels = [p.parent.name for p in items]
    _, test = train_test_split(items, test_size=0.2, stratify=labels, random_state=0)
    return sorted(os.path.relpath(p, folder) for p in test)


def sec_classifier(args, work: Path, R: dict) -> None:
    folder = DATA / "flowers"
    test = _split(folder)
    cache = work / "cache-classifier"
    shutil.rmtree(cache, ignore_errors=True)
    print("[classifier] featurize extract + logreg ...", file=sys.stderr)
    fz = run_worker("featurize_classifier", folder=str(folder), cache=str(cache), test_paths=test)
    epochs = 25 if args.full else args.tutorial_epochs
    print(f"[classifier] tutorial recipe, {epochs} epochs ...", file=sys.stderr)
    tu = run_worker("tutorial", folder=str(folder), test_paths=test, epochs=epochs)
    tu["mode"] = "full (25 epochs)" if epochs == 25 else (
        f"QUICK: {epochs} of the recipe's 25 epochs; full-run time extrapolated as 25 x seconds/epoch")
    tu["seconds_25_epochs_extrapolated"] = tu["seconds_per_epoch"] * 25
    R["classifier"] = {"featurize": fz, "tutorial": tu,
                       "speedup_measured": tu["seconds"] / fz["seconds"],
                       "speedup_vs_25_epochs": tu["seconds_25_epochs_extrapolated"] / fz["seconds"]}


def sec_cachehit(args, work: Path, R: dict) -> None:
    folder = DATA / "chest_xray"
    cache = work / "cache-xray"
    shutil.rmtree(cache, ignore_errors=True)
    print("[cachehit] chest_xray first run + re-run ...", file=sys.stderr)
    r = run_worker("cachehit", folder=str(folder), cache=str(cache))
    runs = []
    for _ in range(5):  # median of 5: one sample right after the first run's teardown is noise
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "--cache", str(cache),
                        "--no-progress"], check=True, capture_output=True, cwd=ROOT)
        runs.append(time.perf_counter() - t)
    r["rerun_seconds_cli_runs"] = runs
    r["rerun_seconds_cli"] = sorted(runs)[len(runs) // 2]
    r["rerun_fraction_in_process"] = r["rerun_seconds_in_process"] / r["first_seconds"]
    r["rerun_fraction_cli"] = r["rerun_seconds_cli"] / r["first_seconds"]
    R["cachehit"] = r


def sec_rss(args, work: Path, R: dict) -> None:
    rows = {}
    for n in args.rss_n:
        folder = work / f"rss-{n}"
        if not folder.exists():
            src = sorted((DATA / "chest_xray").glob("*/*/*.jpeg"))
            for i in range(n):
                f = src[i % len(src)]
                d = folder / f.parent.name
                d.mkdir(parents=True, exist_ok=True)
                # copies past the first pass so every file has new content (nothing deduplicates)
                if i < len(src):
                    os.link(f, d / f"{i}.jpeg")
                else:
                    data = f.read_bytes() + i.to_bytes(8, "little")  # trailing bytes: same image, new hash
                    (d / f"{i}.jpeg").write_bytes(data)
        cache = work / f"cache-rss-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"[rss] extraction of {n} images ...", file=sys.stderr)
        rows[n] = run_worker("extract_only", memory=True, folder=str(folder), cache=str(cache))
        shutil.rmtree(cache, ignore_errors=True)
    R["rss"] = rows


def sec_knobs(args, work: Path, R: dict) -> None:
    folder = subset_folder(DATA / "flowers", args.n, work / "sub-efficientnet_lite0" / "images")
    warm = subset_folder(DATA / "trashnet", 8, work / "warm-efficientnet_lite0")
    cache = work / "cache-knobs"
    rows = []
    for workers, threads, bs in args.knobs:
        shutil.rmtree(cache / "features", ignore_errors=True)
        shutil.rmtree(cache / "datasets", ignore_errors=True)
        print(f"[knobs] workers={workers} threads={threads} batch={bs} ...", file=sys.stderr)
        r = run_worker("featurize", backbone="efficientnet_lite0", weights=None, folder=str(folder), engine="openvino",
                       cache=str(cache), warm_folder=str(warm), workers=workers, threads=threads, batch_size=bs,
                       model_only=False)
        rows.append({"workers": workers, "threads": threads, "batch_size": bs, "img_s": r["img_s"]})
    R["knobs"] = rows


# --------------------------------------------------------------------------- report


def table(R: dict) -> str:
    L = []
    if "extract" in R:
        L.append("## Extraction (end to end over real JPEGs; ratios vs the naive loop in the same run)\n")
        L.append("| backbone | images | contender | engine/precision | img/s | x naive | model-only img/s | "
                 "decode+resize ms/img (1 core) | cosine to naive fp32 (mean / min) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for bb, d in R["extract"].items():
            for k, r in d["rows"].items():
                who = "naive tutorial loop" if k == "naive" else f"featurize --engine {k}"
                how = "torch/fp32, PIL, 0 workers" if k == "naive" else f"{r['engine']}/{r['precision']}"
                mo = f"{r['model_only_img_s']:.1f}" if "model_only_img_s" in r else "-"
                dec = f"{r['decode_ms']:.2f}" if "decode_ms" in r else "-"
                cos = r.get("cosine_to_naive_fp32")
                cs = f"{cos['mean']:.4f} / {cos['min']:.4f}" if cos else "-"
                L.append(f"| {bb} ({d['weights']}) | {d['images']} | {who} | {how} | {r['img_s']:.1f} | "
                         f"{r['ratio_vs_naive']:.2f}x | {mo} | {dec} | {cs} |")
    if "classifier" in R:
        c = R["classifier"]
        fz, tu = c["featurize"], c["tutorial"]
        L.append("\n## Time to a trained, evaluated classifier (flowers, stratified 80/20 split, seed 0)\n")
        L.append("| recipe | seconds | test accuracy |")
        L.append("|---|---|---|")
        L.append(f"| featurize extract ({fz['engine']}/{fz['precision']}, cold cache incl. model conversion) + "
                 f"logreg head | {fz['seconds']:.1f} (extract {fz['extract_seconds']:.1f}, fit+eval "
                 f"{fz['fit_eval_seconds']:.1f}) | {fz['accuracy']:.3f} |")
        L.append(f"| tutorial fixed-feature-extractor, {tu['mode']} | {tu['seconds']:.1f} "
                 f"({tu['seconds_per_epoch']:.1f} s/epoch) | final {tu['accuracy_final']:.3f}, best epoch "
                 f"{tu['accuracy_best']:.3f} |")
        L.append(f"| tutorial, 25 epochs (extrapolated from the measured s/epoch) | "
                 f"{tu['seconds_25_epochs_extrapolated']:.0f} | not measured |" if tu["epochs"] != 25 else "")
        L.append(f"\nspeed-up: {c['speedup_measured']:.1f}x vs the measured tutorial run; "
                 f"{c['speedup_vs_25_epochs']:.1f}x vs the 25-epoch recipe")
    if "cachehit" in R:
        r = R["cachehit"]
        L.append(f"\n## Cache-hit re-run (chest_xray, {r['images']} images)\n")
        L.append(f"first run {r['first_seconds']:.1f} s ({r['first_img_s']:.1f} img/s, {r['engine']}); re-run "
                 f"in-process {r['rerun_seconds_in_process']:.2f} s ({100 * r['rerun_fraction_in_process']:.2f} %), "
                 f"via the CLI incl. Python start-up (median of 5) {r['rerun_seconds_cli']:.2f} s "
                 f"({100 * r['rerun_fraction_cli']:.2f} %)")
    if "rss" in R:
        L.append("\n## Peak RSS of extraction (main process + decode workers)\n")
        L.append("| images | seconds | peak summed PSS MB | peak summed RSS MB (shared pages counted per process) |")
        L.append("|---|---|---|---|")
        for n, r in R["rss"].items():
            L.append(f"| {n} | {r['seconds']:.1f} | {r.get('peak_pss_mb', 0):.0f} | {r['peak_rss_mb']:.0f} |")
    if "knobs" in R:
        L.append("\n## Knobs (OpenVINO path, Lite0)\n")
        L.append("| decode workers | engine threads | batch | img/s |")
        L.append("|---|---|---|---|")
        for r in R["knobs"]:
            L.append(f"| {r['workers']} | {r['threads']} | {r['batch_size']} | {r['img_s']:.1f} |")
    L.append(bench_process.table(R))
    return "\n".join(L)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_worker":
        task, kw, out = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
        Path(out).write_text(json.dumps(WORKERS[task](**kw)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="extract,classifier,cachehit,rss",
                   help="comma list of sections: extract, classifier, cachehit, rss, knobs, process, mp12, heads_load")
    p.add_argument("--process-n", default="100,500,1000", help="flowers images for the whole-process section")
    p.add_argument("--mp12-n", type=int, default=60, help="12 MP JPEGs for the mp12 section")
    p.add_argument("--n", type=int, default=1000, help="flowers images for the Lite0 extraction race")
    p.add_argument("--n-resnet", type=int, default=300, help="flowers images for the ResNet-50 race")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--engines", default="torch,openvino")
    p.add_argument("--full", action="store_true", help="run the tutorial recipe's full 25 epochs")
    p.add_argument("--tutorial-epochs", type=int, default=2, help="quick mode's epochs (default 2)")
    p.add_argument("--rss-n", default="1000,5000,50000", help="image counts for the RSS section")
    p.add_argument("--knobs", default="1:2:32,2:2:32,2:1:32,2:2:64,1:1:32",
                   help="workers:threads:batch triples for the knobs section")
    p.add_argument("--work", default="/tmp/featurize-bench", help="scratch folder (subsets, caches)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    args.process_n = [int(x) for x in args.process_n.split(",") if x]
    args.rss_n = [int(x) for x in args.rss_n.split(",") if x]
    args.knobs = [tuple(int(v) for v in k.split(":")) for k in args.knobs.split(",") if k]
    if not DATA.is_dir():
        print(f"the shared datasets are not at {DATA}; nothing to benchmark", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # converted engines go to the bench's own store (not ~/.cache), inherited by every worker
    os.environ.setdefault("FEATURIZE_ENGINES", str(work / "engines"))
    R = {"command": " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/bench.py", *sys.argv[1:]]),
         "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "load_before": os.getloadavg()},
         "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        from featurize.backbones import cpu_has_fast_bf16

        R["machine"]["fast_bf16"] = cpu_has_fast_bf16()
    except Exception:
        pass
    sections = {"extract": sec_extract, "classifier": sec_classifier, "cachehit": sec_cachehit, "rss": sec_rss,
                "knobs": sec_knobs, "process": bench_process.sec_process, "mp12": bench_process.sec_mp12,
                "heads_load": bench_process.sec_heads_load}
    for name in args.only.split(","):
        t = time.perf_counter()
        sections[name](args, work, R)
        R.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        Path(args.json).write_text(json.dumps(R, indent=1, default=str))  # partial results survive a kill
    R["machine"]["load_after"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(R, indent=1, default=str))
    print(table(R))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
