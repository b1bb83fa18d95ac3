"""Decode image files to RGB uint8 tensors and apply a backbone's preprocessing.

Decoding picks the fastest correct decoder per format: libjpeg-turbo through
``torchvision.io.decode_jpeg`` for JPEG, Pillow for everything else (PNG, WebP, BMP,
TIFF, GIF's first frame). EXIF orientation is applied either way. Resizing and cropping
run on uint8 (4x less memory traffic than float); normalisation happens once per batch
on the model's device (:meth:`Preprocess.normalize`).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from featurize import decodenotes
from featurize.fastdecode import MAX_PIXELS, DecodeError, _open, _reason
from featurize.pixels import BlankImage, UnusableFile, read_image_file, to_rgb

# One error type and one header check for both decode paths (the torch-free one owns them).
ImageError = DecodeError


def _header(data: bytes) -> tuple[str, tuple[int, int]]:
    with _open(data) as im:
        return im.format or "", im.size


def _pil_decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:  # the size was checked by decode_bytes (_header)
        im.seek(0)  # first frame of animated GIF/WebP/TIFF
        im = ImageOps.exif_transpose(im)
        rgb = np.asarray(to_rgb(im))  # high bit depth windowed, not clipped to white
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _torchvision_jpeg(data: bytes) -> torch.Tensor:
    """libjpeg-turbo through torchvision (1.6x Pillow's speed). Its libjpeg prints warnings such as
    "Corrupt JPEG data: 4 extraneous bytes before marker" to fd 2: they become this image's notes
    (``featurize.decodenotes``). A truncated file raises; "premature end" is one too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with decodenotes.capture() as said, decodenotes.stderr_captured():
        img = decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if any("premature end" in n.lower() for n in said):
        raise ImageError("truncated file (image data ends early)")
    return img


def decode_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to a (3, H, W) uint8 RGB tensor with EXIF orientation applied.

    Raises ``ImageError`` (with a reason fit for a status column) for empty, corrupt,
    truncated or oversized (decompression bomb) input.
    """
    with decodenotes.capture():  # what decoders say goes to the caller's capture, never to stderr
        return _decode(data)


def _decode(data: bytes) -> torch.Tensor:
    if not data:
        raise ImageError("empty file (0 bytes)")
    fmt, (w, h) = _header(data)
    if w * h > MAX_PIXELS:
        raise ImageError(f"decompression bomb: {w}x{h} pixels exceeds the {MAX_PIXELS} limit")
    if fmt == "JPEG":
        try:
            return _torchvision_jpeg(data)
        except Exception:
            pass  # CMYK/12-bit/odd JPEGs, or a torchvision without decoders: Pillow decides
    try:
        return _pil_decode(data)
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except BlankImage as e:
        raise ImageError(str(e)) from None
    except Exception as e:
        raise _reason(e, "cannot decode") from None


def read_bytes(path: str) -> bytes:
    """Read a file's bytes; raises ``ImageError`` (missing, broken symlink, unreadable, not a
    regular file, too large, not an image by its header: see :func:`featurize.pixels.read_image_file`)."""
    try:
        return read_image_file(path)
    except UnusableFile as e:
        raise ImageError(str(e)) from None


def read_image(path: str) -> torch.Tensor:
    """Read and decode one file; raises ``ImageError`` with the reason on any failure."""
    return decode_bytes(read_bytes(path))


@dataclass(frozen=True)
class Preprocess:
    """A backbone's evaluation preprocessing: resize shorter side, centre crop, normalise.

    Built from the weights' own metadata (torchvision ``weights.transforms()`` or timm's
    ``pretrained_cfg``), never typed by hand. Part of the feature-space id.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def config(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_torchvision(cls, transform) -> "Preprocess":
        """From a torchvision ``ImageClassification`` preset (``weights.transforms()``)."""
        return cls(
            resize=int(transform.resize_size[0]),
            crop=int(transform.crop_size[0]),
            mean=tuple(float(x) for x in transform.mean),
            std=tuple(float(x) for x in transform.std),
            interpolation=transform.interpolation.value,
        )

    @classmethod
    def from_timm(cls, data_config: dict, interpolation: str | None = None) -> "Preprocess":
        """From ``timm.data.resolve_data_config`` output (input_size, crop_pct, mean, std, ...)."""
        crop = int(data_config["input_size"][-1])
        return cls(
            resize=int(np.floor(crop / float(data_config.get("crop_pct", 1.0)))),
            crop=crop,
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
            interpolation=interpolation or data_config.get("interpolation", "bilinear"),
        )

    def _mode(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop a (3, H, W) uint8 tensor to (3, crop, crop) uint8."""
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img, [self.resize], interpolation=self._mode(), antialias=True)
        return F.center_crop(img, [self.crop, self.crop])

    def train_transform(self, scale: tuple[float, float] = (0.35, 1.0)):
        """Augmentation for fine-tuning: RandomResizedCrop + horizontal flip on uint8 tensors."""
        from torchvision.transforms import v2

        return v2.Compose([
            v2.RandomResizedCrop(self.crop, scale=scale, interpolation=self._mode(), antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised float (N, 3, H, W) on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        return ((batch.float() - mean) / std).to(dtype)
