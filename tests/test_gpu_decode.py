"""The GPU decoding path (featurize.gpu), run on the CPU through the same code.

nvjpeg itself needs a GPU; what is tested here is everything around it: which files take
the fast path, batch assembly and order, per-file errors, fallbacks, and that the crops
match the CPU reader's crops to within resize rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from featurize.backbones import get_backbone
from featurize.gpu import _plain_jpeg, device_reader, gpu_decode_available
from featurize.pipeline import reader


def _photo(path: Path, size=(300, 200), mode="RGB", fmt=None, exif_rotate=False) -> str:
    import skimage.data

    im = Image.fromarray(skimage.data.chelsea()).resize(size)
    if mode != "RGB":
        im = im.convert(mode)
    kw = {}
    if exif_rotate:
        ex = Image.Exif()
        ex[0x0112] = 6
        kw["exif"] = ex.tobytes()
    im.save(path, format=fmt, **kw)
    return str(path)


def test_device_reader_matches_cpu_reader(tmp_path):
    pp = get_backbone("efficientnet_lite0", pretrained=False).preprocess
    paths = [
        _photo(tmp_path / "a.jpg"), _photo(tmp_path / "b.png"), _photo(tmp_path / "c.jpg", size=(180, 260)),
        _photo(tmp_path / "rot.jpg", exif_rotate=True), _photo(tmp_path / "cmyk.jpg", mode="CMYK"),
    ]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    assert _plain_jpeg(Path(paths[0]).read_bytes()) and not _plain_jpeg(Path(paths[1]).read_bytes())
    assert not _plain_jpeg(Path(paths[4]).read_bytes()) and not _plain_jpeg(Path(paths[5]).read_bytes())

    ref = list(reader(paths, pp, 4, 0))
    got = list(device_reader(paths, pp, 4, 0, torch.device("cpu")))
    assert [b["index"] for b in got] == [b["index"] for b in ref] == [[0, 1, 3], [4, 5]]
    assert [b["errors"][0][0] for b in got if b["errors"]] == [2]
    for g, r in zip(got, ref):
        assert g["images"].dtype == torch.uint8 and g["images"].shape == r["images"].shape
        diff = (g["images"].int() - r["images"].int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 3


def test_gpu_decode_only_on_cuda():
    assert not gpu_decode_available(torch.device("cpu"))
