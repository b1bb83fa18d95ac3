"""The unfreeze stage: LP-FT fine-tuning that starts from the fitted linear probe.

LP-FT (Kumar et al., ICLR 2022): fine-tuning from a random head distorts the pretrained
features while the head is still wrong; starting from the converged linear probe avoids
that. So the classifier layer is initialised from the probe (its scaling folded into the
weights, see ``heads.linear``) and epoch 0 -- the model before any step -- scores what the
probe scored. Epoch 0 is also a checkpoint candidate, so the kept (best) model is never
worse than the probe on validation.

A run folder (``runs/ft-NNN/``) holds:

    featurize_run.json          config, data split, history, which files are current
    split.json                  the exact train / val / test files (val is never trained on)
    backbone-eNNN.safetensors   best backbone weights (keys of ``Backbone.model``): the run
                                folder is itself a backbone (``featurize.backbones``)
    classifier-eNNN.safetensors best classifier layer (weight, bias)
    state-eNNN.safetensors      last complete epoch: model + AdamW state, for ``--resume``

Every file is written under a temporary name and renamed; the JSON is written last and names
the current files, so a ``kill -9`` at any moment leaves the last complete epoch intact.
Augmentation and shuffling are seeded per (seed, epoch, image), so a resumed run repeats
the uninterrupted run's numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from featurize import cache as fc
from featurize.backbones import PRECISIONS, Backbone, get_backbone, resolve_device, resolve_precision
from featurize.errors import Interrupted, UserError
from featurize.files import replacing, write_text
from featurize.images import ImageError, read_image
from featurize.layout import latest_run_dir, next_run_dir  # noqa: F401  (re-exported)
from featurize.loading import make_loader, reader
from featurize.options import check_batch_size, check_out_dir, check_seed, int_at_least, number_in, resolve_workers
from featurize.pipeline import tune_allocator
from featurize.registry import RUN_META

SPLIT_FILE = "split.json"


@dataclass
class FinetuneConfig:
    """Everything that changes the training numbers (recorded in the run folder)."""

    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of all optimiser steps spent on a linear warm-up
    batch_size: int = 32
    unfreeze: str = "all"  # all | last:N
    train_bn: bool = False
    patience: int = 3  # epochs without a better val score before stopping
    keep: str = "best"  # best: the epoch with the best val score (epoch 0 = the probe) | last: the last epoch
    seed: int = 0
    init: str = "probe"  # probe | random
    class_weight: str | None = None  # None | "balanced": loss weights n / (k * n_c), best epoch by balanced accuracy
    val_fraction: float = 0.15
    max_train: int | None = None  # stratified subset of the training rows
    max_steps: int | None = None  # cap on steps per epoch (smoke tests)
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    workers: int | None = None

    def __post_init__(self) -> None:
        """Refuse unusable values with one line each (they reached torch or numpy as tracebacks,
        or silently meant something else: --patience -1 stopped at epoch 0)."""
        int_at_least("--epochs", self.epochs, 1)
        int_at_least("--batch-size", self.batch_size, 1)
        number_in("--lr", self.lr, 0, 10, low_open=True)
        number_in("--weight-decay", self.weight_decay, 0, 10)
        number_in("--warmup", self.warmup, 0, 1, high_open=True)
        number_in("--val-fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        int_at_least("--patience", self.patience, 0)
        check_seed(self.seed)
        for name, v in (("--max-train", self.max_train), ("--max-steps", self.max_steps)):
            if v is not None:
                int_at_least(name, v, 1)
        if self.workers is not None:
            resolve_workers(self.workers)
        if self.init not in ("probe", "random"):
            raise UserError(f"--init {self.init!r}: use probe or random")
        if self.keep not in ("best", "last"):
            raise UserError(f"--keep {self.keep!r}: use best or last")
        parse_unfreeze(self.unfreeze)


# --------------------------------------------------------------------------- data


@dataclass
class DataPlan:
    """Which files train, validate and test; labels are indices into ``classes``."""

    root: str
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, class index)
    val: list[tuple[str, int]]
    test: list[tuple[str, int]] = field(default_factory=list)
    val_source: str = "val"  # "val" split or "holdout" carved from train

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DataPlan":
        return cls(d["root"], d["classes"], [tuple(x) for x in d["train"]], [tuple(x) for x in d["val"]],
                   [tuple(x) for x in d.get("test", [])], d.get("val_source", "val"))


def _stratified_take(codes: np.ndarray, fraction: float | None, count: int | None, rng) -> np.ndarray:
    """Boolean mask choosing about ``fraction`` (or ``count`` in total) of each class, at least one each."""
    take = np.zeros(len(codes), bool)
    classes, counts = np.unique(codes, return_counts=True)
    for c, n in zip(classes, counts):
        k = round(n * fraction) if fraction is not None else round(count * n / len(codes))
        idx = np.flatnonzero(codes == c)
        take[rng.permutation(idx)[:max(1, min(k, n - 1 if fraction is not None else n))]] = True
    return take


def plan_data(root: str, paths, labels, splits, val_fraction: float = 0.15, seed: int = 0,
              max_train: int | None = None) -> DataPlan:
    """Split labelled rows into train / val / test for fine-tuning (torch-free).

    Takes the dataset root and per-row relative paths, labels and split names (``''`` when
    the folder has no split). The ``val`` split validates when there is one; otherwise a
    stratified hold-out of ``val_fraction`` is carved from the training rows (seeded, and
    recorded in the run folder). A ``test`` split is only scored at the end. Raises
    ``UserError`` when a class has too few images to both train and validate.
    """
    paths, labels, splits = (np.asarray(a).astype(str) for a in (paths, labels, splits))
    keep = labels != ""
    paths, labels, splits = paths[keep], labels[keep], splits[keep]
    is_train = np.isin(splits, ["train", ""])
    classes = sorted(set(labels[is_train].tolist()))
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class(es) to train on; fine-tuning needs at least 2 class folders")
    code = {c: i for i, c in enumerate(classes)}
    rows = lambda m: [(p, code[lab]) for p, lab in zip(paths[m], labels[m]) if lab in code]  # noqa: E731
    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(is_train)
    if (splits == "val").any():
        val_mask, source = splits == "val", "val"
    else:
        codes = np.array([code[x] for x in labels[train_idx]])
        counts = np.bincount(codes, minlength=len(classes))
        small = [f"{classes[i]} ({n})" for i, n in enumerate(counts) if n < 2]
        if small:
            raise UserError(f"too few images for a validation hold-out: class {', '.join(small)}; each class needs "
                            "at least 2 images (one to train, one to validate), or add a val/ split")
        hold = _stratified_take(codes, val_fraction, None, rng)
        val_mask = np.zeros(len(paths), bool)
        val_mask[train_idx[hold]] = True
        train_idx = train_idx[~hold]
        source = "holdout"
    if max_train is not None and max_train < len(train_idx):
        codes = np.array([code[x] for x in labels[train_idx]])
        train_idx = train_idx[_stratified_take(codes, None, max_train, rng)]
    train_mask = np.zeros(len(paths), bool)
    train_mask[train_idx] = True
    return DataPlan(root, classes, rows(train_mask), rows(val_mask), rows(splits == "test"), source)


class TrainImages(Dataset):
    """Decode + augment (uint8) one training image; its randomness is seeded by (seed, epoch, index)."""

    def __init__(self, root: str, rows, transform, seed: int):
        self.root, self.rows, self.transform, self.seed, self.epoch = root, rows, transform, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, label = self.rows[i]
        try:
            img = read_image(os.path.join(self.root, path))
        except ImageError:
            return None  # recorded as a skipped file by extract already; training just drops it
        # seeding here (not per worker) makes the crop independent of worker count and order
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.transform(img), label


def _collate_train(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _train_loader(plan: DataPlan, bb: Backbone, cfg: FinetuneConfig, epoch: int, workers: int):
    ds = TrainImages(plan.root, plan.train, bb.preprocess.train_transform(), cfg.seed)
    ds.epoch = epoch
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
    return make_loader(ds, cfg.batch_size, workers, _collate_train, sampler=order)


# --------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """The backbone (pooled features) followed by one linear classifier layer."""

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # The backbone runs under autocast like extraction does; the head runs in fp32 on the
        # float features, exactly as the probe saw the cached vectors.
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype not in (None, torch.float32)):
            f = self.backbone(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(f.float())


def find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """Return the backbone's blocks in forward order and the name of the stack holding them.

    The stack is ``layer1..layer4`` for ResNets, otherwise the largest ``Sequential`` /
    ``ModuleList`` by parameter count (timm ``blocks``, torchvision ``features``, ViT
    ``encoder.layers``). Plain ``Sequential`` stages inside it are flattened one level so a
    block is one residual/MBConv block; children without parameters (ReLU, pooling) are not
    counted.
    """
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        blocks = [(f"layer{i}.{n}", m) for i in range(1, 5) for n, m in getattr(model, f"layer{i}").named_children()]
        return blocks, "layer1..layer4"
    best = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2:
            n = sum(p.numel() for p in m.parameters())
            if best is None or n > best[0]:
                best = (n, name, m)
    if best is None:
        raise UserError(f"cannot find the blocks of {type(model).__name__}; use --unfreeze all")
    _, stack_name, stack = best
    blocks = []
    for cname, child in stack.named_children():
        full = f"{stack_name}.{cname}" if stack_name else cname
        if type(child) is nn.Sequential:
            blocks += [(f"{full}.{n}", c) for n, c in child.named_children()]
        else:
            blocks.append((full, child))
    return [(n, b) for n, b in blocks if any(True for _ in b.parameters())], stack_name


def parse_unfreeze(spec: str) -> int | None:
    """``all`` -> None, ``last:N`` -> N (N >= 0; 0 trains the classifier only)."""
    if spec == "all":
        return None
    m = re.fullmatch(r"last:(\d+)", spec or "")
    if not m:
        raise UserError(f"--unfreeze {spec!r} is not valid; use all or last:N (e.g. last:2)")
    return int(m.group(1))


def apply_unfreeze(model: FinetuneModel, spec: str, backbone_name: str = "backbone") -> dict:
    """Make the chosen part of the backbone trainable (the classifier always is); return a summary.

    ``last:N`` trains the last N blocks plus the layers after the block stack (e.g. the
    final 1x1 conv and norm), which sit between those blocks and the classifier. Raises
    ``UserError`` when N exceeds the number of blocks.
    """
    n = parse_unfreeze(spec)
    bb = model.backbone
    for p in bb.parameters():
        p.requires_grad_(n is None)
    n_blocks = None
    if n is not None:
        blocks, stack = find_blocks(bb)
        n_blocks = len(blocks)
        if n > n_blocks:
            raise UserError(f"--unfreeze last:{n} exceeds the depth of {backbone_name} ({n_blocks} blocks in "
                            f"{stack}); use last:1..last:{n_blocks} or all")
        chosen = blocks[len(blocks) - n:] if n else []
        for _, b in chosen:
            for p in b.parameters():
                p.requires_grad_(True)
        if n:  # parameters registered after the last block (head conv, final norm)
            in_stack = {id(p) for _, b in blocks for p in b.parameters()}
            last_block = max(i for i, (_, p) in enumerate(bb.named_parameters()) if id(p) in in_stack)
            for i, (_, p) in enumerate(bb.named_parameters()):
                if i > last_block and id(p) not in in_stack:
                    p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"unfreeze": spec, "blocks": n_blocks, "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters())}


def set_train_mode(model: nn.Module, train_bn: bool) -> None:
    """Train mode for the trainable part only; BatchNorm keeps its running statistics unless ``train_bn``.

    Frozen BN (the Keras fine-tuning guide's advice) normalises with the pretrained
    statistics, so small fine-tuning batches cannot wreck them. Fully frozen modules stay in
    eval mode (no dropout/stochastic depth in a part that does not learn).
    """
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not train_bn:
            m.eval()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on weight matrices/kernels, not on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


# --------------------------------------------------------------------------- files


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def _save_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- evaluation


def _batches(plan_root: str, rows, bb: Backbone, batch_size: int, workers: int):
    paths = [os.path.join(plan_root, p) for p, _ in rows]
    labels = np.array([y for _, y in rows])
    for b in reader(paths, bb.preprocess, batch_size, workers):
        if b["images"] is not None:
            yield b["images"], torch.as_tensor(labels[b["index"]]), b["index"]


def evaluate(model: FinetuneModel, bb: Backbone, root: str, rows, device, dtype, batch_size=64, workers=0) -> dict:
    """Accuracy and mean cross-entropy over ``rows`` with the backbone's eval preprocessing."""
    model.eval()
    loss, truth, pred = 0.0, [], []
    with torch.inference_mode():
        for images, y, _ in _batches(root, rows, bb, batch_size, workers):
            x = bb.preprocess.normalize(images.to(device)).contiguous(memory_format=torch.channels_last)
            logits = model(x, dtype)
            y = y.to(device)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            truth.append(y.cpu().numpy())
            pred.append(logits.argmax(1).cpu().numpy())
    n = sum(len(t) for t in truth)
    if not n:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "loss": float("nan"), "n": 0}
    truth, pred = np.concatenate(truth), np.concatenate(pred)
    recalls = [float((pred[truth == c] == c).mean()) for c in np.unique(truth)]
    return {"accuracy": float((truth == pred).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "loss": loss / n, "n": n}


def logits_for(model: FinetuneModel, bb: Backbone, root: str, rows, device, dtype, batch_size=64) -> np.ndarray:
    """Raw logits for ``rows`` (unreadable files left out), for tests and predict."""
    model.eval()
    out = []
    with torch.inference_mode():
        for images, _, _ in _batches(root, rows, bb, batch_size, 0):
            x = bb.preprocess.normalize(images.to(device)).contiguous(memory_format=torch.channels_last)
            out.append(model(x, dtype).float().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, len(model.head.bias)))


# --------------------------------------------------------------------------- training


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _score_key(cfg: FinetuneConfig) -> str:
    """Balanced weights select epochs by balanced accuracy, as `fit --class-weight balanced` selects C."""
    return "balanced_accuracy" if cfg.class_weight == "balanced" else "accuracy"


def _better(a: dict, b: dict | None, key: str = "accuracy") -> bool:
    """Higher val score wins; an equal score is broken by lower val loss."""
    return b is None or (a[key], -a["loss"]) > (b[key], -b["loss"])


def class_weights(plan: DataPlan, cfg: FinetuneConfig) -> torch.Tensor | None:
    """Cross-entropy weights n / (k * n_c) over the training rows (scikit-learn's "balanced"), or None."""
    if cfg.class_weight is None:
        return None
    if cfg.class_weight != "balanced":
        raise UserError(f"--class-weight must be 'balanced' or 'none', got {cfg.class_weight!r}")
    counts = np.bincount([y for _, y in plan.train], minlength=len(plan.classes)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(plan.classes) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _build(meta: dict) -> tuple[Backbone, FinetuneModel, torch.device, str, torch.dtype]:
    cfg = FinetuneConfig(**meta["config"])
    # every weight is loaded from the run's own files, so the base is built without its download
    bb = get_backbone(meta["base_backbone"], weights=meta.get("base_weights"), pretrained=False)
    device = resolve_device(cfg.device)
    prec = meta["precision"]
    dtype = PRECISIONS[prec]
    model = FinetuneModel(bb.model, bb.dim, len(meta["classes"]))
    return bb, model, device, prec, dtype


def _check_space(bb: Backbone, precision: str, space_id: str) -> None:
    sid = fc.space_id_for(bb.space_config(precision))
    if sid != space_id:
        raise UserError(f"the backbone {bb.name} now builds feature space {sid}, but the cache and probe are for "
                        f"{space_id} (its weights changed since `extract`); re-run `extract` and `fit`")


def start_run(plan: DataPlan, space_info: dict, cfg: FinetuneConfig, out: str | os.PathLike,
              probe: dict | None = None) -> Path:
    """Create a run folder: config, the data split and the initial model (epoch 0 = the probe).

    ``space_info`` is the cached feature space's ``space.json`` (its ``build`` names the
    backbone and weights to rebuild). ``probe`` is ``{"W", "b", "classes", ...metrics}``
    from ``heads.linear`` (required unless ``cfg.init == "random"``). Raises ``UserError``
    for bad options or a probe whose classes differ from the data's.
    """
    class_weights(plan, cfg)  # validates --class-weight before anything is built
    out = check_out_dir(out)
    if (out / RUN_META).exists():
        raise UserError(f"{out} already holds a run; resume it with `finetune --resume {out}` or pick another --out")
    build = space_info.get("build", {})
    device = resolve_device(cfg.device)
    prec = space_info["precision"] if cfg.precision == "auto" else resolve_precision(cfg.precision, device)
    bb = get_backbone(build.get("backbone", space_info["backbone"]), weights=build.get("weights"))
    _check_space(bb, space_info["precision"], space_info["space_id"])
    model = FinetuneModel(bb.model, bb.dim, len(plan.classes))
    info = apply_unfreeze(model, cfg.unfreeze, bb.name)  # validates last:N before anything is written
    torch.manual_seed(cfg.seed)
    model.head.reset_parameters()
    if cfg.init == "probe":
        if probe is None:
            raise UserError("fine-tuning starts from a linear probe: run `fit --head logreg` first "
                            "(or `finetune --init random`)")
        if list(probe["classes"]) != list(plan.classes):
            raise UserError(f"the probe's classes {probe['classes']} differ from the data's {plan.classes}; "
                            "re-run `fit --head logreg` on this dataset")
        with torch.no_grad():
            model.head.weight.copy_(torch.as_tensor(np.asarray(probe["W"]), dtype=torch.float32))
            model.head.bias.copy_(torch.as_tensor(np.asarray(probe["b"]), dtype=torch.float32))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / SPLIT_FILE, plan.to_json())
    meta = {
        "format": "featurize-finetune", "base_backbone": build.get("backbone", space_info["backbone"]),
        "base_weights": build.get("weights"), "base_name": bb.name, "base_space_id": space_info["space_id"],
        "preprocess": bb.preprocess.config(), "precision": prec, "classes": plan.classes, "dim": bb.dim,
        "config": asdict(cfg), "unfreeze_info": info, "val_source": plan.val_source,
        "n_train": len(plan.train), "n_val": len(plan.val), "n_test": len(plan.test),
        "probe": {k: v for k, v in (probe or {}).items() if k not in ("W", "b")},
        "epochs_done": -1, "history": [], "best": None, "bad_epochs": 0, "status": "started",
        "created_at": time.time(), "train_seconds": 0.0,
    }
    _save_tensors(out / "init.safetensors", model.state_dict())
    meta["init_weights"] = "init.safetensors"
    _write_json(out / RUN_META, meta)
    return out


def _checkpoint(out: Path, meta: dict, model: FinetuneModel, opt, epoch: int, improved: bool) -> None:
    """Write this epoch's files, then the JSON that names them, then drop the superseded files."""
    old = {meta.get(k) for k in ("state_file", "backbone_weights", "classifier_weights")} - {None}
    tensors, extra = _save_optimizer(opt)
    state = f"state-e{epoch:03d}.safetensors"
    _save_tensors(out / state, {**{f"model.{k}": v for k, v in model.state_dict().items()}, **tensors},
                  {"epoch": epoch})
    meta["state_file"], meta["optimizer_groups"] = state, extra["param_groups"]
    if improved:
        bw, cw = f"backbone-e{epoch:03d}.safetensors", f"classifier-e{epoch:03d}.safetensors"
        _save_tensors(out / bw, model.backbone.state_dict(), {"epoch": epoch})
        _save_tensors(out / cw, model.head.state_dict(), {"epoch": epoch})
        meta["backbone_weights"], meta["classifier_weights"] = bw, cw
    meta["epochs_done"] = epoch
    _write_json(out / RUN_META, meta)
    keep = {meta.get(k) for k in ("state_file", "backbone_weights", "classifier_weights")}
    for name in old - keep:
        (out / name).unlink(missing_ok=True)


@dataclass
class _Session:
    """One call of :func:`train`: the run's files and what was built from them."""

    out: Path
    meta: dict  # the run's featurize_run.json, updated and written at every checkpoint
    plan: DataPlan
    cfg: FinetuneConfig
    bb: Backbone
    model: FinetuneModel
    device: torch.device
    prec: str
    dtype: torch.dtype
    opt: torch.optim.Optimizer
    scaler: object
    workers: int
    weight: torch.Tensor | None
    steps_per_epoch: int
    log: object
    resumed_from: int
    t_wall: float

    def evaluate(self, rows) -> dict:
        return evaluate(self.model, self.bb, self.plan.root, rows, self.device, self.dtype, 2 * self.cfg.batch_size,
                        self.workers)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


def _open(out: Path, log) -> _Session:
    """Read a run folder and build its model and optimizer at the last complete epoch (or the start)."""
    if not (out / RUN_META).is_file():
        raise UserError(f"{out} is not a fine-tuning run folder (no {RUN_META}); pass a runs/ft-NNN folder to --resume")
    meta = json.loads((out / RUN_META).read_text())
    if meta["status"] == "finished":
        raise UserError(f"{out} has already finished; start a new run with `finetune`")
    plan = DataPlan.from_json(json.loads((out / SPLIT_FILE).read_text()))
    cfg = FinetuneConfig(**meta["config"])
    tune_allocator()
    t_wall = time.perf_counter()
    bb, model, device, prec, dtype = _build(meta)
    apply_unfreeze(model, cfg.unfreeze, bb.name)
    resumed_from = meta["epochs_done"]
    if resumed_from >= 0:
        sd = _load_tensors(out / meta["state_file"])
        model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    else:
        model.load_state_dict(_load_tensors(out / meta["init_weights"]))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    if resumed_from >= 0:
        _load_optimizer(opt, {k: v.to(device) for k, v in sd.items()}, meta["optimizer_groups"])
    steps_per_epoch = math.ceil(len(plan.train) / cfg.batch_size)
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    weight = class_weights(plan, cfg)
    return _Session(out, meta, plan, cfg, bb, model, device, prec, dtype, opt,
                    torch.amp.GradScaler(device.type) if prec == "fp16" else None,
                    resolve_workers(cfg.workers),
                    weight.to(device) if weight is not None else None, steps_per_epoch, log, resumed_from, t_wall)


def _best(epoch: int, m: dict) -> dict:
    return {"epoch": epoch, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "loss": m["loss"]}


def _epoch0(s: _Session) -> None:
    """Score the initial model (the probe) before any step; it is the first checkpoint candidate."""
    m = s.evaluate(s.plan.val)
    s.meta["history"].append({"epoch": 0, "train_loss": None, "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                              "val_balanced_accuracy": m["balanced_accuracy"], "images_per_second": None,
                              "seconds": 0.0})
    s.meta["best"] = _best(0, m)
    if s.plan.test:
        s.meta["test_epoch0"] = s.evaluate(s.plan.test)
    print(f"epoch 0/{s.cfg.epochs}  ({s.cfg.init} init)  val_loss {m['loss']:.4f}  val_acc {m['accuracy']:.4f}",
          file=s.log, flush=True)
    _checkpoint(s.out, s.meta, s.model, s.opt, 0, True)


def _train_epoch(s: _Session, epoch: int) -> tuple[float, int]:
    """One pass over the training images (at most ``steps_per_epoch`` steps); returns (loss sum, images)."""
    cfg, warmup = s.cfg, int(round(s.cfg.warmup * s.total_steps))
    torch.manual_seed(cfg.seed * 1009 + epoch)  # dropout / stochastic depth, if any
    set_train_mode(s.model, cfg.train_bn)
    loss_sum, seen, step = 0.0, 0, (epoch - 1) * s.steps_per_epoch
    for i, batch in enumerate(_train_loader(s.plan, s.bb, cfg, epoch, s.workers)):
        if i >= s.steps_per_epoch:
            break
        if batch is None or (cfg.train_bn and len(batch[1]) < 2):
            continue
        images, y = batch
        for g in s.opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step + i, s.total_steps, warmup)
        x = s.bb.preprocess.normalize(images.to(s.device)).contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(s.model(x, s.dtype), y.to(s.device), weight=s.weight)
        s.opt.zero_grad(set_to_none=True)
        if s.scaler:
            s.scaler.scale(loss).backward()
            s.scaler.step(s.opt)
            s.scaler.update()
        else:
            loss.backward()
            s.opt.step()
        loss_sum += float(loss.detach()) * len(y)
        seen += len(y)
    return loss_sum, seen


def _end_epoch(s: _Session, epoch: int, loss_sum: float, seen: int, t0: float, t_train: float) -> None:
    """Validate, keep the best epoch, log one line, and checkpoint."""
    meta, cfg = s.meta, s.cfg
    m = s.evaluate(s.plan.val)
    secs = time.perf_counter() - t0
    # keep=last: a validation set drawn from the training distribution cannot see a shifted test set
    # (chest X-ray: its 5 % hold-out kept the probe where the trained epoch generalised better)
    improved = cfg.keep == "last" or _better(m, meta["best"], _score_key(cfg))
    if improved:
        meta["best"], meta["bad_epochs"] = _best(epoch, m), 0
    else:
        meta["bad_epochs"] += 1
    row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_loss": m["loss"],
           "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
           "images_per_second": seen / t_train if t_train else None, "seconds": secs}
    meta["history"].append(row)
    meta["train_seconds"] += secs
    done = [h["seconds"] for h in meta["history"] if h["epoch"] > 0]
    eta = (sum(done) / len(done)) * (cfg.epochs - epoch)
    print(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  val_loss {m['loss']:.4f}  "
          f"val_acc {m['accuracy']:.4f}  val_bal_acc {m['balanced_accuracy']:.4f}{' *best' if improved else ''}  "
          f"{row['images_per_second']:.1f} img/s  {secs:.0f}s  ETA {_fmt_s(eta)}", file=s.log, flush=True)
    _checkpoint(s.out, meta, s.model, s.opt, epoch, improved)


def _finish(s: _Session) -> dict:
    """Score the kept model on the test split once, mark the run finished; return the summary."""
    meta, cfg = s.meta, s.cfg
    best = meta["best"]
    if s.plan.test:
        s.model.backbone.load_state_dict(_load_tensors(s.out / meta["backbone_weights"]))
        s.model.head.load_state_dict(_load_tensors(s.out / meta["classifier_weights"]))
        meta["test_best"] = s.evaluate(s.plan.test)
    meta["status"] = "finished"
    meta["finished_at"] = time.time()
    _write_json(s.out / RUN_META, meta)
    eps = [h["images_per_second"] for h in meta["history"] if h.get("images_per_second")]
    return {
        "run": str(s.out), "base_backbone": meta["base_name"], "classes": meta["classes"], "init": cfg.init,
        "unfreeze": meta["unfreeze_info"], "val_source": meta["val_source"], "n_train": meta["n_train"],
        "n_val": meta["n_val"], "n_test": meta["n_test"], "epochs_done": meta["epochs_done"],
        "best_epoch": best["epoch"], "best_val_accuracy": best["accuracy"],
        "epoch0_val_accuracy": meta["history"][0]["val_accuracy"], "probe": meta["probe"],
        "test_accuracy_best": meta.get("test_best", {}).get("accuracy"),
        "test_accuracy_epoch0": meta.get("test_epoch0", {}).get("accuracy"),
        "test_balanced_accuracy_best": meta.get("test_best", {}).get("balanced_accuracy"),
        "test_balanced_accuracy_epoch0": meta.get("test_epoch0", {}).get("balanced_accuracy"),
        "class_weight": cfg.class_weight,
        "history": meta["history"], "resumed_from_epoch": s.resumed_from if s.resumed_from >= 0 else None,
        "train_seconds": round(meta["train_seconds"], 1),
        "wall_seconds_this_call": round(time.perf_counter() - s.t_wall, 1),
        "images_per_second": round(float(np.mean(eps)), 1) if eps else None, "precision": s.prec,
        "device": str(s.device), "early_stopped": bool(meta.get("early_stopped")),
    }


def train(out: str | os.PathLike, log=None) -> dict:
    """Train (or continue) the run in ``out`` to its end; return the JSON-able summary.

    Resumes from the last complete epoch when the run has one. Prints one line per epoch
    (loss, val accuracy, images/s, ETA) to ``log`` (stderr by default). Ctrl-C keeps the
    last complete epoch and raises ``featurize.errors.Interrupted`` saying how to resume.
    """
    s = _open(Path(out), log or sys.stderr)
    if s.resumed_from >= 0:
        print(f"resuming {s.out} after epoch {s.resumed_from}", file=s.log)
    else:
        _epoch0(s)
    try:
        for epoch in range(s.meta["epochs_done"] + 1, s.cfg.epochs + 1):
            if s.meta["bad_epochs"] >= s.cfg.patience:  # also right after a resume of a stopped run
                s.meta["early_stopped"] = True
                print(f"early stop: no better val score for {s.cfg.patience} epochs", file=s.log)
                break
            t0 = time.perf_counter()
            loss_sum, seen = _train_epoch(s, epoch)
            _end_epoch(s, epoch, loss_sum, seen, t0, time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise Interrupted(f"Interrupted: epoch {s.meta['epochs_done']} is saved; resume with "
                          f"`finetune --resume {s.out}`") from None
    return _finish(s)


# --------------------------------------------------------------------------- predict


def load_run_model(run_dir: str | os.PathLike, device: str = "auto"):
    """Build the best model of a run folder; returns ``(backbone, model, device, dtype, classes)``."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_META).is_file():
        raise UserError(f"{run_dir} is not a fine-tuning run folder (no {RUN_META})")
    meta = json.loads((run_dir / RUN_META).read_text())
    if not meta.get("classifier_weights"):
        raise UserError(f"{run_dir} has no checkpoint yet; wait for its first epoch or `finetune --resume {run_dir}`")
    bb = get_backbone(str(run_dir))  # the run folder is a backbone: base + fine-tuned weights
    dev = resolve_device(device)
    dtype = PRECISIONS[meta["precision"]]
    if dev.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    model = FinetuneModel(bb.model, bb.dim, len(meta["classes"]))
    model.head.load_state_dict(_load_tensors(run_dir / meta["classifier_weights"]))
    return bb, model.to(dev).to(memory_format=torch.channels_last).eval(), dev, dtype, meta["classes"]


def predict_run(run_dir: str | os.PathLike, paths: list[str], batch_size: int = 32, device: str = "auto",
                workers: int | None = None) -> tuple[np.ndarray, list[str], list[str], list[tuple[str, str]]]:
    """Classify image files end to end with a run's fine-tuned backbone and classifier.

    Returns ``(probs (n_ok, C) float32, classes, ok_paths, errors [(path, reason)])``;
    unreadable files are reported in ``errors``, never raised.
    """
    check_batch_size(batch_size)
    workers = resolve_workers(workers)
    bb, model, dev, dtype, classes = load_run_model(run_dir, device)
    probs, ok, errors = [], [], []
    with torch.inference_mode():
        for b in reader(list(paths), bb.preprocess, batch_size, workers):
            errors += [(paths[i], reason) for i, reason in b["errors"]]
            if b["images"] is None:
                continue
            x = bb.preprocess.normalize(b["images"].to(dev)).contiguous(memory_format=torch.channels_last)
            probs.append(torch.softmax(model(x, dtype), dim=1).float().cpu().numpy())
            ok += [paths[i] for i in b["index"]]
    P = np.concatenate(probs) if probs else np.empty((0, len(classes)), np.float32)
    return P, classes, ok, errors
