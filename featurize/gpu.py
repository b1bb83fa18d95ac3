"""GPU decoding: JPEGs are decoded on the GPU (nvjpeg via ``torchvision.io.decode_jpeg(device=...)``).

Workers only read the file and check its header (cheap), so the CPU stops being the
bottleneck: a 2-core machine decodes ~200 JPEG/s, nvjpeg thousands. Everything that is not
a plain JPEG (PNG, WebP, CMYK or EXIF-rotated JPEGs, anything nvjpeg rejects) is decoded and
resized on the CPU in the workers exactly like the CPU path, so no file is ever lost to the
fast path. On the device the crop is resized in float and rounded back to uint8, so the
batch the engine sees has the CPU path's format (uint8 NCHW) and its values to within
rounding (tests/test_gpu_decode.py checks this with ``device="cpu"``).

Not measured on a GPU in this project's benchmark runs (no GPU was available); the code
path runs on CPU in the tests through the same function.
"""

from __future__ import annotations

import io
import time

import torch

from featurize import decodenotes
from featurize.images import MAX_PIXELS, ImageError, Preprocess, decode_bytes, read_bytes
from featurize.loading import ImageReader, make_loader


def _plain_jpeg(data: bytes) -> bool:
    """A baseline/progressive RGB or greyscale JPEG with no EXIF rotation: safe for nvjpeg."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.size[0] * im.size[1] > MAX_PIXELS:
                return False
            return im.getexif().get(0x0112, 1) == 1
    except Exception:
        return False


class BytesOrCrop(ImageReader):
    """Workers: plain JPEGs come back as raw bytes, everything else as a decoded uint8 crop."""

    def __getitem__(self, i: int):
        t = time.perf_counter()
        with decodenotes.capture() as notes:  # what the decoders said, recorded (featurize.decodenotes)
            try:
                data = read_bytes(self.paths[i])
                if _plain_jpeg(data):
                    return i, "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), "", \
                        time.perf_counter() - t, notes
                return i, "crop", self.preprocess(decode_bytes(data)), "", time.perf_counter() - t, notes
            except ImageError as e:
                return i, None, None, str(e), time.perf_counter() - t, notes
            except Exception as e:
                return i, None, None, f"cannot decode ({type(e).__name__}: {e})", time.perf_counter() - t, notes


def _collate(items):
    return items


def _resize_on_device(img: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """(3, H, W) uint8 on the device -> (3, crop, crop) uint8, resize in float (antialiased)."""
    from torchvision.transforms.v2 import functional as F

    x = F.resize(img.float(), [preprocess.resize], interpolation=preprocess._mode(), antialias=True)
    x = F.center_crop(x, [preprocess.crop, preprocess.crop])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def device_decode_batch(items, preprocess: Preprocess, device: torch.device):
    """Turn a worker batch into the reader's dict with ``images`` on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    crops: dict[int, torch.Tensor] = {}
    errors = [(i, err) for i, kind, _, err, *_ in items if kind is None]
    jpeg = [(i, data) for i, kind, data, *_ in items if kind == "jpeg"]
    for i, kind, data, *_ in items:
        if kind == "crop":
            crops[i] = data.to(device, non_blocking=True)
    if jpeg:
        try:
            decoded = decode_jpeg([d for _, d in jpeg], mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad file fails nvjpeg's batch: decode one by one, CPU for the rejects
            decoded = []
            for _, d in jpeg:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    decoded.append(None)
        for (i, d), img in zip(jpeg, decoded):
            if img is None:
                try:
                    crops[i] = preprocess(decode_bytes(d.numpy().tobytes())).to(device)
                except ImageError as e:
                    errors.append((i, str(e)))
                continue
            crops[i] = _resize_on_device(img, preprocess)
    index = sorted(crops)
    return {
        "index": index,
        "images": torch.stack([crops[i] for i in index]) if index else None,
        "errors": sorted(errors),
        "decode_s": sum(it[4] for it in items),
        "notes": [(i, notes) for i, _, _, _, _, notes in items if notes],
    }


def device_reader(paths: list[str], preprocess: Preprocess, batch_size: int, workers: int, device: torch.device):
    """Like ``featurize.loading.reader`` but JPEG decoding and resizing run on ``device``."""
    for items in make_loader(BytesOrCrop(paths, preprocess), batch_size, workers, _collate):
        yield device_decode_batch(items, preprocess, device)


def gpu_decode_available(device: torch.device) -> bool:
    """nvjpeg decoding needs a CUDA device and a torchvision built with it."""
    if device.type != "cuda":
        return False
    try:
        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, format="JPEG")
        tiny = buf.getvalue()
        decode_jpeg(torch.frombuffer(bytearray(tiny), dtype=torch.uint8), device=device)
        return True
    except Exception:
        return False
