"""Hostile and unlucky files (issue 10): names that are not UTF-8, FIFOs and devices, a head's
sidecar edited to inject HTML. Each test reproduces what an adversarial trial found."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import cli
from cachebuild import build_cache
from conftest import make_image
from featurize.cache import index_path, read_index


def _main(argv, capsys):
    """``cli.main`` in-process; with ``capsysbinary`` the output is decoded as the bytes written
    (a file name that is not UTF-8 is printed as its raw bytes, as `ls` does)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    dec = (lambda b: b.decode("utf-8", "surrogateescape")) if isinstance(out.out, bytes) else str
    return rc, dec(out.out), dec(out.err)


def test_non_utf8_names_round_trip(tmp_path, capsysbinary, monkeypatch):
    """A file and a class folder whose names are not UTF-8 are embedded, stored as their raw
    bytes and lead back to the same files; fit/predict/report print them without failing."""
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    data = tmp_path / "data"
    bad_file = os.fsdecode(b"bad_\xff\xfename.jpg")
    bad_cls = os.fsdecode(b"cls_\xe9")
    for i in range(3):
        make_image(data / "a" / (bad_file if i == 0 else f"{i}.jpg"), i)
        make_image(data / bad_cls / f"{i}.jpg", 10 + i)
    rc, out, err = _main(["extract", data, "--cache", tmp_path / "c", "--backbone", "tiny", "--no-progress",
                          "--workers", "0", "--json"], capsysbinary)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ok"] == 6
    idx = read_index(index_path(tmp_path / "c", data))
    assert set(idx.status) == {"ok"} and bad_cls in idx.classes
    assert f"a/{bad_file}" in idx.path and f"{bad_cls}/0.jpg" in idx.path
    for p in idx.path:  # every stored name leads back to its file, byte for byte
        assert os.path.isfile(os.path.join(os.fsencode(idx.root), os.fsencode(p)))
    assert _main(["fit", "--cache", tmp_path / "c", "--head", "centroid", "--folds", "3"], capsysbinary)[0] == 0
    rc, out, _ = _main(["predict", data / "a", "--cache", tmp_path / "c", "--head", "centroid"], capsysbinary)
    assert rc == 0 and bad_file in out
    assert _main(["report", "--cache", tmp_path / "c", "--head", "centroid"], capsysbinary)[0] == 0


@pytest.fixture
def specials(tmp_path):
    """A folder with one good image, a FIFO and a symlink to /dev/zero, all named like images."""
    data = tmp_path / "data"
    make_image(data / "good.jpg", 1)
    make_image(data / "good2.png", 2)
    os.mkfifo(data / "fifo.jpg")
    os.symlink("/dev/zero", data / "zero.jpg")
    return data


def test_fifo_and_device_are_recorded_not_read(specials, tmp_path, capsys, monkeypatch):
    """Nothing opens them for reading (a FIFO blocks forever, /dev/zero never ends): the index
    records why, and predict lists them as skipped."""
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    rc, out, err = _main(["extract", specials, "--cache", tmp_path / "c", "--backbone", "tiny", "--no-progress",
                          "--workers", "0", "--json"], capsys)
    assert rc == 0, err
    errors = {e["path"]: e["reason"] for e in json.loads(out.strip().splitlines()[-1])["errors"]}
    assert errors == {"fifo.jpg": "not a regular file (a FIFO)", "zero.jpg": "not a regular file (a character device)"}
    from featurize.cache import hash_files

    hashes, bad = hash_files([str(specials / "fifo.jpg"), str(specials / "zero.jpg"), str(specials / "good.jpg")])
    assert list(hashes) == [str(specials / "good.jpg")] and [r for _, r in bad] == [
        "not a regular file (a FIFO)", "not a regular file (a character device)"]


def test_reader_refuses_a_fifo_swapped_in_after_the_scan(tmp_path):
    """The check is on the open descriptor, so a file replaced by a FIFO between scan and read
    is refused instead of blocking."""
    from featurize.images import ImageError, read_bytes

    os.mkfifo(tmp_path / "late.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        read_bytes(str(tmp_path / "late.jpg"))


def _hostile_head(tmp_path, capsys):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [6, 6])
    assert _main(["fit", "--cache", tmp_path / "c", "--head", "centroid", "--folds", "2"], capsys)[0] == 0
    head = next((tmp_path / "c" / "heads").rglob("centroid.joblib"))
    return head


def test_report_escapes_and_applies_the_trust_rule(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    head = _hostile_head(tmp_path, capsys)
    sidecar = head.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    payload = "<script>alert(1)</script>"
    meta.update(n_images=payload, seed=payload, class_weight=payload, classes=[payload, "b"], dataset=payload)
    meta["timings"]["fit_s"] = payload
    meta["metrics"]["cv"]["per_class"][payload] = meta["metrics"]["cv"]["per_class"].pop("a")
    sidecar.write_text(json.dumps(meta))
    # edited after fit wrote it: refused like a modified head
    rc, _, err = _main(["report", "--cache", tmp_path / "c", "--head", "centroid"], capsys)
    assert rc == 1 and "changed after `fit` wrote it" in err
    # a head from elsewhere (not in this machine's registry): refused too
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(head, other / "h.joblib")
    shutil.copy(sidecar, other / "h.json")
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home2"))
    rc, _, err = _main(["report", "--model", other / "h.joblib"], capsys)
    assert rc == 1 and "refusing to report" in err and "--trust" in err
    # trusted on purpose: the page is written, with every sidecar value escaped
    rc, _, err = _main(["report", "--model", other / "h.joblib", "--trust", "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    page = Path(tmp_path / "r" / "report.html").read_text()
    assert "<script" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5
    # once trusted, the same pair reports without --trust
    assert _main(["report", "--model", other / "h.joblib", "--out", tmp_path / "r2"], capsys)[0] == 0


def _gray16(path, values):
    from PIL import Image

    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)
    return path


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_windowed_not_clipped(tmp_path, mode):
    """A 16-bit gray image with values 291..694 (Pillow's 16bit.cropped.tif) was embedded as
    solid white; both decode paths now see its full contrast, in the right order."""
    from PIL import Image

    from featurize.fastdecode import read_preprocessed
    from featurize.images import read_image

    ramp = np.linspace(291, 694, 48 * 48).reshape(48, 48)
    if mode == "I;16":
        path = _gray16(tmp_path / "g.png", ramp)
    else:
        path = tmp_path / "g.tif"
        Image.fromarray(ramp.astype(np.int32 if mode == "I" else np.float32), mode).save(path)
    assert Image.open(path).mode == mode
    full = read_image(str(path)).numpy()
    small = read_preprocessed(str(path), {"resize": 48, "crop": 48, "interpolation": "bilinear"})
    for img in (full, small):
        assert img.min() <= 2 and img.max() >= 253  # the whole range, not 255 everywhere
        row_means = img[0].mean(axis=1)
        assert np.all(np.diff(row_means) >= 0)  # darker at the top, brighter at the bottom: the ramp


def test_a_constant_high_bit_depth_image_is_refused_not_embedded_blank(tmp_path):
    from featurize.extraction import extract

    data = tmp_path / "d"
    data.mkdir()
    _gray16(data / "flat.png", np.full((20, 20), 1000))
    make_image(data / "ok.png", 1)
    s = extract(data, tmp_path / "c", backbone="tiny", workers=0, progress=False)
    assert s["ok"] == 1 and s["errors"] == [
        {"path": "flat.png", "reason": "blank image (every pixel of this I;16 image is 1000)"}]


def test_a_huge_non_image_is_refused_from_its_header(tmp_path):
    """A 3 GB non-image was read whole (3.8 GB peak) before being rejected; now a few bytes are."""
    import tracemalloc

    from featurize.images import ImageError, read_bytes

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00not an image" * (2 << 20))  # 26 MB
    (tmp_path / "small.jpg").write_bytes(b"\x00not an image")
    with pytest.raises(ImageError):  # warm-up: Pillow imports its format plugins once
        read_bytes(str(tmp_path / "small.jpg"))
    tracemalloc.start()
    with pytest.raises(ImageError, match="not an image"):
        read_bytes(str(junk))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # reading it whole would be 26 MB
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: no disk used
    with pytest.raises(ImageError, match="file too large"):
        read_bytes(str(sparse))


def test_an_image_drawn_in_its_alpha_channel_is_not_embedded_blank(tmp_path):
    """Pillow's gbr.png: black RGB, the picture in the alpha channel; dropping the alpha gave a
    solid black image recorded ok. It is painted over white instead; ordinary transparent
    images keep their pixels (their vectors do not change)."""
    from PIL import Image

    from featurize.fastdecode import read_preprocessed
    from featurize.images import read_image

    alpha = (np.add.outer(np.arange(40), np.arange(40)) * 3 % 256).astype(np.uint8)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawn.png")
    for img in (read_image(str(tmp_path / "drawn.png")).numpy(),
                read_preprocessed(str(tmp_path / "drawn.png"), {"resize": 40, "crop": 40, "interpolation": "bilinear"})):
        assert img.max() - img.min() > 200
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (40, 40, 3))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "photo.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "photo.png")).numpy().transpose(1, 2, 0), rgba[..., :3])
