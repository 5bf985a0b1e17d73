"""Runs that survive their users: kill -9 at any moment and a rerun leave no partial file and the outputs of an
uninterrupted run; a user's exclusion drops the scan and reruns only what depends on it; the virtual
environment's own snakemake works without activating the environment; local runs never start jobs whose
declared memory sums past the machine's."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_snakemake, write_config
from workflow_scripts.common import nifti_io

# Two demo subjects (one AD, one CN) at 3 mm voxels and a 32^3 model input: preprocessing takes seconds.
SMALL = {"demo": {"n_subjects": 2, "visits": 1, "n_mci": 0, "seed": 5, "voxel_scale": 3.0},
         "preprocess": {"skullstrip": {"method": "deepbet"}, "target_shape": [32, 32, 32]}}
# Per-job records that differ between runs by nature (times, host names, process ids).
RUN_RECORDS = ("logs", "benchmarks")


def partial_files(results: Path) -> list[Path]:
    return sorted(p for p in results.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp"))


def result_files(results: Path) -> list[Path]:
    return sorted(p.relative_to(results) for p in results.rglob("*")
                  if p.is_file() and p.relative_to(results).parts[0] not in RUN_RECORDS)


def assert_same_file(a: Path, b: Path, root_a: Path, root_b: Path) -> None:
    """Equal content: voxels, affine and header text for NIfTI, pixels for PNG, bytes otherwise (the run
    folder's own path, which tables such as scans.tsv name, read as one placeholder)."""
    if a.name.endswith((".nii.gz", ".nii")):
        ia, ib = nib.load(a), nib.load(b)
        np.testing.assert_array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj), err_msg=str(a))
        np.testing.assert_array_equal(ia.affine, ib.affine)
        assert ia.header["descrip"] == ib.header["descrip"]
    elif a.suffix == ".png":
        import matplotlib.image

        np.testing.assert_array_equal(matplotlib.image.imread(a), matplotlib.image.imread(b), err_msg=str(a))
    else:
        assert (a.read_bytes().replace(bytes(root_a), b"<run>")
                == b.read_bytes().replace(bytes(root_b), b"<run>")), a


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """`snakemake preprocess` on a two-scan demo, uninterrupted: the reference run."""
    workdir = tmp_path_factory.mktemp("small_run")
    config = write_config(workdir / "small.yaml", SMALL)
    run_snakemake(workdir, "preprocess", configfiles=[config])
    return workdir, config


def test_a_writer_killed_mid_write_leaves_no_file_at_the_target_and_its_rerun_no_partial(tmp_path):
    target = tmp_path / "ras" / "S1" / "I1.nii.gz"
    script = ("import sys, numpy as np, nibabel as nib; from workflow_scripts.common import nifti_io; "
              "data = np.random.default_rng(0).random((256, 256, 200), dtype=np.float32); "
              "nifti_io.save_nifti_atomic(nib.Nifti1Image(data, np.eye(4)), sys.argv[1])")
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not partial_files(tmp_path) and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial_files(tmp_path), "the writer finished before its partial file was seen"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not target.exists() and len(partial_files(tmp_path)) == 1  # what kill -9 leaves
    nifti_io.save_nifti_atomic(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), target)
    assert partial_files(tmp_path) == [] and nib.load(target).shape == (4, 4, 4)


def test_kill_9_during_preprocessing_then_the_same_command_gives_the_uninterrupted_outputs(small_run, tmp_path):
    reference, config = small_run
    shutil.copytree(reference / "demo_data", tmp_path / "demo_data")  # the same generated collection
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "preprocess", "--configfile", str(config)]
    run = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    results = tmp_path / "results"
    deadline = time.monotonic() + 600
    # kill when a job is writing a file, or else once a stage job of the second half has started
    while run.poll() is None and time.monotonic() < deadline:
        if partial_files(results) or list(results.glob("logs/n4/*/*.log")):
            break
        time.sleep(0.01)
    assert run.poll() is None, "the run finished before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (results / "usable.tsv").exists()
    # the README's recovery: unlock (the killed Snakemake left its lock), then the same command
    subprocess.run(cmd + ["--unlock"], cwd=tmp_path, check=True, capture_output=True)
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert partial_files(results) == []
    assert result_files(results) == result_files(reference / "results")
    for rel in result_files(results):
        assert_same_file(results / rel, reference / "results" / rel, tmp_path, reference)


def test_the_environments_snakemake_runs_without_activating_it(small_run, tmp_path):
    reference, config = small_run
    shutil.copytree(reference / "demo_data", tmp_path / "demo_data")
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}  # no virtual environment
    snakemake = Path(sys.executable).parent / "snakemake"
    result = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores",
                             "1", "results/scans.tsv", "--configfile", str(config)], cwd=tmp_path, env=bare,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scans = pd.read_csv(tmp_path / "results" / "scans.tsv", sep="\t")
    assert len(scans) == 2


def test_a_local_run_never_declares_more_memory_than_the_machine_has(small_run):
    from workflow_scripts.common.cli import machine_memory_mb

    reference, config = small_run
    machine = machine_memory_mb()
    big = write_config(reference / "big.yaml", {"resources": {"nifti": {"threads": 1, "mem_mb": 10 * machine,
                                                                        "runtime": 15}}})
    scan = pd.read_csv(reference / "results" / "scans.tsv", sep="\t", dtype=str).iloc[0]
    target = f"results/nifti/{scan['subject']}/{scan['image_id']}.nii.gz"
    plan = run_snakemake(reference, target, "-n", "--forcerun", "nifti", configfiles=[config, big]).stdout
    assert f"mem_mb={machine}," in plan and f"mem_mb={10 * machine}" not in plan


def job_intervals(results: Path) -> list[tuple[float, float, int]]:
    """(start, end, threads) of every benchmarked job: Snakemake writes the benchmark file when the job ends,
    with its wall time in seconds."""
    import yaml

    resources = yaml.safe_load((REPO / "config.yaml").read_text())["resources"]
    jobs = []
    for tsv in (results / "benchmarks").rglob("*.tsv"):
        parts = tsv.relative_to(results / "benchmarks").parts
        rule = parts[0].removesuffix(".tsv")
        key = {"demo_collection": "demo", "qc_metrics": "qc"}.get(rule, rule)  # the resources entry a rule uses
        seconds = float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])
        end = tsv.stat().st_mtime
        jobs.append((end - seconds, end, int(resources[key]["threads"])))
    return jobs


def test_jobs_running_at_once_never_claim_more_threads_than_the_cores_given(small_run):
    reference, _ = small_run
    jobs = job_intervals(reference / "results")
    assert len(jobs) >= 2 * 7  # every stage and the QC montage of both scans
    events = sorted([(start + 0.05, threads) for start, _, threads in jobs]  # 50 ms of timing slack
                    + [(end, -threads) for _, end, threads in jobs], key=lambda e: (e[0], e[1]))
    running, peak = 0, 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 2, f"{peak} threads ran at once with --cores 2"


def test_a_user_exclusion_drops_the_scan_and_reruns_only_what_depends_on_it(small_run):
    workdir, config = small_run
    results = workdir / "results"
    usable = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    chosen = usable["image_id"].iloc[0]
    (workdir / "exclusions.tsv").write_text(f"image_id\treason\n{chosen}\tghosting on the QC montage\n")
    exclude = write_config(workdir / "exclude.yaml", {"data": {"exclude_scans": "exclusions.tsv"}})
    stages = {p: p.stat().st_mtime_ns for p in results.glob("*/*/*.nii.gz")}
    plan = run_snakemake(workdir, "preprocess", "-n", configfiles=[config, exclude]).stdout
    assert "usable_scans" in plan
    assert not any(f"rule {stage}:" in plan for stage in ("nifti", "stripped", "resampled", "cropped128", "n4", "ras"))
    run_snakemake(workdir, "preprocess", configfiles=[config, exclude])
    dropped = pd.read_csv(results / "dropped.tsv", sep="\t", dtype=str)
    assert dropped.set_index("image_id").loc[chosen, "reason_code"] == "excluded_by_user"
    assert "ghosting on the QC montage" in dropped.set_index("image_id").loc[chosen, "reason"]
    assert chosen not in set(pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)["image_id"])
    assert {p: p.stat().st_mtime_ns for p in results.glob("*/*/*.nii.gz")} == stages  # no stage reran
