"""Training: tensor cache, class weights, early stopping, augmentation, checkpoints and resume,
the NaN guard, W&B offline, and a tiny end-to-end CLI run (16^3 volumes, random weights)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import discard_unless_failed
from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.learning.tensor_cache import cache_scan, rescale_intensities
from workflow_scripts.learning.recipe import training_settings
from workflow_scripts.learning.checkpoints import (check_no_overlap, data_record, load_checkpoint, restore_rng_states,
                                                   rng_states)
from workflow_scripts.learning.scan_data import ScanDataset, VolumeTransform, load_volume, tensor_sources
from workflow_scripts.learning.train import EarlyStopping, class_weights, fit, main, predict, run_config

REPO = Path(__file__).resolve().parents[1]
SIDE = 16
TRAIN = resolve("train")  # the training settings as the schema's defaults make them


def _transform(train: bool, **given) -> VolumeTransform:
    """``VolumeTransform`` with the schema's augmentation and z-normalisation settings for what the test does not
    give."""
    return VolumeTransform(train, **{**TRAIN.augmentation, "znorm_mask": TRAIN.znorm_mask, **given})


def _volume(rng: np.random.Generator, label: int) -> np.ndarray:
    """A ball of brain-like intensities in [0, 1] on a zero background."""
    grid = np.indices((SIDE,) * 3) - (SIDE - 1) / 2
    ball = (grid ** 2).sum(0) < (SIDE * 0.4) ** 2
    vol = ball * rng.uniform(0.2, 0.8 + 0.2 * label, (SIDE,) * 3)
    return (vol / vol.max()).astype(np.float16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request) -> dict:
    """6 training and 4 validation scans (both classes), cached tensors and manifests; the module's
    training runs write under its root, which is removed afterwards (see discard_unless_failed)."""
    failed_before = request.session.testsfailed
    root = tmp_path_factory.mktemp("tiny_train")
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 6), ("val", 4)):
        for i in range(n):
            label, subject, image_id = i % 2, f"{split[:2]}_S_{i:04d}", f"I{split[0]}{i}"
            path = root / "tensors" / subject / f"{image_id}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, _volume(rng, label))
            rows.append({"split": split, "path": str(path), "subject": subject, "image_id": image_id,
                         "group": "AD" if label else "CN", "label": label})
    table = pd.DataFrame(rows)
    manifests = {}
    for split in ("train", "val"):
        manifests[split] = root / f"{split}.csv"
        table[table["split"] == split].drop(columns="split").to_csv(manifests[split], index=False)
    yield {"root": root, "train": manifests["train"], "val": manifests["val"], "table": table}
    discard_unless_failed(request, root, failed_before)


def _config(tiny: dict, out_dir: Path, *, model: dict | None = None, run: dict | None = None, **train) -> dict:
    """The run record ``fit`` reads, as the command builds it: the tiny manifests, random weights, and the
    schema's defaults but for 2 epochs, no loader workers, no W&B and on_changed_settings error; ``train``
    and ``model`` change settings, ``run`` the paths and run controls of ``run_config``."""
    recipe = {"max_epochs": 2, "num_workers": 0, "wandb": {"mode": "disabled"}, "on_changed_settings": "error", **train}
    job = training_settings(recipe, {"weights": "none", **(model or {})})
    return run_config(job, **{"out_dir": out_dir, "train": tiny["train"], "val": tiny["val"], **(run or {})})


# ----------------------------------------------------------------------------- tensor cache

def test_cache_scan_writes_ras_float16_rescaled_to_unit_range(tmp_path):
    rng = np.random.default_rng(1)
    data = np.zeros((16, 14, 12), np.float32)
    data[2:14, 2:12, 2:10] = rng.uniform(100, 200, (12, 10, 8))
    data[3, 3, 3] = 1e6  # one hot voxel: must be clipped, not squash the rest towards 0
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = 15
    nib.save(nib.Nifti1Image(data, las), tmp_path / "scan.nii.gz")
    out = cache_scan(tmp_path / "scan.nii.gz", tmp_path / "t" / "scan.npy")
    cached = np.load(out)
    assert cached.dtype == np.float16 and cached.shape == data.shape
    assert cached.min() == 0 and cached.max() == 1
    assert cached[::-1][3, 3, 3] == 1  # flipped to RAS: x runs left to right
    assert cached[::-1][0, 0, 0] == 0  # background stays 0
    brain = cached[::-1][2:14, 2:12, 2:10].astype(np.float32)
    assert 0.3 < np.median(brain) < 0.7
    np.testing.assert_allclose(cached.astype(np.float32), rescale_intensities(data[::-1]), atol=1e-3)


def test_a_nifti_path_reads_like_its_cached_tensor(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[2:6, 2:6, 2:6] = np.random.default_rng(2).uniform(10, 50, (4, 4, 4))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "I1.nii.gz")
    cache_scan(tmp_path / "I1.nii.gz", tmp_path / "I1.npy")
    table = pd.DataFrame({"path": [str(tmp_path / "I1.nii.gz")], "subject": ["S"], "image_id": ["I1"]})
    (source,) = tensor_sources(table)
    assert torch.equal(load_volume(source), load_volume(tmp_path / "I1.npy"))
    assert load_volume(source).shape == (1, 8, 8, 8)


def test_tensor_cache_cli_and_empty_volume_error(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.learning.tensor_cache", "--input",
                             str(tmp_path / "empty.nii.gz"), "--output", str(tmp_path / "empty.npy")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "empty.nii.gz has no voxel above 0" in result.stderr
    assert not (tmp_path / "empty.npy").exists()


# ----------------------------------------------------------------------------- pieces

def test_class_weights_are_inverse_frequency():
    torch.testing.assert_close(class_weights([0, 0, 0, 1], 2), torch.tensor([4 / 6, 4 / 2]))
    torch.testing.assert_close(class_weights([0, 1, 1, 0, 1, 1], 2), torch.tensor([6 / 4, 6 / 8]))
    with pytest.raises(cli.PipelineError, match=r"\[3, 0\]"):
        class_weights([0, 0, 0], 2)


def _run_stopper(accuracies, losses, patience=TRAIN.patience) -> int | None:
    """The 1-based epoch at which early stopping fires, or None."""
    stopper = EarlyStopping(patience=patience, monitor=TRAIN.early_stopping)
    for epoch, (acc, loss) in enumerate(zip(accuracies, losses), start=1):
        if stopper.update(acc, loss)["stop"]:
            return epoch
    return None


def test_early_stopping_needs_both_metrics_stalled_for_patience_epochs():
    flat = [0.5] * 10
    assert _run_stopper(flat, [1.0] * 10) == 6  # best at epoch 1, 5 epochs without improvement
    # Accuracy stalls but loss keeps falling: never stop.
    assert _run_stopper(flat, [1.0 - 0.01 * i for i in range(10)]) is None
    # Loss stalls but accuracy keeps rising: never stop.
    assert _run_stopper([0.5 + 0.01 * i for i in range(10)], [1.0] * 10) is None
    # Loss improves last at epoch 4, accuracy at epoch 2: the later one counts -> stop at 4 + 5.
    acc = [0.5, 0.6] + [0.6] * 10
    loss = [1.0, 0.9, 0.95, 0.8] + [0.85] * 8
    assert _run_stopper(acc, loss) == 9
    assert _run_stopper(acc, loss, patience=2) == 6


def test_early_stopping_state_round_trip():
    stopper = EarlyStopping(patience=3, monitor=TRAIN.early_stopping)
    stopper.update(0.6, 0.7)
    stopper.update(0.5, 0.8)
    restored = EarlyStopping(patience=3, monitor=TRAIN.early_stopping)
    restored.load_state_dict(stopper.state_dict())
    assert restored.update(0.5, 0.8) == stopper.update(0.5, 0.8) == {"accuracy": False, "loss": False, "stop": False}
    assert restored.update(0.5, 0.8)["stop"] and restored.accuracy_wait == 3


def test_augmentation_only_in_the_training_transform():
    volume = torch.from_numpy(_volume(np.random.default_rng(3), 0).astype(np.float32))[None]
    brain = volume > 0
    val = _transform(train=False)
    out = val(volume)
    assert torch.equal(out, val(volume))  # deterministic
    assert abs(out[brain].mean().item()) < 1e-5 and abs(out[brain].std().item() - 1) < 1e-4
    expected = (volume - volume[brain].mean()) / volume[brain].std()
    torch.testing.assert_close(out, expected)
    whole = _transform(train=False, znorm_mask="none")(volume)
    assert abs(whole.mean().item()) < 1e-5 and abs(whole.std().item() - 1) < 1e-4

    train = _transform(train=True, gamma_p=1.0, noise_p=1.0)
    torch.manual_seed(0)
    first = train(volume)
    torch.manual_seed(1)
    second = train(volume)
    assert not torch.allclose(first, out, atol=1e-3) and not torch.allclose(first, second, atol=1e-3)
    assert torch.isfinite(first).all()
    # The brain mask of the z-normalisation comes from the clean volume, not the noisy one.
    assert abs(first[brain].mean().item()) < 1e-4 and abs(first[brain].std().item() - 1) < 1e-3
    never = _transform(train=True, gamma_p=0.0, noise_p=0.0)
    torch.testing.assert_close(never(volume), out)


def test_dataset_augmentation_is_keyed_to_epoch_and_scan(tiny):
    table = pd.read_csv(tiny["train"])
    dataset = ScanDataset([Path(p) for p in table["path"]], table["label"],
                          _transform(True, gamma_p=1.0, noise_p=1.0), seed=5)
    a, label, index = dataset[(3, 2)]
    torch.rand(10)  # global RNG use in between must not matter
    b, _, _ = dataset[(3, 2)]
    c, _, _ = dataset[(4, 2)]
    assert torch.equal(a, b) and not torch.equal(a, c) and (label, index) == (0, 2)


def test_tensor_sources_order_and_missing_tensor(tiny, tmp_path):
    table = pd.read_csv(tiny["train"], dtype=str).head(2)
    assert tensor_sources(table) == [Path(p) for p in table["path"]]
    assert tensor_sources(table, tiny["root"] / "tensors") == [Path(p) for p in table["path"]]
    table["tensor_path"] = [table["path"][1], table["path"][0]]
    assert tensor_sources(table, tmp_path) == [Path(table["path"][1]), Path(table["path"][0])]
    table = table.drop(columns="tensor_path")
    with pytest.raises(cli.PipelineError, match="It0"):
        tensor_sources(table, tmp_path)


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    states = rng_states()
    torch.save({"rng": states}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng_states(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and __import__("random").random() == expected[2]


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def full_run(tiny) -> Path:
    """An uninterrupted 2-epoch run through the command line, as the workflow calls it."""
    out = tiny["root"] / "full"
    result = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.learning.train", "fit", "--train", str(tiny["train"]),
         "--val", str(tiny["val"]), "--out-dir", str(out), "--settings", json.dumps(
             {"model": {"weights": "none"}, "train": {"max_epochs": 2, "batch_size": 2, "num_workers": 2,
                                                       "wandb": {"mode": "disabled"}}})],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_cli_run_writes_history_summary_predictions_and_checkpoints(full_run, tiny):
    for name in ("last.pt", "best_acc.pt", "best_loss.pt", "history.json", "summary.json", "val_predictions.csv"):
        assert (full_run / name).is_file(), name
    history = json.loads((full_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    for key in ("train_loss", "val_loss", "train_accuracy", "val_balanced_accuracy", "val_auc", "lr_head",
                "lr_backbone", "seconds"):
        assert key in history[0], key
    assert history[0]["lr_head"] == 1e-3 and history[0]["lr_backbone"] == 1e-4
    assert history[1]["lr_head"] == pytest.approx(1e-3 * (1 + np.cos(np.pi / 5)) / 2)  # cosine, T_0 = 5
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["parameters"] == {"total": 33_148_482, "trainable": 24_909_826, "frozen": 8_238_656}
    assert summary["splits"]["train"]["per_class"]["1"] == {"group": "AD", "scans": 3, "subjects": 3}
    assert summary["splits"]["val"]["scans"] == 4 and summary["device"] == "cpu"
    assert summary["config"]["lr_head"] == 1e-3 and summary["code_version"]
    assert set(summary["versions"]) >= {"torch", "torchvision", "torchio", "numpy"}
    # the data record: subjects and scans of each role, each tensor's SHA-256, one hash, in the checkpoints too
    train_table = pd.read_csv(tiny["train"], dtype=str)
    record = summary["data"]
    assert record["train"]["subjects"] == sorted(train_table["subject"])
    assert [scan["image_id"] for scan in record["train"]["scans"]] == list(train_table["image_id"])
    assert record["val"]["subjects"] == sorted(pd.read_csv(tiny["val"], dtype=str)["subject"])
    first = record["train"]["scans"][0]
    assert first["sha256"] == hashlib.sha256(Path(train_table["path"][0]).read_bytes()).hexdigest()
    assert load_checkpoint(full_run / "best_acc.pt")["data"] == record
    best = summary["best"]["accuracy"]
    assert best["val_accuracy"] == max(row["val_accuracy"] for row in history)
    best_ckpt = load_checkpoint(full_run / "best_acc.pt")
    assert best_ckpt["epoch"] == best["epoch"] and "optimizer" in best_ckpt and "early_stopping" in best_ckpt
    predictions = pd.read_csv(full_run / "val_predictions.csv", dtype={"image_id": str})
    assert list(predictions.columns) == ["image_id", "subject", "label", "prob", "pred"]
    assert list(predictions["image_id"]) == list(pd.read_csv(tiny["val"])["image_id"])
    assert ((predictions["prob"] >= 0.5).astype(int) == predictions["pred"]).all()
    assert (predictions["pred"] == predictions["label"]).mean() == pytest.approx(best["val_accuracy"])


def test_resumed_run_ends_like_an_uninterrupted_one(full_run, tiny):
    """Stopped after epoch 1 then resumed (with 0 workers instead of 2): same weights and history."""
    out = tiny["root"] / "resumed"
    assert fit(_config(tiny, out, run={"stop_after_epoch": 1})) is None
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "summary.json").exists()
    fit(_config(tiny, out))
    full, resumed = load_checkpoint(full_run / "last.pt"), load_checkpoint(out / "last.pt")
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("history", "best"):
        strip = lambda rows: json.loads(json.dumps(rows).replace("NaN", "null"))
        drop = {"seconds", "train_data_wait_share", "val_data_wait_share"}
        rows_full = [{k: v for k, v in r.items() if k not in drop} for r in strip(full["history"])]
        rows_resumed = [{k: v for k, v in r.items() if k not in drop} for r in strip(resumed["history"])]
        assert rows_full == rows_resumed
    assert full["optimizer"]["state"][0]["exp_avg"].equal(resumed["optimizer"]["state"][0]["exp_avg"])
    assert (pd.read_csv(out / "val_predictions.csv")).equals(pd.read_csv(full_run / "val_predictions.csv"))


def test_changed_settings_stop_or_restart_instead_of_resuming(full_run, tiny):
    with pytest.raises(cli.PipelineError, match="lr_head: 0.001 -> 0.01"):
        fit(_config(tiny, full_run, lr_head=0.01))
    assert load_checkpoint(full_run / "last.pt")["config"]["lr_head"] == 1e-3  # untouched
    out = tiny["root"] / "restarted"
    fit(_config(tiny, out, max_epochs=1))
    summary = fit(_config(tiny, out, max_epochs=1, lr_head=0.01, on_changed_settings="restart"))
    assert summary["config"]["lr_head"] == 0.01 and summary["epochs_run"] == 1
    assert load_checkpoint(out / "best_loss.pt")["config"]["lr_head"] == 0.01


def test_predict_mode_reproduces_validation_predictions(full_run, tiny):
    """The validation tensors under other subjects' names (a test set the model never saw by subject)."""
    renamed = pd.read_csv(tiny["val"], dtype=str)
    renamed["subject"] = renamed["subject"].str.replace("va_", "te_")
    renamed.to_csv(tiny["root"] / "renamed_val.csv", index=False)
    out = tiny["root"] / "predicted.csv"
    main(["predict", "--manifest", str(tiny["root"] / "renamed_val.csv"), "--checkpoint", str(full_run / "best_acc.pt"),
          "--predictions-out", str(out)])
    expected = pd.read_csv(full_run / "val_predictions.csv")
    got = pd.read_csv(out)
    assert list(got.columns) == list(expected.columns)
    np.testing.assert_allclose(got["prob"], expected["prob"], rtol=1e-5)


def test_predict_refuses_a_manifest_sharing_a_subject_with_training_or_validation(full_run, tiny, capsys):
    test = pd.read_csv(tiny["val"], dtype=str)
    test["subject"] = test["subject"].str.replace("va_", "te_")
    test.loc[2, "subject"] = "va_S_0002"  # one validation subject
    test.to_csv(tiny["root"] / "leaky_test.csv", index=False)
    out = tiny["root"] / "leaky_predictions.csv"
    checkpoint = full_run / "best_acc.pt"
    args = ["predict", "--manifest", str(tiny["root"] / "leaky_test.csv"), "--checkpoint", str(checkpoint),
            "--predictions-out", str(out)]
    assert cli.run(main, args) == 1
    message = capsys.readouterr().err
    assert f"holds 1 subject(s) that model {checkpoint} used as validation data: va_S_0002" in message
    assert not out.exists()
    args[2] = str(tiny["train"])  # the training manifest itself
    assert cli.run(main, args) == 1
    assert "holds 6 subject(s) that model" in (message := capsys.readouterr().err)
    assert "used as training data: tr_S_0000, tr_S_0001" in message and not out.exists()


def test_a_cv_fold_model_may_predict_its_held_out_fold_and_the_test_set_but_not_its_own_subjects():
    """The fold model's record holds its train and inner-validation subjects only; fold k and the test
    set share none of them, so both pass, while a manifest with one inner-validation subject is refused."""
    rows = pd.DataFrame({"subject": [f"S{i}" for i in range(8)], "image_id": [f"I{i}" for i in range(8)],
                         "label": [i % 2 for i in range(8)]})
    record = data_record({"train": rows.iloc[:4], "val": rows.iloc[4:6]}, {"train": ["a"] * 4, "val": ["b"] * 2})
    held_out, test = rows.iloc[6:7], rows.iloc[7:8]
    check_no_overlap(held_out, record, "cv/fold0/best_acc.pt", "cv/fold0/held_out.csv")
    check_no_overlap(test, record, "cv/fold0/best_acc.pt", "splits/test.csv")
    with pytest.raises(cli.PipelineError, match=r"model cv/fold0/best_acc.pt used as validation data: S5"):
        check_no_overlap(pd.concat([held_out, rows.iloc[[5]]]), record, "cv/fold0/best_acc.pt", "x.csv")
    with pytest.raises(cli.PipelineError, match="records no training and validation subjects"):
        check_no_overlap(test, None, "old.pt", "splits/test.csv")


# ----------------------------------------------------------------------------- resuming only on the same scans

def _manifest(tiny: dict, path: Path, split: str, rows: Sequence[int] | None = None) -> Path:
    """A copy of a tiny manifest (``rows`` of it) at ``path``, rewritten in place between runs."""
    table = pd.read_csv(tiny[split], dtype=str)
    (table if rows is None else table.iloc[list(rows)]).to_csv(path, index=False)
    return path


def _history_rows(rows: list[dict]) -> list[dict]:
    """History rows without timings (which differ between runs)."""
    drop = {"seconds", "train_data_wait_share", "val_data_wait_share"}
    return [{k: v for k, v in r.items() if k not in drop} for r in json.loads(json.dumps(rows).replace("NaN", "null"))]


def test_a_grown_training_manifest_restarts_the_run_from_epoch_1(full_run, tiny, tmp_path, caplog):
    """The reviewer's case: a run interrupted on 4 training scans, the manifest grown (6 scans) in place."""
    train = _manifest(tiny, tmp_path / "train.csv", "train", range(4))
    out = tmp_path / "run"
    assert fit(_config(tiny, out, run={"train": train, "stop_after_epoch": 1})) is None
    old_hash = load_checkpoint(out / "last.pt")["data"]["hash"]
    _manifest(tiny, train, "train")
    caplog.set_level(logging.INFO, logger="workflow_scripts.learning.train")
    summary = fit(_config(tiny, out, run={"train": train}, on_changed_settings="restart"))  # as the workflow
    assert f"training manifest {train}: 2 scan(s) added (It4, It5)" in caplog.text
    assert "starting afresh" in caplog.text and "resuming" not in caplog.text
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and summary["epochs_run"] == 2
    # trained from epoch 1 on the 6 scans: exactly the uninterrupted run on tiny's own (identical) manifest
    assert _history_rows(history) == _history_rows(json.loads((full_run / "history.json").read_text()))
    assert summary["splits"]["train"]["scans"] == 6
    new_hash = load_checkpoint(full_run / "last.pt")["data"]["hash"]
    assert summary["data"]["hash"] == new_hash != old_hash
    assert load_checkpoint(out / "last.pt")["data"]["hash"] == new_hash


def test_changed_tensor_contents_alone_stop_or_restart_the_run(tiny, tmp_path, caplog):
    tensors = tmp_path / "tensors"
    shutil.copytree(tiny["root"] / "tensors", tensors)
    pd.read_csv(tiny["train"], dtype=str).assign(path="unused.nii.gz").to_csv(tmp_path / "train.csv", index=False)
    pd.read_csv(tiny["val"], dtype=str).assign(path="unused.nii.gz").to_csv(tmp_path / "val.csv", index=False)
    out = tmp_path / "run"
    config = _config(tiny, out, run={"train": tmp_path / "train.csv", "val": tmp_path / "val.csv",
                                         "tensor_dir": tensors}, max_epochs=1)
    fit(config)
    before = load_checkpoint(out / "last.pt")
    changed = tensors / "tr_S_0002" / "It2.npy"
    np.save(changed, (np.load(changed) * 0.5).astype(np.float16))  # same name, shape and manifest row
    with pytest.raises(cli.PipelineError, match=r"training manifest .*: tensor contents changed \(It2\)"):
        fit({**config, "on_changed_settings": "error"})
    assert load_checkpoint(out / "last.pt")["data"] == before["data"]  # untouched
    caplog.set_level(logging.INFO, logger="workflow_scripts.learning.train")
    fit({**config, "on_changed_settings": "restart"})
    assert "tensor contents changed (It2)" in caplog.text and "resuming" not in caplog.text
    after = load_checkpoint(out / "last.pt")
    assert after["data"]["train"]["scans"][2]["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert after["epoch"] == 1 and len(after["history"]) == 1
    assert any(not torch.equal(value, after["model"][key]) for key, value in before["model"].items())


def test_a_re_split_reuses_no_checkpoint_of_the_old_run(tiny, tmp_path, caplog):
    """Swap a training and a validation subject (same label): every checkpoint is the new run's, and the
    new model refuses the old validation manifest, which now holds one of its training subjects."""
    train, val = _manifest(tiny, tmp_path / "train.csv", "train"), _manifest(tiny, tmp_path / "val.csv", "val")
    out = tmp_path / "run"
    config = _config(tiny, out, run={"train": train, "val": val}, max_epochs=1, on_changed_settings="restart")
    fit(config)
    old_val = _manifest(tiny, tmp_path / "old_val.csv", "val")
    old_hash = load_checkpoint(out / "best_acc.pt")["data"]["hash"]
    rows_train, rows_val = pd.read_csv(train, dtype=str), pd.read_csv(val, dtype=str)
    pd.concat([rows_val.iloc[[0]], rows_train.iloc[1:]]).to_csv(train, index=False)
    pd.concat([rows_train.iloc[[0]], rows_val.iloc[1:]]).to_csv(val, index=False)
    caplog.set_level(logging.INFO, logger="workflow_scripts.learning.train")
    summary = fit(config)
    assert f"training manifest {train}: 1 scan(s) added (Iv0), 1 scan(s) removed (It0)" in caplog.text
    assert f"validation manifest {val}: 1 scan(s) added (It0), 1 scan(s) removed (Iv0)" in caplog.text
    assert "resuming" not in caplog.text
    new_hash = summary["data"]["hash"]
    assert new_hash != old_hash and "tr_S_0000" in summary["data"]["val"]["subjects"]
    checkpoints = sorted(out.glob("*.pt"))
    assert len(checkpoints) == 4  # last, best_acc, best_loss, best_hierarchy
    for checkpoint in checkpoints:
        assert load_checkpoint(checkpoint)["data"]["hash"] == new_hash, checkpoint
    with pytest.raises(cli.PipelineError, match=r"used as training data: va_S_0000"):
        predict(out / "best_acc.pt", old_val, tmp_path / "predictions.csv", device="cpu", num_workers=0)


def test_non_finite_loss_stops_the_run_naming_epoch_and_step(tiny, tmp_path):
    table = pd.read_csv(tiny["train"])
    bad = np.load(table["path"][0]).copy()
    bad[SIDE // 2, SIDE // 2, SIDE // 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    table.loc[0, "path"] = str(tmp_path / "nan.npy")
    table.to_csv(tmp_path / "train.csv", index=False)
    config = _config(tiny, tmp_path / "run", run={"train": tmp_path / "train.csv"}, batch_size=6)
    with pytest.raises(cli.PipelineError, match=r"non-finite training loss .* at epoch 1, step 1 .*It0"):
        fit(config)


def test_wandb_offline_writes_a_local_run_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "wb"
    summary = fit(_config(tiny, out, wandb={"mode": "offline"}, max_epochs=1, run={"run_name": "tiny"}))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert summary is not None and len(runs) == 1
    log = list(runs[0].glob("*.wandb"))
    assert log, "the run's local log file is missing"
    assert b"best-accuracy" in log[0].read_bytes()  # the checkpoint artifact is recorded
    staged = [f for f in (tmp_path / "wandb_data_dir").rglob("*") if f.is_file() and f.stat().st_size > 10**7]
    assert not staged, f"W&B copied checkpoints into its staging folder: {staged}"


def test_recalibrate_bn_leaves_the_trained_layers_statistics_of_the_training_scans(tiny, tmp_path):
    """With --recalibrate-bn the saved model's trained BatchNorm statistics are exactly those of
    its own weights over the unaugmented training scans: recomputing them changes nothing.
    Without it, they are the lagging running averages, and recomputing does change them."""
    from workflow_scripts.learning.models import build_model, recalibrate_batchnorm

    def recomputed_gap(out_dir: Path, **recipe) -> float:
        fit(_config(tiny, out_dir, max_epochs=1, model={"trainable_from": "layer4"}, **recipe))
        model = build_model(**training_settings(None, {"arch": "r3d_18", "weights": "none"}).model)
        model.load_state_dict(load_checkpoint(out_dir / "last.pt")["model"])
        saved = model.layer4[1].conv2[1].running_mean.clone()
        table = pd.read_csv(tiny["train"], dtype={"subject": str, "image_id": str})
        volumes = [load_volume(Path(p)) for p in table["path"]]
        batches = [torch.stack([_transform(train=False)(v) for v in volumes[i:i + 2]])
                   for i in range(0, len(volumes), 2)]
        recalibrate_batchnorm(model, batches, torch.device("cpu"))
        return float((model.layer4[1].conv2[1].running_mean - saved).abs().max())

    assert recomputed_gap(tmp_path / "recalibrated", recalibrate_bn=True) < 1e-4
    assert recomputed_gap(tmp_path / "running") > 1e-3
