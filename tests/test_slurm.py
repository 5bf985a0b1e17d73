"""profiles/slurm on a real one-node SLURM cluster started by the test: the tiny collection's
preprocessing and a 1-epoch training run as SLURM jobs and give the outputs of a local run."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, discard_unless_failed, run_snakemake, write_config
from slurm_cluster import start_cluster, unavailable_reason

pytestmark = pytest.mark.workflow
PROFILE = REPO / "profiles" / "slurm"
SMALL = {"threads": 1, "mem_mb": 2000}
TINY_SLURM = {
    "demo": {"n_subjects": 6, "visits": 1, "n_mci": 0, "seed": 5, "voxel_scale": 3.0},
    # 2 mm resampling, as in the tiny workflow run: the 3 mm demo heads at 1 mm cost minutes per stage
    "preprocess": {"skullstrip": {"method": "deepbet"}, "resample": {"spacing": [2.0, 2.0, 2.0]},
                   "target_shape": [32, 32, 32]},
    "split": {"ratios": [0.34, 0.33, 0.33]},  # one subject per class and partition
    "experiments": {"r3d_18_kinetics400": {"arch": "r3d_18", "weights": "none"}},
    "train": {"max_epochs": 1, "num_workers": 0, "wandb": {"mode": "disabled"}},
    # Jobs small enough for any CI machine's node (slurmd reports its real CPUs and memory).
    "resources": {name: SMALL for name in ("stripped", "train", "predict")},
}


def profile_partitions() -> tuple[str, ...]:
    """The partitions profiles/slurm sends jobs to, so the test cluster offers exactly those."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    rules = (profile.get("set-resources") or {}).values()
    default = profile.get("default-resources") or {}
    names = {r["slurm_partition"] for r in rules if "slurm_partition" in r}
    return tuple(sorted(names | ({default["slurm_partition"]} if "slurm_partition" in default else set())))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"SLURM cannot be started on this machine: {reason}")
    folder = Path(tmp_path_factory.mktemp("slurm"))
    try:
        running = start_cluster(folder, extra_partitions=profile_partitions())
    except (RuntimeError, OSError) as err:
        pytest.skip(f"SLURM did not start on this machine: {err}")
    yield running
    running.stop()
    assert all(p.poll() is not None for p in running.processes.values()), "a SLURM daemon outlived the test"


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, request):
    """The same target run locally and through profiles/slurm, each in its own folder."""
    failed_before = request.session.testsfailed
    local, slurm = Path(tmp_path_factory.mktemp("local")), Path(tmp_path_factory.mktemp("on_slurm"))
    for folder in (local, slurm):
        write_config(folder / "tiny.yaml", TINY_SLURM)
    run_snakemake(local, "train", configfiles=[local / "tiny.yaml"])
    # The test cluster has no accounting database, so jobs are followed with squeue (the
    # profile's documented switch); everything else is the profile as shipped.
    run_snakemake(slurm, "train", "--profile", str(PROFILE), "--slurm-status-command", "squeue",
                  "--slurm-init-seconds-before-status-checks", "2", configfiles=[slurm / "tiny.yaml"],
                  env=cluster.env, timeout=1500)
    yield local, slurm
    for folder in (local, slurm):
        discard_unless_failed(request, folder, failed_before)


def profile_grouped_rules() -> set[str]:
    """The rules profiles/slurm groups into one SLURM job per scan."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert "group-components" not in profile  # one scan per group job
    return {entry.split("=")[0] for entry in profile["groups"]}


def slurm_job_of_each_log(folder: Path) -> dict[str, str]:
    """Each job log under results/logs (relative path) -> the SLURM job id the job logged."""
    ids = {}
    for log in sorted((folder / "results" / "logs").rglob("*.log")):
        found = re.findall(r"SLURM job (\d+)", log.read_text())
        assert found, f"{log} was not written by a SLURM job"
        ids[log.relative_to(folder / "results" / "logs").as_posix()] = found[0]
    return ids


def test_each_scan_preprocessing_runs_grouped_and_every_other_job_alone(cluster, runs):
    _, slurm = runs
    queue = cluster.run("squeue", "-h", "-t", "all", "-o", "%i %P %b %j").stdout.split("\n")
    jobs = {line.split()[0]: line.split()[1:] for line in queue if line.strip()}
    ids = slurm_job_of_each_log(slurm)
    assert len(ids) >= 6 * 6 + 4  # demo, ingest, 6 stages of 6 scans, tensors, split, training
    assert set(ids.values()) <= set(jobs)  # the cluster knows each job
    grouped_rules = profile_grouped_rules()
    assert {"nifti", "stripped", "resampled", "cropped128", "n4", "ras"} <= grouped_rules
    grouped = {path: job for path, job in ids.items() if path.split("/")[0] in grouped_rules}
    alone = {path: job for path, job in ids.items() if path not in grouped}
    # A scan's six stages and its QC metrics (`train` needs no QC montage) share one SLURM job, its own.
    scans = pd.read_csv(slurm / "results" / "scans.tsv", sep="\t", dtype=str)
    job_of_scan = {}
    for subject, image_id in zip(scans["subject"], scans["image_id"]):
        own = {job for path, job in grouped.items() if path.endswith(f"{subject}/{image_id}.log")}
        assert len(own) == 1, f"{subject}/{image_id}: its preprocessing ran in SLURM jobs {sorted(own)}"
        job_of_scan[image_id] = own.pop()
    assert len(set(job_of_scan.values())) == len(scans) == 6
    assert all(sum(job == j for j in grouped.values()) == 7 for job in job_of_scan.values())
    assert not set(alone.values()) & set(grouped.values())
    assert len(set(alone.values())) == len(alone)  # every other rule instance: its own SLURM job
    partition, gres = jobs[ids["train/r3d_18_kinetics400.log"]][:2]
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]["train_model"]
    assert partition == profile["slurm_partition"] and "gpu" in gres
    # The plugin's own per-job logs carry the same ids.
    plugin_logs = {p.stem for p in (slurm / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(ids.values()) <= plugin_logs


def _image(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj, dtype=np.float64)


def test_slurm_outputs_equal_the_local_run(runs):
    local, slurm = (r / "results" for r in runs)
    scans, scans_slurm = (pd.read_csv(r / "scans.tsv", sep="\t", dtype=str) for r in (local, slurm))
    for table, root in ((scans, local), (scans_slurm, slurm)):  # absolute paths: relative to each run
        table["dicom_dir"] = [os.path.relpath(d, root.parent) for d in table["dicom_dir"]]
    pd.testing.assert_frame_equal(scans_slurm, scans)
    for subject, image_id in zip(scans["subject"], scans["image_id"]):
        for stage in ("stripped", "resampled", "n4", "ras"):
            a, b = (_image(r / stage / subject / f"{image_id}.nii.gz") for r in (local, slurm))
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=f"{stage} {image_id}")
        np.testing.assert_array_equal(np.load(slurm / "tensors" / subject / f"{image_id}.npy"),
                                      np.load(local / "tensors" / subject / f"{image_id}.npy"))
    for part in ("train", "val", "test"):
        pd.testing.assert_frame_equal(pd.read_csv(slurm / "splits" / f"{part}.csv"),
                                      pd.read_csv(local / "splits" / f"{part}.csv"))
    model_l, model_s = (r / "models" / "r3d_18_kinetics400" for r in (local, slurm))
    hist_l, hist_s = (json.loads((m / "history.json").read_text()) for m in (model_l, model_s))
    assert len(hist_l) == len(hist_s) == 1
    timings = {"seconds", "train_data_wait_share", "val_data_wait_share"}
    assert {k: v for k, v in hist_s[0].items() if k not in timings} == \
        pytest.approx({k: v for k, v in hist_l[0].items() if k not in timings}, rel=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(model_s / "val_predictions.csv"),
                                  pd.read_csv(model_l / "val_predictions.csv"), rtol=1e-4)
