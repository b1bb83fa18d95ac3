"""``extract --ray`` on a real Ray runtime: same rows and vectors as a local run, and its faults.

One local runtime (``ray.init`` with 2 CPUs) serves the whole module: Ray starts slowly on
2 cores. CLI runs join it by address, as ``--ray ADDRESS`` joins a cluster. The 2-node
cluster test is in ``test_distributed_cluster.py``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, make_dataset, run_cli
from featurize import cache as fc
from featurize.extraction import extract

ray = pytest.importorskip("ray")

FAST = dict(backbone="tiny", precision="fp32", workers=0, progress=False, batch_size=4)
CLI = ["--backbone", "tiny", "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def address():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def vectors(cache, data):
    _, idx = fc.find_index(cache, data)
    X, _, _, paths = fc.load_features(cache, idx, fc.resolve_space(cache, idx))
    return dict(zip(paths, X)), idx


def disk_rows(cache) -> list[bytes]:
    rows = []
    for p in Path(cache, "features").glob("*/*.h5"):
        with h5py.File(p, "r") as f:
            rows += f["hash"][()].tolist()
    return rows


def assert_same_as_local(cache, local_cache, data):
    got, idx = vectors(cache, data)
    want, want_idx = vectors(local_cache, data)
    for k in fc.INDEX_FIELDS:  # the index is identical: paths, labels, hashes, statuses and reasons
        assert getattr(idx, k) == getattr(want_idx, k), k
    assert sorted(got) == sorted(want)
    for k in want:  # the same engine and preprocessing: the same feature space
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    d = make_dataset(root / "data", classes=("a", "b", "c"), per_class=14)
    (d / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    good = (d / "b" / "0.jpg").read_bytes()
    (d / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    local = root / "local"
    extract(d, local, **FAST)
    return d, local


def test_kill9_of_the_driver_then_rerun_gives_the_local_rows_vectors_and_reasons(address, data, tmp_path):
    """The driver (a CLI run joining the runtime) is killed mid-run; the rerun (in this process,
    its Ray workers warm) embeds the rest: the index and vectors of a local run, none doubled."""
    from featurize import api

    d, local = data
    cache = tmp_path / "c"
    env = {"FEATURIZE_FAULT": "shard_written:2", "FEATURIZE_SHARD_ROWS": "8"}
    p = run_cli("extract", d, *CLI, "--batch-size", "4", "--cache", cache, "--ray", address, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr
    saved = len(disk_rows(cache))
    assert 0 < saved < 42
    s = extract(d, cache, ray=address, **FAST)
    assert (s["embedded"], s["ok"], s["failed"]) == (42 - saved, 42, 2)
    assert s["ray"]["workers"] == 1 and s["engine"] == "torch" and s["device"] == "cpu"
    reasons = {e["path"]: e["reason"] for e in s["errors"]}  # corrupt images, recorded on a worker as locally
    assert "not an image" in reasons["a/corrupt.jpg"] and "truncated" in reasons["b/truncated.jpg"]
    assert_same_as_local(cache, local, d)
    rows = disk_rows(cache)
    assert len(rows) == len(set(rows)) == 42  # none lost, none written twice
    again = api.extract(d, "tiny", cache, precision="fp32", ray=address)  # the Python API, as --ray
    assert again.embedded == 0 and "ray" not in again.summary  # nothing new: known space, Ray not used


def _model_workers(cls: str = "_Embedder") -> list[int]:
    """Pids of Ray's actor processes that run the model (their title names the class)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and f"({cls})" in title:
            pids.append(int(pid))
    return pids


@pytest.mark.parametrize("worker", ["backbone", "stored"])
def test_a_worker_killed_mid_run_is_retried_and_every_row_written_once(address, tmp_path, monkeypatch, worker):
    """Either model worker: one built from the backbone (torch), or the torch-free one on the stored engine."""
    n = 80 if worker == "backbone" else 400  # the stored-engine worker is faster: more rows to kill it amid
    d = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=n // 2)
    cache = tmp_path / "c"
    kw = {**FAST, "batch_size": 2}
    if worker == "stored":
        pytest.importorskip("openvino")
        kw.update(engine="openvino")  # a local run of the request first: its engine goes into the store
        extract(make_dataset(tmp_path / "warm", per_class=1), tmp_path / "warm-cache", **kw)
    monkeypatch.setenv("FEATURIZE_SHARD_ROWS", "4")
    result = {}
    run = threading.Thread(target=lambda: result.update(extract(d, cache, ray=address, **kw)))
    run.start()
    killed, deadline = None, time.time() + 120
    while killed is None and time.time() < deadline and run.is_alive():
        pids = _model_workers("_Embedder" if worker == "backbone" else "_StoredEmbedder")
        if pids and disk_rows(cache):  # the model runs and rows are coming back: kill it mid-run
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.02)
    run.join(180)
    assert killed, "no model worker was seen running"
    assert result["embedded"] == result["ok"] == n and result["ray"]["worker_engines"] == [worker], result
    assert result["ray"]["worker_processes"] == 2, result["ray"]  # the killed one, then its restart
    rows = disk_rows(cache)
    assert len(rows) == len(set(rows)) == n  # Ray retried the lost batches; each row written once
    assert len(vectors(cache, d)[0]) == n


def test_without_ray_the_error_names_the_extra(data, tmp_path, monkeypatch):
    from featurize.distributed import install_hint
    from featurize.errors import UserError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UserError, match=r'--ray needs Ray Data.*pip install "[\w.-]+\[ray\]"'):
        extract(data[0], tmp_path / "c", ray="local", **FAST)
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    name = re.search(r'^\[project\]\n(?:#.*\n)*name = "([^"]+)"', pyproject, re.M).group(1)
    assert install_hint() == f'pip install "{name}[ray]"' and re.search(r"^ray = \[", pyproject, re.M)


def test_a_worker_that_cannot_see_the_folder_says_so(address, tmp_path):
    from featurize.distributed import WorkerCannotRead, _decode, _worker_cannot_read
    from featurize.images import Preprocess

    pp = Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3)
    batch = {"i": np.arange(1), "path": np.array([str(tmp_path / "not-mounted" / "a.jpg")], dtype=object)}
    with pytest.raises(WorkerCannotRead, match="cannot read .*not-mounted"):
        _decode(batch, pp)
    with pytest.raises(Exception) as info:  # as the driver sees it: wrapped by Ray
        ray.get(ray.remote(num_cpus=0)(_decode).remote(batch, pp))
    assert "cannot read" in _worker_cannot_read(info.value) and "not-mounted" in _worker_cannot_read(info.value)


def test_ray_keeps_the_space_engine_and_never_mixes_engines(address, tmp_path):
    from featurize.errors import UserError

    cache = tmp_path / "c"
    first = extract(make_dataset(tmp_path / "d1", per_class=2), cache, engine="torch", **FAST)
    space = fc.FeatureSpace(cache, first["space_id"])  # it now holds PyTorch vectors
    second = extract(make_dataset(tmp_path / "d2", per_class=2, seed=100), cache, ray=address, **FAST)
    # auto on the workers follows the space's engine, as a local run does
    assert second["embedded"] == 4 and second["engine"] == "torch" and space.held_engine() == "torch"
    with pytest.raises(UserError, match="holds vectors from the torch engine"):  # refused before the cluster runs
        extract(make_dataset(tmp_path / "d3", per_class=2, seed=200), cache, ray=address, engine="openvino", **FAST)
    assert space.held_engine() == "torch" and len(set(disk_rows(cache))) == 8


_STORED_DRIVER = """
import json, sys
from featurize.extraction import extract
s = extract(sys.argv[1], sys.argv[2], backbone="tiny", engine="openvino", precision="fp32", progress=False,
            batch_size=4, ray=sys.argv[3])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
print(json.dumps({"summary": s, "heavy": heavy}))
"""


def test_a_request_the_engine_store_holds_runs_torch_free_with_the_local_rows_and_vectors(address, tmp_path,
                                                                                          monkeypatch):
    """After a local OpenVINO run, `--ray` of that request imports no torch on the driver, and its CPU
    workers decode in their own threads into the stored engine: the rows and vectors of the local
    torch-free run of the same request, bad files recorded with the local reasons."""
    pytest.importorskip("openvino")
    import json
    import subprocess

    from featurize.distributed import WorkerCannotRead, _StoredEmbedder

    d = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=9)
    (d / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    ov = dict(backbone="tiny", engine="openvino", precision="fp32", progress=False)
    extract(d, tmp_path / "first", workers=0, **ov)  # converts the engine into the store, records the request
    local = extract(d, tmp_path / "local", **ov)  # the torch-free local run
    p = subprocess.run([sys.executable, "-c", _STORED_DRIVER, str(d), str(tmp_path / "c"), address],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    s = out["summary"]
    assert out["heavy"] == [], out["heavy"][:5]  # the driver never imported torch
    assert s["ray"]["worker_engines"] == ["stored"] and s["engine"] == "openvino"
    assert (s["space_id"], s["embedded"], s["failed"]) == (local["space_id"], 18, 1)
    assert "not an image" in {e["path"]: e["reason"] for e in s["errors"]}["a/corrupt.jpg"]
    assert_same_as_local(tmp_path / "c", tmp_path / "local", d)
    # a worker that cannot see the folder says so (the driver turns it into a one-line error)
    spec = {"space_id": s["space_id"], "precision": "fp32", "dim": s["dim"],
            "preprocess": fc.FeatureSpace(tmp_path / "c", s["space_id"]).info()["preprocess"]}
    worker = _StoredEmbedder(spec, 4)
    with pytest.raises(WorkerCannotRead, match="cannot read .*not-mounted"):
        worker({"i": np.arange(1), "path": np.array([str(tmp_path / "not-mounted" / "a.jpg")], dtype=object)})
    # a worker whose node's store lacks the engine converts it (torch, checked against the space), same vectors
    monkeypatch.setenv("FEATURIZE_ENGINES", str(tmp_path / "empty-store"))
    worker = _StoredEmbedder({**spec, "backbone": "tiny", "weights": None, "device": "cpu", "engine": "openvino"}, 4)
    paths = sorted(str(p) for p in (d / "b").glob("*.jpg"))[:3]
    out = worker({"i": np.arange(3), "path": np.array(paths, dtype=object)})
    want, _ = vectors(tmp_path / "local", d)
    assert worker.built == "converted" and list(out["error"]) == ["", "", ""]
    np.testing.assert_allclose(out["emb"], [want[os.path.relpath(p, d)] for p in paths], rtol=1e-4, atol=1e-5)


def test_a_ray_run_with_cpu_workers_makes_the_next_one_torch_free(address, tmp_path):
    """A request never run locally: the first `--ray` run builds the backbone (torch) and its CPU
    workers convert the engine; it records the request, and the next `--ray` run of it takes the
    stored path (workers load the stored engine, decode in their threads) into the same space."""
    pytest.importorskip("openvino")
    kw = dict(FAST, engine="openvino", device="cpu")  # device=cpu: a request no other test runs locally
    first = extract(make_dataset(tmp_path / "d1", per_class=3), tmp_path / "c", ray=address, **kw)
    assert first["ray"]["worker_engines"] == ["backbone"] and first["engine"] == "openvino"
    second = extract(make_dataset(tmp_path / "d2", per_class=3, seed=50), tmp_path / "c", ray=address, **kw)
    assert second["ray"]["worker_engines"] == ["stored"] and second["space_id"] == first["space_id"]
    assert (second["embedded"], second["ok"], second["engine"]) == (6, 6, "openvino")
