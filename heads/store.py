"""Saving and loading fitted heads, with provenance and a trust check.

Format: a joblib file ``{"format": "featurize-head", "meta": {...}, "estimator": ...}`` plus a
readable ``<name>.json`` sidecar holding the same ``meta`` (reports and listings read that,
never the pickle).

Why a digest registry: joblib/pickle files can run arbitrary code when loaded. Every head this
tool writes has its SHA-256 recorded in ``$FEATURIZE_HOME/trusted_heads.json`` (default
``~/.featurize``), outside any folder users exchange. ``load_head`` hashes the file first
and refuses an unknown digest (a file from elsewhere, or one modified since it was written)
unless the caller passes ``trust=True`` (CLI ``--trust``), which records it. We chose this
over skops because it needs no extra dependency and keeps the custom estimators loadable.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from featurize.errors import UserError
from featurize.files import replacing, sha256_file, write_text

FORMAT = "featurize-head"
FORMAT_VERSION = 1


def trust_file() -> Path:
    """Return the registry of trusted head digests (``$FEATURIZE_HOME/trusted_heads.json``)."""
    return Path(os.environ.get("FEATURIZE_HOME", Path.home() / ".featurize")) / "trusted_heads.json"


file_digest = sha256_file  # the SHA-256 hex digest of a file's bytes


def _read_trust() -> dict:
    try:
        reg = json.loads(trust_file().read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        reg = None
    if not isinstance(reg, dict) or not all(isinstance(v, dict) for v in reg.values()):
        raise UserError(f"{trust_file()} is damaged; delete it (heads will then need --trust once)")
    return reg


def _trust(digest: str, path, meta_digest: str | None = None) -> None:
    reg = _read_trust()
    reg[digest] = {"path": str(Path(path).resolve()), "trusted_at": time.time()}
    if meta_digest:  # the sidecar's digest too: `report` reads only the sidecar
        reg[digest]["meta_sha256"] = meta_digest
    write_text(trust_file(), json.dumps(reg, indent=1, sort_keys=True))


def versions() -> dict:
    """Library versions recorded in every head (a head may not load across major sklearn versions)."""
    import h5py
    import joblib
    import numpy
    import sklearn

    return {"python": platform.python_version(), "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "joblib": joblib.__version__, "h5py": h5py.__version__}


def save_head(path, estimator, meta: dict) -> dict:
    """Write ``estimator`` with ``meta`` to ``path`` (+ ``.json`` sidecar) and trust its digest.

    Takes the file path, the fitted estimator and a JSON-able provenance dict (must hold
    ``space_id`` and ``classes``); returns ``{"path", "meta_path", "sha256"}``.
    """
    import joblib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), "saved_at": time.time()}
    with replacing(path) as tmp:
        joblib.dump({"format": FORMAT, "meta": meta, "estimator": estimator}, tmp, compress=3)
    digest = file_digest(path)
    meta_path = path.with_suffix(".json")
    write_text(meta_path, json.dumps({**meta, "sha256": digest}, indent=1, default=str))
    _trust(digest, path, file_digest(meta_path))
    return {"path": str(path), "meta_path": str(meta_path), "sha256": digest}


def read_meta(path) -> dict:
    """Return a head's provenance from its ``.json`` sidecar without unpickling anything."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.exists():
        raise UserError(f"{meta_path} is missing; re-run `fit` to write the head and its metadata")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} cannot be read ({type(e).__name__}: {e}); re-run `fit`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is not a head's metadata (a JSON object); re-run `fit`")
    return meta


def read_trusted_meta(path, trust: bool = False) -> dict:
    """The sidecar of a head, under the same trust rule as :func:`load_head`.

    ``report`` reads only the sidecar (never the pickle), yet it puts the sidecar's text into
    a web page and reads the image files it names: a head from elsewhere is refused unless
    ``trust`` (CLI ``--trust``), as is a sidecar changed after `fit` wrote it or one that
    belongs to another head file. With ``trust`` the pair is recorded as trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no head file at {path}; run `fit` first or pass --model PATH")
    meta = read_meta(path)
    digest, meta_digest = file_digest(path), file_digest(path.with_suffix(".json"))
    entry = _read_trust().get(digest)
    if not trust:
        if entry is None:
            raise UserError(f"refusing to report on {path}: its SHA-256 {digest[:16]}... was not recorded by this tool "
                            "(a head from elsewhere or modified); pass --trust if you trust its source")
        if entry.get("meta_sha256", meta_digest) != meta_digest or meta.get("sha256", digest) != digest:
            raise UserError(f"refusing to report on {path}: {path.with_suffix('.json').name} was changed after `fit` "
                            "wrote it or belongs to another head; re-run `fit`, or pass --trust")
    elif entry is None or entry.get("meta_sha256") != meta_digest:
        _trust(digest, path, meta_digest)
    return meta


def check_space(meta: dict, space_id: str, backbone: str | None = None, path="head") -> None:
    """Raise ``UserError`` when the head was fit on a different feature space than ``space_id``."""
    if meta.get("space_id") != space_id:
        raise UserError(
            f"{path} was fit on feature space {meta.get('space_id')} (backbone {meta.get('backbone')}), "
            f"not on {space_id} (backbone {backbone or '?'}); re-run `fit` with --backbone {backbone or space_id} "
            f"or predict with --backbone {meta.get('backbone')}"
        )


def load_head(path, expect_space: str | None = None, expect_backbone: str | None = None, trust: bool = False):
    """Load a head written by :func:`save_head`; returns ``(estimator, meta)``.

    Raises ``UserError`` when the file is missing, its digest is not trusted (pass
    ``trust=True`` only for files from a source you trust: loading runs pickle code), it is
    not a featurize head, or it was fit on another feature space than ``expect_space``.
    """
    import joblib

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no head file at {path}; run `fit` first or pass --model PATH")
    digest = file_digest(path)
    trusted = digest in _read_trust()
    if not trusted:
        if not trust:
            raise UserError(
                f"refusing to load {path}: its SHA-256 {digest[:16]}... was not recorded by this tool "
                f"(a file from elsewhere or modified; loading pickles can run code); pass --trust if you trust its source"
            )
        # A head travels with its sidecar, which names the digest `fit` wrote: a mismatch is a
        # damaged or altered file, and unpickling a damaged one can exhaust memory.
        sidecar = path.with_suffix(".json")
        try:
            written = json.loads(sidecar.read_text()).get("sha256")
        except (OSError, ValueError):
            written = None
        if written and written != digest:
            raise UserError(f"refusing to load {path}: it does not match the SHA-256 in {sidecar.name} (damaged or "
                            "altered after `fit` wrote it); re-run `fit` or get an intact copy")
    try:
        obj = joblib.load(path)
    except Exception as e:
        raise UserError(f"{path} could not be loaded ({type(e).__name__}: {e}); re-run `fit`") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a featurize head file; write one with `fit --out {path}`")
    if not trusted:
        _trust(digest, path)  # only once it loaded: a broken file is never remembered as trusted
    meta = obj["meta"]
    if expect_space is not None:
        check_space(meta, expect_space, expect_backbone, path)
    return obj["estimator"], meta


def cache_for_head(cache, meta: dict):
    """The cache whose feature space embeds a head's inputs: ``cache`` when it holds the head's
    space, else the cache the head was fit in (its sidecar names its dataset index there) when that
    one does, so ``fit --out models/h.joblib --cache DIR`` then ``predict --model models/h.joblib``
    works without repeating ``--cache``. Returns ``(cache, moved)``; raises ``UserError`` when
    neither holds the space (new images could not be embedded)."""
    from featurize.cache import FeatureSpace
    from featurize.layout import Cache

    cache = Cache.of(cache)
    sid = meta["space_id"]
    if FeatureSpace(cache, sid).exists():
        return cache, False
    if meta.get("index_path"):
        home = Cache.of_index(meta["index_path"])
        if FeatureSpace(home, sid).exists():
            return home, True
    backbone = meta.get("backbone", "?")
    raise UserError(f"the cache {cache.root} has no feature space {sid}, which this head embeds with (backbone "
                    f"{backbone}), nor has the cache it was fit in; pass --cache with the folder the head was fit "
                    f"with, or run `extract DATA --backbone {backbone} --cache {cache.root}` first")
