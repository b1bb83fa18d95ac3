"""Engines: the optimised CPU engine stays in the fp32 reference's feature space, and auto uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurize import engines
from featurize.errors import UserError

ov = pytest.importorskip("openvino", reason="OpenVINO is a core dependency where it has a wheel: pip install -e .")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def _photos(tmp: Path) -> list[Path]:
    """Real photographs: scikit-image's sample photos + a few flowers when the shared datasets exist."""
    import skimage.data
    from PIL import Image

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        p = tmp / "photos" / "sample" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).save(p, quality=92)
        out.append(p)
    flowers = SHARED / "flowers"
    if flowers.is_dir():
        for cls in sorted(d for d in flowers.iterdir() if d.is_dir()):
            out += sorted(cls.glob("*.jpg"))[:2]
    return out


@pytest.fixture(scope="module")
def lite0():
    from featurize.backbones import get_backbone

    return get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("featurize-cache")


@pytest.mark.slow
def test_openvino_matches_torch_fp32_on_real_photos(lite0, ov_cache, tmp_path):
    from featurize.backbones import resolve_precision
    from featurize.images import read_image

    paths = _photos(tmp_path)
    batch = torch.stack([lite0.preprocess(read_image(str(p))) for p in paths])
    ref = engines.TorchEngine(lite0, torch.device("cpu"), "fp32")(batch)
    precision = resolve_precision("auto", torch.device("cpu"))  # bf16 on AVX512-BF16/AMX CPUs
    eng = engines.make_engine(lite0, torch.device("cpu"), precision, "openvino", cache_dir=ov_cache, space_id="s")
    assert eng.name == "openvino" and eng.precision == precision
    got = eng(batch)
    assert got.shape == ref.shape and got.dtype == np.float32
    cos = engines.cosine_rows(got, ref)
    assert cos.min() >= engines.COSINE_TOLERANCE, dict(zip([p.name for p in paths], cos.round(4)))
    if precision == "bf16":  # the reference engine's own bf16 autocast keeps the same promise
        cos_t = engines.cosine_rows(engines.TorchEngine(lite0, torch.device("cpu"), "bf16")(batch), ref)
        assert cos_t.min() >= engines.COSINE_TOLERANCE

    # The converted model is kept in the user's engine store: a second engine loads it without converting.
    from featurize.enginestore import engine_dir

    assert (engine_dir("s") / "model.xml").is_file()
    again = engines.make_engine(lite0, torch.device("cpu"), precision, "openvino", cache_dir=ov_cache, space_id="s")
    assert not again.converted
    np.testing.assert_allclose(again(batch), got, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_auto_engine_uses_openvino_and_records_it(ov_cache, tmp_path, monkeypatch):
    """A silent fallback to PyTorch would fail here."""
    import shutil

    from featurize import cache as fc
    from featurize.extraction import extract

    data = tmp_path / "data" / "x"
    data.mkdir(parents=True)
    for p in _photos(tmp_path)[:3]:
        shutil.copy(p, data / p.name)
    s = extract(tmp_path / "data", cache_dir=ov_cache, engine="auto", progress=False, workers=0)
    assert s["engine"] == "openvino" and s["ok"] == 3 and s["failed"] == 0
    idx = fc.read_index(Path(s["index_file"]))
    assert idx.extractions[s["space_id"]]["engine"] == "openvino"
    from featurize.enginestore import engine_dir

    assert (engine_dir(s["space_id"]) / "model.xml").is_file()

    # Second run on new images: the saved model is reused, never converted again.
    monkeypatch.setattr(engines.OpenVINOEngine, "_convert", lambda self: pytest.fail("converted twice"))
    shutil.copy(_photos(tmp_path)[3], data / "new.jpg")
    s2 = extract(tmp_path / "data", cache_dir=ov_cache, engine="auto", progress=False, workers=0)
    assert s2["engine"] == "openvino" and s2["embedded"] == 1 and s2["cached"] == 3
    assert s2["space_id"] == s["space_id"]

    # A cache-hit run never builds an engine at all.
    monkeypatch.setattr(engines, "OpenVINOEngine", lambda *a, **k: pytest.fail("engine built on a cache hit"))
    s3 = extract(tmp_path / "data", cache_dir=ov_cache, engine="auto", progress=False, workers=0)
    assert s3["embedded"] == 0 and s3["ok"] == 4


def test_engine_option_errors(monkeypatch):
    from featurize.backbones import get_backbone

    bb = get_backbone("tiny")
    with pytest.raises(UserError, match="unknown engine"):
        engines.make_engine(bb, torch.device("cpu"), "fp32", "tensorrt")
    with pytest.raises(UserError, match="runs on the CPU"):
        engines.make_engine(bb, torch.device("cuda"), "bf16", "openvino")
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    with pytest.raises(UserError, match="pip install openvino"):
        engines.make_engine(bb, torch.device("cpu"), "fp32", "openvino")
    assert engines.make_engine(bb, torch.device("cpu"), "fp32", "auto").name == "torch"


def test_openvino_engine_on_tiny_model_matches_torch(tmp_path):
    """Fast check of the uint8-in, normalisation-folded graph on any CPU."""
    from featurize.backbones import get_backbone

    bb = get_backbone("tiny")
    x = engines._test_pattern(bb.preprocess.crop, 3)
    ref = engines.TorchEngine(bb, torch.device("cpu"), "fp32")(x)
    eng = engines.make_engine(bb, torch.device("cpu"), "fp32", "openvino", cache_dir=tmp_path, space_id="t")
    np.testing.assert_allclose(eng(x), ref, rtol=1e-3, atol=1e-4)
    from featurize.enginestore import engine_dir

    meta = json.loads((engine_dir("t") / "meta.json").read_text())
    assert meta["backbone"] == "tiny"


def test_openvino_map_keeps_order_with_batches_in_flight(tmp_path):
    """Several batches run at once (one per stream); results must come back in input order,
    each equal to running that batch alone, whatever the batch sizes (an empty one included)."""
    from featurize.backbones import get_backbone

    bb = get_backbone("tiny")
    eng = engines.make_engine(bb, torch.device("cpu"), "fp32", "openvino", cache_dir=tmp_path, space_id="t")
    eng.in_flight, eng.requests = 3, [eng.compiled.create_infer_request() for _ in range(3)]  # > 1 on any CPU
    x = engines._test_pattern(bb.preprocess.crop, 12)
    sizes = [5, 1, 0, 3, 2, 1]
    batches, start = [], 0
    for k, n in enumerate(sizes):
        batches.append((f"b{k}", x[start:start + n]))
        start += n
    got = list(eng.map(iter(batches)))
    assert [tag for tag, _ in got] == [tag for tag, _ in batches]
    ref = engines.TorchEngine(bb, torch.device("cpu"), "fp32")
    for (_, emb), (_, images) in zip(got, batches):
        assert emb.shape == (len(images), bb.dim)
        if len(images):
            np.testing.assert_allclose(emb, ref(images), rtol=1e-3, atol=1e-4)

    # A map abandoned with batches still running (Ctrl-C in extraction) leaves no request busy.
    abandoned = eng.map(iter(batches))
    next(abandoned)
    abandoned.close()
    again = list(eng.map(iter(batches)))
    for (_, a), (_, b) in zip(again, got):
        np.testing.assert_array_equal(a, b)


def test_conversion_holds_ctrl_c_and_sends_no_telemetry():
    """Ctrl-C inside OpenVINO's converter could abort the process; it is held until conversion ends."""
    import signal

    from openvino.tools.ovc import convert_impl, telemetry_stub

    ran_to_end = False
    with pytest.raises(KeyboardInterrupt):
        with engines._hold_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            ran_to_end = True  # not interrupted in the middle
    assert ran_to_end and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    original = convert_impl.tm
    with engines._no_telemetry():
        assert convert_impl.tm is telemetry_stub
    assert convert_impl.tm is original


def test_engines_freed_in_any_order_leave_ctrl_c_working(tmp_path):
    """Each OpenVINO Core's CPU plugin swaps the thread's signal stack and restores the previous
    one when freed; two Cores freed first-in-first-out left a freed stack and Ctrl-C segfaulted.
    Run in a child so a regression fails this test instead of killing pytest."""
    import subprocess
    import sys

    script = f"""
import gc, signal, time, torch
from featurize import engines
from featurize.backbones import get_backbone
bb, x = get_backbone("tiny"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
first = engines.OpenVINOEngine(bb, "fp32", {str(tmp_path / "engine")!r})
second = engines.OpenVINOEngine(bb, "fp32", {str(tmp_path / "engine")!r})
first(x), second(x)
del first; gc.collect()
del second; gc.collect()
try:
    signal.raise_signal(signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    print("KeyboardInterrupt raised")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "KeyboardInterrupt raised" in r.stdout
