"""Start-up paid once per machine: the user engine store, torch-free extraction with a stored
engine, its Pillow decode path (and DCT-domain downscaling of large JPEGs) held to the vectors
of today's decode path, and a folder of non-images failing before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED, make_dataset, run_cli

ov = pytest.importorskip("openvino", reason="OpenVINO is a core dependency where it has a wheel: pip install -e .")

_NO_TORCH = """
import json, sys
from featurize.extraction import extract
s = extract(sys.argv[1], cache_dir=sys.argv[2], backbone="tiny", engine="openvino", progress=False)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
print(json.dumps({"summary": s, "heavy": heavy}))
"""


def _vectors(cache: Path, summary: dict) -> dict:
    from featurize import cache as fc

    hashes, emb = fc.FeatureSpace(cache, summary["space_id"]).load()
    return dict(zip(hashes.tolist(), emb))


def test_stored_engine_serves_every_cache_without_torch(tmp_path, engine_store, monkeypatch):
    from featurize import engines
    from featurize.enginestore import engine_dir
    from featurize.extraction import extract

    data = make_dataset(tmp_path / "data", per_class=5)
    first = extract(data, cache_dir=tmp_path / "a", backbone="tiny", engine="openvino", progress=False, workers=0)
    assert first["engine"] == "openvino" and first["ok"] == 10
    folder = engine_dir(first["space_id"])
    assert folder.parent == engine_store and (folder / "model.xml").is_file()
    stamp = (folder / "model.xml").stat().st_mtime_ns

    # A brand-new cache, another process: extraction runs on the stored engine and never imports torch.
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(data), str(tmp_path / "b")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], out["heavy"][:10]
    second = out["summary"]
    assert second["space_id"] == first["space_id"] and second["embedded"] == 10 and second["engine"] == "openvino"
    a, b = _vectors(tmp_path / "a", first), _vectors(tmp_path / "b", second)
    assert a.keys() == b.keys()
    keys = sorted(a)
    cos = engines.cosine_rows(np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys]))
    assert cos.min() >= 0.999, cos.round(5)

    # predict of a new photo with a head fit on those vectors embeds it on the stored engine, torch-free too.
    env = {"FEATURIZE_HOME": str(tmp_path / "home")}
    run_cli("fit", "--head", "centroid", "--cache", tmp_path / "b", env=env, check=0)
    new = make_dataset(tmp_path / "new", classes=("cat",), per_class=1, seed=99) / "cat" / "0.jpg"
    script = ("import sys, cli\nrc = cli.main(sys.argv[1:])\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", script, "predict", str(new), "--head", "centroid", "--cache",
                        str(tmp_path / "b")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, **env})
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "NO-TORCH", p.stderr[-2000:]
    assert "0.jpg" in p.stdout

    # The full (torch) path with a request the store has not seen loads the stored engine: no second conversion.
    monkeypatch.setattr(engines.OpenVINOEngine, "_convert", lambda self: pytest.fail("converted again"))
    third = extract(data, cache_dir=tmp_path / "c", backbone="tiny", engine="openvino", device="cpu",
                    progress=False, workers=0)
    assert third["embedded"] == 10 and third["space_id"] == first["space_id"]
    assert (folder / "model.xml").stat().st_mtime_ns == stamp
    assert [p.name for p in engine_store.glob(f"{first['space_id']}-openvino-*")] == [folder.name]


def test_engine_store_publish_keeps_the_first_and_discards_the_loser(tmp_path):
    from featurize import enginestore

    final = tmp_path / "store" / "sp-openvino-1"
    for who in ("winner", "loser"):
        tmp = enginestore.new_temp_dir(final)
        for name in ("model.xml", "model.bin", enginestore.META):
            (tmp / name).write_text(who)
        assert enginestore.publish(tmp, final) is (who == "winner")
        assert not tmp.exists()
    assert (final / "model.xml").read_text() == "winner"


def test_a_folder_where_nothing_decodes_fails_before_loading_a_model(tmp_path):
    folder = tmp_path / "texts" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_text(f"not a photo {i}\n")
    script = ("import sys, cli\nrc = cli.main(sys.argv[1:])\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(rc)")
    for _ in range(2):  # the re-run (bad files recorded, unchanged) fails the same way
        p = subprocess.run([sys.executable, "-c", script, "extract", str(tmp_path / "texts"), "--cache",
                            str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 1, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: none of the 4 image files")
        assert "not an image" in p.stderr and p.stdout.strip() == "NO-TORCH"
    from featurize import cache as fc

    idx = fc.read_index(fc.index_path(tmp_path / "cache", tmp_path / "texts"))
    assert len(idx.errors()) == 4 and all("not an image" in r for _, r in idx.errors())


def test_nothing_decodes_json_and_partial_failures_still_succeed(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    (data / "cat" / "notes.jpg").write_text("text")
    p = run_cli("extract", data, "--cache", tmp_path / "cache", "--backbone", "tiny", "--workers", "0", "--json", check=0)
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["ok"] == 4 and s["failed"] == 1
    assert abs(sum(s["seconds"].values()) - s["process_seconds"]) < 0.02  # every second accounted for
    assert list(s["seconds"])[0] == "import" and s["seconds"]["other"] >= 0


def _real_jpegs(per_dataset: int) -> list[Path]:
    import random

    out = []
    for name in ("flowers", "chest_xray", "trashnet"):
        files = sorted((SHARED / name).rglob("*.jp*g"))
        random.Random(0).shuffle(files)
        out += files[:per_dataset]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "flowers").is_dir(), reason="shared datasets not present")
def test_new_decode_path_keeps_vectors_on_real_photos(tmp_path):
    """Pillow decode + resize + crop vs today's torchvision path, same OpenVINO engine, the three
    shared datasets: per image cosine >= 0.999. Large JPEGs (real photos upscaled to 4032x3024,
    quality 90) decoded DCT-downscaled vs at full resolution: >= 0.998."""
    import torch
    from PIL import Image

    from featurize import engines, fastdecode
    from featurize.backbones import get_backbone, resolve_precision
    from featurize.cache import space_id_for
    from featurize.images import read_image

    bb = get_backbone("efficientnet_lite0")
    pp = bb.preprocess.config()
    prec = resolve_precision("auto", torch.device("cpu"))
    eng = engines.make_engine(bb, torch.device("cpu"), prec, "openvino", space_id=space_id_for(bb.space_config(prec)))
    paths = _real_jpegs(6)
    old = eng(torch.stack([bb.preprocess(read_image(str(p))) for p in paths]))
    new = eng(np.stack([fastdecode.read_preprocessed(str(p), pp) for p in paths]))
    cos = engines.cosine_rows(old, new)
    assert cos.min() >= 0.999, dict(zip([p.name for p in paths], cos.round(5)))

    big = []
    for i, p in enumerate(paths[::6]):  # one per dataset, upscaled to a 12 MP phone photo
        im = Image.open(p).convert("RGB")
        big.append(tmp_path / f"big{i}.jpg")
        im.resize((4032, 3024), Image.Resampling.BICUBIC).save(big[-1], quality=90)
    with Image.open(big[0]) as im:
        fastdecode.draft_for(im, pp["resize"])
        assert im.size == (1008, 756)  # 1/4 scale: still >= 2x the 341x256 resize target
    full = eng(torch.stack([bb.preprocess(read_image(str(p))) for p in big]))
    drafted = eng(np.stack([fastdecode.read_preprocessed(str(p), pp) for p in big]))
    cos = engines.cosine_rows(full, drafted)
    assert cos.min() >= 0.998, cos.round(5)


def test_bomb_rule_bounds_the_decoded_size(tmp_path, monkeypatch):
    """A JPEG over the pixel limit decodes when its DCT-scaled decode fits (a 108 MP photo decodes
    at 1/8); a format that must decode whole is refused. Scaled down: a limit of 1 Mpx."""
    from PIL import Image

    from featurize import fastdecode

    monkeypatch.setattr(fastdecode, "MAX_PIXELS", 1_000_000)
    pp = {"resize": 36, "crop": 32, "interpolation": "bilinear"}
    big = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (90, 140, 200)).save(big, quality=80)  # 1.9 Mpx
    out = fastdecode.read_preprocessed(str(big), pp)
    assert out.shape == (3, 32, 32) and abs(int(out[2].mean()) - 200) <= 2
    png = tmp_path / "big.png"
    Image.new("RGB", (1600, 1200)).save(png)
    with pytest.raises(fastdecode.DecodeError, match="decompression bomb"):
        fastdecode.read_preprocessed(str(png), pp)


def test_first_run_torch_path_scales_large_jpegs_the_same_way(tmp_path, monkeypatch):
    """The torch pipeline (a machine's first run) sends large JPEGs through the same DCT-scaled
    decode and bomb rule as the torch-free path: same pixels, and not refused."""
    from PIL import Image

    from featurize import fastdecode, images
    from featurize.backbones import get_backbone
    from featurize.loading import decode_for_model

    monkeypatch.setattr(fastdecode, "MAX_PIXELS", 1_000_000)
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)
    pp = get_backbone("tiny").preprocess
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).resize((1600, 1200)).save(big)
    got = decode_for_model(str(big), pp)
    assert tuple(got.shape) == (3, pp.crop, pp.crop)
    np.testing.assert_array_equal(got.numpy(), fastdecode.read_preprocessed(str(big), pp.config()))
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.read_image(str(big))  # what the torch path did with it before
