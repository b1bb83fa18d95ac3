"""The one error type users see.

A ``UserError`` means the input or environment is wrong in a way the user can fix;
the CLI prints its message on one line and exits with code 1. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    ``details`` (JSON-able) go into the CLI's ``--json`` error object next to the message,
    e.g. the files that were skipped and why.
    """

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the work done so far was saved; the message says what was kept and how to resume."""


# --------------------------------------------------------------------------- wording for Python callers
# Messages are written for the CLI (flags, commands in backticks); the Python API rewords them.

_BOOL_FLAGS = {"trust", "wait", "train-bn", "no-progress", "json"}


def _flag(m: re.Match) -> str:
    name, value = m.group(1), m.group(2)
    py = name.replace("-", "_")
    if name in _BOOL_FLAGS:
        return f"{py}=True"
    return f"{py}={value.strip()}" if value else py


def _call(m: re.Match) -> str:
    """`` `fit --head logreg DATA` `` -> `` `featurize.fit('DATA', head='logreg')` ``."""
    tokens, args, i = m.group(2).split(), [], 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--"):
            key = t[2:].replace("-", "_")
            if t[2:] in _BOOL_FLAGS or i + 1 == len(tokens):
                args.append(f"{key}=True")
            else:
                args.append(f"{key}={tokens[i + 1]!r}")
                i += 1
        else:
            args.insert(sum(not a.count("=") for a in args), repr(t))
        i += 1
    return f"`featurize.{m.group(1)}({', '.join(args)})`"


def python_wording(message: str) -> str:
    """Reword a CLI-worded message for a Python caller: `` `extract DATA` `` -> ``featurize.extract('DATA')``,
    ``--batch-size`` -> ``batch_size``, ``--weights PATH`` -> ``weights=PATH``, ``--trust`` -> ``trust=True``."""
    message = re.sub(r"`(extract|fit)((?: [^`]+)?)`", _call, message)
    parts = message.split("`")  # flags inside another command's backticks stay CLI flags
    parts[::2] = [re.sub(r"--([a-z][a-z0-9-]*)( [A-Z][A-Z_]*\b)?", _flag, p) for p in parts[::2]]
    return "`".join(parts)


@contextlib.contextmanager
def python_errors():
    """Within the block, a ``UserError`` is re-raised worded for Python (:func:`python_wording`)."""
    try:
        yield
    except UserError as e:
        raise type(e)(python_wording(str(e)), e.details) from None


#: errno values that mean the disk (or the user's quota, or the file size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def file_size_limit() -> int | None:
    """The most bytes this process may write to one file (``ulimit -f``), None when unlimited."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def disk_full_error(folder, err: OSError, need_bytes: int = 0) -> UserError:
    """The one line for a full disk: where, how much is free, how much more is needed; for a
    file too large (``EFBIG``), the limit that was hit: this process's (``ulimit -f``) or the
    file system's (FAT32 holds at most 4 GB per file)."""
    folder = os.fspath(folder)
    saved = "then re-run: the work saved so far is kept"
    if err.errno == errno.EFBIG:
        limit = file_size_limit()
        if limit is not None:
            size = f"{limit / 2**20:.1f} MB" if limit >= 2**20 else f"{limit / 2**10:.0f} KB"
            return UserError(f"a cache file in {folder} would exceed this process's file size limit (ulimit -f: "
                             f"{size}); raise it (ulimit -f unlimited), {saved}")
        return UserError(f"a cache file in {folder} is larger than its file system allows (FAT32: 4 GB per file); "
                         f"use --cache on another file system, {saved}")
    try:
        free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))).free
    except OSError:
        free = 0
    need_mb = max(1, -(-int(need_bytes * 1.2 + 2**20) // 2**20))  # with room for HDF5's metadata
    what = os.strerror(err.errno).lower() if err.errno else "no space left"
    return UserError(f"{what} on the disk of {folder} ({free / 2**20:.1f} MB free); free {need_mb} MB or more, or "
                     f"use --cache elsewhere, {saved}")
