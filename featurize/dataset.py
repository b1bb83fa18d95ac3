"""Scan an image folder into entries (path, label, split, size, mtime) without decoding.

Layouts:
- ``data/<class>/**/<image>``: labelled by the top-level folder (nested folders inside a
  class are just organisation, as in torchvision's ImageFolder);
- ``data/{train,val,test}/<class>/**/<image>``: a split layout (``valid``/``validation``
  count as ``val``);
- a flat folder of images: unlabelled.
Hidden files and folders are skipped; non-image files (e.g. ATTRIBUTION.txt) are counted
as ignored. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featurize.cache import not_regular_reason
from featurize.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Entry:
    path: str  # relative to the root, with forward slashes
    label: str
    split: str
    size: int
    mtime_ns: int
    error: str = ""  # set when the file cannot even be stat'ed (broken symlink, ...)


@dataclass
class Scan:
    root: str
    layout: str
    entries: list[Entry]
    ignored: int


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: str) -> tuple[list[tuple[str, os.DirEntry]], int]:
    """Return ``[(relative path, DirEntry)]`` of candidate image files and the count of others.

    Sorted, hidden files and folders skipped, symlinks followed except into a folder that is
    already on the path (a symlink loop would list every image again under a wrong label),
    unreadable folders skipped (as ``os.walk`` does). ``os.scandir`` entries let ``scan`` stat
    relative to the open folder.
    """
    found: list[tuple[str, os.DirEntry]] = []
    ignored = 0

    def key(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def visit(folder: str, prefix: str, ancestors: frozenset) -> None:
        nonlocal ignored
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            return
        dirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                dirs.append(e)
            elif is_image_name(e.name):
                found.append((prefix + e.name, e))
            else:
                ignored += 1
        for d in dirs:
            try:
                k = key(d.stat())
            except OSError:
                continue
            if k not in ancestors:
                visit(d.path, prefix + d.name + "/", ancestors | {k})

    visit(root, "", frozenset({key(os.stat(root))}))
    return found, ignored


def scan(root: str | os.PathLike) -> Scan:
    """Scan ``root`` and return its layout and entries.

    Raises ``UserError`` if the folder is missing, not a folder, or holds no images.
    """
    root = str(root)
    if not os.path.exists(root):
        raise UserError(f"folder {root} does not exist; pass the folder that holds your images")
    if not os.path.isdir(root):
        raise UserError(f"{root} is a file, not a folder; pass the folder that holds your images")
    files, ignored = _walk(root)
    if not files:
        raise UserError(f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "put images in <folder>/<class>/ or directly in the folder")
    parts = [f.split("/") for f, _ in files]
    tops = {p[0] for p in parts if len(p) > 1}
    is_split = bool(tops) and all(t.lower() in SPLIT_NAMES for t in tops)
    layout = "split" if is_split else ("folder" if tops else "flat")
    entries = []
    for (rel, dirent), p in zip(files, parts):
        if is_split:
            split = SPLIT_NAMES[p[0].lower()] if len(p) > 1 else ""
            label = p[1] if len(p) > 2 else ""
        else:
            split, label = "", (p[0] if len(p) > 1 else "")
        try:
            st = dirent.stat()  # follows symlinks, like os.stat
            # a FIFO or device named like an image would block or never end when read
            entries.append(Entry(rel, label, split, st.st_size, st.st_mtime_ns, error=not_regular_reason(st.st_mode)))
        except FileNotFoundError:
            entries.append(Entry(rel, label, split, -1, -1, error="broken symlink"))
        except OSError as e:
            entries.append(Entry(rel, label, split, -1, -1, error=f"cannot stat ({e.strerror})"))
    return Scan(os.path.realpath(root), layout, entries, ignored)


def list_images(paths: list[str]) -> list[str]:
    """Expand files and folders (recursively) into image file paths, in order.

    Raises ``UserError`` for a path that does not exist.
    """
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files, _ = _walk(p)
            out.extend(str(Path(p) / f) for f, _ in files)
        elif os.path.exists(p) or os.path.islink(p):
            out.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders")
    return out
