"""The one Pillow-to-RGB conversion every decode path uses (torch-free).

``Image.convert("RGB")`` clips high-bit-depth grayscale: a 16-bit image whose values are
291..694 became solid white (255) and was embedded with status ok. Here the modes without a
fixed 8-bit meaning (``I;16*``, ``I`` 32-bit integer, ``F`` float) are windowed to their own
minimum..maximum, as image viewers display them (16-bit data rarely fills 0..65535: 12-bit
sensors, satellite and medical scans). A high-bit-depth image with a single value has nothing to
window: it is refused with a reason instead of embedded as a blank. 8-bit modes convert as
Pillow does (16-bit RGB PNGs already open as 8-bit ``RGB``, scaled by Pillow).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


class BlankImage(ValueError):
    """A high-bit-depth image with one value (or none finite): nothing to embed. The message is the reason."""


def is_high_bit_depth(mode: str) -> bool:
    return mode.startswith("I;16") or mode in ("I", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """Return ``im`` as an 8-bit RGB image, high-bit-depth grayscale windowed to its min..max.

    Raises ``BlankImage`` for a high-bit-depth image with no contrast.
    """
    if not is_high_bit_depth(im.mode):
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return _alpha_drawn(im, rgb) if "A" in im.getbands() else rgb
    a = np.asarray(im).astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        raise BlankImage(f"blank image (a {im.mode} image with no finite pixel value)")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        raise BlankImage(f"blank image (every pixel of this {im.mode} image is {lo:g})")
    scaled = np.where(finite, (a - lo) * (255.0 / (hi - lo)), 0.0)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _alpha_drawn(im: Image.Image, rgb: Image.Image) -> Image.Image:
    """An image drawn only in its alpha channel (one colour, shapes in the transparency, like
    Pillow's ``gbr.png``) converts to a blank: paint it over white instead. Other transparent
    images convert as before (the alpha dropped), so their vectors do not change."""
    if not all(lo == hi for lo, hi in rgb.getextrema()):
        return rgb
    alpha = im.getchannel("A")
    if alpha.getextrema()[0] == alpha.getextrema()[1]:
        return rgb  # truly one colour everywhere
    white = Image.new("RGB", im.size, (255, 255, 255))
    white.paste(rgb, mask=alpha)
    return white


#: No image this tool decodes needs more bytes than this (89.5 Mpx x 4 channels x 2 bytes is
#: 716 MB uncompressed); a larger file is refused before it is read into memory.
MAX_FILE_BYTES = 1 << 30


class UnusableFile(Exception):
    """A file refused before decoding; the message is the recorded reason."""


def read_image_file(path) -> bytes:
    """Read an image file's bytes, refusing early what cannot be an image.

    Only regular files are opened (a FIFO or device would block or never end); the size is
    checked and the header sniffed (Pillow reads only what identifies the format) before the
    whole file is read, so a 3 GB non-image costs a few bytes, not 3 GB of memory.
    """
    from featurize.cache import open_regular, read_error_reason

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise UnusableFile(f"file too large for an image ({size / 2**30:.1f} GiB, the limit is "
                                   f"{MAX_FILE_BYTES / 2**30:.0f} GiB)")
            if size == 0:
                raise UnusableFile("empty file (0 bytes)")
            # On a duplicate descriptor: some plugins (TIFF) close the file they were given. What
            # Pillow warns here, the decoders warn again (recorded per image: featurize.decodenotes;
            # no catch_warnings, which is not thread-safe and this runs in decode threads).
            try:
                with os.fdopen(os.dup(f.fileno()), "rb") as probe:
                    Image.open(probe).close()
            except Image.UnidentifiedImageError:
                raise UnusableFile("not an image (unrecognised or corrupt header)") from None
            except Exception:  # a damaged header the decoder will name, or a bomb it will refuse
                pass
            f.seek(0)
            return f.read()
    except OSError as e:
        raise UnusableFile(read_error_reason(e)) from None
