"""The unfreeze stage (issue 4): LP-FT on the tiny backbone, a couple of steps per run.

Real pipeline throughout: images written on the fly, `extract` into a real cache, a real
logreg probe saved through heads.store, real training on CPU. fp32 so that epoch 0 can be
compared with the probe exactly.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import last_json, make_dataset, run_cli
from featurize import finetune as ft
from featurize.cache import find_index, load_features, resolve_space
from featurize.errors import UserError
from featurize.extraction import extract


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 3-class dataset extracted with the tiny backbone and a saved logreg probe."""
    tmp = tmp_path_factory.mktemp("ft")
    os.environ["FEATURIZE_HOME"] = str(tmp / "home")  # the trusted-heads registry stays in tmp
    data = make_dataset(tmp / "data", classes=("a", "b", "c"), per_class=8)
    cache = tmp / "cache"
    extract(data, cache, backbone="tiny", precision="fp32", workers=0, progress=False)
    ipath, index = find_index(cache, data)
    space = resolve_space(cache, index)
    X, labels, splits, paths = load_features(cache, index, space)

    from heads import make_head
    from heads.protocol import head_path
    from heads.store import save_head

    est = make_head("logreg").fit(X, labels.astype(str))
    probe_file = head_path(cache, ipath, space.space_id, "logreg")
    save_head(probe_file, est, {"space_id": space.space_id, "classes": sorted(set(labels)), "head": "logreg",
                                "backbone": "tiny"})
    return {"tmp": tmp, "data": data, "cache": cache, "index": index, "space": space, "X": X,
            "labels": labels.astype(str), "splits": splits, "paths": list(paths), "est": est,
            "probe_file": probe_file}


def _plan(env, **kw):
    return ft.plan_data(env["index"].root, env["paths"], env["labels"], env["splits"], val_fraction=0.25, **kw)


def _probe(env, plan):
    from featurize.workflow import refit_probe

    return refit_probe(env["est"], env["X"], env["paths"], plan)


def _run(env, name, plan=None, probe=None, log=None, **cfg):
    plan = plan or _plan(env)
    if probe is None and cfg.get("init", "probe") == "probe":
        probe = _probe(env, plan)[1]
    base = dict(epochs=2, batch_size=4, max_steps=2, workers=0, lr=1e-2, warmup=0.0, patience=5)
    run = ft.start_run(plan, env["space"].info(), ft.FinetuneConfig(**{**base, **cfg}), env["tmp"] / "runs" / name,
                       probe)
    return run, ft.train(run, log=log or io.StringIO())


def _state(run: Path) -> dict:
    meta = json.loads((run / "featurize_run.json").read_text())
    from safetensors.torch import load_file

    return {k[6:]: v for k, v in load_file(str(run / meta["state_file"])).items() if k.startswith("model.")}


def _init(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "init.safetensors"))


def test_epoch0_is_the_probe(env):
    plan = _plan(env)
    fitted, probe = _probe(env, plan)
    run = ft.start_run(plan, env["space"].info(), ft.FinetuneConfig(epochs=1, max_steps=1, batch_size=4, workers=0),
                       env["tmp"] / "runs" / "p0", probe)
    # logits of the initial model on the images == the probe's decision function on the cached vectors
    meta = json.loads((run / "featurize_run.json").read_text())
    bb, model, dev, prec, dtype = ft._build(meta)
    model.load_state_dict(_init(run))
    logits = ft.logits_for(model, bb, plan.root, plan.val, dev, dtype)
    row = {p: i for i, p in enumerate(env["paths"])}
    Xv = env["X"][[row[p] for p, _ in plan.val]]
    yv = np.array([plan.classes[y] for _, y in plan.val])
    np.testing.assert_allclose(logits, fitted.decision_function(Xv), rtol=1e-4, atol=1e-4)
    summary = ft.train(run, log=io.StringIO())
    assert summary["epoch0_val_accuracy"] == pytest.approx(float((fitted.predict(Xv) == yv).mean()))
    assert summary["history"][1]["epoch"] == 1 and summary["best_val_accuracy"] >= summary["epoch0_val_accuracy"]


def test_binary_probe_folds_to_two_logits(env):
    from heads import make_head
    from heads.linear import linear_params

    y = np.where(env["labels"] == "a", "a", "rest")
    est = make_head("logreg").fit(env["X"], y)
    p = linear_params(est)
    z = env["X"] @ p["W"].T + p["b"]
    np.testing.assert_allclose(z[:, 1] - z[:, 0], getattr(est, "best_estimator_", est).decision_function(env["X"]), atol=1e-5)


def test_class_weight_balanced_weights_the_loss_refits_the_probe_and_selects_by_balanced_accuracy(env):
    """Balanced weights reach every part of a run: the loss (n / (k * n_c)), the probe refit
    (a balanced logistic regression, not the probe's own weights) and the epoch choice."""
    from heads.linear import linear_params, refit

    labels = np.where(env["labels"] == "a", "a", "rest")  # 8 vs 16: imbalanced
    plan = ft.plan_data(env["index"].root, env["paths"], labels, env["splits"], val_fraction=0.25)
    cfg = ft.FinetuneConfig(class_weight="balanced")
    counts = np.bincount([y for _, y in plan.train])
    w = ft.class_weights(plan, cfg).numpy()
    np.testing.assert_allclose(w, counts.sum() / (2 * counts), rtol=1e-6)
    assert ft.class_weights(plan, ft.FinetuneConfig()) is None
    with pytest.raises(UserError, match="balanced"):
        ft.class_weights(plan, ft.FinetuneConfig(class_weight="inverse"))

    from heads import make_head

    est = make_head("logreg").fit(env["X"], labels)
    row = {p: i for i, p in enumerate(env["paths"])}
    tr = [row[p] for p, _ in plan.train]
    plain, bal = refit(est, env["X"][tr], labels[tr]), refit(est, env["X"][tr], labels[tr], class_weight="balanced")
    assert bal.steps[-1][1].class_weight == "balanced" and plain.steps[-1][1].class_weight is None
    assert not np.allclose(linear_params(plain)["b"], linear_params(bal)["b"])

    run, s = _run(env, "balanced", plan=plan, probe={**linear_params(bal)}, class_weight="balanced")
    assert s["class_weight"] == "balanced"
    meta = json.loads((run / "featurize_run.json").read_text())
    best = max(meta["history"], key=lambda h: (h["val_balanced_accuracy"], -h["val_loss"]))
    assert meta["best"]["epoch"] == best["epoch"]
    assert all(0 <= h["val_balanced_accuracy"] <= 1 for h in meta["history"])


class _InterruptAt(io.StringIO):
    """A log that raises KeyboardInterrupt (as Ctrl-C would) when epoch N's line is printed."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def write(self, s):
        if s.startswith(f"epoch {self.epoch}/"):
            raise KeyboardInterrupt
        return super().write(s)


def test_resume_after_interrupt_equals_uninterrupted(env):
    _, full = _run(env, "full", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _run(env, "cut", epochs=3, log=_InterruptAt(2))  # dies during epoch 2, before its checkpoint
    cut = env["tmp"] / "runs" / "cut"
    assert json.loads((cut / "featurize_run.json").read_text())["epochs_done"] == 1
    # what a kill -9 inside epoch 2's checkpoint leaves: a torn temp file and a file the JSON does not name yet
    (cut / ".state-e002.safetensors.tmp-999999").write_bytes(b"torn")
    (cut / "state-e002.safetensors").write_bytes(b"not referenced by featurize_run.json")
    resumed = ft.train(cut, log=io.StringIO())
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_done"] == 3
    a, b = _state(env["tmp"] / "runs" / "full"), _state(cut)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [h["val_accuracy"] for h in full["history"]] == [h["val_accuracy"] for h in resumed["history"]]
    with pytest.raises(UserError, match="already finished"):
        ft.train(cut, log=io.StringIO())


def _bn_stats(sd):
    return {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}


def test_batchnorm_frozen_by_default_and_trainable_on_request(env):
    run, _ = _run(env, "bn-frozen")
    before, after = _init(run), _state(run)
    assert _bn_stats(before)
    for k, v in _bn_stats(before).items():
        assert torch.equal(v, after[k]), f"{k} moved although BatchNorm is frozen"
    assert not torch.equal(before["backbone.features.0.weight"], after["backbone.features.0.weight"])
    run, _ = _run(env, "bn-train", train_bn=True)
    before, after = _init(run), _state(run)
    assert any(not torch.equal(v, after[k]) for k, v in _bn_stats(before).items())


def test_unfreeze_last_n_keeps_earlier_blocks(env):
    run, summary = _run(env, "last2", unfreeze="last:2")
    assert summary["unfreeze"]["blocks"] == 4  # tiny: conv, bn, conv, bn
    before, after = _init(run), _state(run)
    for k in ("backbone.features.0.weight", "backbone.features.0.bias", "backbone.features.1.weight"):
        assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    assert not torch.equal(before["backbone.features.3.weight"], after["backbone.features.3.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_bad_unfreeze_and_small_holdout(env):
    with pytest.raises(UserError, match="exceeds the depth"):
        _run(env, "deep", unfreeze="last:9")
    with pytest.raises(UserError, match="all or last:N"):
        ft.parse_unfreeze("first:2")
    with pytest.raises(UserError, match="too few images for a validation hold-out"):
        ft.plan_data("/x", ["a/1.jpg", "a/2.jpg", "b/1.jpg"], ["a", "a", "b"], ["", "", ""])


def test_random_init_does_not_need_a_probe(env):
    _, s = _run(env, "random", init="random", epochs=1)
    assert s["init"] == "random" and s["probe"] == {}


def test_run_folder_is_a_backbone_and_predicts(env):
    run, _ = _run(env, "asbb", epochs=1)
    s = extract(env["data"], env["cache"], backbone=str(run), precision="fp32", workers=0, progress=False)
    assert s["backbone"] == "run:asbb" and s["space_id"] != env["space"].space_id and s["ok"] == 24
    _, index = find_index(env["cache"], env["data"])  # `fit --backbone runs/ft-NNN/` finds that space
    assert resolve_space(env["cache"], index, str(run) + "/").space_id == s["space_id"]
    files = [os.path.join(env["index"].root, p) for p in env["paths"][:5]] + [str(env["tmp"] / "missing.jpg")]
    probs, classes, ok, errors = ft.predict_run(run, files, workers=0)
    assert classes == ["a", "b", "c"] and probs.shape == (5, 3) and len(ok) == 5 and len(errors) == 1
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_finetune_default_backbone_is_the_latest_with_a_probe(env, tmp_path):
    """After `extract --backbone runs/ft-NNN/` the newest space has no probe; a plain `finetune`
    starts from the latest extraction that has one instead of failing."""
    run, _ = _run(env, "newest", epochs=1)
    s = extract(env["data"], env["cache"], backbone=str(run), precision="fp32", workers=0, progress=False)
    _, index = find_index(env["cache"], env["data"])
    assert resolve_space(env["cache"], index).space_id == s["space_id"]  # the newest: no probe there
    out = tmp_path / "ft-default"
    run_cli("finetune", "--data", env["data"], "--cache", env["cache"], "--workers", "0", "--epochs", "1",
            "--max-steps", "1", "--batch-size", "4", "--val-fraction", "0.25", "--precision", "fp32", "--out", out,
            env={"FEATURIZE_HOME": os.environ["FEATURIZE_HOME"]}, check=0)
    meta = json.loads((out / "featurize_run.json").read_text())
    assert meta["base_space_id"] == env["space"].space_id


def test_cli_finetune_predict_and_errors(env, tmp_path, capsys):
    """Real subprocess runs for finetune and predict --model RUN; one-line errors with exit code 1."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT))
    import cli

    common = ["--data", str(env["data"]), "--backbone", "tiny", "--cache", str(env["cache"]), "--workers", "0"]
    e = {"FEATURIZE_HOME": os.environ["FEATURIZE_HOME"]}
    out = tmp_path / "ft-cli"
    p = run_cli("finetune", *common, "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--val-fraction",
                "0.25", "--precision", "fp32", "--class-weight", "balanced", "--out", out, "--json", env=e, check=0)
    s = last_json(p)
    assert s["class_weight"] == "balanced" and s["probe"]["class_weight"] == "balanced"  # loss and refit alike
    assert s["epoch0_val_accuracy"] == pytest.approx(s["probe"]["val_accuracy"])
    assert "val_acc" in p.stderr and "img/s" in p.stderr and "ETA" in p.stderr
    img = os.path.join(env["index"].root, env["paths"][0])
    p = run_cli("predict", img, "--model", out, "--json", env=e, check=0)
    assert last_json(p)["predictions"][0]["label"] in ("a", "b", "c")
    import featurize as fz  # the Python API loads a run folder as a classifier too

    run_head = fz.load_head(out)
    assert list(run_head.predict([img])) == [last_json(p)["predictions"][0]["label"]]
    assert "using fine-tuning run" in p.stderr
    # bad inputs: the same CLI in-process (main() returns the exit code); no probe names the command to run
    from heads.store import save_head

    other = tmp_path / "other.joblib"
    save_head(other, env["est"], {"space_id": "resnet18-000000000000", "classes": ["a", "b", "c"], "head": "logreg"})
    for argv, text in ((["--probe", str(tmp_path / "none.joblib")], "run `fit --head logreg` first"),
                       (["--probe", str(other)], "feature space"), (["--unfreeze", "last:99"], "exceeds the depth"),
                       (["--unfreeze", "first"], "all or last:N")):
        capsys.readouterr()
        assert cli.main(["finetune", *common, *argv, "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert text in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_kill9_mid_training_then_resume_equals_uninterrupted(env, tmp_path, sig):
    """A real SIGKILL (or Ctrl-C) of the CLI during epoch 2, then `finetune --resume RUN`: same
    weights as a clean run. Ctrl-C exits 130 with one line saying how to resume."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    common = ["finetune", "--data", str(env["data"]), "--backbone", "tiny", "--cache", str(env["cache"]),
              "--workers", "0", "--epochs", "3", "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0.25",
              "--precision", "fp32", "--lr", "1e-2"]
    e = {"FEATURIZE_HOME": os.environ["FEATURIZE_HOME"]}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_cli(*common, "--out", clean, env=e, check=0)
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *common, "--out", str(killed)],
                            env={**os.environ, **e}, stdout=subprocess.DEVNULL, stderr=err)
    meta = killed / "featurize_run.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill as soon as epoch 1 is checkpointed
        try:
            if json.loads(meta.read_text()).get("epochs_done", 0) >= 1:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("training finished before it could be killed")
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    assert json.loads(meta.read_text())["epochs_done"] < 3
    if sig == "SIGINT":
        err.seek(0)
        said = [line for line in err.read().splitlines() if "nterrupt" in line]
        assert proc.returncode == 130 and len(said) == 1, said
        assert said[0].startswith("Interrupted: epoch ") and f"finetune --resume {killed}" in said[0]
    p = run_cli("finetune", "--resume", killed, "--json", env=e, check=0)
    assert last_json(p)["epochs_done"] == 3
    a, b = _state(clean), _state(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_keep_last_keeps_the_last_epoch_where_val_prefers_another(env):
    """--keep last: the kept model is the last epoch's, whatever the val score says (a val set drawn
    from the training distribution could not see chest X-ray's shifted test split)."""
    from safetensors.torch import load_file

    _, best = _run(env, "keep-best", lr=3.0)  # a destructive step: val prefers an earlier epoch
    run, last = _run(env, "keep-last", lr=3.0, keep="last")
    assert best["best_epoch"] < 2 and last["best_epoch"] == 2
    assert [h["val_accuracy"] for h in best["history"]] == [h["val_accuracy"] for h in last["history"]]
    meta = json.loads((run / "featurize_run.json").read_text())
    kept = load_file(str(run / meta["backbone_weights"]))
    final = {k[len("backbone."):]: v for k, v in _state(run).items() if k.startswith("backbone.")}
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    with pytest.raises(UserError, match="--keep 'first'"):
        ft.FinetuneConfig(keep="first")
