"""Extraction: plan (scan -> hash -> what to embed) -> run (reader -> model -> writer) -> finish.

- plan: list the folder without decoding (``featurize.dataset``), hash new or changed files only
  (unchanged size+mtime reuse the index), and find which hashes have no vector yet in the feature
  space; the model is built only when there is something to embed (or the request is new);
- run: ``featurize.stages.embed`` drives the chosen engine's reader -> model -> writer (the
  torch-free lean path, torch, or Ray), imported only when the plan has work, so a re-run with
  nothing new starts and ends in about a second;
- finish: the dataset index is rewritten atomically (before embedding too) and the shards compacted.
Each stage is timed; :func:`extract_folder` returns an :class:`Extraction` whose ``to_dict()``
is the JSON summary (``extract --json``). This module itself imports no torch.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from featurize import cache as fc
from featurize import enginestore, fastdecode, fastpath, stages
from featurize.dataset import Scan, scan
from featurize.enginestore import request_key
from featurize.errors import DISK_FULL, Interrupted, UserError, disk_full_error
from featurize.layout import Cache
from featurize.options import check_batch_size, check_cache_dir, check_engine, resolve_workers

#: Wall-clock stages of an extract, in order; "other" is the named remainder (lock, planning, ...).
STAGES = ("scan", "index", "hash", "load_model", "decode", "model", "write", "compaction", "other")


def _hash_entries(root: str, scan_entries, old: fc.DatasetIndex | None) -> tuple[list[str], list[str], int]:
    """Content hashes and statuses for every entry, reading only new/changed files."""
    prev = {}
    if old is not None:
        for i, p in enumerate(old.path):
            prev[p] = (old.size[i], old.mtime_ns[i], old.hash[i], old.status[i])
    hashes, statuses, hashed = [], [], 0
    for e in scan_entries:
        if e.error:
            hashes.append("")
            statuses.append(f"error: {e.error}")
            continue
        p = prev.get(e.path)
        if p and p[0] == e.size and p[1] == e.mtime_ns and p[2]:
            hashes.append(p[2])
            statuses.append(p[3])
            continue
        try:
            hashes.append(fc.content_hash(os.path.join(root, e.path)))
            statuses.append(fc.STATUS_PENDING)
            hashed += 1
        except OSError as err:
            hashes.append("")
            statuses.append(f"error: {fc.read_error_reason(err)}")
    return hashes, statuses, hashed


def _known_space(old: fc.DatasetIndex | None, key: dict, cache: Cache) -> str | None:
    """The space id a finished run with the same request resolved to: this folder's own runs
    first, then any other folder's in the cache (a new folder of already-embedded images)."""
    def newest_first(p: Path) -> float:
        try:
            return -p.stat().st_mtime
        except OSError:  # replaced or removed meanwhile
            return 0.0

    def others():  # only looked at when this folder's own runs do not know the request
        for p in sorted(cache.index_files(), key=newest_first):
            yield fc.read_extractions(p)

    runs = itertools.chain([old.extractions] if old else [], others())
    for extractions in runs:
        for sid, run in extractions.items():
            if isinstance(run, dict) and run.get("request") == key and fc.FeatureSpace(cache, sid).usable():
                return sid
    return None


def _mark(space: fc.FeatureSpace, sc: Scan, hashes: list[str], statuses: list[str]):
    """``(statuses, todo)``: rows whose hash has a vector in ``space`` ok, the others pending (errors
    kept), and the unique ``[(hash, abspath)]`` to embed."""
    fc.remove_dead_temp_files(space.folder)
    for q in space.quarantine_damaged():
        print(f"warning: moved damaged shard aside to {q}; its images are re-embedded", file=sys.stderr)
    known = space.known_hashes()
    marked, todo, seen = [], [], set()
    for e, h, s in zip(sc.entries, hashes, statuses):
        if not h or s.startswith("error"):
            marked.append(s)
        elif h.encode() in known:
            marked.append(fc.STATUS_OK)
        else:
            marked.append(fc.STATUS_PENDING)
            if h not in seen:
                seen.add(h)
                todo.append((h, os.path.join(sc.root, e.path)))
    return marked, todo


def _drop_undecodable(sc: Scan, hashes: list[str], statuses: list[str], todo) -> tuple[list[str], str | None]:
    """Before any model is loaded, decode new files until one works; mark those that do not.

    Costs one decode when the first file is fine. Returns the statuses and, when no file of the
    folder can be an image (none decodes and none is embedded already), the error message, so
    that a folder of non-images fails before loading a model; else None.
    """
    if todo is None:  # unknown feature space: every file that is not known to be bad is a candidate
        seen, todo = set(), []
        for e, h, st in zip(sc.entries, hashes, statuses):
            if h and not st.startswith("error") and h not in seen:
                seen.add(h)
                todo.append((h, os.path.join(sc.root, e.path)))
    _, failed = fastdecode.first_decodable(todo)
    reasons = dict(failed)
    statuses = [f"error: {reasons[h]}" if h in reasons else st for h, st in zip(hashes, statuses)]
    if sc.entries and all(st.startswith("error") for st in statuses):
        path, reason = next((e.path, st[len("error: "):]) for e, st in zip(sc.entries, statuses))
        return statuses, (f"none of the {len(statuses)} image files in {sc.root} can be decoded (e.g. {path}: "
                          f"{reason}); check that they are images")
    return statuses, None


def _remember_engine(key: dict, engine: str, ex) -> None:
    """After the full path built an OpenVINO engine on the CPU, record the request in the engine
    store so that the next extract of it, in any cache, runs torch-free (``featurize.fastpath``)."""
    eng = getattr(ex.engine, "_engine", ex.engine)  # a LazyEngine that was never built stays None
    if eng is None or getattr(eng, "name", "") != "openvino" or ex.device.type != "cpu":
        return
    enginestore.remember(key, engine, {
        "space_id": ex.space.space_id, "space": ex.space.info(), "engine": "openvino", "precision": ex.precision,
        "device": "cpu", "backbone": ex.backbone.name, "dim": int(ex.backbone.dim)})


@dataclass(frozen=True)
class Extraction:
    """What an extract did. ``to_dict()`` (also ``.summary``) is the JSON summary, ``extract --json``."""

    dataset: str
    layout: str
    backbone: str | None
    space_id: str
    dim: int
    device: str | None
    precision: str | None
    engine: str | None
    images: int
    classes: int
    ignored_files: int
    workers: int
    splits: dict  # {split: {"images", "ok"}} for a train/val/test layout
    hashed: int
    embedded: int
    cached: int
    duplicates: int  # files with the bytes of another file
    n_label_conflicts: int
    label_conflicts: list = field(repr=False)
    n_split_overlaps: int
    split_overlaps: list = field(repr=False)
    ok: int
    failed: int
    pending: int
    errors: list = field(repr=False)  # [{"path", "reason"(, "messages")}], the first 50
    warnings: int  # embedded images the decoders warned about (kept, never printed)
    warned: list = field(repr=False)  # [{"path", "messages"}], the first 50
    seconds: dict = field(repr=False)  # wall seconds by stage (STAGES); they add up to wall_seconds
    wall_seconds: float
    decode_cpu_seconds: float  # decoding summed over the workers (they overlap the model)
    images_per_second: float | None  # end to end: decode + model + write, once the model was ready
    index_file: str
    features_dir: str
    interrupted: bool
    ray: dict | None = None  # with Ray: nodes, workers, start-up (not on a re-run with nothing new)
    process_seconds: float | None = None  # the whole process (CLI), see with_process_time

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if not (k in ("ray", "process_seconds") and v is None)}

    @property
    def summary(self) -> dict:
        return self.to_dict()

    def with_process_time(self, started: float | None) -> "Extraction":
        """The same result with the process's own seconds: ``import`` (interpreter start-up and imports
        before the extract, ``started`` seconds) first, and the time around the call into ``other``, so
        the stages add up to ``process_seconds`` (the process's wall time so far)."""
        now = process_age()
        if started is None or now is None:
            return self
        sec = {"import": round(started, 3), **self.seconds}
        sec["other"] = round(sec.get("other", 0.0) + max(0.0, now - started - self.wall_seconds), 3)
        return replace(self, seconds=sec, process_seconds=round(now, 3))


class _Clock:
    """Wall seconds by stage for one call of :func:`extract_folder` (they never overlap)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t


@dataclass(frozen=True)
class Request:
    """What to extract, as asked (``extract``'s options)."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    engine: str = "auto"
    wait: bool = False
    progress: bool = True

    def check(self) -> None:
        check_batch_size(self.batch_size)
        resolve_workers(self.workers)  # checked before any work
        check_engine(self.engine)


@dataclass(frozen=True)
class Plan:
    """What an extract will do: the folder's rows (hash, status) and the unique files to embed with ``ex``."""

    sc: Scan
    ipath: Path
    old: fc.DatasetIndex | None
    hashes: list[str]
    statuses: list[str]  # ok / pending / error: <reason>, before embedding
    hashed: int  # files read to hash (new or changed)
    key: dict  # request_key: what a finished run records
    space: fc.FeatureSpace
    todo: list[tuple[str, str]]  # [(hash, abspath)] to embed
    ex: object  # a featurize.stages.Extractor (None when nothing is to embed and the space is known)
    workers: int

    @property
    def need_bytes(self) -> int:
        """Disk the run needs: shards + their merge + the index."""
        ex = self.ex
        dim = 0 if ex is None else int(ex.record["dim"]) if isinstance(ex, fastpath.LeanExtractor) else ex.backbone.dim
        return 2 * len(self.todo) * dim * 4 + 64 * len(self.sc.entries)


def extract(data, cache_dir=None, backbone: str = "efficientnet_lite0", weights: str | None = None,
            batch_size: int = 32, workers: int | None = None, device: str = "auto", precision: str = "auto",
            engine: str = "auto", wait: bool = False, progress: bool = True, ray: str | None = None,
            workers_per_node: int | None = None, gpus_per_worker: float | None = None) -> dict:
    """:func:`extract_folder`'s JSON-able summary (``extract --json``); ``cache_dir`` is the cache (a
    ``Cache`` or its folder; None: ``$FEATURIZE_CACHE`` or ``./cache``)."""
    return extract_folder(data, cache_dir, Request(backbone, weights, batch_size, workers, device, precision, engine,
                                                   wait, progress), ray, workers_per_node, gpus_per_worker).to_dict()


def extract_folder(data, cache=None, request: Request = Request(), ray: str | None = None,
                   workers_per_node: int | None = None, gpus_per_worker: float | None = None) -> Extraction:
    """Embed every new or changed image of ``data`` into the cache and update its index.

    Returns an :class:`Extraction` (counts, per-stage seconds, cache paths). Raises
    ``UserError`` for a missing/empty folder, bad options or a concurrent run; per-file
    problems are recorded in the index and counted, never raised. On Ctrl-C the work done
    is saved and ``featurize.errors.Interrupted`` (a ``KeyboardInterrupt``) is raised; its
    message says what was saved and how to resume (the CLI prints it as one line). A full
    disk is a ``UserError`` too: every finished shard is kept and the next run resumes.

    ``ray`` (``local``, ``auto`` or a cluster address) runs the reader -> model stage on Ray
    Data (``featurize.distributed``); everything else is the same code.
    """
    t_start, clock, cache = time.perf_counter(), _Clock(), Cache.of(cache)
    check_cache_dir(cache)
    request.check()
    rp = None
    if ray is not None:  # Ray is imported only when there is something to embed
        from featurize.distributed import RayPipeline

        rp = RayPipeline(ray, workers_per_node, gpus_per_worker)
    with clock("scan"):
        sc = scan(data)
    ipath, plan = cache.index_path(sc.root), None
    try:
        with fc.CacheLock(Cache.lock_path(ipath), wait=request.wait):
            plan = _plan(sc, ipath, cache, request, rp, clock)
            done = stages.embed(plan.ex, plan.todo, request.batch_size, plan.workers, request.progress) \
                if plan.todo else stages.Embedded()
            if rp:
                rp.close()
            statuses = _final_statuses(plan, done)
            run = _run_record(plan, done, statuses, request, rp)
            index = _write(plan, statuses, run, done.interrupted, clock)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(cache, e, plan.need_bytes if plan else 0) from None
        raise
    result = _result(plan, done, index, run, clock.seconds, time.perf_counter() - t_start, rp)
    if done.interrupted:
        raise Interrupted(f"Interrupted: {done.written} images embedded and saved, {result.pending} still pending; "
                          "re-run the same command to resume.")
    return result


def _plan(sc: Scan, ipath: Path, cache: Cache, request: Request, rp, clock: _Clock) -> Plan:
    """Hash the folder's files and decide what to embed with which engine; the model is built
    (torch imported) only for an unknown request or when there is work for the full path."""
    fc.remove_dead_temp_files(ipath.parent)  # an index being written by a run that died (disk full)
    with clock("index"):
        old = _read_index(ipath)
    with clock("hash"):
        hashes, statuses, hashed = _hash_entries(sc.root, sc.entries, old)
    key = request_key(request.backbone, request.weights, rp.key_device() if rp else request.device,
                      request.precision)
    # the engine store knows requests run before on this machine, in any cache: no torch needed
    ex = None if rp else fastpath.lean_extractor(cache, key, request.engine)
    sid = ex.space.space_id if ex else _known_space(old, key, cache)
    todo = None
    if sid:
        statuses, todo = _mark(fc.FeatureSpace(cache, sid), sc, hashes, statuses)
    statuses, nothing = _drop_undecodable(sc, hashes, statuses, todo)
    if nothing:  # record why, never load a model for it
        fc.write_index(ipath, _index_of(sc, old, hashes, statuses))
        raise UserError(nothing)
    if todo is not None:
        bad = {h for h, s in zip(hashes, statuses) if h and s.startswith("error")}
        todo = [(h, p) for h, p in todo if h not in bad]
    if (todo is None or todo) and ex is None:  # unknown request or work to do: build the model (torch)
        with clock("load_model"):  # importing torch is part of loading the model (2-5 s)
            ex = _build(cache, request, rp)
        if ex.space.space_id != sid:
            sid = ex.space.space_id
            statuses, todo = _mark(ex.space, sc, hashes, statuses)
    index = _index_of(sc, old, hashes, statuses)
    unchanged = old is not None and all(getattr(old, k) == getattr(index, k) for k in fc.INDEX_FIELDS) \
        and (old.root, old.layout) == (index.root, index.layout)
    if not unchanged:  # a killed run still leaves an index that names every file
        with clock("index"):
            fc.write_index(ipath, index)
    # more workers than cores only cost memory: --workers 999 forked 836 processes (18 GB)
    workers = resolve_workers(request.workers) if request.workers is not None \
        else fastpath.cpu_cores() if isinstance(ex, fastpath.LeanExtractor) else resolve_workers(None)
    return Plan(sc, ipath, old, hashes, statuses, hashed, key, fc.FeatureSpace(cache, sid), todo, ex, workers)


def _read_index(ipath: Path) -> fc.DatasetIndex | None:
    if not ipath.exists():
        return None
    try:
        return fc.read_index(ipath)
    except UserError as e:  # the index is derived data: rebuild it, features are kept
        print(f"warning: {e}; rebuilding it from the folder", file=sys.stderr)
        return None


def _index_of(sc: Scan, old: fc.DatasetIndex | None, hashes: list[str], statuses: list[str]) -> fc.DatasetIndex:
    return fc.DatasetIndex(
        root=sc.root, layout=sc.layout, path=[e.path for e in sc.entries], label=[e.label for e in sc.entries],
        split=[e.split for e in sc.entries], hash=hashes, size=[e.size for e in sc.entries],
        mtime_ns=[e.mtime_ns for e in sc.entries], status=statuses,
        extractions=dict(old.extractions) if old else {})


def _build(cache: Cache, request: Request, rp):
    """The full path's extractor (torch, or Ray's driver side, torch-free when the store has the engine)."""
    args = (cache, request.backbone, request.weights, request.device, request.precision, request.engine)
    try:
        if rp:  # torch only when the workers' engine is not in the engine store (featurize.distributed)
            return rp.build_extractor(*args)
        from featurize.pipeline import build_extractor, tune_allocator

        tune_allocator()
        return build_extractor(*args)
    except KeyboardInterrupt:
        raise Interrupted("Interrupted while loading the model, before any image was embedded; "
                          "re-run the same command.") from None


def _final_statuses(plan: Plan, done: stages.Embedded) -> list[str]:
    """The plan's statuses with what the run embedded ok and what failed."""
    if not (done.written or done.failed):
        return plan.statuses
    known = plan.space.known_hashes()
    return [f"error: {done.failed[h]}" if h in done.failed else fc.STATUS_OK if h and h.encode() in known else s
            for h, s in zip(plan.hashes, plan.statuses)]


def _run_record(plan: Plan, done: stages.Embedded, statuses: list[str], request: Request, rp) -> dict:
    """This space's entry in the index's ``extractions``: the engine, what embedding cost so far, and
    (once finished) the request and counts, so a re-run knows the space without torch."""
    run = {**(plan.old.extractions.get(plan.space.space_id, {}) if plan.old else {})}
    run["notes"] = _kept_notes(run.get("notes"), done.notes, plan.hashes, statuses)
    run.update(_engine_info(plan, request, rp))
    if done.written:  # what embedding this dataset cost, summed over runs (compare shows it beside accuracy)
        pipe_s = sum(v for k, v in done.seconds.items() if k in ("decode", "model", "write"))
        run["embedded_total"] = run.get("embedded_total", 0) + done.written
        run["embed_seconds_total"] = round(run.get("embed_seconds_total", 0.0) + pipe_s, 3)
    if not done.interrupted:
        run.update(finished_at=time.time(), n_ok=sum(s == fc.STATUS_OK for s in statuses),
                   n_failed=sum(s.startswith("error") for s in statuses), request=plan.key)
    return run


def _write(plan: Plan, statuses: list[str], run: dict, interrupted: bool, clock: _Clock) -> fc.DatasetIndex:
    """Write the index (the run recorded unless interrupted) and compact the space's shards."""
    index = _index_of(plan.sc, plan.old, plan.hashes, statuses)
    if not interrupted:
        index.extractions[plan.space.space_id] = run
    with clock("index"):
        fc.write_index(plan.ipath, index)
    if not interrupted:
        with clock("compaction"):
            plan.space.compact(max_shards=1)
    return index


def _engine_info(plan: Plan, request: Request, rp) -> dict:
    """What embedded this space: backbone, precision, device, engine, dim (+ Ray's cluster)."""
    ex = plan.ex
    if ex is None:
        return {}
    if isinstance(ex, fastpath.LeanExtractor):
        return ex.summary()
    info = dict(backbone=ex.backbone.name, precision=ex.precision, device=str(ex.device),
                engine=getattr(ex.engine, "name", "torch"), dim=ex.backbone.dim)
    if rp:  # the workers' device; how many nodes and workers
        info.update(device=ex.engine.device or info["device"], ray=rp.info)
    else:
        _remember_engine(plan.key, request.engine, ex)
    return info


def _result(plan: Plan, done: stages.Embedded, index: fc.DatasetIndex, run: dict, timed: dict, wall: float,
            rp) -> Extraction:
    seconds = {k: timed[k] + done.seconds.get(k, 0.0) for k in STAGES}
    seconds["other"] = max(0.0, wall - sum(v for k, v in seconds.items() if k != "other"))
    pipeline_s = wall - seconds["scan"] - seconds["hash"] - seconds["load_model"]
    statuses, sc = index.status, plan.sc
    n_ok = sum(s == fc.STATUS_OK for s in statuses)
    ok_hashes = [h for h, s in zip(index.hash, statuses) if s == fc.STATUS_OK]
    duplicates = len(ok_hashes) - len(set(ok_hashes))  # files with the bytes of another file
    conflicts, overlaps = _duplicate_problems(index) if duplicates else ([], [])
    return Extraction(
        dataset=sc.root, layout=sc.layout, backbone=run.get("backbone"), space_id=plan.space.space_id,
        dim=run.get("dim") or plan.space.info()["dim"], device=run.get("device"), precision=run.get("precision"),
        engine=run.get("engine"), images=len(sc.entries), classes=len(index.classes), ignored_files=sc.ignored,
        workers=plan.workers, splits=_split_counts(index.split, statuses), hashed=plan.hashed,
        embedded=done.written, cached=n_ok - done.written - duplicates, duplicates=duplicates,
        n_label_conflicts=len(conflicts), label_conflicts=conflicts[:50],
        n_split_overlaps=len(overlaps), split_overlaps=overlaps[:50],
        ok=n_ok, failed=sum(s.startswith("error") for s in statuses),
        pending=sum(s == fc.STATUS_PENDING for s in statuses),
        errors=_errors(index, run["notes"]), **_warnings(index, run["notes"]),
        seconds={k: round(v, 3) for k, v in seconds.items()}, wall_seconds=round(wall, 3),
        decode_cpu_seconds=round(done.seconds.get("decode_cpu", 0.0), 3),
        images_per_second=round(done.written / pipeline_s, 1) if done.written and pipeline_s > 0 else None,
        index_file=str(plan.ipath), features_dir=str(plan.space.folder), interrupted=done.interrupted,
        ray=rp.info if rp and rp.info else None)


def _kept_notes(old, new: dict, hashes: list[str], statuses: list[str]) -> dict:
    """What decoders said about each file (``{hash: [message]}``, kept in the run record): this
    run's, and earlier runs' for files still ok or failed (a re-run does not decode them again)."""
    ok = {h for h, st in zip(hashes, statuses) if h and st != fc.STATUS_PENDING}
    kept = {h: m for h, m in old.items() if h in ok and isinstance(m, list)} if isinstance(old, dict) else {}
    kept.update((h, m) for h, m in new.items() if h in ok)
    return kept


def _errors(index: fc.DatasetIndex, notes: dict) -> list[dict]:
    """The first 50 files that failed, with their reason and what the decoders said, if anything."""
    out = []
    for p, h, st in zip(index.path, index.hash, index.status):
        if st.startswith("error") and len(out) < 50:
            out.append({"path": p, "reason": st[len("error: "):], **({"messages": notes[h]} if h in notes else {})})
    return out


def _warnings(index: fc.DatasetIndex, notes: dict) -> dict:
    """Summary fields: ``warnings``, how many embedded images the decoders warned about (kept,
    not printed), and ``warned``, the first 50 with their messages."""
    warned = [{"path": p, "messages": notes[h]} for p, h, st in zip(index.path, index.hash, index.status)
              if st == fc.STATUS_OK and h in notes]
    return {"warnings": len(warned), "warned": warned[:50]}


def _split_counts(splits: list[str], statuses: list[str]) -> dict:
    """``{split: {"images", "ok"}}`` for a split layout (train/val/test), ``{}`` otherwise."""
    out: dict[str, dict] = {}
    for sp, st in zip(splits, statuses):
        if sp:
            c = out.setdefault(sp, {"images": 0, "ok": 0})
            c["images"] += 1
            c["ok"] += st == fc.STATUS_OK
    return {sp: out[sp] for sp in ("train", "val", "test") if sp in out}


def _duplicate_problems(index: fc.DatasetIndex) -> tuple[list[list[str]], list[list[str]]]:
    """Byte-identical files that disagree: ``(label conflicts, split overlaps)``, each a list of
    the paths sharing one content hash. Both make held-out metrics dishonest."""
    groups: dict[str, list[int]] = {}
    for i, (h, st) in enumerate(zip(index.hash, index.status)):
        if st == fc.STATUS_OK:
            groups.setdefault(h, []).append(i)
    conflicts, overlaps = [], []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        paths = [index.path[i] for i in rows]
        if len({index.label[i] for i in rows}) > 1:
            conflicts.append(paths)
        if len({index.split[i] for i in rows if index.split[i]}) > 1:
            overlaps.append(paths)
    return conflicts, overlaps


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up included), from /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def format_summary(s: dict) -> str:
    """A short human summary of :func:`extract`'s result."""
    sec = s["seconds"]
    lines = [
        f"{s['dataset']}: {s['images']} images ({s['layout']} layout, {s['classes']} classes) -> "
        f"{s['ok']} ok, {s['failed']} failed, {s['ignored_files']} non-image files ignored",
        f"backbone {s['backbone']} (D={s['dim']}) on {s['device']} {s['precision']} [{s['engine']}]: "
        f"embedded {s['embedded']}"
        + (f" ({s['images_per_second']:.1f} img/s, decode to write)" if s.get("images_per_second") else "")
        + f", reused {s['cached']} from cache"
        + (f", {s['duplicates']} files duplicate others' bytes" if s.get("duplicates") else ""),
        "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in sec.items())
        + (f"; process {s['process_seconds']:.2f}s" if s.get("process_seconds") else f"; wall {s['wall_seconds']:.2f}s"),
        f"cache: {s['index_file']} + {s['features_dir']}",
    ]
    if s.get("splits"):  # the held-out parts are what the metrics will rest on
        lines.insert(1, "splits: " + ", ".join(
            f"{sp} {c['ok']}" + (f" ({c['images'] - c['ok']} not ok)" if c["images"] != c["ok"] else "")
            for sp, c in s["splits"].items()) + " images")
    if s.get("n_label_conflicts"):
        lines.append(f"warning: {s['n_label_conflicts']} images have the same bytes under different labels, e.g. "
                     f"{' = '.join(s['label_conflicts'][0])}; check their labels (see --json)")
    if s.get("n_split_overlaps"):
        lines.append(f"warning: {s['n_split_overlaps']} images are in more than one split with the same bytes, e.g. "
                     f"{' = '.join(s['split_overlaps'][0])}; held-out scores count them as unseen")
    if s.get("warnings"):  # one line: what Pillow/libtiff/libjpeg said used to fill the screen
        eg = "; ".join(f"{w['path']}: {w['messages'][0][:100]}" for w in s["warned"][:2])
        lines.append(f"{s['warnings']} images decoded with warnings and were embedded, e.g. {eg} "
                     "(all in --json)")
    for e in s["errors"][:10]:
        lines.append(f"  skipped {e['path']}: {e['reason']}")
    if s["failed"] > 10:
        lines.append(f"  ... {s['failed'] - 10} more (see --json)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- predict support


def embed_paths(paths: list[str], space_id: str, cache=None, batch_size: int = 32, device: str = "auto",
                workers: int | None = None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed image files into an existing feature space, reusing cached vectors by content hash.

    Returns ``(X float32 (n_ok, D), ok_paths, errors [(path, reason)])``; new vectors are
    added to the cache. Raises ``UserError`` if the space is unknown or its weights changed.
    """
    cache = Cache.of(cache)  # None: $FEATURIZE_CACHE or ./cache
    check_cache_dir(cache)
    check_batch_size(batch_size)
    workers = resolve_workers(workers)
    space = fc.FeatureSpace(cache, space_id)
    info = space.info()

    def build():
        lean = fastpath.lean_for_space(cache, space_id, device)  # stored engine: no torch
        if lean is not None:
            return lean
        from featurize.pipeline import build_extractor

        how = info.get("build", {})
        ex = build_extractor(cache, how.get("backbone", info["backbone"]), how.get("weights"), device,
                             info["precision"])
        if ex.space.space_id != space_id:
            raise UserError(f"the weights of {info['backbone']} changed since space {space_id} was extracted "
                            f"(now {ex.space.space_id}); re-run `extract` and `fit`")
        return ex

    found, errors = embed_files(space, paths, build, batch_size, workers)
    ok_paths = [p for p in paths if p in found]
    X = np.stack([found[p] for p in ok_paths]) if ok_paths else np.empty((0, info["dim"]), np.float32)
    return X, ok_paths, errors


def embed_files(space: fc.FeatureSpace, paths: list[str], build, batch_size: int = 32, workers: int | None = None):
    """Vectors of ``paths`` in ``space``: cached ones found by content hash, the rest embedded by
    ``build()`` (an ``Extractor`` for that space, called only when a file is not cached yet) and
    added to the cache. Returns ``({path: vector}, [(path, reason)])`` for unreadable files.
    """
    hashes, errors = fc.hash_files(paths)
    found = space.vectors_for(hashes)
    todo = list({h: p for p, h in hashes.items() if p not in found}.items())  # one file per new hash
    if todo:
        ex = build()
        if not isinstance(ex, fastpath.LeanExtractor):
            from featurize.pipeline import tune_allocator

            tune_allocator()
        failed = stages.embed(ex, todo, batch_size, resolve_workers(workers)).failed
        errors += [(p, failed[h]) for p, h in hashes.items() if h in failed]
        found.update(space.vectors_for({p: h for p, h in hashes.items() if p not in found and h not in failed}))
    return found, errors

