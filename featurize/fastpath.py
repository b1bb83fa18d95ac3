"""Extraction without torch, once this user's engine store holds the converted engine.

The first ``extract`` of a request on a machine imports torch, builds the backbone, converts it
(``featurize.engines``) and records in the engine store what the request resolved to: the
feature space (id, ``space.json`` content, preprocessing) and the engine
(``featurize.enginestore.remember``). Every later ``extract`` of the same request -- in any
cache, a brand-new one included -- finds that record and runs:

    Pillow/numpy decode + resize + crop (threads, ``featurize.fastdecode``)
        -> the stored OpenVINO engine (uint8 in) -> shards

importing neither torch, torchvision nor timm (2-5 s of start-up saved on every run).
Anything the record does not cover (another engine, a GPU, a preprocessing this decoder does
not reproduce) takes the full path.

A ``LeanExtractor`` is a ``featurize.stages.Extractor``: ``featurize.stages.embed`` drives its
reader and model as it drives the torch and Ray ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from featurize import cache as fc
from featurize import enginestore, fastdecode

#: ``--engine`` values the torch-free path serves (``torch`` asks for the reference engine).
LEAN_ENGINES = ("auto", "openvino")


@dataclass
class LeanExtractor:
    """The stored engine's stages (``featurize.stages.Extractor``), without torch."""

    label = "extract"
    space: fc.FeatureSpace
    record: dict
    folder: object  # the engine's folder in the store
    threads: int
    _engine: object = field(default=None, repr=False)

    @property
    def preprocess(self) -> dict:
        return self.record["space"]["preprocess"]

    @property
    def engine(self):
        """The compiled stored engine, built on first use (a run with nothing to embed never loads it)."""
        if self._engine is None:
            self._engine = enginestore.load_stored(self.folder, self.record["precision"], self.threads,
                                                   int(self.record["dim"]))
        return self._engine

    def model(self):
        self.space.claim_engine("openvino")  # one engine per space (featurize.cache.FeatureSpace.claim_engine)
        return self.engine

    def reader(self, paths: list[str], batch_size: int, workers: int):
        return fastdecode.reader(paths, self.preprocess, batch_size, workers)

    def summary(self) -> dict:
        r = self.record
        return {"backbone": r["backbone"], "precision": r["precision"], "device": r["device"],
                "engine": "openvino", "dim": int(r["dim"])}


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def lean_extractor(cache, key: dict, engine: str) -> LeanExtractor | None:
    """The torch-free extractor for request ``key`` when the store has its record and engine, else None.

    Registers the feature space in ``cache`` (``space.json`` from the record) when new.
    """
    if engine not in LEAN_ENGINES or enginestore.openvino_version() is None:
        return None
    rec = enginestore.recall(key, engine)
    if rec is None or rec.get("engine") != "openvino" or rec.get("device") != "cpu":
        return None
    space_meta = rec["space"]
    if not fastdecode.supports(space_meta.get("preprocess", {})):
        return None
    folder = enginestore.engine_dir(rec["space_id"])
    if not enginestore.is_complete(folder):  # the store was cleared: convert again on the full path
        return None
    space = fc.FeatureSpace(cache, rec["space_id"])
    if space.held_engine() not in (None, "openvino"):  # auto keeps the engine a space holds (full path)
        return None
    if not space.exists():
        config = {k: v for k, v in space_meta.items() if k not in ("space_id", "dim", "schema_version")}
        space.create(config, int(rec["dim"]))
    return LeanExtractor(space, rec, folder, cpu_cores())


def lean_for_space(cache, space_id: str, device: str = "auto") -> LeanExtractor | None:
    """The torch-free extractor for an existing feature space (``predict`` of new images) when the
    store holds its OpenVINO engine and it would run on this CPU; else None (the full path)."""
    if device not in ("auto", "cpu") or enginestore.openvino_version() is None:
        return None
    if device == "auto" and enginestore.host()["nvidia"]:  # auto would pick the GPU
        return None
    space = fc.FeatureSpace(cache, space_id)
    info = space.info()
    if space.held_engine() not in (None, "openvino"):  # a space never mixes engines' vectors
        return None
    folder = enginestore.engine_dir(space_id)
    if info.get("precision") not in ("fp32", "bf16") or not fastdecode.supports(info.get("preprocess", {})) \
            or not enginestore.is_complete(folder):
        return None
    record = {"space_id": space_id, "space": info, "engine": "openvino", "precision": info["precision"],
              "device": "cpu", "backbone": info.get("backbone"), "dim": int(info["dim"])}
    return LeanExtractor(space, record, folder, cpu_cores())
