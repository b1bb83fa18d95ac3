"""Shared fixtures: tiny real images made on the fly and a real subprocess CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"


def make_image(path: Path, seed: int, size=(40, 48), fmt: str | None = None, color=None) -> Path:
    """Write a small random RGB image (distinct bytes per seed); format from the suffix."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    if color is not None:  # class-dependent tint so heads can learn something
        arr = (arr // 4 + np.array(color, dtype=np.uint8) // 4 * 3).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes=("cat", "dog"), per_class=4, seed=0, ext=".jpg", split=None) -> Path:
    """``root/<class>/<i>.jpg`` (or ``root/<split>/<class>/...`` when ``split`` is a list)."""
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 10)]
    s = seed
    for sp in (split or [None]):
        for ci, c in enumerate(classes):
            for i in range(per_class):
                folder = root / sp / c if sp else root / c
                make_image(folder / f"{i}{ext}", s, color=colors[ci % len(colors)])
                s += 1
    return root


def run_cli(*args, env=None, timeout=300, check=None):
    """Run ``python cli.py ARGS`` as a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    return proc


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session", autouse=True)
def engine_store(tmp_path_factory):
    """One engine store for the whole session (in-process and subprocess runs alike): tests never
    touch ~/.cache, and a backbone is converted at most once per session."""
    store = tmp_path_factory.mktemp("engine-store")
    old = os.environ.get("FEATURIZE_ENGINES")
    os.environ["FEATURIZE_ENGINES"] = str(store)
    yield store
    if old is None:
        os.environ.pop("FEATURIZE_ENGINES", None)
    else:
        os.environ["FEATURIZE_ENGINES"] = old


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"
