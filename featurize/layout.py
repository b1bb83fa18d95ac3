"""The cache folder's layout: the one place that knows where each kind of file lives.

    datasets/<folder>-<8 hex of its real path>.h5      the dataset index, one per image folder
    datasets/<folder>-<hash>.lock                      lockf'ed while an extract runs on that folder
    features/<space_id>/                               space.json + immutable HDF5 shards
    engines/<space_id>-<engine>/                       converted models of older versions (now once per
                                                       user: featurize.enginestore, engine_store_dir())
    heads/<folder>-<hash>/<space_id>/<head>.joblib     heads saved by `fit` (+ .json sidecar)
    reports/compare-<folder>-<hash>.csv|.json          `compare` leaderboards

and, outside the cache (in the working directory), fine-tuning runs: ``runs/ft-NNN/``.
    reports/audit-<folder>-<hash>.csv|.json|.html      `audit` findings
    reports/pixelhash-v<version>.npz                   perceptual hashes by content hash (`audit`)

Every module asks a :class:`Cache` for a path instead of joining strings. A ``Cache`` is
``os.PathLike``, so it can be passed wherever a cache folder is taken. Torch-free, no I/O
beyond listing folders.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from featurize.errors import UserError
from featurize.registry import RUN_META


def default_cache_dir() -> Path:
    """The cache directory used when ``--cache`` is not given: ``$FEATURIZE_CACHE`` or ``./cache``."""
    return Path(os.environ.get("FEATURIZE_CACHE", "cache"))


def engine_store_dir() -> Path:
    """Where converted engines are kept once per user, shared by every cache:
    ``$FEATURIZE_ENGINES``, else ``$XDG_CACHE_HOME/featurize/engines`` (``~/.cache/...``)."""
    if os.environ.get("FEATURIZE_ENGINES"):
        return Path(os.environ["FEATURIZE_ENGINES"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "featurize" / "engines"


def dataset_key(root: str | os.PathLike) -> str:
    """Return the file stem for a dataset folder: ``<folder name>-<8 hex of its real path>``."""
    real = os.path.realpath(root)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(real.rstrip("/")) or "root")[:40]
    return f"{name}-{hashlib.sha1(os.fsencode(real)).hexdigest()[:8]}"


class Cache(os.PathLike):
    """A cache folder (``None``: ``$FEATURIZE_CACHE`` or ``./cache``) and the paths of its layout."""

    KINDS = ("datasets", "features", "engines", "heads", "reports")

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(default_cache_dir() if root is None else root)

    @classmethod
    def of(cls, cache: "Cache | str | os.PathLike | None") -> "Cache":
        return cache if isinstance(cache, Cache) else cls(cache)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Cache) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __truediv__(self, part):  # Path(cache) / "x" keeps working for callers that still join
        return self.root / part

    def exists(self) -> bool:
        return self.root.is_dir()

    def looks_like_cache(self) -> bool:
        """True for an empty folder or one holding any of the layout's folders."""
        return not any(self.root.iterdir()) or any((self.root / d).is_dir() for d in self.KINDS[:4])

    # datasets
    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def index_path(self, data: str | os.PathLike) -> Path:
        """The index file of the image folder ``data``."""
        return self.datasets_dir / f"{dataset_key(data)}.h5"

    @staticmethod
    def of_index(index_path: str | os.PathLike) -> "Cache":
        """The cache a dataset index file (``<cache>/datasets/<key>.h5``) belongs to."""
        return Cache(Path(index_path).parent.parent)

    @staticmethod
    def lock_path(index_path: str | os.PathLike) -> Path:
        return Path(index_path).with_suffix(".lock")

    def index_files(self) -> list[Path]:
        """Every dataset index file, sorted by name."""
        return sorted(self.datasets_dir.glob("*.h5"))

    # feature spaces
    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def space_folder(self, space_id: str) -> Path:
        return self.features_dir / space_id

    def space_folders(self) -> list[Path]:
        return sorted(p for p in self.features_dir.glob("*/"))

    # heads
    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    def head_path(self, index_path: str | os.PathLike, space_id: str, head: str) -> Path:
        """Default file of a fitted head: ``heads/<dataset>/<space_id>/<head>.joblib``."""
        return self.heads_dir / Path(index_path).stem / space_id / f"{head}.joblib"

    def head_sidecars(self) -> list[Path]:
        """The ``.json`` files under ``heads/`` (head sidecars, and anything else written there)."""
        return sorted(self.heads_dir.rglob("*.json"))

    @staticmethod
    def of_head(head_file: str | os.PathLike) -> "Cache | None":
        """The cache a head file saved under ``<cache>/heads/`` belongs to, else None."""
        parents = Path(head_file).resolve().parents
        return Cache(parents[3]) if len(parents) > 3 and parents[2].name == "heads" else None

    # reports
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def compare_stem(self, index_path: str | os.PathLike) -> Path:
        """``reports/compare-<dataset>``: the leaderboard's .csv/.json stem."""
        return self.reports_dir / f"compare-{Path(index_path).stem}"

    def audit_stem(self, index_path: str | os.PathLike) -> Path:
        """``reports/audit-<dataset>``: the audit's .csv/.json/.html stem."""
        return self.reports_dir / f"audit-{Path(index_path).stem}"

    def pixelhash_path(self, version: int) -> Path:
        """``reports/pixelhash-v<version>.npz``: the audit's perceptual hashes, keyed by content hash."""
        return self.reports_dir / f"pixelhash-v{version}.npz"

# --------------------------------------------------------------------------- fine-tuning runs (./runs)


def next_run_dir(runs: str | os.PathLike = "runs") -> Path:
    """``runs/ft-NNN`` with the next free number."""
    runs = Path(runs)
    nums = [int(m.group(1)) for p in runs.glob("ft-*") if (m := re.fullmatch(r"ft-(\d+)", p.name))]
    return runs / f"ft-{max(nums, default=0) + 1:03d}"


def latest_run_dir(runs: str | os.PathLike = "runs") -> Path:
    """The highest-numbered ``runs/ft-NNN`` that has run metadata; ``UserError`` if none."""
    found = sorted((p for p in Path(runs).glob("ft-*") if (p / RUN_META).is_file()),
                   key=lambda p: int(p.name[3:]) if p.name[3:].isdigit() else -1)
    if not found:
        raise UserError(f"no fine-tuning run in {runs}/ to resume; start one with `finetune`")
    return found[-1]
