"""What decoders say is recorded per image, never printed (issue 10, item 12).

On Pillow's own test images ``extract`` printed 400-500 lines to stderr: libtiff's errors and
torchvision's libjpeg written from C to fd 2, Python warnings and Pillow's logger. The files
below make each of those channels talk; both decode paths must keep stderr clean and record
the messages in the summary (``warnings``/``warned``, ``errors[].messages``) and the index.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from featurize import fastdecode
from featurize.extraction import extract, format_summary

_PIXELS = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)


def _encoded(fmt: str, **kw) -> bytearray:
    b = io.BytesIO()
    Image.fromarray(_PIXELS).save(b, fmt, **kw)
    return bytearray(b.getvalue())


def talkative_images(folder: Path) -> dict[str, str]:
    """Images that make a decoder talk, and a word of what it says, by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _encoded("JPEG")  # junk before the DQT marker: libjpeg prints "Corrupt JPEG data" (fd 2)
    k = jpeg.index(b"\xff\xdb")
    (folder / "junk.jpg").write_bytes(jpeg[:k] + b"junk" + jpeg[k:])
    # a palette with transparency as bytes: Pillow's UserWarning when it converts (a Python warning)
    Image.fromarray(_PIXELS).convert("P").save(folder / "pal.png", transparency=bytes(range(10)))
    tif = _encoded("TIFF")  # SamplesPerPixel 65535: Pillow's logger.error, then refused
    k = tif.index(b"\x15\x01\x03\x00\x01\x00\x00\x00\x03\x00")
    tif[k + 8:k + 10] = b"\xff\xff"
    (folder / "spp.tif").write_bytes(tif)
    tif = _encoded("TIFF", compression="tiff_adobe_deflate")  # zeroed deflate data: libtiff's error (fd 2)
    with Image.open(io.BytesIO(bytes(tif))) as im:
        off, n = im.tag_v2[273][0], im.tag_v2[279][0]
    tif[off + 2:off + n] = bytes(n - 2)
    (folder / "zip.tif").write_bytes(tif)
    Image.fromarray(_PIXELS).save(folder / "quiet.png")
    return {"junk.jpg": "Corrupt JPEG data: 4 extraneous bytes", "pal.png": "Transparency expressed in bytes",
            "spp.tif": "More samples per pixel than can be decoded", "zip.tif": "ZIPDecode: Decoding error"}


def test_extract_records_decoder_messages_and_prints_none(tmp_path):
    """Torch path, decoding in a DataLoader worker process: stderr stays empty (it had 3 raw lines
    on these files), the messages are in --json, the summary says it in one line, a re-run too."""
    said = talkative_images(tmp_path / "data" / "a")
    args = ("extract", tmp_path / "data", "--cache", tmp_path / "c", "--backbone", "tiny", "--workers", "1",
            "--no-progress")
    p = run_cli(*args, "--json")
    assert p.stderr == ""
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["ok"], s["failed"], s["warnings"]) == (3, 2, 2)
    warned = {Path(w["path"]).name: w["messages"] for w in s["warned"]}
    failed = {Path(e["path"]).name: e.get("messages", []) for e in s["errors"]}
    for name, words in said.items():
        got = warned.get(name) or failed.get(name)
        assert got and any(words in m for m in got), (name, got)
    assert "quiet.png" not in warned
    again = extract(tmp_path / "data", tmp_path / "c", backbone="tiny", workers=0, progress=False)
    assert again["embedded"] == 0 and again["warned"] == s["warned"]  # from the index, not a second decode
    line = next(x for x in format_summary(again).splitlines() if "decoded with warnings" in x)
    assert line.startswith("2 images decoded with warnings and were embedded, e.g. a/junk.jpg: Corrupt JPEG")


def test_lean_reader_threads_record_messages_and_leave_warnings_as_they_were(tmp_path, capfd):
    """Torch-free path: decode threads. ``warnings.catch_warnings`` is not thread-safe (concurrent
    decodes used it and could leave the process's filters changed for good); the hooks are
    installed once, messages go to the image that caused them and everything is put back."""
    said = talkative_images(tmp_path)
    names = sorted(said) * 4
    filters, show = list(warnings.filters), warnings.showwarning
    pp = {"resize": 40, "crop": 32, "interpolation": "bilinear"}
    batches = list(fastdecode.reader([str(tmp_path / n) for n in names], pp, batch_size=3, workers=3))
    assert capfd.readouterr().err == ""
    notes = {i: m for b in batches for i, m in b["notes"]}
    for i, name in enumerate(names):
        assert any(said[name] in m for m in notes.get(i, [])) == (name != "junk.jpg"), (name, notes.get(i))
    assert warnings.filters == filters and warnings.showwarning is show
    with pytest.warns(UserWarning, match="Transparency expressed in bytes"):  # outside a run: as before
        fastdecode.read_preprocessed(str(tmp_path / "pal.png"), pp)
