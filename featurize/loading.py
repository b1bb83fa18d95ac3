"""Reading images in DataLoader workers: the reader stage of extraction and fine-tuning's loaders.

- :class:`ImageReader`: files -> (index, uint8 crop or None, error, decode seconds); a file that
  fails becomes a recorded reason, never an exception;
- :func:`reader`: batches ``{index, images (uint8 NCHW), errors, decode_s}`` in order;
- :func:`make_loader` / :func:`worker_init`: the one DataLoader set-up (Ctrl-C handled by the
  main process only, one torch thread per worker) shared by ``pipeline``, ``gpu`` and ``finetune``.
"""

from __future__ import annotations

import signal
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from featurize import decodenotes, fastdecode
from featurize.images import ImageError, Preprocess, decode_bytes, read_bytes
from featurize.options import resolve_workers


def decode_for_model(path: str, preprocess: Preprocess) -> torch.Tensor:
    """Read, decode and preprocess one file to a (3, crop, crop) uint8 tensor.

    A JPEG much larger than the network's input goes through ``featurize.fastdecode`` (libjpeg's
    DCT-domain downscaling, the bomb rule on the decoded size), as on the torch-free path; every
    other file through ``featurize.images``. Raises ``ImageError`` with the reason.
    """
    data = read_bytes(path)
    if fastdecode.scales_down(data, preprocess.config()):
        try:
            return torch.from_numpy(fastdecode.preprocess_bytes(data, preprocess.config()))
        except fastdecode.DecodeError as e:
            raise ImageError(str(e)) from None
    return preprocess(decode_bytes(data))


class ImageReader(Dataset):
    """Map-style dataset of files -> (index, uint8 crop or None, error, decode seconds, notes).

    ``notes``: what the decoders said about the file (``featurize.decodenotes``), never printed.
    """

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t = time.perf_counter()
        with decodenotes.capture() as notes:
            try:
                img = decode_for_model(self.paths[i], self.preprocess)
                return i, img, "", time.perf_counter() - t, notes
            except ImageError as e:
                return i, None, str(e), time.perf_counter() - t, notes
            except Exception as e:  # a decoder bug on one file must not end the run
                return i, None, f"cannot decode ({type(e).__name__}: {e})", time.perf_counter() - t, notes


def _collate(items):
    ok = [(i, img) for i, img, *_ in items if img is not None]
    return {
        "index": [i for i, _ in ok],
        "images": torch.stack([img for _, img in ok]) if ok else None,
        "errors": [(i, err) for i, img, err, *_ in items if img is None],
        "decode_s": sum(it[3] for it in items),
        "notes": [(i, notes) for i, _, _, _, notes in items if notes],
    }


def _quiet_hangups(exc_type, exc, tb, _default=sys.excepthook):
    # A worker hands each decoded batch to the main process by passing a file descriptor
    # (multiprocessing's resource sharer thread). If Ctrl-C stops the main process mid
    # hand-over, that thread sees the connection drop and would print a traceback under the
    # one-line "Interrupted" message; the batch is re-decoded on resume, nothing is lost.
    if issubclass(exc_type, (EOFError, ConnectionError)):
        return
    _default(exc_type, exc, tb)


def worker_init(_):
    """DataLoader worker setup shared by extraction, GPU decoding and fine-tuning."""
    # Ctrl-C goes to the whole process group; only the main process handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _quiet_hangups
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, batch_size: int, workers: int, collate_fn, sampler=None,
                pin: bool = False) -> DataLoader:
    """The DataLoader every stage uses (extraction, GPU decoding, fine-tuning): ``workers`` decode
    processes (0: in this process) set up by :func:`worker_init`, 4 batches prefetched each."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      worker_init_fn=worker_init if workers else None, pin_memory=pin,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def reader(paths: list[str], preprocess: Preprocess, batch_size: int, workers: int, pin: bool = False):
    """Yield batches ``{index, images (uint8 NCHW), errors [(i, reason)], decode_s, notes [(i, [message])]}``
    in order."""
    workers = resolve_workers(workers)  # never more processes than cores (each holds a decoder's memory)
    yield from make_loader(ImageReader(paths, preprocess), batch_size, workers, _collate, pin=pin)
