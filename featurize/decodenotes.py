"""What decoders say about one image, recorded as data instead of printed (torch-free).

Pillow and the C libraries under it talk while decoding odd files, and all of it went straight to
stderr: 400-500 lines on Pillow's own test images (``Tests/images``), a wall of noise in place of
the summary. Four channels, each routed here while :func:`capture` is active in the decoding
thread:

- Python warnings (``UserWarning: Tag data larger than file``, ``Corrupt EXIF data``, ...);
- Pillow's loggers (``More samples per pixel than can be decoded``, written by logging's
  last-resort handler);
- libtiff's error handler (``TIFFFetchNormalTag: ...``, ``TIFFFillStrip: Read error ...``),
  written from C to file descriptor 2: replaced through ``ctypes`` by one that records;
- C libraries that ``fprintf(stderr)`` (torchvision's libjpeg: ``Corrupt JPEG data: 4
  extraneous bytes``): :func:`stderr_captured` points fd 2 at a file for the duration of one call.

Decoding runs in threads (the torch-free reader) or in processes (DataLoader workers), so
nothing here uses ``warnings.catch_warnings``, which swaps process-wide state and is not
thread-safe (concurrent decodes left every later warning of the process ignored). Instead one
set of hooks is installed while any capture is active (reference-counted) and each message goes
to the list of the thread that caused it; outside a capture every channel prints as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import warnings

#: Messages kept per image (the first ones, duplicates dropped) and characters per message.
MAX_NOTES = 8
MAX_CHARS = 240

_local = threading.local()


def note(message) -> bool:
    """Record ``message`` for the image this thread is decoding; False when none is (not recorded)."""
    notes = getattr(_local, "notes", None)
    if notes is None:
        return False
    text = " ".join(str(message).split())[:MAX_CHARS]
    if text and text not in notes and len(notes) < MAX_NOTES:
        notes.append(text)
    return True


@contextlib.contextmanager
def capture():
    """Collect what decoders say in this thread during the block; yields the list of messages."""
    notes: list[str] = []
    outer = getattr(_local, "notes", None)
    _local.notes = notes
    _HOOKS.acquire()
    try:
        yield notes
    finally:
        _HOOKS.release()
        _local.notes = outer
        if outer is not None:  # a nested capture's messages belong to the outer image too
            for n in notes:
                note(n)


@contextlib.contextmanager
def active():
    """Keep the hooks installed for the block (a reader's lifetime), so that per-image captures do
    not install and remove them image by image."""
    _HOOKS.acquire()
    try:
        yield
    finally:
        _HOOKS.release()


# --------------------------------------------------------------------------- Python warnings

_NOT_ABOUT_THE_IMAGE = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
# Every occurrence is recorded, not only the first per code location ("default" action); only for
# the decoders' modules and ours, where they are about the image being decoded.
_DECODER_MODULES = re.compile(r"(PIL|featurize|torchvision)(\.|$)")


def _show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, _NOT_ABOUT_THE_IMAGE) or not note(message):
        _HOOKS.shown(message, category, filename, lineno, file, line)


class _Hooks:
    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0
        self.saved_show = warnings.showwarning
        self.filters: list[tuple] = []

    def shown(self, *args):
        self.saved_show(*args)

    def acquire(self):
        with self.lock:
            self.users += 1
            if self.users == 1:
                self._install()

    def release(self):
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self._uninstall()

    def _install(self):
        _install_libtiff_handler()
        _install_log_handler()
        if warnings.showwarning is not _show:
            self.saved_show = warnings.showwarning
            warnings.showwarning = _show
        from PIL import Image

        # Our own size rule (fastdecode.MAX_PIXELS) decides about bombs; Pillow's warning counts the
        # file's pixels, not the decode's. Filters are matched first to last.
        # torchvision >= 0.29 warns on every decode that its decoders are deprecated: about code.
        self.filters = [("ignore", None, Image.DecompressionBombWarning, None, 0),
                        ("ignore", None, DeprecationWarning, _DECODER_MODULES, 0)] + [
            ("always", None, c, _DECODER_MODULES, 0) for c in (UserWarning, RuntimeWarning)]
        for f in reversed(self.filters):
            warnings.filterwarnings(f[0], category=f[2], module=f[3].pattern if f[3] else "")
        self.filters = list(warnings.filters[:len(self.filters)])  # the entries as the module stores them

    def _uninstall(self):
        if warnings.showwarning is _show:
            warnings.showwarning = self.saved_show
        for f in self.filters:  # only ours: filters added meanwhile stay
            with contextlib.suppress(ValueError):
                warnings.filters.remove(f)


_HOOKS = _Hooks()


def _after_fork_in_child():
    # A lock held by another thread at fork time would stay held in the child forever (its
    # holder does not exist there): a DataLoader worker would hang on its first image.
    _HOOKS.lock = threading.Lock()
    global _fd_lock
    _fd_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- Pillow's loggers


class _LogNotes(logging.Handler):
    """On the ``PIL`` logger: a record logged while this thread decodes becomes a note. Any other
    is printed as logging would have without this handler (its last-resort handler), if no other
    handler takes it."""

    def emit(self, record):
        if note(record.getMessage()):
            return
        logger = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return  # someone configured logging: their handlers have it
            logger = logger.parent if logger.propagate else None
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


_LOG_HANDLER = _LogNotes(logging.WARNING)


def _install_log_handler():
    pil = logging.getLogger("PIL")
    if _LOG_HANDLER not in pil.handlers:
        pil.addHandler(_LOG_HANDLER)


# --------------------------------------------------------------------------- libtiff

_TIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_tiff: dict = {}


def _text(b) -> str:
    return b.decode("utf-8", "replace") if b else ""


def _on_tiff_error(module, fmt, ap):
    try:
        buf = ctypes.create_string_buffer(1024)
        _tiff["vsnprintf"](buf, len(buf), fmt, ap)
        msg = (f"{_text(module)}: " if module else "") + _text(buf.value)
        if not note(msg):  # libtiff's own format: "module: message.\n"
            sys.stderr.write(msg + ".\n")
    except Exception:  # never raise into C
        pass


def _install_libtiff_handler():
    """Point the libtiff that Pillow uses at :func:`_on_tiff_error` (once per process).

    Pillow silences libtiff's warnings itself but not its errors, which libtiff prints to fd 2.
    Where the library or ``vsnprintf`` cannot be found (a static build), messages print as before.
    """
    if "handler" in _tiff:
        return
    _tiff["handler"] = None
    try:
        from PIL import _imaging

        lib = ctypes.CDLL(_imaging.__file__)  # dlsym searches its dependencies: Pillow's libtiff
        setter = lib.TIFFSetErrorHandler
        libc = ctypes.CDLL(None)
        vsnprintf = libc.vsnprintf
    except (OSError, AttributeError, ImportError):
        return
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    setter.argtypes, setter.restype = [_TIFF_HANDLER], ctypes.c_void_p
    _tiff["vsnprintf"] = vsnprintf
    _tiff["handler"] = _TIFF_HANDLER(_on_tiff_error)  # kept alive: C holds a pointer to it
    setter(_tiff["handler"])


# --------------------------------------------------------------------------- fd 2

_fd_lock = threading.Lock()
_spool: dict = {}


def _spool_fd() -> int:
    """A scratch file of this process (a forked child must not share its parent's)."""
    if _spool.get("pid") != os.getpid():
        import tempfile

        _spool.update(pid=os.getpid(), file=tempfile.TemporaryFile())
    return _spool["file"].fileno()


@contextlib.contextmanager
def stderr_captured():
    """Record what C code writes to file descriptor 2 during the block as this thread's notes.

    fd 2 is one per process: only one thread redirects it at a time; another thread that asks
    meanwhile runs its block unredirected (it is never pointed at someone else's file).
    """
    if getattr(_local, "notes", None) is None or not _fd_lock.acquire(blocking=False):
        yield
        return
    try:
        spool = _spool_fd()
        os.ftruncate(spool, 0)
        os.lseek(spool, 0, os.SEEK_SET)
        with contextlib.suppress(Exception):
            sys.stderr.flush()  # Python's own buffered text stays on the real stderr
        saved = os.dup(2)
        try:
            os.dup2(spool, 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        os.lseek(spool, 0, os.SEEK_SET)
        for line in os.read(spool, 1 << 16).decode("utf-8", "replace").splitlines():
            note(line)
    finally:
        _fd_lock.release()
