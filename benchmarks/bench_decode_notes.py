"""What recording decoder messages costs, and what it keeps off stderr (issue 10, item 12).

Decodes every image of a folder with both readers -- the torch-free one (threads,
``featurize.fastdecode``) and the torch one (DataLoader worker processes, ``featurize.loading``) --
with the per-image capture on (as shipped) and off (``featurize.decodenotes`` replaced by no-ops:
messages go to stderr, as before the capture existed), alternating on/off in each round so that
load on a shared machine hits both alike. Counts the lines written to file descriptor 2 while
the reader ran, the images with notes and the decode wall time.

    python benchmarks/bench_decode_notes.py /tmp/pillow-images --rounds 3

(``/tmp/pillow-images``: Pillow's ``Tests/images``, e.g. ``git archive HEAD Tests/images`` of
python-pillow/Pillow.) Writes ``benchmarks/RESULTS_decode_notes.md`` and
``benchmarks/results_decode_notes.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featurize import decodenotes  # noqa: E402
from featurize.dataset import IMAGE_EXTENSIONS  # noqa: E402

_REAL = (decodenotes.capture, decodenotes.active, decodenotes.stderr_captured)


@contextlib.contextmanager
def _nothing():
    yield []


def _capture(on: bool) -> None:
    decodenotes.capture, decodenotes.active, decodenotes.stderr_captured = _REAL if on else (_nothing,) * 3


@contextlib.contextmanager
def _fd2_lines(out: dict):
    """Count the lines written to fd 2 during the block (Python's and C's alike)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out["stderr_lines"] = len(f.read().splitlines())


def one(reader: str, paths: list[str], on: bool, workers: int) -> dict:
    _capture(on)
    res: dict = {"reader": reader, "capture": "on" if on else "off"}
    t = time.perf_counter()
    ok = noted = 0
    with _fd2_lines(res):
        if reader == "lean (threads)":
            from featurize import fastdecode

            batches = fastdecode.reader(paths, {"resize": 256, "crop": 224, "interpolation": "bilinear"}, 32,
                                        workers)
        else:
            from featurize.backbones import get_backbone
            from featurize.loading import reader as torch_reader

            batches = torch_reader(paths, get_backbone("efficientnet_lite0", pretrained=False).preprocess, 32,
                                   workers)
        for b in batches:
            ok += len(b["index"])
            noted += len(b.get("notes", []))
    res.update(decode_s=round(time.perf_counter() - t, 3), ok=ok, with_notes=noted)
    _capture(True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    paths = sorted(str(p) for p in Path(a.folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    runs = []
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for reader in ("lean (threads)", "torch (processes)"):
            for on in ((True, False) if r % 2 else (False, True)):
                runs.append({"round": r + 1, **one(reader, paths, on, a.workers)})
                print(json.dumps(runs[-1]), flush=True)
    load.append(os.getloadavg()[0])
    rows = []
    for reader in ("lean (threads)", "torch (processes)"):
        for cap in ("off", "on"):
            rs = [x for x in runs if x["reader"] == reader and x["capture"] == cap]
            rows.append({"reader": reader, "capture": cap, "images": len(paths), "ok": rs[0]["ok"],
                         "with_notes": rs[0]["with_notes"],
                         "stderr_lines": f"{min(x['stderr_lines'] for x in rs)}-{max(x['stderr_lines'] for x in rs)}",
                         "decode_s_median": statistics.median(x["decode_s"] for x in rs)})
    cmd = "python benchmarks/bench_decode_notes.py " + " ".join(sys.argv[1:])
    meta = {"command": cmd, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
            "load_average": load, "workers": a.workers, "rounds": a.rounds}
    (ROOT / "benchmarks" / "results_decode_notes.json").write_text(json.dumps({**meta, "rows": rows, "runs": runs},
                                                                             indent=1))
    lines = ["# Decoder messages: recorded per image vs printed", "", f"`{cmd}` ({meta['machine']}, load average "
             f"{load[0]:.1f} -> {load[1]:.1f}; on/off alternate in each round, {a.workers} decode workers)", "",
             "| reader | capture | images | ok | with notes | stderr lines | decode s (median) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['reader']} | {r['capture']} | {r['images']} | {r['ok']} | {r['with_notes']} | {r['stderr_lines']} "
              f"| {r['decode_s_median']:.2f} |" for r in rows]
    (ROOT / "benchmarks" / "RESULTS_decode_notes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
