"""Small file helpers every writer shares (torch-free): crash-safe replacement and file digests.

Every file featurize writes is written under a temporary name in the same folder, flushed to
disk, renamed over the final name (atomic on POSIX) and the folder entry synced, so a reader
or a ``kill -9`` sees the old file or the new one, never half of one. Temporary names end in
``.tmp-<pid>`` so leftovers of dead writers can be recognised and removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes (weights files, saved heads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def temp_name(final: Path) -> Path:
    """``.<name>.tmp-<pid>`` beside ``final``."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(final: str | os.PathLike, before_rename=None):
    """Yield a temporary path to write; on success it is fsync'ed and renamed over ``final``.

    ``before_rename()`` runs between the fsync and the rename (the crash tests' hook). On an
    exception the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if before_rename:
            before_rename()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(final: str | os.PathLike, text: str) -> None:
    """Replace ``final`` with ``text`` crash-safely (see :func:`replacing`)."""
    with replacing(final) as tmp:
        tmp.write_text(text)
