"""Inference engines: uint8 image batches in, float32 (N, D) embeddings out.

- ``TorchEngine`` is the reference engine on every device (CPU, CUDA, MPS): PyTorch eager,
  channels_last, autocast to the chosen precision (bf16/fp16 on GPUs, bf16 on CPUs with
  AVX512-BF16/AMX, fp32 otherwise).
- ``OpenVINOEngine`` is the optimised CPU engine (a dependency on x86-64 and arm64): the
  frozen module is converted once to OpenVINO IR with the normalisation folded in (it takes
  the uint8 batch directly), stored once per user in the engine store
  (``featurize.enginestore``: ``~/.cache/featurize/engines/<space_id>-openvino-<version>/``,
  shared by every cache) and compiled with the bf16 inference hint on CPUs that run bf16
  natively. Later runs, in any cache, read the stored IR and OpenVINO's compiled blob
  instead of converting again; with the engine stored, ``featurize.fastpath`` extracts
  without importing torch at all.
  It runs in throughput mode: several inference streams, one batch in flight per stream
  (``map``), so the model never waits for the main process to hand over the next batch.

Every engine has ``map(batches)``: ``(tag, uint8 batch)`` pairs in, ``(tag, float32 (N, D))``
out in the same order; the extraction pipeline feeds it. ``engine(batch)`` is the one-batch
shortcut.

An engine never moves vectors to another feature space: the feature-space id (backbone,
weights, preprocessing, precision) does not include the engine, so every engine must give
vectors within ``COSINE_TOLERANCE`` of the fp32 PyTorch reference on real photos
(tests/test_engines.py). A freshly converted OpenVINO model is checked against the fp32
reference on a built-in test pattern; one that misses the tolerance is not used.
The engine and precision that produced a space's vectors are recorded in the dataset
index (``extractions``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from featurize import enginestore
from featurize.errors import UserError
from featurize.options import ENGINES, cpu_cores  # noqa: F401  (cpu_cores re-exported)

#: Minimum cosine similarity between any engine's vector and the fp32 PyTorch vector of the
#: same image for the two to count as the same feature space.
COSINE_TOLERANCE = 0.995


def default_engine_threads() -> int:
    """Inference threads for the CPU engine: all cores (the decode workers share them).

    OpenVINO's throughput mode splits them into streams (2 x 1 thread on 2 cores); the
    knob sweep in benchmarks/RESULTS.md found no better split of the 2 cores here.
    """
    return cpu_cores()


class Engine:
    """What every engine shares: ``map`` over batches, one at a time unless overridden."""

    def map(self, batches):
        """Yield ``(tag, embeddings)`` for each ``(tag, uint8 batch)`` of ``batches``, in order."""
        for tag, images in batches:
            yield tag, self(images)


class TorchEngine(Engine):
    """The reference engine: PyTorch eager, channels_last, autocast to the chosen precision."""

    name = "torch"

    def __init__(self, backbone, device: torch.device, precision: str):
        self.backbone, self.device, self.precision = backbone, device, precision
        self.model = backbone.model.to(device).to(memory_format=torch.channels_last)
        from featurize.backbones import PRECISIONS

        self.dtype = PRECISIONS[precision]
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) (CPU, pinned CPU, or already on the device) -> float32 (N, D) numpy."""
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            x = self.backbone.preprocess.normalize(x).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision != "fp32"):
                out = self.model(x)
            return out.float().cpu().numpy()


# --------------------------------------------------------------------------- OpenVINO


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _test_pattern(size: int, n: int = 2) -> torch.Tensor:
    """A deterministic photo-like uint8 batch (smooth colour gradients, edges, texture)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for k in range(n):
        r = 0.5 + 0.5 * torch.sin(6.0 * xx + k)
        gch = 0.5 + 0.5 * torch.cos(4.0 * yy * (k + 1))
        b = ((xx * 8 + k).floor() % 2) * 0.6 + 0.2 * yy
        img = torch.stack([r, gch, b]) + 0.05 * torch.randn(3, size, size, generator=g)
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@contextlib.contextmanager
def _no_telemetry():
    """Convert without OpenVINO's usage telemetry.

    ``ov.convert_model`` reports usage to Intel from a child process unless the user opted out
    (``opt_in_out --opt_out``). featurize converts on the user's behalf, so it does not report:
    offline it only waits on the network, and a Ctrl-C printed the child's traceback. Swaps in
    OpenVINO's own no-op stub for the duration; if those modules move, conversion runs as is.
    """
    try:
        from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils
    except ImportError:
        yield
        return
    saved = convert_impl.tm, telemetry_utils.tm
    convert_impl.tm = telemetry_utils.tm = telemetry_stub
    try:
        yield
    finally:
        convert_impl.tm, telemetry_utils.tm = saved


_openvino_core = enginestore.openvino_core  # one Core per process (see there)


@contextlib.contextmanager
def _hold_ctrl_c():
    """Hold Ctrl-C until the block ends (a few seconds of conversion), then raise it.

    Interrupted inside OpenVINO's converter (C++ behind pybind11) the process can abort
    ("terminate called after throwing ...") instead of stopping cleanly.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


class OpenVINOEngine(Engine):
    """OpenVINO on CPU, uint8 input with normalisation folded in, bf16 where the CPU has it."""

    name = "openvino"

    def __init__(self, backbone, precision: str, folder: str | os.PathLike | None = None,
                 threads: int | None = None, check: bool = True):
        """``folder``: the engine's folder in the store (``enginestore.engine_dir``), None to keep nothing."""
        if precision not in ("fp32", "bf16"):
            raise UserError(f"--engine openvino runs fp32 or bf16, not {precision}")
        self.backbone, self.precision, self.device = backbone, precision, torch.device("cpu")
        self.threads = threads or default_engine_threads()
        self.folder = Path(folder) if folder else None
        self.converted = False
        t = time.perf_counter()
        if self.folder is not None and self._stored():
            self.runner = enginestore.load_stored(self.folder, precision, self.threads, backbone.dim)
        else:
            self._convert_and_store(check)
        self.convert_seconds = time.perf_counter() - t
        self.compiled, self.in_flight, self.requests = self.runner.compiled, self.runner.in_flight, self.runner.requests

    # -- conversion and the engine store

    def _meta(self) -> dict:
        import openvino as ov

        return {"openvino": ov.__version__, "torch": torch.__version__, "backbone": self.backbone.name,
                "weights_digest": self.backbone.weights_digest, "preprocess": self.backbone.preprocess.config()}

    def _stored(self) -> bool:
        """A published engine built from this backbone (same weights and preprocessing) is stored."""
        if not enginestore.is_complete(self.folder):
            return False
        try:
            meta = json.loads((self.folder / enginestore.META).read_text())
        except (OSError, ValueError):
            return False
        mine = self._meta()
        return all(meta.get(k) == mine[k] for k in ("backbone", "weights_digest", "preprocess"))

    def _convert_and_store(self, check: bool) -> None:
        """Convert, compile, check against the reference, then publish atomically in the store
        (when another process published first, its engine is used next time; this one runs now)."""
        model = self._convert()
        self.converted = True
        tmp = enginestore.new_temp_dir(self.folder) if self.folder is not None else None
        try:
            self.runner = enginestore.CompiledEngine(model, self.precision, self.threads, self.backbone.dim, tmp)
            self.compiled, self.in_flight, self.requests = \
                self.runner.compiled, self.runner.in_flight, self.runner.requests
            if check:
                self._check_against_reference()
            if tmp is not None:
                import openvino as ov

                ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
                (tmp / enginestore.META).write_text(json.dumps(self._meta(), indent=1))
                enginestore.publish(tmp, self.folder)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _convert(self):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        pp = self.backbone.preprocess
        model = self.backbone.model.to(memory_format=torch.contiguous_format)
        example = pp.normalize(_test_pattern(pp.crop, 1))
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _no_telemetry(), \
                _hold_ctrl_c():
            warnings.simplefilter("ignore")  # tracer deprecation chatter
            # Trace once without torch's trace check: the check re-runs the model several times and
            # was 3/4 of the conversion (39 s -> 12 s on a loaded 2-core machine; same graph, and the
            # converted engine is checked against the fp32 reference below anyway).
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            om = ov.convert_model(traced, example_input=example)
        om.reshape({om.inputs[0]: ov.PartialShape([-1, 3, pp.crop, pp.crop])})
        # Fold the per-batch normalisation into the graph: the engine takes the uint8 batch.
        ppp = PrePostProcessor(om)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32) \
            .mean([m * 255.0 for m in pp.mean]).scale([s * 255.0 for s in pp.std])
        ppp.output().tensor().set_element_type(ov.Type.f32)
        return ppp.build()

    def _check_against_reference(self) -> None:
        x = _test_pattern(self.backbone.preprocess.crop, 2)
        ref = TorchEngine(self.backbone, torch.device("cpu"), "fp32")(x)
        self.backbone.model.to(memory_format=torch.contiguous_format)
        cos = float(cosine_rows(self(x), ref).min())
        self.check_cosine = cos
        if cos < COSINE_TOLERANCE:
            raise EngineMismatch(f"OpenVINO {self.precision} vectors of {self.backbone.name} reach cosine {cos:.4f} "
                                 f"to the fp32 PyTorch reference, below the {COSINE_TOLERANCE} tolerance")

    # -- inference

    def __call__(self, images) -> np.ndarray:
        """uint8 (N, 3, H, W) -> float32 (N, D) numpy (one batch, one stream)."""
        return self.runner(images)

    def map(self, batches):
        """Keep up to ``in_flight`` batches running (one per stream); yield results in order."""
        self.runner.in_flight, self.runner.requests = self.in_flight, self.requests
        return self.runner.map(batches)


class EngineMismatch(UserError):
    """An optimised engine's vectors differ from the reference beyond ``COSINE_TOLERANCE``."""


def engine_folder(cache, space_id: str, engine: str) -> Path | None:
    """The stored engine's folder: once per user in the engine store, whatever the cache."""
    if space_id is None or engine != "openvino":
        return None
    return enginestore.engine_dir(space_id)


class LazyEngine:
    """Builds the engine on its first batch, so a run that is all cache hits never loads it."""

    def __init__(self, factory, predicted_name: str):
        self._factory, self._engine, self._predicted = factory, None, predicted_name

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self._factory()
        return self._engine

    @property
    def name(self) -> str:
        return self._engine.name if self._engine is not None else self._predicted

    def __call__(self, images):
        return self.engine(images)

    def map(self, batches):
        return self.engine.map(batches)


def _auto_openvino(backbone, device: torch.device, precision: str) -> bool:
    # The 16-wide test model runs in microseconds on PyTorch; converting it would cost more
    # than it saves (and slow every test), so auto keeps it on the reference engine.
    return (device.type == "cpu" and precision in ("fp32", "bf16") and backbone.name != "tiny"
            and openvino_available())


def make_engine(backbone, device: torch.device, precision: str, engine: str = "auto", cache_dir=None,
                space_id: str | None = None, threads: int | None = None, lazy: bool = False):
    """Return the inference engine for ``engine`` (auto|torch|openvino).

    ``auto`` picks OpenVINO on CPU when it is installed (it is 2-3x faster than PyTorch
    there; not for the ``tiny`` test model), PyTorch otherwise; if OpenVINO cannot convert this backbone or misses the
    tolerance, ``auto`` warns and uses PyTorch while ``openvino`` raises ``UserError``.
    ``cache_dir`` (the ``Cache``; unused since engines are stored once per user)/``space_id`` key the
    converted model on disk. ``lazy`` defers building
    to the first batch (options are still validated now).
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use auto, torch or openvino")
    if lazy:
        if engine == "openvino" and device.type != "cpu":
            raise UserError(f"--engine openvino runs on the CPU; use --device cpu or --engine torch on {device.type}")
        if engine == "openvino" and not openvino_available():
            raise UserError("--engine openvino needs OpenVINO: `pip install openvino` (no wheel for this "
                            "platform? use --engine torch)")
        predicted = engine if engine != "auto" else (
            "openvino" if _auto_openvino(backbone, device, precision) else "torch")
        return LazyEngine(lambda: make_engine(backbone, device, precision, engine, cache_dir, space_id, threads),
                          predicted)
    if engine == "torch":
        return TorchEngine(backbone, device, precision)
    if engine == "openvino":
        if device.type != "cpu":
            raise UserError(f"--engine openvino runs on the CPU; use --device cpu or --engine torch on {device.type}")
        if not openvino_available():
            raise UserError("--engine openvino needs OpenVINO: `pip install openvino` (no wheel for this "
                            "platform? use --engine torch)")
        try:
            return OpenVINOEngine(backbone, precision, engine_folder(cache_dir, space_id, "openvino"), threads)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"OpenVINO cannot run {backbone.name} ({type(e).__name__}: {str(e)[:200]}); "
                            "use --engine torch") from None
    # auto
    if _auto_openvino(backbone, device, precision):
        try:
            return OpenVINOEngine(backbone, precision, engine_folder(cache_dir, space_id, "openvino"), threads)
        except Exception as e:
            print(f"warning: OpenVINO engine unavailable for {backbone.name} ({type(e).__name__}: "
                  f"{str(e)[:200]}); using PyTorch", file=sys.stderr)
    return TorchEngine(backbone, device, precision)
