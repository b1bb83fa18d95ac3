"""Decode + resize + centre-crop with Pillow and numpy only (torch-free), for the extraction path
that runs a stored engine without importing torch (``featurize.fastpath``).

It reproduces ``featurize.images`` (torchvision decode + antialiased resize + centre crop) to
within per-image cosine 0.999 of the embedded vectors (tests/test_fastpath.py, on the three
shared datasets), with two differences on purpose:

- **Large JPEGs are decoded DCT-domain downscaled** (libjpeg's scaled IDCT through
  ``Image.draft``): the largest 1/2, 1/4 or 1/8 scale whose result is still at least twice the
  resize target, then the usual antialiased resize. A 12 MP phone photo then decodes at
  1008x756 instead of 4032x3024 (about 2x the img/s; cosine >= 0.998 to a full decode).
- **The decompression-bomb rule bounds the decoded size**, not the file's pixel count: a JPEG
  whose DCT-scaled decode fits in ``MAX_PIXELS`` is accepted (a genuine 108 MP 12000x9000
  JPEG decodes at 1/8 in bounded memory); anything whose decode would exceed it is refused.
  Pillow itself still refuses to open files above twice that (``Image.MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from featurize import decodenotes
from featurize.pixels import BlankImage, UnusableFile, read_image_file, to_rgb

#: Most pixels a decode may produce (Pillow's bomb threshold).
MAX_PIXELS = 89_478_485
#: DCT-domain downscaling keeps at least this multiple of the resize target in each direction.
DRAFT_MARGIN = 2
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class DecodeError(Exception):
    """A file that cannot be used as an image; the message is the recorded reason."""


def supports(preprocess: dict) -> bool:
    """True when this path reproduces ``preprocess`` (bilinear/bicubic resize, crop <= resize)."""
    return preprocess.get("interpolation") in _RESAMPLE and int(preprocess["crop"]) <= int(preprocess["resize"])


def resized_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """torchvision's ``resize(img, [resize])``: the shorter side to ``resize``, the longer truncated."""
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def _reason(e: Exception, what: str) -> DecodeError:
    if "truncat" in str(e).lower():
        return DecodeError("truncated file (image data ends early)")
    return DecodeError(f"{what} ({type(e).__name__}: {e})")


def _open(src) -> Image.Image:
    """Open encoded bytes or a binary file (Pillow reads only the header until the image is loaded)."""
    import io

    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise DecodeError("empty file (0 bytes)")
        src = io.BytesIO(src)
    try:
        return Image.open(src)
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised or corrupt header)") from None
    except Exception as e:
        raise _reason(e, "not a readable image") from None


def draft_for(im: Image.Image, resize: int) -> None:
    """Ask libjpeg for the smallest DCT-scaled decode still >= ``DRAFT_MARGIN`` x the resize target."""
    if im.format != "JPEG":
        return
    tw, th = resized_size(*im.size, resize)
    if im.size[0] >= 2 * DRAFT_MARGIN * tw and im.size[1] >= 2 * DRAFT_MARGIN * th:
        im.draft(None, (DRAFT_MARGIN * tw, DRAFT_MARGIN * th))  # picks the largest scale >= this size


def scales_down(data: bytes, preprocess: dict) -> bool:
    """True for a JPEG that libjpeg decodes DCT-downscaled for ``preprocess`` (at least 4x its
    resize target in both directions), when this module reproduces ``preprocess``."""
    if data[:2] != b"\xff\xd8" or not supports(preprocess):
        return False
    try:
        with _open(data) as im:
            tw, th = resized_size(*im.size, int(preprocess["resize"]))
            return im.format == "JPEG" and im.size[0] >= 2 * DRAFT_MARGIN * tw and im.size[1] >= 2 * DRAFT_MARGIN * th
    except DecodeError:
        return False


def decode_rgb(data, resize: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes or a binary file to an RGB Pillow image (DCT-downscaled when large), EXIF
    orientation applied.

    Returns the image and the full-resolution size after orientation (what the resize target
    is computed from). Raises ``DecodeError`` with a reason fit for a status column.
    """
    with _open(data) as im:
        try:
            im.seek(0)  # first frame of animated GIF/WebP/TIFF
            full = im.size
            draft_for(im, resize)
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise DecodeError(f"decompression bomb: a {full[0]}x{full[1]} image decodes to "
                                  f"{im.size[0] * im.size[1]} pixels, over the {MAX_PIXELS} limit")
            drafted = im.size
            out = ImageOps.exif_transpose(im)
            if out.size != drafted:  # rotated by 90 degrees: the full size turns too
                full = (full[1], full[0])
            return to_rgb(out), full  # high bit depth windowed, not clipped to white
        except DecodeError:
            raise
        except BlankImage as e:
            raise DecodeError(str(e)) from None
        except Exception as e:
            raise _reason(e, "cannot decode") from None


def preprocess_bytes(data, preprocess: dict) -> np.ndarray:
    """Encoded bytes (or a binary file) -> (3, crop, crop) uint8: decode, shorter side to
    ``resize``, centre crop."""
    resize, crop = int(preprocess["resize"]), int(preprocess["crop"])
    im, full = decode_rgb(data, resize)
    tw, th = resized_size(*full, resize)
    top, left = int(round((th - crop) / 2.0)), int(round((tw - crop) / 2.0))  # torchvision's centre
    if im.size == (tw, th):
        arr = np.asarray(im)[top:top + crop, left:left + crop]
    else:
        # Resize only the crop window: Pillow computes each output pixel from the same filter taps
        # as a whole resize followed by the crop, at 1/3 of the work on a 3:2 photo. It takes the
        # box in single precision, so a few pixels differ by 1 (per-image cosine >= 0.9993 on the
        # 1,000 flowers, bf16 engine).
        sx, sy = im.size[0] / tw, im.size[1] / th
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        arr = np.asarray(im.resize((crop, crop), _RESAMPLE[preprocess["interpolation"]], box=box))
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_preprocessed(path: str, preprocess: dict) -> np.ndarray:
    """Read a file and :func:`preprocess_bytes` it; raises ``DecodeError`` on any failure."""
    try:
        data = read_image_file(path)  # regular files only, header sniffed before the whole is read
    except UnusableFile as e:
        raise DecodeError(str(e)) from None
    return preprocess_bytes(data, preprocess)


def _one(i: int, path: str, preprocess: dict):
    """``(i, crop or None, error, seconds, notes)``: what the decoders said is recorded, not printed."""
    t = time.perf_counter()
    with decodenotes.capture() as notes:
        try:
            return i, read_preprocessed(path, preprocess), "", time.perf_counter() - t, notes
        except DecodeError as e:
            return i, None, str(e), time.perf_counter() - t, notes
        except Exception as e:  # a decoder bug on one file must not end the run
            return i, None, f"cannot decode ({type(e).__name__}: {e})", time.perf_counter() - t, notes


def _collate(items) -> dict:
    ok = [(i, img) for i, img, *_ in items if img is not None]
    return {"index": [i for i, _ in ok], "images": np.stack([img for _, img in ok]) if ok else None,
            "errors": [(i, err) for i, img, err, *_ in items if img is None], "decode_s": sum(it[3] for it in items),
            "notes": [(i, notes) for i, _, _, _, notes in items if notes]}


def reader(paths: list[str], preprocess: dict, batch_size: int, workers: int, ahead: int = 3):
    """Yield batches ``{index, images (uint8 NCHW numpy), errors [(i, reason)], decode_s, notes}`` in
    order (``notes``: ``[(i, [message])]``, what the decoders said about each file, never printed).

    ``workers`` threads decode side by side (Pillow releases the GIL while decoding and
    resizing), up to ``ahead`` batches ahead of the consumer; no process is started.
    """
    with decodenotes.active():  # one install of the message hooks for the whole run
        yield from _batches(paths, preprocess, batch_size, workers, ahead)


def _batches(paths: list[str], preprocess: dict, batch_size: int, workers: int, ahead: int):
    if workers < 1:  # in this process, one image at a time
        for start in range(0, len(paths), batch_size):
            yield _collate([_one(i, paths[i], preprocess) for i in range(start, min(start + batch_size, len(paths)))])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending, todo = deque(), iter(range(len(paths)))
        try:
            def fill():
                while len(pending) < ahead * batch_size:
                    i = next(todo, None)
                    if i is None:
                        return
                    pending.append(pool.submit(_one, i, paths[i], preprocess))

            fill()
            while pending:
                items = []
                while pending and len(items) < batch_size:
                    items.append(pending.popleft().result())
                    fill()
                yield _collate(items)
        finally:  # abandoned (Ctrl-C): drop what has not started
            for f in pending:
                f.cancel()


def first_decodable(candidates: list[tuple[str, str]], preprocess: dict | None = None):
    """Try ``[(key, path)]`` in order until one decodes; return ``(key or None, [(key, reason)])``.

    Lets ``extract`` record undecodable files and stop before loading any model when none of
    the new files is an image (costs one decode when the first file is fine).
    """
    failed = []
    for key, path in candidates:
        try:
            with decodenotes.capture():  # the reader records them when it decodes the file again
                read_preprocessed(path, preprocess or {"resize": 64, "crop": 56, "interpolation": "bilinear"})
            return key, failed
        except DecodeError as e:
            failed.append((key, str(e)))
        except Exception as e:
            failed.append((key, f"cannot decode ({type(e).__name__}: {e})"))
    return None, failed
