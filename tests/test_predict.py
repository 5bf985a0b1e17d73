"""A trained model on new scans: the model package of the shared demo run, loaded with torch and
torchvision only; `snakemake predict` on held-out DICOM series (with labels and a broken series) and
on NIfTI files without labels; the leakage guard; the cohort page in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, chromium, demo_options, run_snakemake, write_config
from workflow_scripts.common import cli
from workflow_scripts.predict.predict import class_label, list_new_scans, preprocessing_settings, scan_id

pytestmark = pytest.mark.workflow


def main_experiment(demo_run: Path) -> str:
    return pd.read_csv(demo_run / "results" / "comparison.csv")["experiment"].iloc[0]


def package_of(demo_run: Path, experiment: str | None = None) -> Path:
    return demo_run / "results" / "models" / (experiment or main_experiment(demo_run)) / "package"


def test_every_network_experiment_has_a_package_with_its_card(demo_run):
    models = demo_run / "results" / "models"
    network = {n for n, e in TINY["experiments"].items() if e.get("kind", "video") != "volumetry"}
    assert network == {"r3d_18_kinetics400", "mc3_18_scratch", "resnet50_2d"}
    assert {p.parent.name for p in models.glob("*/package")} == network  # volumetry trains no network
    summary_dirs = [models / name for name in sorted(network)]
    for run in summary_dirs:
        card = json.loads((run / "package" / "model_card.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        metrics = json.loads((demo_run / "results" / "evaluation" / run.name / "metrics.json").read_text())
        assert card["architecture"]["arch"] == summary["config"]["arch"]
        assert card["input"]["shape"] == [1, 32, 32, 32]
        assert card["preprocessing"]["settings"]["target_shape"] == TINY["preprocess"]["target_shape"]
        assert card["preprocessing"]["settings"]["skullstrip"]["method"] == "deepbet"
        assert card["classes"] == ["CN", "AD"] and card["decision_threshold"] == 0.5
        assert card["metrics"]["test"]["subject"]["accuracy"] == metrics["subject"]["accuracy"]
        train = summary["data"]["train"]
        assert card["training_data"]["train"]["scans"] == len(train["scans"])
        assert sum(c["scans"] for c in card["training_data"]["train"]["by_class"].values()) == len(train["scans"])
        assert card["training_data"]["train"]["by_phase"] == {"ADNI1": len(train["scans"])}
        subjects = set(train["subjects"]) | set(summary["data"]["val"]["subjects"])
        assert len(card["known_identifiers"]["subject_sha256"]) == len(subjects)
        assert not any(s in json.dumps(card["known_identifiers"]) for s in subjects)  # hashed, not listed
        assert card["versions"]["torch"] and card["code_version"] == summary["code_version"]
        state = torch.load(run / "package" / "model.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict, no optimizer
        assert card["files"]["model.pt"]["bytes"] < (run / "last.pt").stat().st_size


def test_package_predictions_equal_evaluate_with_torch_and_torchvision_only(demo_run):
    """The README's lines: TorchScript needs torch alone; the state dict goes into torchvision's r3d_18."""
    import torchvision

    package = package_of(demo_run)
    test = pd.read_csv(package.parents[2] / "evaluation" / package.parent.name / "test_predictions.csv",
                       dtype={"image_id": str, "subject": str})
    volumes = torch.stack([torch.from_numpy(np.load(demo_run / "results" / "tensors" / s / f"{i}.npy")
                                            .astype(np.float32))[None] for s, i in zip(test["subject"], test["image_id"])])
    model = torch.jit.load(str(package / "model.ts")).eval()
    with torch.no_grad():
        p_ad = model(volumes)[:, 1].numpy()
    np.testing.assert_allclose(p_ad, test["prob"].to_numpy(), atol=1e-5)

    card = json.loads((package / "model_card.json").read_text())
    assert card["architecture"]["arch"] == "r3d_18"
    network = torchvision.models.video.r3d_18(num_classes=2)
    network.stem[0] = torch.nn.Conv3d(1, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False)
    network.load_state_dict(torch.load(package / "model.pt", weights_only=True))
    network.eval()
    brain = (volumes > 0).float()
    mean = (volumes * brain).sum((1, 2, 3, 4), keepdim=True) / brain.sum((1, 2, 3, 4), keepdim=True)
    std = (((volumes - mean) * brain) ** 2).sum((1, 2, 3, 4), keepdim=True) / (brain.sum((1, 2, 3, 4), keepdim=True) - 1)
    with torch.no_grad():
        eager = torch.softmax(network((volumes - mean) / std.sqrt()), 1)[:, 1].numpy()
    np.testing.assert_allclose(eager, test["prob"].to_numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def new_cohort(tmp_path_factory, demo_run):
    """Held-out demo subjects (a seed the study did not use) as a flat folder of DICOM series, one of them
    truncated as an interrupted download leaves it, and a labels table."""
    from workflow_scripts.data.demo import generate_collection
    from workflow_scripts.data.ingest import find_image_dir

    root = tmp_path_factory.mktemp("new_subjects")
    collection = generate_collection(root / "ida", **demo_options(n_subjects=4, seed=101, visits=1, voxel_scale=3.0,
                                                                  n_mci=0, distractors=False))
    study_subjects = set(pd.read_csv(demo_run / "results" / "scans.tsv", sep="\t", dtype=str)["subject"])
    collection = collection[~collection["Subject"].isin(study_subjects)]
    assert len(collection) >= 3
    folder = root / "dicom"
    for _, row in collection.iterrows():
        shutil.copytree(find_image_dir(root / "ida", row["Subject"], row["Image Data ID"]),
                        folder / row["Image Data ID"])
    broken = folder / collection["Image Data ID"].iloc[-1]
    victim = sorted(broken.iterdir())[len(list(broken.iterdir())) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    labels = root / "labels.csv"
    pd.DataFrame({"image_id": collection["Image Data ID"], "group": collection["Group"]}).to_csv(labels, index=False)
    return {"root": root, "dicom": folder, "labels": labels, "collection": collection,
            "broken": broken.name}


def predict_config(workdir: Path, name: str, settings: dict) -> Path:
    return write_config(workdir / f"predict_{name}.yaml", {"predict": {"name": name, **settings}})


@pytest.fixture(scope="module")
def dicom_prediction(demo_run, new_cohort):
    before = {p: p.stat().st_mtime_ns for p in (demo_run / "results" / "evaluation").rglob("*") if p.is_file()}
    config = predict_config(demo_run, "new-dicom", {"model": str(package_of(demo_run)), "source": "dicom",
                                                     "input": str(new_cohort["dicom"]),
                                                     "labels": str(new_cohort["labels"])})
    result = run_snakemake(demo_run, "predict", configfiles=[demo_run / "tiny.yaml", config])
    after = {p: p.stat().st_mtime_ns for p in (demo_run / "results" / "evaluation").rglob("*") if p.is_file()}
    return {"out": demo_run / "results" / "predict" / "new-dicom", "log": result.stdout + result.stderr,
            "study_untouched": before == after}


def test_predict_scores_new_dicom_series_drops_the_broken_one_and_evaluates_the_labelled(dicom_prediction,
                                                                                       new_cohort, demo_run):
    out = dicom_prediction["out"]
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    dropped = pd.read_csv(out / "dropped.tsv", sep="\t", dtype=str)
    good = [i for i in new_cohort["collection"]["Image Data ID"] if i != new_cohort["broken"]]
    assert sorted(predictions["image_id"]) == sorted(good)
    assert dropped["image_id"].tolist() == [new_cohort["broken"]]
    assert dropped["reason_code"].iloc[0] == "truncated_pixel_data" and dropped["stage"].iloc[0] == "nifti"
    assert predictions["prob_ad"].between(0, 1).all()
    assert (predictions["predicted"] == np.where(predictions["prob_ad"] >= 0.5, "AD", "CN")).all()
    assert predictions["in_training_data"].isna().all()
    assert predictions["hippocampal_share_gradcam"].notna().all()
    groups = dict(zip(new_cohort["collection"]["Image Data ID"], new_cohort["collection"]["Group"]))
    assert (predictions["group"] == predictions["image_id"].map(groups)).all()
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    labels = (predictions["group"] == "AD").astype(int)
    assert metrics["scan"]["accuracy"] == pytest.approx(((predictions["prob_ad"] >= 0.5) == labels).mean())
    assert metrics["n_scans"] == len(good) and metrics["intervals_estimable"] is False
    assert (out / "evaluation" / "roc.png").stat().st_size > 5000
    # the model's preprocessing: the new scans' inputs have the model's shape; the study is not touched
    assert np.load(next((out / "tensors").glob("*.npy"))).shape == (32, 32, 32)
    assert dicom_prediction["study_untouched"]


def test_predict_page_opens_in_headless_chromium_with_every_scan_and_its_figures(dicom_prediction):
    from playwright.sync_api import sync_playwright

    out = dicom_prediction["out"]
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    page_file = out / "predictions.html"
    assert 'src="http' not in page_file.read_text()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            text = page.inner_text("body")
            shown = [float(number) for number in re.findall(r"\b[01]\.\d+\b", text)]
            for _, row in predictions.iterrows():  # each scan and its p(AD), however many decimals the page gives
                assert row["image_id"] in text and any(abs(value - row["prob_ad"]) < 5e-4 for value in shown)
            assert "not estimable" in text
            page.get_by_role("link", name=predictions["image_id"].iloc[0], exact=True).click()
            images = page.locator("img")
            assert images.count() == 2 * len(predictions)  # the map and the QC montage of each scan
            widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert min(widths) > 200  # decoded pictures, not broken links
        finally:
            browser.close()
    assert not errors


def test_predict_elsewhere_on_nifti_files_without_labels_gives_the_dicom_cohorts_probabilities(
        demo_run, dicom_prediction, tmp_path):
    """On another machine: only the package (copied) and the same heads as NIfTI files (dicom2nifti's output),
    no labels, the default config: the package's preprocessing from the nifti stage on, so the same
    probabilities; the settings where the config differs are reported; no metrics."""
    first = dicom_prediction["out"]
    folder = tmp_path / "nifti"
    folder.mkdir()
    for path in (first / "nifti").glob("*/*.nii.gz"):
        if b"SCAN FAILED" not in path.read_bytes()[:40]:
            shutil.copy(path, folder / path.name)
    shutil.copytree(package_of(demo_run), tmp_path / "received_model")
    config = predict_config(tmp_path, "new-nifti", {"model": "received_model", "source": "nifti",
                                                     "input": str(folder), "explain": []})
    result = run_snakemake(tmp_path, "predict", configfiles=[config])
    log = result.stdout + result.stderr
    assert "the current config differs at preprocess.target_shape: model [32, 32, 32], current config " \
           "[128, 128, 128]" in log
    assert "predict new-nifti: " in log and "preprocessing outcome not known" not in log  # its own last line
    assert not (tmp_path / "results" / "scans.tsv").exists()  # no study here
    out = tmp_path / "results" / "predict" / "new-nifti"
    nifti = pd.read_csv(out / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    dicom = pd.read_csv(first / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    assert sorted(nifti.index) == sorted(dicom.index)
    np.testing.assert_allclose(nifti.loc[dicom.index, "prob_ad"], dicom["prob_ad"], atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled_scans"] == 0 and summary["metrics"] is None
    assert any("target_shape" in d for d in summary["setting_differences"])
    assert nifti["group"].isna().all()
    assert not (out / "hippocampus_atlas").exists()  # no maps asked for: no registration


def test_leakage_guard_refuses_a_training_scan_unless_asked_and_then_marks_it(demo_run, tmp_path):
    summary = json.loads((package_of(demo_run).parent / "summary.json").read_text())
    trained = summary["data"]["train"]["scans"][0]
    scans = pd.read_csv(demo_run / "results" / "scans.tsv", sep="\t", dtype=str).set_index("image_id")
    folder = tmp_path / "again"
    shutil.copytree(scans.loc[trained["image_id"], "dicom_dir"], folder / "rescan")  # renamed: caught by UID
    settings = {"model": str(package_of(demo_run)), "source": "dicom", "input": str(folder)}
    config = predict_config(demo_run, "leak", settings)
    result = run_snakemake(demo_run, "predict", configfiles=[demo_run / "tiny.yaml", config], check=False)
    assert result.returncode != 0
    log = (demo_run / "results" / "predict" / "leak" / "logs" / "scans.log").read_text()
    assert "rescan" in log and f"subject {trained['subject']}" in log and "allow_training_scans" in log
    assert not (demo_run / "results" / "predict" / "leak" / "scans.tsv").exists()

    config = predict_config(demo_run, "leak", {**settings, "allow_training_scans": True})
    run_snakemake(demo_run, "results/predict/leak/scans.tsv", configfiles=[demo_run / "tiny.yaml", config])
    listed = pd.read_csv(demo_run / "results" / "predict" / "leak" / "scans.tsv", sep="\t", dtype=str)
    assert "series" in listed["in_training_data"].iloc[0] and "subject" in listed["in_training_data"].iloc[0]


def test_predict_without_a_model_says_what_to_set(demo_run):
    result = run_snakemake(demo_run, "predict", "-n", configfiles=[demo_run / "tiny.yaml"], check=False)
    assert result.returncode != 0 and "predict.model" in result.stdout + result.stderr


def test_scan_listing_labels_and_settings_reporting(tmp_path):
    (tmp_path / "a b.nii.gz").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c_1.nii").write_bytes(b"")
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tgroup\tsubject\na b.nii.gz\t ad \tS1\n")
    table = list_new_scans({"source": "nifti", "input": str(tmp_path), "labels": str(labels)})
    assert table["image_id"].tolist() == ["a-b", "c-1"] and table["subject"].tolist() == ["S1", "c_1"]
    assert class_label(table["group"].iloc[0], ["CN", "AD"]) == 1 and class_label("MCI", ["CN", "AD"]) is None
    assert scan_id("I12_3.x") == "I12-3-x"
    with pytest.raises(cli.PipelineError, match="is not a folder"):
        list_new_scans({"source": "dicom", "input": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(cli.PipelineError, match="no dicom scans found"):
        list_new_scans({"source": "dicom", "input": str(tmp_path / "empty")})
    card = {"preprocessing": {"settings": {"target_shape": [32, 32, 32],
                                           "skullstrip": {"method": "deepbet", "synthstrip_cache": "/a"}}}}
    used, differences = preprocessing_settings(card, {"target_shape": [128, 128, 128],
                                                      "skullstrip": {"method": "deepbet", "synthstrip_cache": "/b"}})
    assert used["target_shape"] == [32, 32, 32] and used["skullstrip"]["synthstrip_cache"] == "/b"
    assert differences == ["preprocess.target_shape: model [32, 32, 32], current config [128, 128, 128]"]


def test_lint_reports_nothing_with_predict_configured(demo_run, new_cohort):
    config = predict_config(demo_run, "lint", {"model": str(package_of(demo_run)), "source": "dicom",
                                                "input": str(new_cohort["dicom"])})
    result = run_snakemake(demo_run, "--lint", configfiles=[demo_run / "tiny.yaml", config], check=False,
                           timeout=300)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, result.stdout[-3000:]
