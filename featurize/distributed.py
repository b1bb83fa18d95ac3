"""Extraction on a Ray cluster: the reader -> model stage runs on Ray Data, the rest stays local.

The driver (the ``extract`` process) scans, hashes, plans and writes exactly as a local run
(``featurize.extraction``); only the images still to embed go through Ray Data:

    paths (driver) -> decode + resize tasks (any node) -> actor pool, one engine per actor
    (GPUs when asked) -> vectors streamed back -> the driver's ``ShardWriter`` -> index

When the request has already run with OpenVINO on CPUs (locally: the per-user engine store holds
its engine and record, ``featurize.fastpath``; or as an earlier ``--ray`` run with CPU workers,
which records it) and the workers are CPU workers, the torch-free variant runs: the driver never imports torch, and each actor decodes its block of paths in its
own threads into the stored engine (a local torch-free run per block):

    paths (driver) -> actor pool (decode threads + stored OpenVINO engine) -> vectors -> writer

On a CPU node decode tasks beside the actor only fight the engine for the same cores and ship
decoded pixels through the object store; the actor owns the node, as a local run owns the machine.

Why vectors come back to the driver instead of each worker writing shards on shared storage:
the crash story stays the local one (only the driver writes; a ``kill -9`` of it loses at most
the shard being filled, the next run deletes its temp files and re-embeds the rest), the cache
needs to be reachable by the driver only, and one writer is not the limit: it takes about
27,000 vectors/s at D = 1,280 on a shared 2-core machine (``benchmarks/RESULTS_scale.md``), the
output of some thirteen GPUs at 2,000 img/s each. Past that, workers could write their own shards
(the cache's shard names are unique per writer and need no coordination); not needed yet.

Workers use the same backbone, preprocessing and engines as a local run (an actor refuses
to start if its feature-space id differs from the driver's), so the vectors land in the same
feature space. Ray Data retries a task whose worker died and restarts a dead actor; a batch is
handed to the driver only once it is complete, so every row is written exactly once.

Ray is imported only here, and this module only with ``extract --ray``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import queue
import socket
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from featurize import cache as fc
from featurize.errors import UserError

#: the distribution's name on PyPI, ``[project] name`` in pyproject.toml (a test keeps the two equal)
DISTRIBUTION = "featurize-images"


def install_hint() -> str:
    """The command that installs Ray Data with featurize (the ``ray`` extra)."""
    return f'pip install "{DISTRIBUTION}[ray]"'


def _have_ray() -> bool:
    try:  # without importing it (2 s): a re-run with nothing new never starts Ray
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


ACTOR_START_TIMEOUT_S = 600  # loading a backbone on a busy node, or a cluster still adding nodes


class WorkerCannotRead(RuntimeError):
    """A worker cannot see the dataset folder (not on shared storage at the same path)."""


class RayPipeline:
    """``extract --ray``: connects to Ray when there is work and runs reader -> model on it.

    ``address`` is ``local`` (start a runtime on this machine with all its cores), ``auto``
    (join the cluster ``ray start`` runs here) or a cluster address (``ray://head:10001``,
    ``head:6379``). Nothing connects until :meth:`build_extractor` is called.
    """

    def __init__(self, address: str, workers_per_node: int | None = None, gpus_per_worker: float | None = None):
        if not _have_ray():
            raise UserError(f"--ray needs Ray Data, which is not installed; `{install_hint()}`")
        if workers_per_node is not None and workers_per_node < 1:
            raise UserError("--workers-per-node must be >= 1")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise UserError("--gpus-per-worker must be >= 0 (0: CPU workers; 0.5: two workers share a GPU)")
        self.address, self.workers_per_node, self.gpus_per_worker = address or "local", workers_per_node, gpus_per_worker
        self._started = False  # this process called ray.init (so it disconnects at the end)
        self.info: dict = {}

    # -- what identifies the request before connecting (so a cache-hit re-run never starts Ray)

    def key_device(self) -> str:
        gpus = "" if self.gpus_per_worker is None else f":{self.gpus_per_worker:g}gpu"
        return f"ray{gpus}"

    # -- connect, size the pool, resolve the workers' device and precision

    def connect(self) -> None:
        import ray

        t = time.perf_counter()
        logging.getLogger("ray").setLevel(logging.WARNING)
        if not ray.is_initialized():
            kw = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
            try:
                if self.address == "local":
                    ray.init(address="local", **kw)
                else:
                    kw.pop("include_dashboard")  # only for a runtime this process starts
                    ray.init(address=self.address, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot connect to the Ray cluster at {self.address!r} ({str(e).splitlines()[0]}); "
                                "start it with `ray start --head` on the head node, or use --ray alone for a "
                                "local runtime") from None
            self._started = True
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # featurize's own bar counts images
        ctx.print_on_execution_start = False
        # start every model worker before feeding any (else the first one up takes the whole of a small run,
        # and a cluster that cannot place them all says so instead of running short-handed)
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" and the like
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if total_gpus else 0.0)
        actors = 0
        for n in nodes:
            res = n["Resources"]
            if gpus:
                fit = int(res.get("GPU", 0) // gpus)
                actors += min(fit, self.workers_per_node or fit)
            elif res.get("CPU", 0) >= 1:
                actors += self.workers_per_node or 1
        if actors == 0:
            raise UserError(f"no node of the Ray cluster has {gpus:g} GPU(s) for a worker "
                            f"(cluster GPUs: {total_gpus:g}); use --gpus-per-worker 0 for CPU workers")
        self.gpus, self.actors = gpus, actors
        self.info = {"address": self.address, "nodes": len(nodes), "workers": actors, "gpus_per_worker": gpus,
                     "connect_seconds": round(time.perf_counter() - t, 3)}

    def resolve(self, device: str, precision: str) -> tuple[str, str]:
        """The device and precision the workers run (the precision is part of the feature space)."""
        if self.gpus:
            if device not in ("auto", "cuda"):
                raise UserError(f"--device {device} with GPU workers; use --device auto or --gpus-per-worker 0")
            if precision == "auto":  # ask a GPU worker: bf16 where the GPU has it, else fp16
                import ray

                precision = ray.get(ray.remote(num_gpus=self.gpus, num_cpus=0)(_worker_precision).remote())
            return "cuda", precision
        if device not in ("auto", "cpu"):
            raise UserError(f"--device {device} with CPU workers; pass --gpus-per-worker to use GPUs")
        return "cpu", precision  # auto: resolved on the driver's CPU, forced on every worker

    def build_extractor(self, cache, backbone: str, weights: str | None, device: str, precision: str,
                        engine: str):
        """Connect, then build the backbone here only for its feature space (the engine runs on workers).

        When the request has run locally on this machine with OpenVINO (the engine store has its record
        and engine, as for a torch-free local run: ``featurize.fastpath``) and the workers are CPU
        workers, nothing is built: neither the driver nor a worker whose node stores the engine imports
        torch, and each worker decodes in its own threads, as a local run (:class:`_StoredEmbedder`).
        """
        from featurize.enginestore import request_key

        self.connect()
        asked = (device, precision)
        device, precision = self.resolve(device, precision)
        # what a finished run with CPU workers records, so that the next one takes the stored path
        self._ray_request = (request_key(backbone, weights, RAY_CPU_DEVICE, asked[1]), engine)
        lean = self._stored(cache, backbone, weights, *asked, engine) if device == "cpu" else None
        if lean is not None:
            rec = lean.record
            self.spec = {"stored": True, "backbone": backbone if not os.path.isdir(backbone)
                         else os.path.realpath(backbone), "weights": os.path.realpath(weights) if weights else None,
                         "device": "cpu", "precision": rec["precision"], "engine": "openvino",
                         "space_id": rec["space_id"], "dim": int(rec["dim"]), "preprocess": lean.preprocess,
                         "per_node": self.workers_per_node or 1, "lanes": STORED_LANES}
            bb = _Described(rec["backbone"], int(rec["dim"]), lean.preprocess)
            return RayExtractor(bb, _WorkerEngine("openvino"), "cpu", rec["precision"], lean.space, self)
        import torch

        from featurize.backbones import get_backbone, resolve_precision

        if device == "cpu":
            precision = resolve_precision(precision, torch.device("cpu"))
        elif precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
        bb = get_backbone(backbone, weights=weights)
        config = bb.space_config(precision)
        space = fc.FeatureSpace(cache, fc.space_id_for(config))
        build = {"backbone": backbone if not os.path.isdir(backbone) else os.path.realpath(backbone),
                 "weights": os.path.realpath(weights) if weights else None}
        space.create({**config, "build": build, "dim": bb.dim}, bb.dim)
        engine = space.engine_for(engine)  # as local runs: auto keeps the engine whose vectors the space holds
        if engine != "auto":  # refused here, before the cluster starts, when another engine holds the space
            space.claim_engine(engine)
        self.spec = {"stored": False, "backbone": build["backbone"], "weights": build["weights"], "device": device,
                     "precision": precision, "engine": engine,
                     "space_id": space.space_id, "dim": bb.dim}
        return RayExtractor(bb, _WorkerEngine(engine), torch.device(device), precision, space, self)

    def _stored(self, cache, backbone, weights, device, precision, engine):
        """The torch-free extractor of this request, or None: from the record of a local run on this
        machine (``fastpath.lean_extractor``: its engine is in this store), else from the record of an
        earlier ``--ray`` run with CPU workers (each worker loads the engine from its node's store, or
        converts it there once)."""
        from featurize import enginestore, fastdecode, fastpath

        lean = fastpath.lean_extractor(cache, enginestore.request_key(backbone, weights, device, precision), engine)
        if lean is not None or engine not in fastpath.LEAN_ENGINES:
            return lean
        rec = enginestore.recall(*self._ray_request)
        if rec is None or rec.get("engine") != "openvino" or rec.get("device") != "cpu" \
                or not fastdecode.supports(rec["space"].get("preprocess", {})):
            return None
        space = fc.FeatureSpace(cache, rec["space_id"])
        if space.held_engine() not in (None, "openvino"):  # auto keeps the engine a space holds (full path)
            return None
        if not space.exists():
            space.create({k: v for k, v in rec["space"].items() if k not in ("space_id", "dim", "schema_version")},
                         int(rec["dim"]))
        return fastpath.LeanExtractor(space, rec, enginestore.engine_dir(rec["space_id"]), fastpath.cpu_cores())

    def _remember(self, ex) -> None:
        """After a complete run whose CPU workers built an OpenVINO engine: record the request, so
        that the next ``--ray`` run of it takes the torch-free stored path (:meth:`_stored`)."""
        from featurize import enginestore

        enginestore.remember(self._ray_request[0], self._ray_request[1], {
            "space_id": ex.space.space_id, "space": ex.space.info(), "engine": "openvino", "precision": ex.precision,
            "device": "cpu", "backbone": ex.backbone.name, "dim": int(ex.backbone.dim)})

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    # -- the run: reader and model in one, on the cluster (featurize.stages.embed drives it)

    def batches(self, ex, paths: list[str], batch_size: int):
        """A ``featurize.stages.Reader`` whose batches come back embedded: decode and model run on the
        cluster, so its ``images`` are the vectors (``_WorkerEngine.map`` passes them through)."""
        import pyarrow as pa
        import ray.data

        table = pa.table({"i": np.arange(len(paths), dtype=np.int64), "path": paths})
        # Two calls queued per actor hide the hand-over without letting the first actor up take a small run.
        pool = ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=2)
        if self.spec["stored"]:
            # CPU workers with the stored engine: paths in, vectors out. Each actor decodes in its own
            # threads beside its engine, as a local run: no decode task competes with the engine for the
            # node's cores and no decoded pixels go through the object store. Blocks grow from one model
            # call (the first vectors come back early) to STORED_BLOCK_CALLS (fewer hand-overs, at each
            # of which the actor's decode -> engine pipeline drains).
            blocks = _growing_blocks(len(paths), batch_size, max(STORED_BLOCK_CALLS * batch_size,
                                                                     math.ceil(len(paths) / 20_000)))
            ds = ray.data.from_arrow([table.slice(o, n) for o, n in blocks])
            # STORED_LANES calls at once per actor, one more block queued
            n = self.spec["lanes"]
            lanes = ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=n + 1,
                                               max_concurrent_calls_per_actor=n, enable_true_multi_threading=n > 1)
            ds = ds.map_batches(_StoredEmbedder, fn_constructor_kwargs={"spec": self.spec, "batch_size": batch_size},
                                batch_size=None, batch_format="numpy", compute=lanes, num_cpus=1)
        else:
            # CPU actors run two batches in flight (OpenVINO's two streams); the decode tasks share the cores.
            per_call = batch_size if self.gpus else 2 * batch_size
            # one decode task per model call: the first model call can start as soon as one call's images are
            # decoded, and vectors stream back call by call (with blocks of many calls, a call's rows come back
            # only when its whole block is embedded: the first rows of a 1,000-image run arrived at the end)
            per_block = max(per_call, math.ceil(len(paths) / 20_000))  # at most ~20k blocks for the driver to track
            ds = ray.data.from_arrow([table.slice(o, per_block) for o in range(0, len(paths), per_block)])
            # decode runs in tasks of their own on every free core of every node. Declaring their memory (a
            # decoded batch plus the files) also keeps Ray Data from fusing them into the model actors (it
            # fuses stages with equal resource requests), where decoding would wait for the model.
            crop = ex.backbone.preprocess.crop
            ds = ds.map_batches(_decode, fn_kwargs={"preprocess": ex.backbone.preprocess}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=1, memory=per_block * (3 * crop * crop + (1 << 20)))
            ds = ds.map_batches(_Embedder, fn_constructor_kwargs={"spec": self.spec}, batch_size=per_call,
                                batch_format="numpy", compute=pool, num_gpus=self.gpus or None, num_cpus=1)
        t0, nodes, first, worker_model = time.perf_counter(), set(), 0.0, 0.0
        built, worker_load, wall0, calls = set(), 0.0, time.time(), {}  # calls: per actor, [ready, first, last]
        claimed, devices = None, set()
        try:
            # prefetch_batches=0: Ray Data's prefetcher holds back that many finished blocks before handing
            # one over (a 1-2 s delay for every block here); the model workers run ahead regardless
            for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                first = first or time.perf_counter() - t0
                ok = b["error"] == ""
                if str(b["engine"][0]) != claimed:  # one engine per space: workers that built another
                    claimed = str(b["engine"][0])   # engine (auto on mixed nodes) are refused, never mixed
                    ex.space.claim_engine(claimed)
                worker_model += float(b["model_s"].sum())
                ex.engine.name, ex.engine.device = str(b["engine"][0]), str(b["device"][0])
                nodes.update(b["node"].tolist())
                built.update(b["built"].tolist())
                worker_load = max(worker_load, float(b["load_s"].max()))
                c = calls.setdefault(str(b["actor"][0]), [float(b["ready_at"][0]), math.inf, 0.0])
                c[1], c[2] = min(c[1], float(b["call_at"][0])), max(c[2], float(b["done_at"][0]))
                # the driver's wall clock: "model" is its wait for the cluster (decode + model run there)
                yield {"index": [int(i) for i in b["i"][ok]], "images": b["emb"][ok] if ok.any() else None,
                       "errors": [(int(i), str(r)) for i, r in zip(b["i"][~ok], b["error"][~ok])],
                       "decode_s": float(b["decode_s"].sum()), "waited": "model"}
                devices.update(b["device"].tolist())
            if not self.spec["stored"] and claimed == "openvino" and devices == {"cpu"}:
                self._remember(ex)
        except Exception as e:
            if type(e).__name__ == "GetTimeoutError" and "starting actors" in str(e):
                raise UserError(f"the Ray cluster did not start {self.actors} model workers within "
                                f"{ACTOR_START_TIMEOUT_S} s; lower --workers-per-node or --gpus-per-worker") from None
            cause = _worker_cannot_read(e)
            if cause:
                raise UserError(f"{cause}; images (and --weights) must be on storage every node mounts at the "
                                "same path (NFS, a shared volume), see the README") from None
            raise
        finally:
            # first_batch_seconds: workers started, model built, first batch embedded (the start-up cost)
            self.info.update(run_seconds=round(time.perf_counter() - t0, 3), nodes_used=len(nodes),
                             first_batch_seconds=round(first, 3), worker_model_seconds=round(worker_model, 3),
                             worker_load_seconds=round(worker_load, 3), worker_engines=sorted(built))
            if calls:  # when the model workers were up, and how long they were busy (their clocks: one machine's)
                self.info.update(
                    workers_ready_seconds=round(max(c[0] for c in calls.values()) - wall0, 3),
                    first_call_seconds=round(min(c[1] for c in calls.values()) - wall0, 3),
                    worker_span_seconds=round(sum(c[2] - c[1] for c in calls.values()), 3),
                    worker_processes=len(calls))  # more than workers: Ray restarted one that died
            self.close()


class _Described(NamedTuple):
    """What the driver needs of a backbone whose engine only the workers load (the stored-engine path)."""

    name: str
    dim: int
    preprocess: dict


class _WorkerEngine:
    """Stands in for the engine on the driver: its name and device are the workers' (set as batches
    arrive), and the batches it is given are embedded already (on the cluster)."""

    def __init__(self, asked: str):
        self.name, self.device = asked, None

    def map(self, batches):
        return iter(batches)


@dataclass
class RayExtractor:
    """The stages of ``extract --ray`` (``featurize.stages.Extractor``): reader and model run on the cluster."""

    label = "extract (ray)"
    backbone: object  # featurize.backbones.Backbone built here only for its feature space (_Described: stored path)
    engine: _WorkerEngine
    device: object  # torch.device ("cpu" on the stored path, which never imports torch here)
    precision: str
    space: fc.FeatureSpace
    cluster: RayPipeline

    def model(self):
        return self.engine  # built on the workers; the space is claimed as their batches arrive

    def reader(self, paths: list[str], batch_size: int, workers: int):
        return self.cluster.batches(self, paths, batch_size)


def _worker_cannot_read(e: BaseException) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, WorkerCannotRead):
            return str(e)
        text = str(e)
        if "WorkerCannotRead" in text:  # Ray wraps user exceptions; the message survives
            line = next((ln for ln in text.splitlines() if "WorkerCannotRead:" in ln), "")
            return line.split("WorkerCannotRead:", 1)[1].strip() or "a Ray worker cannot read the images"
        e = e.__cause__ or e.__context__
    return None


def _worker_precision() -> str:
    from featurize.backbones import resolve_device, resolve_precision

    return resolve_precision("auto", resolve_device("auto"))


def _decode(batch: dict, preprocess) -> dict:
    """A Ray task: read + decode + resize a batch of files (the local reader's code, per file)."""
    import torch

    from featurize.loading import ImageReader

    torch.set_num_threads(1)
    paths = [str(p) for p in batch["path"]]
    reader = ImageReader(paths, preprocess)
    imgs = np.zeros((len(paths), 3, preprocess.crop, preprocess.crop), np.uint8)
    errors, decode_s = [], np.zeros(len(paths))
    for k in range(len(paths)):
        _, img, err, decode_s[k], _ = reader[k]  # the notes stay in the worker (not carried back yet)
        if img is None and not os.path.isdir(os.path.dirname(paths[k])):
            raise WorkerCannotRead(f"Ray worker on {socket.gethostname()} cannot read {os.path.dirname(paths[k])}")
        if img is not None:
            imgs[k] = img.numpy()
        errors.append(err)
    return {"i": batch["i"], "img": imgs, "error": np.array(errors, dtype=object), "decode_s": decode_s}


class _Embedder:
    """A Ray actor: one backbone + engine, built once, embedding decoded batches."""

    def __init__(self, spec: dict):
        from featurize.pipeline import tune_allocator

        t = time.perf_counter()
        tune_allocator()
        self.engine, dev = _build_engine(spec)
        self.dim, self.dev, self.built, self.load_s = spec["dim"], str(dev), "backbone", time.perf_counter() - t
        import ray

        self.node, self.ready_at = ray.get_runtime_context().get_node_id(), time.time()
        self.actor = f"{self.node}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        import torch

        call_at = time.time()
        n = len(batch["i"])
        ok = np.flatnonzero(batch["error"] == "")
        emb = np.zeros((n, self.dim), np.float32)
        t = time.perf_counter()
        if len(ok):
            imgs = torch.from_numpy(np.ascontiguousarray(batch["img"][ok]))
            streams = max(1, getattr(self.engine, "in_flight", 1))
            step = math.ceil(len(ok) / streams)
            parts = [(k, imgs[k:k + step]) for k in range(0, len(ok), step)]
            for k, out in self.engine.map(parts):
                emb[ok[k:k + len(out)]] = out
        model_s = time.perf_counter() - t
        return _result(self, batch["i"], emb, batch["error"], batch["decode_s"], model_s, call_at)


#: the device of the request key a ``--ray`` run with CPU workers is recorded under (never a local run's)
RAY_CPU_DEVICE = "ray-cpu"

#: model calls per block (Ray batch) for the stored-engine workers, once the first blocks are back
STORED_BLOCK_CALLS = 8
#: blocks a stored-engine worker embeds at once (Ray Data calls it from that many threads)
STORED_LANES = 2


def _growing_blocks(n: int, first: int, most: int) -> list[tuple[int, int]]:
    """(offset, size) of blocks covering ``n`` rows: ``first`` rows, then doubling up to ``most``."""
    out, o, size = [], 0, max(1, first)
    while o < n:
        out.append((o, min(size, n - o)))
        o += size
        size = min(2 * size, max(most, first))
    return out


def _build_engine(spec: dict):
    """The backbone and engine built with torch (the full path), checked against the driver's feature space."""
    import torch

    from featurize.backbones import get_backbone, resolve_device
    from featurize.engines import cpu_cores, make_engine

    bb = get_backbone(spec["backbone"], weights=spec["weights"])
    sid = fc.space_id_for(bb.space_config(spec["precision"]))
    if sid != spec["space_id"]:
        raise RuntimeError(f"the Ray worker on {socket.gethostname()} builds feature space {sid}, the driver "
                           f"{spec['space_id']}: install the same featurize, backbone weights and library "
                           "versions on every node")
    dev = resolve_device(spec["device"])
    if dev.type == "cpu":
        torch.set_num_threads(cpu_cores())  # Ray sets 1 thread per reserved CPU; the engine owns the node
    # OpenVINO's converted model is kept once per user and node (featurize.enginestore): converted on a
    # node's first run, reused after
    return make_engine(bb, dev, spec["precision"], spec["engine"], space_id=sid), dev


def _result(actor, i, emb, error, decode_s, model_s: float, call_at: float) -> dict:
    """A model worker's output batch: the driver's loop reads these columns."""
    n = len(i)

    def col(v):
        return np.array([v] * n, dtype=object)

    return {"i": i, "emb": emb, "error": error, "decode_s": decode_s, "model_s": np.full(n, model_s / max(n, 1)),
            "engine": col(actor.engine.name), "device": col(actor.dev), "node": col(actor.node),
            "built": col(actor.built), "load_s": np.full(n, actor.load_s), "actor": col(actor.actor),
            "ready_at": np.full(n, actor.ready_at), "call_at": np.full(n, call_at), "done_at": np.full(n, time.time())}


class _StoredEmbedder:
    """A Ray actor for CPU workers when the engine store holds the space's engine: a local torch-free
    run per block of paths (``fastdecode`` threads -> the stored OpenVINO engine), the same pixels and
    engine as ``extract`` without Ray on this machine.

    A node whose store lacks the engine converts it once (with torch, checked against the driver's
    feature space) and stores it for the next run.
    """

    def __init__(self, spec: dict, batch_size: int):
        import ray

        from featurize import enginestore, fastpath

        t = time.perf_counter()
        # the engine and the decode threads own the node, as locally (shared by --workers-per-node actors)
        self.threads = max(1, fastpath.cpu_cores() // spec.get("per_node", 1))
        folder = enginestore.engine_dir(spec["space_id"])
        if enginestore.is_complete(folder):
            self.engine, self.built = enginestore.load_stored(folder, spec["precision"], self.threads, spec["dim"]), \
                "stored"
        else:
            self.engine, self.built = _build_engine(spec)[0], "converted"
        self.spec, self.batch_size, self.dim, self.dev = spec, batch_size, spec["dim"], "cpu"
        # STORED_LANES blocks run at once, each on its own share of the engine's infer requests (streams)
        # and decode threads: when one block drains (its last batches in the engine, nothing left to
        # decode), the other keeps the cores busy, as a local run's one long pipeline does
        runner = getattr(self.engine, "runner", self.engine)  # OpenVINOEngine (converted) wraps a CompiledEngine
        n = max(1, min(spec.get("lanes", STORED_LANES), len(runner.requests)))
        self.runner, self.lanes = runner, queue.SimpleQueue()
        for k in range(n):
            self.lanes.put(runner.requests[k::n])
        self.lane_threads = max(1, self.threads // n)
        self.load_s = time.perf_counter() - t
        self.node, self.ready_at = ray.get_runtime_context().get_node_id(), time.time()
        self.actor = f"{self.node}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        from featurize import fastdecode

        call_at = time.time()
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        emb = np.zeros((n, self.dim), np.float32)
        errors, decode_s = np.full(n, "", dtype=object), np.zeros(n)

        def decoded():
            for b in fastdecode.reader(paths, self.spec["preprocess"], self.batch_size, self.lane_threads):
                for i, reason in b["errors"]:
                    if not os.path.isdir(os.path.dirname(paths[i])):
                        raise WorkerCannotRead(f"Ray worker on {socket.gethostname()} cannot read "
                                               f"{os.path.dirname(paths[i])}")
                    errors[i] = reason
                ids = list(b["index"]) + [i for i, _ in b["errors"]]
                decode_s[ids] = b["decode_s"] / max(1, len(ids))
                if b["images"] is not None:
                    yield b["index"], b["images"]

        t = time.perf_counter()
        lane = self.lanes.get()
        try:
            for index, out in self.runner.map(decoded(), requests=lane):
                emb[index] = out
        finally:
            self.lanes.put(lane)
        return _result(self, batch["i"], emb, errors, decode_s, time.perf_counter() - t, call_at)
