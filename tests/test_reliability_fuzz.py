"""Fuzz (issue 10): seeded truncations, bit flips and header edits of real image bytes, through
both decode paths and a real extract. Every file must come back as pixels or as a recorded
reason (never another exception), within a time limit (never a hang), and a file cut short in
its pixel data must never be embedded as ok (never garbage)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SEED = 20261201
N_MUTANTS = 150  # bounded: about 10 s of decoding on a loaded 2-core machine
FILE_SECONDS = 5.0  # per file, generous for a loaded machine; a hang is minutes


def _originals() -> dict[str, bytes]:
    """Small real images in every format the tool reads, with texture so every byte matters."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:72, 0:96]
    base = np.stack([xx * 2.5, yy * 3.4, (xx + yy) * 1.5], -1) + rng.normal(0, 12, (72, 96, 3))
    rgb = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    out = {}
    for fmt, ext, kw in (("JPEG", "jpg", {"quality": 90}), ("JPEG", "jpeg", {"progressive": True}),
                         ("PNG", "png", {}), ("GIF", "gif", {}), ("TIFF", "tif", {"compression": "tiff_deflate"}),
                         ("WEBP", "webp", {"quality": 80}), ("BMP", "bmp", {})):
        buf = io.BytesIO()
        rgb.save(buf, format=fmt, **kw)
        out[ext] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((base[..., 0] * 200).astype(np.uint16)).save(buf, format="PNG")  # 16-bit gray
    out["16.png"] = buf.getvalue()
    return out


def _mutants(originals: dict[str, bytes]):
    """``(name, bytes, kind)``: kind ``cut`` marks a file cut inside its pixel data."""
    rng = np.random.default_rng(SEED)
    names = sorted(originals)
    for i in range(N_MUTANTS):
        ext = names[i % len(names)]
        data = bytearray(originals[ext])
        op = ("truncate", "flip", "header", "splice")[i % 4]
        if op == "truncate":
            keep = int(len(data) * rng.uniform(0.0, 0.6))
            data = data[:keep]
        elif op == "flip":
            for _ in range(int(rng.integers(1, 12))):
                pos = int(rng.integers(0, len(data)))
                data[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == "header":  # the first 64 bytes hold sizes, offsets and chunk lengths
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, min(64, len(data))))
                data[pos] = int(rng.choice([0, 0xFF, 0x7F, 0x80, int(rng.integers(0, 256))]))
        else:  # a run of random bytes in the middle
            pos = int(rng.integers(0, len(data)))
            data[pos:pos + int(rng.integers(8, 256))] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        yield f"m{i:03d}_{op}.{ext.split('.')[-1]}", bytes(data), "cut" if op == "truncate" else op


_DECODE_ALL = """
import json, sys, time
from featurize.fastdecode import DecodeError, read_preprocessed
from featurize.images import ImageError, read_image
pre = {"resize": 64, "crop": 56, "interpolation": "bilinear"}
out = {}
for path in sys.argv[1:]:
    row = {}
    for name, fn, expected in (("torch", read_image, ImageError), ("pillow", lambda p: read_preprocessed(p, pre),
                                                                   DecodeError)):
        t = time.perf_counter()
        try:
            a = fn(path)
            a = a.numpy() if hasattr(a, "numpy") else a
            ok = a.dtype.name == "uint8" and a.ndim == 3 and a.shape[0] == 3 and min(a.shape) > 0
            row[name] = "ok" if ok else f"BAD ARRAY {a.dtype} {a.shape}"
        except expected as e:
            row[name] = "error: " + str(e)
        except Exception as e:
            row[name] = f"UNEXPECTED {type(e).__name__}: {e}"
        row[name + "_s"] = time.perf_counter() - t
    out[path] = row
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "data"
    folder.mkdir()
    kinds = {}
    for name, data, kind in _mutants(_originals()):
        (folder / name).write_bytes(data)
        kinds[str(folder / name)] = kind
    return folder, kinds


def test_fuzzed_images_decode_or_give_a_reason_fast(fuzzed):
    folder, kinds = fuzzed
    # a subprocess: a decoder stuck in C code cannot be interrupted from Python, only killed
    proc = subprocess.run([sys.executable, "-c", _DECODE_ALL, *kinds], capture_output=True, text=True,
                          timeout=FILE_SECONDS * len(kinds), cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == N_MUTANTS
    for path, row in rows.items():
        for name in ("torch", "pillow"):
            assert row[name] == "ok" or row[name].startswith("error: "), (path, row)
            assert row[name + "_s"] < FILE_SECONDS, (path, row)
            if kinds[path] == "cut":  # cut inside the pixel data: never ok
                assert row[name].startswith("error: "), (path, row)
    errors = sum(r["torch"] != "ok" for r in rows.values())
    assert 0.3 * N_MUTANTS < errors < N_MUTANTS  # the mutations bite, and some files survive them


def test_fuzzed_folder_extracts_with_every_file_accounted_for(fuzzed, tmp_path):
    from featurize.cache import find_index
    from featurize.extraction import extract

    folder, kinds = fuzzed
    s = extract(folder, tmp_path / "c", backbone="tiny", precision="fp32", workers=0, batch_size=16,
                progress=False)
    assert s["images"] == N_MUTANTS and s["ok"] + s["failed"] == N_MUTANTS and s["ok"] > 0
    _, idx = find_index(tmp_path / "c", folder)
    for path, status in zip(idx.path, idx.status):
        assert status == "ok" or (status.startswith("error: ") and len(status) > len("error: ")), (path, status)
        if kinds[str(folder / path)] == "cut":
            assert status != "ok", path
