"""Scale-out benchmarks (issue 13): Ray Data extraction, the driver's write capacity, the out-of-core head.

    .venv/bin/python benchmarks/bench_scale.py --only ray,writer,chest      # -> results_scale.json
    .venv/bin/python benchmarks/bench_scale.py --only sgd --big /tmp/big     # 2M x 1,280 (10 GB on disk)

Sections:
- ray:    1,000 flowers, `extract` with the local engine vs `extract --ray` (a local Ray runtime on
          all cores), alternating in fresh subprocesses of one run, each into a fresh cache; the
          OpenVINO conversion is done once before (both reuse it from the per-user engine store).
- writer: the driver's write capacity at D = 1,280: ShardWriter alone (vectors arriving in batches
          of 64), and Ray Data tasks producing vectors streamed into it (what a cluster's driver does).
- chest:  `fit --head sgd` vs `fit --head logreg` on chest X-ray (train -> test), same run.
- sgd:    a generated 2,000,000 x 1,280 feature space (4 classes, train/test split) written with the
          cache's own writer, then `fit --head sgd` under /usr/bin/time (peak RSS, wall).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# ../shared/datasets from a checkout in /work/main, ../../shared/datasets from a worktree in /work/wt/<name>
DATA = next((p for p in (ROOT.parent / "shared" / "datasets", ROOT.parent.parent / "shared" / "datasets")
             if p.is_dir()), ROOT.parent / "shared" / "datasets")
sys.path.insert(0, str(ROOT))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cli(*args, env=None) -> tuple[dict, float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--json"], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed: {args}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, p.stderr


# Runs the CLI in this subprocess with ShardWriter.add timed: when each batch of vectors reached the writer
# (the driver's side of every path: local threads, the torch pipeline, Ray), written as JSON to argv[1].
_TIMED = """
import atexit, json, os, sys, time
from featurize import cache as fc
arrivals = []
add = fc.ShardWriter.add
def timed(self, hashes, emb):
    add(self, hashes, emb)
    arrivals.append((time.time(), len(hashes)))
fc.ShardWriter.add = timed
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(arrivals)))
if os.environ.get("FZ_BENCH_LANES"):  # the `ray-1lane` contender: one block at a time per model worker
    import featurize.distributed
    featurize.distributed.STORED_LANES = int(os.environ["FZ_BENCH_LANES"])
if "--ray" in sys.argv:  # CPU seconds of this driver and the Ray processes it started, taken before ray.shutdown
    import ray
    shutdown = ray.shutdown
    def cpu_then_shutdown(*a, **k):
        open(sys.argv[1] + ".cpu", "w").write(json.dumps(tree_cpu(os.getpid())))
        return shutdown(*a, **k)
    ray.shutdown = cpu_then_shutdown
    def tree_cpu(root):
        tick, procs = os.sysconf("SC_CLK_TCK"), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode(errors="replace")
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            procs[int(pid)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, cmd)
        out = {}
        for pid, (ppid, cpu, cmd) in procs.items():
            p = pid
            while p in procs and p != root:
                p = procs[p][0]
            if p == root:
                kind = "driver" if pid == root else "model worker" if "Embedder" in cmd else \
                    "raylet" if "raylet" in cmd else "gcs_server" if "gcs_server" in cmd else "other ray"
                out[kind] = round(out.get(kind, 0.0) + cpu, 2)
        return out
import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def timed_cli(out: Path, *args) -> tuple[dict, dict]:
    """One `extract` in a fresh process: its summary, and start-up / steady / wall measured from outside.

    start-up s: process spawn -> the first vectors reach the writer (imports, scan, hash, model or
    runtime + workers, the first batch); steady img/s: the images arriving after the first 10 % over
    the time from then to the last batch (``steady_from``); wall s: spawn -> exit (shutdown included).
    """
    spawn, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-c", _TIMED, str(out), *map(str, args), "--json"], capture_output=True,
                       text=True, cwd=ROOT)
    wall = time.time() - spawn
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and what it waited for (local: all of it)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if p.returncode:
        raise SystemExit(f"failed: {args}\n{p.stderr[-3000:]}")
    arrivals = json.loads(out.read_text())
    cpu = Path(f"{out}.cpu")
    cpu = json.loads(cpu.read_text()) if cpu.exists() else None
    Path(f"{out}.cpu").unlink(missing_ok=True)
    (t1, n1), last = arrivals[0], arrivals[-1][0]
    total = sum(n for _, n in arrivals)
    tk, nk = steady_from(arrivals, total)
    return json.loads(p.stdout.strip().splitlines()[-1]), {
        "startup_s": round(t1 - spawn, 2),
        "steady_img_per_s": round((total - nk) / (last - tk), 1) if last > tk else None,
        "after_first_img_per_s": round((total - n1) / (last - t1), 1) if last > t1 else None,
        "wall_s": round(wall, 2), "after_last_s": round(spawn + wall - last, 2), "batches": len(arrivals),
        "first_batch_rows": n1, "vectors": total, "whole_img_per_s": round(total / wall, 1),
        "cpu_s": round(cpu_s, 2), **({"ray_cpu_s": cpu} if cpu else {})}


def steady_from(arrivals: list, total: int, skip: float = 0.1) -> tuple[float, int]:
    """(time, rows so far) at the first arrival by which ``skip`` of the rows had arrived: the steady
    state is counted from there for every contender alike (local batches of 32 and Ray's blocks of up
    to 256 then leave out the same warm-up, not just each one's first batch)."""
    n = 0
    for t, k in arrivals:
        n += k
        if n >= skip * total:
            return t, n
    return arrivals[-1][0], n


def ray_head(start: bool) -> None:
    """`ray start --head` (2 CPUs, no dashboard) for the `--ray auto` contender, or `ray stop`."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--num-cpus", str(os.cpu_count()), "--include-dashboard=false",
           "--disable-usage-stats"] if start else [ray_cli, "stop"]
    subprocess.run(cmd, capture_output=True, text=True, check=start)


def bench_ray(tmp: Path, rounds: int, sets: list[str], contenders: list[str]) -> list[dict]:
    """Local engine vs `--ray` (a runtime started by the run) vs `--ray auto` (joining a runtime already
    running), alternating in fresh processes, each into a fresh cache; the OpenVINO conversion is done
    once before (every contender reuses it from the per-user engine store)."""
    warm = tmp / "warm"
    sample = tmp / "sample"
    data = DATA / "flowers"
    for c in sorted(p for p in data.iterdir() if p.is_dir()):  # 10 files convert the engine into the engine store
        for f in sorted(c.iterdir())[:2]:
            (sample / c.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, sample / c.name / f.name)
    cli("extract", sample, "--cache", warm, "--no-progress")
    rows = []
    for r in range(rounds):
        for name in sets:
            for how in contenders:
                cache = tmp / f"{how}-{r}"
                flag = {"local": [], "ray": ["--ray"], "ray-1lane": ["--ray"], "ray-auto": ["--ray", "auto"]}[how]
                os.environ.pop("FZ_BENCH_LANES", None)
                if how == "ray-1lane":  # the stored-engine worker embedding one block at a time (before lanes)
                    os.environ["FZ_BENCH_LANES"] = "1"
                if how == "ray-auto":
                    ray_head(True)  # started outside the measured run: what a running cluster saves
                before = load()
                try:
                    s, m = timed_cli(tmp / "arrivals.json", "extract", DATA / name, "--cache", cache, "--no-progress",
                                     *flag)
                finally:
                    if how == "ray-auto":
                        ray_head(False)
                row = {"dataset": name, "contender": how, "round": r, "images": s["embedded"], **m,
                       "summary_img_per_s": s["images_per_second"], "engine": s["engine"],
                       "precision": s["precision"], "seconds": s["seconds"], "load_before": before,
                       "load_after": load()}
                if "ray" in s:
                    row["ray"] = s["ray"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(cache)
    return rows


def bench_writer(tmp: Path, n: int = 400_000, dim: int = 1280) -> dict:
    from featurize import cache as fc

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((4096, dim), dtype=np.float32)
    space = fc.FeatureSpace(tmp / "wcache", "bench-000000000001")
    space.create({"backbone": "bench"}, dim)
    w = fc.ShardWriter(space)
    t = time.perf_counter()
    for k in range(0, n, 64):
        w.add([f"{i:032x}" for i in range(k, k + 64)], pool[k % 4096:k % 4096 + 64])
    w.flush()
    alone = time.perf_counter() - t
    shutil.rmtree(space.folder)
    out = {"vectors": n, "dim": dim, "writer_alone_s": round(alone, 2), "writer_alone_vps": round(n / alone),
           "writer_alone_MBps": round(n * dim * 4 / alone / 1e6, 1), "shards": -(-n // w.max_rows)}
    # the same writer fed by Ray Data, as the driver of `extract --ray` is (vectors made by tasks)
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def make(batch):
        r = np.random.default_rng(int(batch["id"][0]))
        return {"id": batch["id"], "emb": r.standard_normal((len(batch["id"]), dim), dtype=np.float32)}

    space.create({"backbone": "bench"}, dim)
    w = fc.ShardWriter(space)
    ds = ray.data.range(n, override_num_blocks=n // 2048).map_batches(make, batch_size=64)
    t = time.perf_counter()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        w.add([f"{i:032x}" for i in b["id"]], b["emb"])
    w.flush()
    via = time.perf_counter() - t
    ray.shutdown()
    shutil.rmtree(space.folder)
    out.update(via_ray_s=round(via, 2), via_ray_vps=round(n / via), writer_share_of_via_ray=round(w.seconds / via, 3))
    print(json.dumps(out), flush=True)
    return out


def bench_chest(cache: Path) -> list[dict]:
    rows = []
    for head in ("logreg", "sgd"):
        before = load()
        s, wall, _ = cli("fit", "--head", head, "--cache", cache, "--data", DATA / "chest_xray", "--out",
                         cache / "bench" / f"{head}.joblib")
        t = s["metrics"]["test"]
        rows.append({"head": head, "accuracy": round(t["accuracy"], 4), "balanced_accuracy":
                     round(t["balanced_accuracy"], 4), "roc_auc": round(t.get("roc_auc", float("nan")), 4),
                     "wall_s": round(wall, 2), "best_params": s["best_params"], "load_before": before})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def generate(big: Path, n: int, dim: int = 1280, classes: int = 4, seed: int = 0) -> dict:
    """2M rows through the cache's own ShardWriter + write_index, as `extract` writes them."""
    from featurize import cache as fc

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 0.06  # overlapping: accuracy < 100 %
    space = fc.FeatureSpace(big, "generated-000000000001")
    space.create({"backbone": "generated", "precision": "fp32"}, dim)
    w = fc.ShardWriter(space, max_rows=65536)
    labels = np.repeat(np.arange(classes), n // classes)  # in class order, as a class-folder dataset is
    hashes = [f"{i:032x}" for i in range(n)]
    for k in range(0, n, 8192):
        y = labels[k:k + 8192]
        X = rng.standard_normal((len(y), dim), dtype=np.float32) + centres[y]
        w.add(hashes[k:k + 8192], X)
    w.flush()
    names = [f"class{c}" for c in range(classes)]
    split = np.where(rng.random(n) < 0.1, "test", "train")
    idx = fc.DatasetIndex(root=str(big / "data"), layout="split",
                          path=[f"{split[i]}/{names[labels[i]]}/{i:07d}.jpg" for i in range(n)],
                          label=[names[c] for c in labels], split=split.tolist(), hash=hashes, size=[1] * n,
                          mtime_ns=[0] * n, status=["ok"] * n,
                          extractions={space.space_id: {"backbone": "generated", "finished_at": time.time()}})
    fc.write_index(fc.index_path(big, big / "data"), idx)
    gb = sum(p.stat().st_size for p in space.shard_paths()) / 1e9
    return {"rows": n, "dim": dim, "classes": classes, "shards": len(space.shard_paths()), "gb_on_disk": round(gb, 2),
            "generate_s": round(time.perf_counter() - t, 1)}


def bench_sgd(big: Path, n: int) -> dict:
    gen = generate(big, n) if not (big / "features").exists() else {"rows": n, "reused": True}
    print(json.dumps(gen), flush=True)
    out = {"generated": gen, "load_before": load()}
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "fit", "--head", "sgd", "--cache", str(big),
           "--json"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    rss_kb = next(int(ln.split()[-1]) for ln in p.stderr.splitlines() if "Maximum resident set size" in ln)
    s = json.loads(p.stdout.strip().splitlines()[-1])
    out.update(peak_rss_gb=round(rss_kb / 1e6, 3), accuracy=round(s["metrics"]["test"]["accuracy"], 4),
               best_params=s["best_params"], out_of_core=s["out_of_core"], timings=s["timings"])
    # an in-memory head on the same space: refused with the size, suggesting sgd
    q = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--head", "logreg", "--cache", str(big)],
                       capture_output=True, text=True, cwd=ROOT)
    out["logreg_message"] = q.stderr.strip().splitlines()[-1] if q.stderr.strip() else f"rc {q.returncode}"
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="ray,writer,chest")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sets", default="flowers,chest_xray", help="ray section: datasets under shared/datasets")
    p.add_argument("--contenders", default="local,ray,ray-auto", help="ray section: local, ray, ray-auto")
    p.add_argument("--cache", default="/tmp/fzcache", help="a cache with chest_xray extracted (copied, not written)")
    p.add_argument("--big", default=None, help="folder for the generated 2M x 1,280 space (sgd section)")
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_scale.json"))
    args = p.parse_args()
    only = set(args.only.split(","))
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "shared": True}}
    out = Path(args.out)
    if out.exists():
        res = {**json.loads(out.read_text()), **res}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        if "ray" in only:
            res["ray"] = bench_ray(tmp, args.rounds, args.sets.split(","), args.contenders.split(","))
        if "writer" in only:
            res["writer"] = bench_writer(tmp)
        if "chest" in only:
            cache = tmp / "cache"
            shutil.copytree(args.cache, cache, ignore=shutil.ignore_patterns("heads", "reports"))
            res["chest"] = bench_chest(cache)
    if "sgd" in only:
        res["sgd"] = bench_sgd(Path(args.big), args.n)
    res["peak_rss_this_process_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
