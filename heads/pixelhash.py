"""Perceptual hashes of images (torch-free: Pillow + numpy), for the audit's near-duplicates.

Embedding cosine alone cannot tell a blurred or recompressed copy from another photo of the
same flower: halving a 320-px photo moves Lite0's pooled features as far as a second photo of
the same kind does. A DCT perceptual hash (pHash) looks at the picture's layout instead: the
image is reduced to 64 x 64 gray pixels, and the signs of its 16 x 16 lowest-frequency DCT
coefficients (minus the mean term) against their median are 255 bits that survive resizing
and JPEG re-encoding but change with a crop or rotation (which the embeddings already find).
The common 64-bit pHash (8 x 8 of a 32 x 32 thumbnail) is too coarse for aligned images: two
chest X-rays of different patients are often 2-4 bits apart; with 255 bits the closest such
pair is 38 bits apart while a half-size or quality-50 copy stays within 22
(``benchmarks/RESULTS_audit.md``). JPEGs are decoded with ``Image.draft`` at 1/2..1/8 scale,
so one image costs well under a millisecond.

Hashes are cached by content hash in ``<cache>/reports/pixelhash-v1.npz`` (:meth:`Cache.pixelhash_path`):
a file whose bytes no longer match the index is skipped, never hashed under the old key.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

SIDE = 64  # the gray thumbnail's side
LOW = 16  # the low-frequency block whose signs are the hash: 16 x 16 - 1 = 255 bits (+ one 0 bit)
WORDS = LOW * LOW // 64  # uint64 words per hash
VERSION = 1  # bump when the hash changes: the cache file name carries it


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (rows: frequencies)."""
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_D = _dct_matrix(SIDE)[:LOW]


def thumbnail(data: bytes) -> np.ndarray:
    """The ``SIDE`` x ``SIDE`` gray thumbnail of encoded image bytes (float32)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompression-bomb and EXIF chatter: the index already accepted it
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (SIDE, SIDE))  # JPEG: decode at the smallest 1/2..1/8 scale still >= SIDE pixels
            if im.mode not in ("L", "RGB"):
                from featurize.pixels import to_rgb

                im = to_rgb(im)
            small = im.convert("L").resize((SIDE, SIDE), Image.BOX)
    return np.asarray(small, dtype=np.float32)


def phash(gray: np.ndarray) -> np.ndarray:
    """The DCT perceptual hash of a ``SIDE`` square gray array: ``WORDS`` uint64 (256 bits, the last always 0)."""
    low = (_D @ gray @ _D.T).ravel()[1:]  # the mean term says nothing about the layout
    bits = np.append(low > np.median(low), False)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def hash_file(path, expected_hash: str | None = None):
    """pHash of the image file at ``path``; None when unreadable or its bytes no longer hash to ``expected_hash``."""
    from featurize.cache import bytes_hash
    from featurize.pixels import UnusableFile, read_image_file

    try:
        data = read_image_file(path)
    except UnusableFile:
        return None
    if expected_hash is not None and bytes_hash(data) != expected_hash:
        return None  # changed since extraction: its vector is of other bytes
    try:
        return phash(thumbnail(data))
    except Exception:  # a file the decoder now refuses: no pixel hash, the embedding still counts
        return None


_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a, b) -> np.ndarray:
    """Differing bits between hashes ``a`` and ``b`` (uint64 arrays (..., WORDS), broadcast)."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
    return _POP[np.ascontiguousarray(x).view(np.uint8)].sum(axis=-1, dtype=np.int64)


def load_store(path: Path) -> dict[str, np.ndarray]:
    """``{content hash: pHash}`` from the cache file (empty when missing or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, codes = z["keys"].astype(str), z["phash"]
            if codes.ndim != 2 or codes.shape[1] != WORDS or len(codes) != len(keys):
                return {}
            return dict(zip(keys.tolist(), codes))
    except (OSError, KeyError, ValueError):
        return {}


def save_store(path: Path, store: dict[str, np.ndarray]) -> None:
    """Write the cache file atomically (a temp file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    keys = np.array(list(store), dtype="S32")
    with open(tmp, "wb") as f:
        np.savez(f, keys=keys, phash=np.array(list(store.values()), dtype=np.uint64).reshape(-1, WORDS))
    os.replace(tmp, path)


def dataset_hashes(cache, root: str, paths, content_hashes, compute: bool = True):
    """pHashes of a dataset's rows, computing only those not cached yet (none when ``compute`` is False).

    Takes the cache dir, the dataset root, the rows' root-relative paths and content hashes.
    Returns ``(phash uint64 (n, WORDS), has (n,) bool, stats)``: rows whose file is gone, changed or
    undecodable have ``has`` False. ``stats``: how many were computed, cached, missing, seconds.
    """
    import time

    from featurize.layout import Cache

    t0 = time.perf_counter()
    store_path = Cache.of(cache).pixelhash_path(VERSION)
    store = load_store(store_path)
    out, has = np.zeros((len(paths), WORDS), np.uint64), np.zeros(len(paths), bool)
    todo = {h: os.path.join(root, rel) for rel, h in zip(paths, content_hashes) if h not in store} if compute else {}
    computed = 0
    if todo:  # Pillow decodes without the GIL: threads use the cores for the first audit of large images
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for h, v in zip(todo, pool.map(hash_file, todo.values(), todo.keys())):
                if v is not None:
                    store[h] = v
                    computed += 1
    for i, h in enumerate(content_hashes):
        v = store.get(h)
        if v is not None:
            out[i], has[i] = v, True
    if computed:
        try:
            save_store(store_path, store)
        except OSError:
            pass  # a read-only cache: hashed again next time, nothing lost (two audits at once: the last write wins)
    return out, has, {"computed": computed, "cached": int(has.sum()) - computed, "missing": int((~has).sum()),
                      "seconds": round(time.perf_counter() - t0, 3)}
