"""Decoding (formats, EXIF, bad files) and folder scanning (layouts, hidden and non-image files)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, make_image
from featurize.dataset import list_images, scan
from featurize.errors import UserError
from featurize.images import ImageError, Preprocess, decode_bytes, read_image


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff", ".gif"])
def test_every_format_decodes_to_rgb_uint8(tmp_path, ext):
    p = make_image(tmp_path / f"x{ext}", seed=1, size=(30, 20))
    img = read_image(str(p))
    assert img.dtype == torch.uint8 and img.shape == (3, 30, 20)
    if ext in (".png", ".bmp", ".tiff"):  # lossless: pixels survive exactly
        assert torch.equal(img, torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1))


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.new("L", (9, 7), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (9, 7), (1, 2, 3, 4)).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        assert read_image(str(tmp_path / name)).shape == (3, 7, 9)


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    img = read_image(str(tmp_path / "a.gif"))
    assert img[0].float().mean() > 200 and img[2].float().mean() < 50


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif)
    img = decode_bytes(buf.getvalue())
    assert img.shape == (3, 40, 20)  # height and width swapped
    assert img[:, :10, :].float().mean() > 200  # the stripe is now on top


def test_jpeg_takes_the_libjpeg_turbo_path_not_pillow(tmp_path, monkeypatch):
    """torchvision's per-call deprecation warning once sent every JPEG to Pillow (1.6x slower)."""
    import featurize.images as fi

    data = make_image(tmp_path / "g.jpg", seed=3, size=(64, 48)).read_bytes()
    expected = fi._pil_decode(data)

    def no_pillow(_):
        raise AssertionError("a plain JPEG went to Pillow")

    monkeypatch.setattr(fi, "_pil_decode", no_pillow)
    got = decode_bytes(data)
    assert got.shape == expected.shape and (got.int() - expected.int()).abs().max() <= 1


def test_bad_files_raise_image_error_with_reason(tmp_path):
    good = make_image(tmp_path / "g.jpg", seed=2, size=(64, 64)).read_bytes()
    cases = {
        "empty file": b"",
        "not an image": b"hello, I am text",
        "truncated": good[: len(good) // 2],
    }
    for expected, data in cases.items():
        with pytest.raises(ImageError, match=expected):
            decode_bytes(data)
    with pytest.raises(ImageError, match="file not found"):
        read_image(str(tmp_path / "missing.jpg"))


def test_decompression_bomb_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 Mpx, tiny on disk
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_bytes(buf.getvalue())


def test_preprocess_resizes_shorter_side_then_crops_and_normalises():
    pp = Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = pp(torch.full((3, 50, 100), 255, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    x = pp.normalize(out[None])
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


def test_scan_folder_layout_skips_hidden_and_non_images(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2)
    (root / "ATTRIBUTION.txt").write_text("credits")
    make_image(root / ".hidden.jpg", seed=99)
    make_image(root / "cat" / ".DS_Store.png", seed=98)
    make_image(root / ".git" / "x.jpg", seed=97)
    make_image(root / "dog" / "puppies" / "nested.png", seed=96)  # nested: still class dog
    s = scan(root)
    assert s.layout == "folder" and s.ignored == 1
    assert sorted({e.label for e in s.entries}) == ["cat", "dog"]
    assert len(s.entries) == 5
    assert [e.label for e in s.entries if "nested" in e.path] == ["dog"]


def test_scan_split_layout_records_split(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2, split=["train", "val", "test"])
    s = scan(root)
    assert s.layout == "split"
    assert {(e.split, e.label) for e in s.entries} == {(sp, c) for sp in ("train", "val", "test") for c in ("cat", "dog")}


def test_scan_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.png", seed=i)
    s = scan(tmp_path / "flat")
    assert s.layout == "flat" and all(e.label == "" for e in s.entries)


def test_scan_records_broken_symlink(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    os.symlink(tmp_path / "nowhere.jpg", root / "cat" / "link.jpg")
    errs = [e for e in scan(root).entries if e.error]
    assert [(e.path, e.error) for e in errs] == [("cat/link.jpg", "broken symlink")]


def test_scan_follows_symlinked_folders_but_not_loops(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2)  # cat/, dog/
    elsewhere = make_dataset(tmp_path / "elsewhere", classes=("bird",), per_class=2)
    os.symlink(elsewhere / "bird", root / "bird")  # a class kept elsewhere: followed
    os.symlink("..", root / "dog" / "up")  # a loop back to the root: would relabel every image "dog"
    os.symlink(root / "cat", root / "cat" / "self")  # a folder linking to itself
    s = scan(root)
    assert sorted(e.path for e in s.entries) == sorted(
        [f"{c}/{p.name}" for c in ("cat", "dog") for p in (root / c).glob("*.jpg")]
        + [f"bird/{p.name}" for p in (elsewhere / "bird").glob("*.jpg")])
    assert {e.label for e in s.entries} == {"bird", "cat", "dog"} and len(s.entries) == 6


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "file"])
def test_scan_bad_folders_are_user_errors(tmp_path, kind):
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
    elif kind == "no_images":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    elif kind == "file":
        target.write_text("x")
    with pytest.raises(UserError):
        scan(target)


def test_list_images_expands_folders(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=2)
    single = make_image(tmp_path / "one.png", seed=5)
    got = list_images([str(root), str(single)])
    assert len(got) == 5 and got[-1] == str(single)
    with pytest.raises(UserError, match="does not exist"):
        list_images([str(tmp_path / "nope")])
