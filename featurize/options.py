"""Validation of user-supplied options, shared by the library functions behind every command.

Each check raises a one-line ``UserError`` naming the option, the bad value and what is
allowed, so a bad value never reaches scikit-learn, numpy or a DataLoader (whose errors are
tracebacks). Torch-free: ``heads`` and ``fit`` use it too. The option names are the CLI's
(``--folds``); library callers see the same names, which match the keyword arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from featurize.errors import UserError

MAX_SEED = 2**32 - 1  # numpy's RandomState, which scikit-learn seeds from it
ENGINES = ("auto", "torch", "openvino")


def check_engine(engine) -> str:
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use auto, torch or openvino")
    return engine


def cpu_cores() -> int:
    """Cores this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def int_at_least(name: str, value, low: int, high: int | None = None, what: str = "") -> int:
    """Return ``value`` if it is an int in ``[low, high]``; else raise a one-line ``UserError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise UserError(f"{name} must be {rng}{what}, not {value!r}")
    return value


def number_in(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` if it is a finite number in the given interval; else raise ``UserError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not inside:  # NaN fails every comparison
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise UserError(f"{name} must be in {lo}{low}, {high}{hi}, not {value!r}")
    return v


def check_seed(seed) -> int:
    return int_at_least("--seed", seed, 0, MAX_SEED)


def check_folds(folds) -> int:
    return int_at_least("--folds", folds, 2, what=" (outer cross-validation needs two folds at least)")


def check_n_jobs(n_jobs) -> int | None:
    """None (one job), -1 (every core) or a positive count."""
    if n_jobs is None or n_jobs == -1:
        return n_jobs
    return int_at_least("--n-jobs", n_jobs, 1, what=" (or -1 for every core)")


def check_batch_size(batch_size) -> int:
    return int_at_least("--batch-size", batch_size, 1)


def resolve_workers(workers, default_max: int = 8) -> int:
    """Decode worker processes: None means one per core (at most ``default_max``); more workers
    than cores only cost memory (each holds a decoder and its buffers), so larger values are
    capped to the cores."""
    cores = cpu_cores()
    if workers is None:
        return max(1, min(cores, default_max))
    int_at_least("--workers", workers, 0, what=" (0 decodes in the main process)")
    return min(workers, cores)


def check_cache_dir(cache) -> Path:
    """Refuse a ``--cache`` path that exists but is not a folder, or sits under a file."""
    return check_out_dir(cache, "--cache")


def check_out_dir(path, option: str = "--out") -> Path:
    """A folder to create or reuse: refuse one that is a file or sits under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; pass a folder path")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a folder; pass another path")
            break
    return path


def check_out_file(path, option: str = "--out") -> Path:
    """A file to write: refuse a folder, or a path whose parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file path (e.g. {path}/head.joblib)")
    check_out_dir(path.parent, option)
    return path


def command_prefix(argv0: str | None = None) -> list[str]:
    """The start of a command line the user can paste: ``python PATH/cli.py`` when they ran the
    script (PATH as they typed it), else ``featurize``, the console script (what a pip install has,
    and what the Python API's callers have on their path)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return ["python", argv0] if os.path.basename(argv0) == "cli.py" else ["featurize"]
