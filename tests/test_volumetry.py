"""Hippocampal volumetry: mm^3 and ICV arithmetic, the logistic-regression baseline, and its outputs in
the shared workflow run (judged like the networks)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.hippocampus import volumetry
from workflow_scripts.evaluation.evaluate import PREDICTION_COLUMNS, validate_predictions

VOLUMETRY_C = resolve("experiments.*", {}).C  # the schema's default inverse regularisation of volumetry


def _image(data: np.ndarray, zooms, path=None, rotate: bool = False) -> nib.Nifti1Image:
    """An image with voxel sizes ``zooms``; ``rotate`` tilts the axes (the header's zooms still hold)."""
    affine = np.diag([*zooms, 1.0])
    if rotate:
        a = np.deg2rad(30)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    img = nib.Nifti1Image(data, affine)
    if path is not None:
        nib.save(img, path)
    return img


def _labels(shape=(12, 10, 8), left=10, right=7) -> np.ndarray:
    data = np.zeros(shape, np.uint8)
    data.flat[:left] = volumetry.LEFT
    data.flat[100:100 + right] = volumetry.RIGHT
    return data


# --- volumes and ICV ----------------------------------------------------------------------

def test_volumes_are_voxel_counts_times_the_anisotropic_voxel_volume_of_each_header(tmp_path):
    # Labels on a 1.2 x 0.9 x 2.0 mm grid (2.16 mm^3 voxels, axes tilted), brain mask on a 1.5 mm grid.
    _image(_labels(left=10, right=7), (1.2, 0.9, 2.0), tmp_path / "hippo.nii.gz", rotate=True)
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[:10, :10, :10] = 1
    _image(brain, (1.5, 1.5, 1.5), tmp_path / "brain.nii.gz")

    row = volumetry.scan_volumes(tmp_path / "hippo.nii.gz", tmp_path / "brain.nii.gz")

    assert row["left_mm3"] == pytest.approx(10 * 2.16)
    assert row["right_mm3"] == pytest.approx(7 * 2.16)
    assert row["icv_mm3"] == pytest.approx(1000 * 3.375)
    assert row["left_icv"] == pytest.approx(21.6 / 3375.0)
    assert row["right_icv"] == pytest.approx(15.12 / 3375.0)


def test_the_volumes_table_has_one_row_per_scan_and_names_a_missing_mask(tmp_path):
    scans = pd.DataFrame({"image_id": ["I1", "I2"], "subject": ["001_S_0001", "002_S_0002"], "group": ["AD", "CN"]})
    for n, row in enumerate(scans.itertuples()):
        (tmp_path / row.subject).mkdir()
        _image(_labels(left=5 + n, right=6), (1.0, 1.0, 1.0), tmp_path / row.subject / f"{row.image_id}.nii.gz")
        _image(np.ones((10, 10, 10), np.uint8), (2.0, 2.0, 2.0), tmp_path / row.subject / f"{row.image_id}_mask.nii.gz")
    masks = str(tmp_path / "{subject}" / "{image_id}.nii.gz")
    icv = str(tmp_path / "{subject}" / "{image_id}_mask.nii.gz")

    table = volumetry.volumes_table(scans, masks, icv)

    assert list(table.columns) == list(volumetry.VOLUME_COLUMNS)
    assert table["image_id"].tolist() == ["I1", "I2"] and table["group"].tolist() == ["AD", "CN"]
    assert table["left_mm3"].tolist() == [5.0, 6.0] and table["icv_mm3"].tolist() == [8000.0, 8000.0]

    (tmp_path / "002_S_0002" / "I2.nii.gz").unlink()
    with pytest.raises(cli.PipelineError, match=r"I2\.nii\.gz.*hippocampus_atlas"):
        volumetry.volumes_table(scans, masks, icv)


def test_a_probability_map_or_foreign_label_is_refused_not_counted():
    data = _labels().astype(np.float32)
    data[0, 0, 0] = 0.4
    with pytest.raises(cli.PipelineError, match="0, 1 \\(left\\) or 2 \\(right\\)"):
        volumetry.label_volumes(_image(data, (1, 1, 1)), source="unet mask")


def test_an_empty_brain_mask_stops_with_the_file_named(tmp_path):
    _image(_labels(), (1, 1, 1), tmp_path / "hippo.nii.gz")
    _image(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), tmp_path / "brain.nii.gz")
    with pytest.raises(cli.PipelineError, match="brain.nii.gz: the brain mask is empty"):
        volumetry.scan_volumes(tmp_path / "hippo.nii.gz", tmp_path / "brain.nii.gz")


# --- the classifier on synthetic features ---------------------------------------------------

def _cohort(n_subjects: int, seed: int, shift: float = 4.0,
            scans_per_subject: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest and a volumes table: AD hippocampi ``shift`` SDs smaller than CN ones."""
    rng = np.random.default_rng(seed)
    manifest, volumes = [], []
    for s in range(n_subjects):
        label = s % 2
        subject = f"{s:03d}_S_{seed:04d}"
        for v in range(scans_per_subject):
            image_id = f"I{seed}{s:03d}{v}"
            left, right = rng.normal(3000 - shift * 150 * label, 150, 2)
            icv = rng.normal(1.4e6, 1e5)
            manifest.append({"path": f"x/{image_id}.nii.gz", "subject": subject, "image_id": image_id,
                             "group": "AD" if label else "CN", "label": label})
            volumes.append({"image_id": image_id, "subject": subject, "group": "AD" if label else "CN",
                            "left_mm3": left, "right_mm3": right, "icv_mm3": icv,
                            "left_icv": left / icv, "right_icv": right / icv})
    return pd.DataFrame(manifest), pd.DataFrame(volumes, columns=list(volumetry.VOLUME_COLUMNS))


def test_separable_volumes_give_a_high_auc_and_a_predictions_table_evaluate_accepts(tmp_path):
    train, train_volumes = _cohort(40, seed=1, shift=2.0)
    val, val_volumes = _cohort(20, seed=2, shift=2.0)
    volumes = pd.concat([train_volumes, val_volumes], ignore_index=True)

    summary = volumetry.fit_run(train, val, volumes, ["left_mm3", "right_mm3"], tmp_path, C=VOLUMETRY_C)

    table = pd.read_csv(tmp_path / "val_predictions.csv", dtype={"image_id": str, "subject": str})
    assert tuple(table.columns) == PREDICTION_COLUMNS
    validate_predictions(table)
    assert table["image_id"].tolist() == val["image_id"].tolist()
    assert (table["label"] == val["label"]).all()
    assert (table["pred"] == (table["prob"] >= 0.5)).all()
    assert roc_auc_score(table["label"], table["prob"]) > 0.9
    # smaller hippocampi -> AD: both standardised coefficients negative
    assert summary["features"] == ["left_mm3", "right_mm3"]
    assert all(c < 0 for c in summary["coefficients"].values())
    assert summary["n_per_class"] == {"0": 20, "1": 20}
    assert "scikit-learn" in summary["versions"]
    assert json.loads((tmp_path / "summary.json").read_text())["coefficients"] == summary["coefficients"]


def test_features_carry_no_signal_gives_chance_auc(tmp_path):
    train, train_volumes = _cohort(60, seed=3, shift=0.0)
    val, val_volumes = _cohort(60, seed=4, shift=0.0)
    volumetry.fit_run(train, val, pd.concat([train_volumes, val_volumes]), ["left_icv", "right_icv"], tmp_path,
                      C=VOLUMETRY_C)
    table = pd.read_csv(tmp_path / "val_predictions.csv")
    assert 0.3 < roc_auc_score(table["label"], table["prob"]) < 0.7


def test_a_cv_fold_is_fitted_on_its_training_manifest_and_predicts_its_inner_validation_split(tmp_path):
    from workflow_scripts.learning import split

    manifest, volumes = _cohort(30, seed=5, shift=1.0)
    manifest["fold"] = np.arange(len(manifest)) % 3
    manifest.to_csv(tmp_path / "cv_folds.csv", index=False)
    split.write_fold_manifests(split.cv_fold_manifests(manifest, 3, 0.2, seed=42)[0], tmp_path)
    volumes.to_csv(tmp_path / "volumes.tsv", sep="\t", index=False)

    volumetry.main(["fit", "--volumes", str(tmp_path / "volumes.tsv"), "--folds-csv", str(tmp_path / "cv_folds.csv"),
                    "--fold", "1", "--settings", '{"experiment": {"features": ["left_icv", "right_icv"]}}',
                    "--out-dir", str(tmp_path / "fold1")])

    summary = json.loads((tmp_path / "fold1" / "summary.json").read_text())
    train = pd.read_csv(tmp_path / "cv" / "fold1" / "train.csv", dtype=str).merge(volumes, on="image_id")
    inner = pd.read_csv(tmp_path / "cv" / "fold1" / "val.csv", dtype=str)
    assert summary["splits"]["train"]["scans"] == len(train) == 20 - len(inner) and len(inner) == 4
    # the scaler saw exactly the fold's training scans: its means are theirs
    for feature in ("left_icv", "right_icv"):
        assert summary["scaler"]["mean"][feature] == pytest.approx(train[feature].mean(), rel=1e-12)
    predicted = pd.read_csv(tmp_path / "fold1" / "val_predictions.csv", dtype={"image_id": str})
    assert sorted(predicted["image_id"]) == sorted(inner["image_id"])
    assert not set(predicted["image_id"]) & set(manifest.loc[manifest["fold"] == 1, "image_id"])


def test_test_predictions_come_from_the_saved_model_with_its_own_features(tmp_path):
    """Validation scans again, under other subjects' names (prediction refuses the model's own subjects)."""
    train, train_volumes = _cohort(20, seed=6)
    val, val_volumes = _cohort(10, seed=7)
    volumes = pd.concat([train_volumes, val_volumes], ignore_index=True)
    volumes.to_csv(tmp_path / "volumes.tsv", sep="\t", index=False)
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    val.assign(subject="test_" + val["subject"]).to_csv(tmp_path / "test.csv", index=False)
    volumetry.main(["fit", "--volumes", str(tmp_path / "volumes.tsv"), "--train", str(tmp_path / "train.csv"),
                    "--val", str(tmp_path / "val.csv"), "--settings", '{"experiment": {"features": ["right_icv", "left_mm3"]}}',
                    "--out-dir", str(tmp_path / "model")])

    volumetry.main(["predict", "--model", str(tmp_path / "model" / "model.joblib"), "--volumes",
                    str(tmp_path / "volumes.tsv"), "--manifest", str(tmp_path / "test.csv"),
                    "--output", str(tmp_path / "test_predictions.csv")])

    predicted = pd.read_csv(tmp_path / "test_predictions.csv", dtype={"subject": str})
    validated = pd.read_csv(tmp_path / "model" / "val_predictions.csv", dtype={"subject": str})
    assert (predicted["subject"] == "test_" + validated["subject"]).all()
    pd.testing.assert_frame_equal(predicted.drop(columns="subject"), validated.drop(columns="subject"))


def test_the_summary_records_the_subjects_and_scans_fitted_and_validated_on(tmp_path):
    train, train_volumes = _cohort(12, seed=10, scans_per_subject=2)
    val, val_volumes = _cohort(6, seed=11)
    volumes = pd.concat([train_volumes, val_volumes], ignore_index=True)
    record = volumetry.fit_run(train, val, volumes, ["left_icv"], tmp_path, C=VOLUMETRY_C)["data"]
    assert record["train"]["subjects"] == sorted(set(train["subject"])) and len(record["train"]["subjects"]) == 12
    assert [scan["image_id"] for scan in record["val"]["scans"]] == val["image_id"].tolist()
    assert [scan["label"] for scan in record["train"]["scans"]] == train["label"].tolist()
    moved = volumes.assign(left_icv=volumes["left_icv"] * 1.01)  # other feature values: another record
    assert volumetry.fit_run(train, val, moved, ["left_icv"], tmp_path, C=VOLUMETRY_C)["data"]["hash"] != record["hash"]
    assert json.loads((tmp_path / "summary.json").read_text())["data"]["val"]["subjects"] == record["val"]["subjects"]


def test_predict_refuses_a_manifest_sharing_a_subject_with_the_fit(tmp_path, capsys):
    train, train_volumes = _cohort(10, seed=12)
    val, val_volumes = _cohort(6, seed=13)
    pd.concat([train_volumes, val_volumes]).to_csv(tmp_path / "volumes.tsv", sep="\t", index=False)
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    model = tmp_path / "model" / "model.joblib"
    volumetry.main(["fit", "--volumes", str(tmp_path / "volumes.tsv"), "--train", str(tmp_path / "train.csv"),
                    "--val", str(tmp_path / "val.csv"), "--out-dir", str(model.parent)])
    leaky = pd.concat([val.assign(subject="test_" + val["subject"]), train.iloc[[3]]])
    leaky.to_csv(tmp_path / "test.csv", index=False)
    args = ["predict", "--model", str(model), "--volumes", str(tmp_path / "volumes.tsv"),
            "--manifest", str(tmp_path / "test.csv"), "--output", str(tmp_path / "out.csv")]
    assert cli.run(volumetry.main, args) == 1
    message = capsys.readouterr().err
    assert f"holds 1 subject(s) that model {model} used as training data: {train['subject'].iloc[3]}" in message
    assert not (tmp_path / "out.csv").exists()
    summary = json.loads((model.parent / "summary.json").read_text())
    del summary["data"]  # a summary written before data records were kept cannot be checked: refused
    (tmp_path / "old_summary.json").write_text(json.dumps(summary))
    val.assign(subject="test_" + val["subject"]).to_csv(tmp_path / "test.csv", index=False)
    assert cli.run(volumetry.main, [*args, "--summary", str(tmp_path / "old_summary.json")]) == 1
    assert "records no training and validation subjects" in capsys.readouterr().err
    assert cli.run(volumetry.main, args) == 0 and (tmp_path / "out.csv").is_file()


def test_a_scan_without_volumes_stops_the_fit_naming_it_and_the_rule_to_rerun(tmp_path):
    train, volumes = _cohort(10, seed=8)
    missing = train["image_id"].iloc[3]
    with pytest.raises(cli.PipelineError, match=rf"{missing}.*hippocampal_volumes"):
        volumetry.fit_run(train, train, volumes[volumes["image_id"] != missing], ["left_icv", "right_icv"], tmp_path,
                          C=VOLUMETRY_C)
    assert not (tmp_path / "summary.json").exists()


def test_training_scans_of_one_class_are_refused(tmp_path):
    train, volumes = _cohort(10, seed=9)
    cn = train[train["label"] == 0]
    with pytest.raises(cli.PipelineError, match="one class only"):
        volumetry.fit_run(cn, cn, volumes, ["left_icv"], tmp_path, C=VOLUMETRY_C)


# --- in the shared workflow run -------------------------------------------------------------

def test_the_volumetry_experiment_is_trained_cross_validated_and_compared_like_the_networks(demo_run):
    results = demo_run / "results"
    scans = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    volumes = volumetry.read_volumes(results / "volumetry" / "atlas" / "volumes.tsv")
    assert sorted(volumes["image_id"]) == sorted(scans["image_id"])
    assert (volumes[["left_mm3", "right_mm3", "icv_mm3"]] > 0).all().all()
    assert np.allclose(volumes["left_icv"], volumes["left_mm3"] / volumes["icv_mm3"])

    summary = json.loads((results / "models" / "hippocampal_volumetry" / "summary.json").read_text())
    assert summary["features"] == ["left_icv", "right_icv"] and summary["kind"] == "volumetry"
    test = pd.read_csv(results / "splits" / "test.csv", dtype=str)
    predicted = pd.read_csv(results / "evaluation" / "hippocampal_volumetry" / "test_predictions.csv", dtype=str)
    assert predicted["image_id"].tolist() == test["image_id"].tolist()
    assert (results / "evaluation" / "hippocampal_volumetry" / "metrics.json").is_file()

    folds = pd.read_csv(results / "splits" / "cv_folds.csv", dtype=str)
    for fold, part in folds.groupby("fold"):
        fold_dir = results / "cv" / "hippocampal_volumetry" / f"fold{fold}"
        manifests = results / "splits" / "cv" / f"fold{fold}"
        fold_summary = json.loads((fold_dir / "summary.json").read_text())
        assert fold_summary["splits"]["train"]["scans"] == len(pd.read_csv(manifests / "train.csv"))
        inner = pd.read_csv(fold_dir / "val_predictions.csv", dtype=str)
        assert sorted(inner["image_id"]) == sorted(pd.read_csv(manifests / "val.csv", dtype=str)["image_id"])
        held_out = pd.read_csv(fold_dir / "held_out_predictions.csv", dtype=str)
        assert sorted(held_out["image_id"]) == sorted(part["image_id"])
    assert (results / "cv" / "hippocampal_volumetry" / "summary.json").is_file()
    comparison = pd.read_csv(results / "comparison.csv")
    assert "hippocampal_volumetry" in comparison["experiment"].tolist()
