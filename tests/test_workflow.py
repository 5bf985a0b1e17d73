"""The workflow end to end on a tiny generated collection: every stage's files, the excluded
table, privacy, lint, and what a re-run schedules after new scans or a changed parameter."""
from __future__ import annotations

import gzip
import json
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.processing import resample_from_to

from conftest import TINY, USER_EXCLUSION_REASON, demo_options, run_snakemake, write_config
from workflow_scripts.common.scan_failure import read_failure
from workflow_scripts.preprocess.skullstrip import dice

pytestmark = pytest.mark.workflow
STAGES = ["nifti", "stripped", "resampled", "cropped128", "n4", "ras"]
PER_SCAN_RULES = {"nifti", "stripped", "resampled", "cropped128", "n4", "ras", "qc"}
TINY_MAIN = "r3d_18_kinetics400"


def test_every_usable_scan_has_one_file_per_stage(demo_run):
    results = demo_run / "results"
    scans = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    by_user = 1  # the scan the demo_run fixture excludes by hand
    assert len(scans) == TINY["demo"]["n_subjects"] - by_user and set(scans["group"]) == {"AD", "CN"}
    for subject, image_id in zip(scans["subject"], scans["image_id"]):
        for stage in STAGES:
            assert (results / stage / subject / f"{image_id}.nii.gz").is_file(), (stage, image_id)
            assert (results / "logs" / stage / subject / f"{image_id}.log").is_file()
            assert (results / "benchmarks" / stage / subject / f"{image_id}.tsv").is_file()
        assert (results / "qc" / subject / f"{image_id}.png").stat().st_size > 10_000
        ras = nib.load(results / "ras" / subject / f"{image_id}.nii.gz")
        assert ras.shape == (32, 32, 32)
        assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
        assert ras.header["descrip"].tobytes().rstrip(b"\x00").decode() == \
            "dicom2nifti>deepbet>bspline2x2x2mm>crop3zoom32x32x32>n4>ras"
        resampled = nib.load(results / "resampled" / subject / f"{image_id}.nii.gz")
        np.testing.assert_allclose(resampled.header.get_zooms(), TINY["preprocess"]["resample"]["spacing"], atol=1e-4)


def test_the_final_brain_mask_still_matches_the_true_brain(demo_run):
    results = demo_run / "results"
    scans = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    for subject, image_id in zip(scans["subject"], scans["image_id"]):
        mask = nib.load(results / "ras" / subject / f"{image_id}_mask.nii.gz")
        truth = nib.load(demo_run / "demo_data" / "truth" / subject / f"{image_id}_brainmask.nii.gz")
        truth_here = np.asanyarray(resample_from_to(truth, mask, order=0).dataobj) > 0
        assert dice(np.asanyarray(mask.dataobj) > 0, truth_here) > 0.8


def test_split_train_cv_and_evaluation_outputs(demo_run):
    import json

    results = demo_run / "results"
    parts = {p: pd.read_csv(results / "splits" / f"{p}.csv", dtype=str) for p in ("train", "val", "test")}
    assert all(len(t) for t in parts.values())
    subjects = [set(t["subject"]) for t in parts.values()]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert json.loads((results / "splits" / "audit.json").read_text())["passed"] is True
    summary = json.loads((results / "models" / "r3d_18_kinetics400" / "summary.json").read_text())
    assert summary["parameters"] == {"total": 33_148_482, "trainable": 24_909_826, "frozen": 8_238_656}
    history = json.loads((results / "models" / "r3d_18_kinetics400" / "history.json").read_text())
    assert 1 <= len(history if isinstance(history, list) else history["epochs"]) <= 2
    metrics = json.loads((results / "evaluation" / "r3d_18_kinetics400" / "metrics.json").read_text())
    assert metrics["n_scans"] == len(parts["test"])
    assert 0 <= metrics["scan"]["accuracy"] <= 1 and "ci" in metrics["scan"] and "subject" in metrics
    assert (results / "evaluation" / "r3d_18_kinetics400" / "roc.png").stat().st_size > 5_000
    check_cv_selected_on_inner_validation_and_reported_on_held_out(demo_run, "r3d_18_kinetics400", "best_acc.pt")
    check_cv_selected_on_inner_validation_and_reported_on_held_out(demo_run, "resnet50_2d", "best_loss.pt")


def check_cv_selected_on_inner_validation_and_reported_on_held_out(demo_run, experiment: str, checkpoint: str):
    """Per fold: val.csv, train.csv and held_out.csv (fold k of cv_folds.csv) share no subject; the run
    validated, hence early-stopped and chose its checkpoint, on val.csv's scans only; that checkpoint
    predicted held_out.csv and the test set; evaluate_fold scored held_out.csv's scans; the CV summary
    keeps the three figures apart."""
    import json

    results = demo_run / "results"
    cv_folds = pd.read_csv(results / "splits" / "cv_folds.csv", dtype=str)
    test = pd.read_csv(results / "splits" / "test.csv", dtype=str)
    held_out_accuracy, inner_accuracy = [], []
    for fold in range(TINY["cv"]["folds"]):
        manifests = {role: pd.read_csv(results / "splits" / "cv" / f"fold{fold}" / f"{role}.csv", dtype=str)
                     for role in ("train", "val", "held_out")}
        ids = {role: set(table["image_id"]) for role, table in manifests.items()}
        assert ids["held_out"] == set(cv_folds.loc[cv_folds["fold"] == str(fold), "image_id"])
        train, val, held = (set(table["subject"]) for table in manifests.values())
        assert val and train and not (train & val or train & held or val & held)
        run = results / "cv" / experiment / f"fold{fold}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["config"]["val"] == f"results/splits/cv/fold{fold}/val.csv"
        assert summary["config"]["train"] == f"results/splits/cv/fold{fold}/train.csv"
        assert summary["splits"]["val"]["scans"] == len(ids["val"])
        assert set(pd.read_csv(run / "val_predictions.csv", dtype=str)["image_id"]) == ids["val"]
        assert summary["selection"]["checkpoint"] == checkpoint
        for subset, expected in (("held_out", ids["held_out"]), ("test", set(test["image_id"]))):
            log = (results / "logs" / "cv" / experiment / f"fold{fold}_predict_{subset}.log").read_text()
            assert f"fold{fold}/{checkpoint}" in log
            metrics = json.loads((run / "evaluation" / subset / "metrics.json").read_text())
            predictions = pd.read_csv(demo_run / metrics["predictions_file"], dtype=str)
            assert metrics["predictions_file"] == f"results/cv/{experiment}/fold{fold}/{subset}_predictions.csv"
            assert set(predictions["image_id"]) == expected and metrics["n_scans"] == len(expected)
        held_out_accuracy.append(
            json.loads((run / "evaluation" / "held_out" / "metrics.json").read_text())["scan"]["accuracy"])
        inner_accuracy.append(summary["best"][summary["selection"]["rule"]]["val_accuracy"])
    cv = json.loads((results / "cv" / experiment / "summary.json").read_text())
    assert cv["cross_validation"]["scan"]["accuracy"]["folds"] == held_out_accuracy
    assert cv["cross_validation"]["scan"]["accuracy"]["mean"] == pytest.approx(np.mean(held_out_accuracy))
    assert cv["inner_validation"]["selection_biased"] is True
    assert cv["inner_validation"]["scan"]["accuracy"]["folds"] == inner_accuracy
    assert len(cv["test"]["scan"]["accuracy"]["folds"]) == TINY["cv"]["folds"] and "subject" in cv["test"]
    words = (results / "cv" / experiment / "summary.md").read_text()
    assert "Cross-validation figure (report this one)" in words and "selection-biased" in words
    assert "77.26% ± 2.34" in (results / "report" / experiment / "cv.html").read_text()


def test_every_experiment_is_trained_and_compared_with_the_main_one_on_the_same_test_scans(demo_run):
    import json

    results = demo_run / "results"
    table = pd.read_csv(results / "comparison.csv")
    assert table["experiment"].iloc[0] == "r3d_18_kinetics400"
    assert {"mc3_18_scratch", "resnet50_2d"} <= set(table["experiment"])
    assert table["main"].tolist() == [True] + [False] * (len(table) - 1)
    for _, row in table.iterrows():
        metrics = json.loads((results / "evaluation" / row["experiment"] / "metrics.json").read_text())
        assert row["accuracy"] == pytest.approx(metrics["scan"]["accuracy"])
        assert (results / "cv" / row["experiment"] / "summary.json").is_file()
    other = table.set_index("experiment").loc["mc3_18_scratch"]
    assert 0 <= other["mcnemar_p"] <= 1 and other["mcnemar_b"] + other["mcnemar_c"] <= other["n_scans"]
    summary = json.loads((results / "models" / "mc3_18_scratch" / "summary.json").read_text())
    assert summary["parameters"]["frozen"] == 0  # trained from the stem
    assert (results / "comparison.png").stat().st_size > 5_000


def test_the_2d_baseline_follows_its_own_recipe_and_exports_embeddings(demo_run):
    """resnet50_2d overrides train: Adam, plateau schedule, layer4 unfrozen from epoch 2, selection and
    early stopping on validation loss; its test predictions come from best_loss.pt."""
    import json

    results = demo_run / "results"
    summary = json.loads((results / "models" / "resnet50_2d" / "summary.json").read_text())
    config = summary["config"]
    assert (config["arch"], config["optimizer"], config["scheduler"]) == ("resnet50", "adam", "plateau")
    assert config["unfreeze_epoch"] == 2 and summary["selection"]["checkpoint"] == "best_loss.pt"
    head_only = 2048 * 512 + 512 + 512 * 2 + 2
    assert summary["epochs_run"] == 2 and summary["parameters"]["trainable"] > head_only  # layer4 unfrozen
    assert json.loads((results / "models" / "r3d_18_kinetics400" / "summary.json").read_text())["config"][
        "optimizer"] == "adamw"  # the override stays with its experiment
    log = (results / "logs" / "predict" / "resnet50_2d.log").read_text()
    assert "best_loss.pt" in log
    for name in ("r3d_18_kinetics400", "resnet50_2d"):
        test = np.load(results / "evaluation" / name / "embeddings_test.npz")
        predictions = pd.read_csv(results / "evaluation" / name / "test_predictions.csv", dtype={"image_id": str})
        assert list(test["image_id"]) == list(predictions["image_id"])
        assert (results / "evaluation" / name / "embeddings.png").stat().st_size > 5_000


def test_every_broken_series_is_left_out_with_its_reason_and_the_rest_of_the_study_completes(demo_run):
    """The demo's planted faults (truncated pixel data, a partial series, two series in one folder, an ambiguous
    image id, an Excel CSV, a phantom that is not a head) and the scan excluded by hand."""
    from workflow_scripts.data.demo_faults import NOT_A_HEAD_DROPS
    from workflow_scripts.common.scan_failure import read_failure

    results = demo_run / "results"

    def table(path):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)

    planted, excluded = table(demo_run / "demo_data" / "truth" / "faults.tsv"), table(results / "excluded.tsv")
    scans, usable, dropped = table(results / "scans.tsv"), table(results / "usable.tsv"), table(results / "dropped.tsv")
    assert set(planted["kind"]) == set(TINY["demo"]["faults"])
    reason_of = dict(zip(excluded["image_id"], excluded["reason_code"]))
    for row in planted[planted["expected"] != "used"].itertuples():
        assert reason_of.get(row.image_id) == row.expected, row
    head = planted[planted["kind"] == "not_a_head"].iloc[0]
    drop = dropped.set_index("image_id").loc[head["image_id"]]
    assert drop["stage"] == "stripped" and drop["reason_code"] in NOT_A_HEAD_DROPS
    assert read_failure(results / "ras" / head["subject"] / f"{head['image_id']}.nii.gz")["stage"] == "stripped"
    assert not (results / "tensors" / head["subject"] / f"{head['image_id']}.npy").exists()
    left_out = set(excluded["image_id"]) | set(dropped["image_id"])
    for manifest in (results / "splits").rglob("*.csv"):
        assert not left_out & set(pd.read_csv(manifest, dtype=str)["image_id"]), manifest
    assert set(usable["image_id"]) == set(scans["image_id"]) - set(dropped["image_id"])
    by_user = dropped[dropped["reason_code"] == "excluded_by_user"]
    assert len(by_user) == 1 and USER_EXCLUSION_REASON in by_user["reason"].iloc[0]  # the fixture's exclusion
    assert (results / "models" / TINY_MAIN / "summary.json").is_file()  # the study went on to training
    assert (f"scans: {len(usable)} used, {len(dropped)} dropped after ingest (reasons in results/dropped.tsv), "
            f"{len(excluded)} left out by ingest") in (demo_run / "snakemake_output.txt").read_text()


def test_distractors_land_in_the_excluded_table_with_reasons(demo_run):
    excluded = pd.read_csv(demo_run / "results" / "excluded.tsv", sep="\t", dtype=str)
    assert {"group_not_in_classes", "not_t1_mprage", "duplicate_series"} <= set(excluded["reason_code"])
    assert excluded["reason"].str.len().min() > 10


def searchable_bytes(path: Path) -> bytes:
    """The bytes of ``path`` that can carry text: a NIfTI's header and extensions, a checkpoint's archive
    without its tensor storages (gigabytes of weights), any other file whole (a failed scan's outputs hold
    their failure record, not gzip)."""
    if path.name.endswith(".nii.gz") and read_failure(path) is None:
        with gzip.open(path) as handle:
            header = handle.read(348)
            vox_offset = int(np.frombuffer(header[108:112], "<f4" if header[:4] == b"\x5c\x01\x00\x00" else ">f4")[0])
            return header + handle.read(max(vox_offset - 348, 0))
    if path.suffix == ".pt" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return b"".join(archive.read(name) for name in archive.namelist() if not re.search(r"/data/\d+$", name))
    return path.read_bytes()


def test_no_personal_identifier_reaches_any_output(demo_run):
    from workflow_scripts.data.demo import planted_identifier_strings

    needles = [s.encode() for s in planted_identifier_strings()]
    dicom = next((demo_run / "demo_data" / "ADNI").rglob("*.dcm")).read_bytes()
    assert any(n in dicom for n in needles)  # they were planted ...
    leaks = []
    for path in [*(demo_run / "results").rglob("*"), *(demo_run / ".snakemake" / "log").rglob("*")]:
        if not path.is_file():
            continue
        leaks += [(str(path), n) for n in needles if n in searchable_bytes(path)]
    assert leaks == []  # ... and nothing carried them on


def test_a_rerun_has_nothing_to_do(demo_run):
    result = run_snakemake(demo_run, "all", "-n", configfiles=[demo_run / "tiny.yaml"])
    assert "Nothing to be done" in result.stdout + result.stderr


def test_lint_reports_nothing(tmp_path):
    result = run_snakemake(tmp_path, "--lint", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_synthstrip_without_weights_fails_at_once_naming_both_remedies(tmp_path):
    config = write_config(tmp_path / "c.yaml", {**TINY, "preprocess": {
        "skullstrip": {"method": "synthstrip", "synthstrip_urls": ["http://127.0.0.1:9/synthstrip.1.pt"]}}})
    result = run_snakemake(tmp_path, "resources/weights/synthstrip.1.pt", check=False, configfiles=[config],
                           timeout=300)
    log = (tmp_path / "results" / "logs" / "synthstrip_weights.log").read_text()
    assert result.returncode != 0
    assert "preprocess.skullstrip.synthstrip_weights" in log and "method: deepbet" in log
    assert not (tmp_path / "resources" / "weights" / "synthstrip.1.pt").exists()


def _scheduled(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, image_id) of every job a dry run lists."""
    jobs, rule = [], None
    for line in dry_run_output.splitlines():
        if m := re.match(r"^(?:localrule|rule|checkpoint) (\w+):", line):
            rule = m.group(1)
            jobs.append((rule, ""))
        elif (m := re.search(r"wildcards:.*image_id=([^,\s]+)", line)) and jobs:
            jobs[-1] = (rule, m.group(1))
    return jobs


def test_new_phase_and_changed_parameter_schedule_only_what_they_affect(tmp_path):
    from workflow_scripts.data.demo import generate_collection

    root = tmp_path / "adni"
    first = generate_collection(root, **demo_options(n_subjects=2, seed=3, visits=1, voxel_scale=3.0, n_mci=0,
                                                     distractors=False, phase="ADNI1"))
    config = write_config(tmp_path / "adni.yaml", {
        "data": {"source": "adni", "adni_root": str(root), "collection_csv": str(root / "collection.csv")},
        "preprocess": {"skullstrip": {"method": "deepbet"}, "target_shape": [32, 32, 32]}})
    run_snakemake(tmp_path, "preprocess", configfiles=[config])

    added = generate_collection(root, **demo_options(n_subjects=2, seed=3, visits=1, voxel_scale=3.0, n_mci=0,
                                                     distractors=False, phase="ADNI2"))
    new_ids = set(added["Image Data ID"])
    assert new_ids.isdisjoint(first["Image Data ID"])
    run_snakemake(tmp_path, "ingest", configfiles=[config])  # the checkpoint sees the new phase
    dry = run_snakemake(tmp_path, "preprocess", "-n", configfiles=[config])
    jobs = [(r, i) for r, i in _scheduled(dry.stdout) if r in PER_SCAN_RULES]
    assert jobs and {i for _, i in jobs} == new_ids
    assert {r for r, _ in jobs} == PER_SCAN_RULES
    run_snakemake(tmp_path, "preprocess", configfiles=[config])

    changed = write_config(tmp_path / "margin.yaml", {"preprocess": {"crop": {"margin": 5}}})
    dry = run_snakemake(tmp_path, "preprocess", "-n", configfiles=[config, changed])
    jobs = [(r, i) for r, i in _scheduled(dry.stdout) if r in PER_SCAN_RULES]
    all_ids = new_ids | set(first["Image Data ID"])
    assert {r for r, _ in jobs} == {"cropped128", "n4", "ras", "qc"}
    assert {i for _, i in jobs} == all_ids


def test_kinetics_weights_are_fetched_once_by_a_local_job_before_training(tmp_path):
    """Compute nodes of a cluster often have no network: one local job fetches the weights."""
    kinetics = write_config(tmp_path / "k.yaml", {**TINY, "experiments": {
        "r3d_18_kinetics400": {"arch": "r3d_18", "weights": "kinetics400"}}})
    dry = run_snakemake(tmp_path, "all", "-n", configfiles=[kinetics], timeout=300).stdout
    assert "python -m workflow_scripts.learning.models fetch --arch r3d_18 --weights kinetics400" in dry
    assert re.search(r"pretrained_weights\s+1\b", dry)  # one fetch for the main model and every fold
    without = write_config(tmp_path / "none.yaml", TINY)  # weights: none
    assert "pretrained_weights" not in run_snakemake(tmp_path, "all", "-n", configfiles=[without], timeout=300).stdout


def test_long_jobs_log_their_start_size_progress_and_end(demo_run):
    results = demo_run / "results"
    train = (results / "logs" / "train" / f"{TINY_MAIN}.log").read_text()
    for what in ("epoch 1 training", "epoch 1 validation", "epoch 2 training", "prediction"):
        assert re.search(rf"{what}: step 1/\d+, running loss \d+\.\d{{4}}, \d+\.\d s/step, ETA \d+:\d\d", train), what
    scan = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str).iloc[0]
    per_scan = {stage: (results / "logs" / stage / scan["subject"] / f"{scan['image_id']}.log").read_text()
                for stage in ("stripped", "hippocampus_atlas", "hippocampus_unet")}
    assert re.search(r"deepbet on \S+: \d+x\d+x\d+ voxels of [\d.]+x[\d.]+x[\d.]+ mm, \d+ threads, on the CPU",
                     per_scan["stripped"])
    assert re.search(r"deepbet: brain volume [\d.]+ ml in [\d.]+ s", per_scan["stripped"])
    assert re.search(r"registering the mni152_fsl template to \S+ \(32x32x32 voxels of", per_scan["hippocampus_atlas"])
    assert "voxels in" in per_scan["hippocampus_atlas"]  # its end: the label sizes and seconds
    assert re.search(r"segmenting \S+ \(32x32x32 voxels of [\d.]+x[\d.]+x[\d.]+ mm\) with ", per_scan["hippocampus_unet"])
    assert "voxels in" in per_scan["hippocampus_unet"]
    unet = (results / "logs" / "segmentation" / "train.log").read_text()
    assert re.search(r"training unet3d on \d+ scans .*\n(.*\n)*.*step 300/300: training loss [\d.]+, validation Dice "
                     r"[\d.]+, ETA 0:00", unet)


def test_all_ends_with_a_run_summary_of_scans_metrics_and_the_report(demo_run):
    results = demo_run / "results"
    summary = (results / "run_summary.md").read_text()
    usable, dropped = (pd.read_csv(results / f"{n}.tsv", sep="\t", dtype=str) for n in ("usable", "dropped"))
    assert f"- used: {len(usable)}\n" in summary
    reasons = ", ".join(f"{code} {n}" for code, n in dropped["reason_code"].value_counts().items())
    assert f"- dropped after ingest: {len(dropped)} ({reasons}), see results/dropped.tsv" in summary
    experiments = pd.read_csv(results / "comparison.csv")["experiment"]
    for name in experiments:
        metrics = json.loads((results / "evaluation" / name / "metrics.json").read_text())
        assert f"- **{name}**: {metrics['n_subjects']} test subjects" in summary
        accuracy = metrics["subject"]["accuracy"]
        assert metrics["intervals_estimable"] is False  # the tiny test split: one or two subjects per class
        assert f"accuracy {accuracy:.3f} (interval not estimable)" in summary
    assert "95% CI" not in summary.split("## Test metrics")[1].split("## Report")[0].replace(
        "95% bootstrap intervals", "")
    assert "snakemake --report report.html" in summary
    printed = (demo_run / "snakemake_output.txt").read_text()
    assert re.search(r"# Run summary\n.*\n\nscans: \d+ used, ", printed, re.S)  # printed, its last line the scans'
    assert len(re.findall(r"^scans: \d+ used", printed, re.M)) == 1  # not printed a second time
