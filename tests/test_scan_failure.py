"""Per-scan failure isolation: a scan's own bad data drops that scan with a record, a bug still fails the job,
and the usable-scans table lists what passed, what was dropped and why."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import VENDOR_DICOM
from workflow_scripts.common import cli, nifti_io, scan_failure
from workflow_scripts.preprocess import usable_scans
from workflow_scripts.preprocess.n4 import check_finite
from workflow_scripts.preprocess.skullstrip import check_mask


def image(shape=(20, 20, 20), zoom=2.0) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.ones(shape, np.float32), np.diag([zoom, zoom, zoom, 1.0]))


def test_a_data_error_writes_the_record_into_every_output_and_later_stages_pass_it_on(tmp_path):
    outputs = [tmp_path / "stripped" / "S1" / "I1.nii.gz", tmp_path / "stripped" / "S1" / "I1_mask.nii.gz"]

    def work():
        nifti_io.save_nifti_atomic(image(), outputs[1])  # half the outputs written before the failure
        raise scan_failure.ScanDataError("empty_brain_mask", "no brain")

    record = scan_failure.run_stage("stripped", [], outputs, work)
    assert record == {"stage": "stripped", "reason_code": "empty_brain_mask", "reason": "no brain",
                      "subject": "S1", "image_id": "I1"}
    assert [scan_failure.read_failure(p) for p in outputs] == [record, record]
    with pytest.raises(OSError, match="failure record of a scan dropped at stage stripped .empty_brain_mask"):
        nifti_io.load_nifti(outputs[0])  # never read as a brain

    later = tmp_path / "n4" / "S1" / "I1.nii.gz"
    called = []
    assert scan_failure.run_stage("n4", outputs, [later], lambda: called.append(1)) == record
    assert not called and scan_failure.read_failure(later) == record


def test_a_bug_still_fails_the_job_and_leaves_no_record(tmp_path):
    out = tmp_path / "nifti" / "S1" / "I1.nii.gz"

    def work():
        raise TypeError("a programming error")

    with pytest.raises(TypeError):
        scan_failure.run_stage("nifti", [], [out], work)
    assert not out.exists()
    assert scan_failure.run_stage("nifti", [], [out], lambda: nifti_io.save_nifti_atomic(image(), out)) is None
    assert scan_failure.read_failure(out) is None and nib.load(out).shape == (20, 20, 20)


def test_a_series_with_truncated_pixel_data_is_dropped_at_conversion_not_fatal(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(VENDOR_DICOM / "siemens" / "anatomical" / "001", series)
    first = sorted(series.iterdir())[0]
    os.truncate(first, first.stat().st_size - 2000)  # headers intact, pixel data cut short
    out = tmp_path / "nifti" / "002_S_0001" / "I7.nii.gz"
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.preprocess.convert", "--dicom-dir", str(series),
                             "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = scan_failure.read_failure(out)
    assert record["stage"] == "nifti" and record["reason_code"] == "conversion_failed"
    assert "pixel data is less than expected" in record["reason"] and str(series) in record["reason"]
    assert (record["subject"], record["image_id"]) == ("002_S_0001", "I7")


def test_empty_and_implausible_masks_are_the_scans_failure():
    img = image((50, 50, 50), zoom=2.0)  # 8 mm^3 voxels
    mask = np.zeros((50, 50, 50), bool)
    with pytest.raises(scan_failure.ScanDataError) as empty:
        check_mask(mask, img, "deepbet", (600, 2500))
    assert empty.value.reason_code == "empty_brain_mask"
    mask[:10, :10, :10] = True  # 8 mL: not a brain
    with pytest.raises(scan_failure.ScanDataError, match="brain mask is 8 < 600 .minimum. mL") as small:
        check_mask(mask, img, "deepbet", (600, None))
    assert small.value.reason_code == "implausible_brain_mask"
    mask[:] = False
    mask[5:45, 5:45, 5:30] = True  # 40 x 40 x 25 voxels x 8 mm^3 = 320 mL
    assert check_mask(mask, img, "deepbet", (300, 2500)) == pytest.approx(320.0)
    with pytest.raises(cli.PipelineError, match="shape"):  # a misshapen mask is a bug, not the scan's fault
        check_mask(mask[:-1], img, "deepbet")


def test_non_finite_n4_output_drops_the_scan():
    data = np.ones((4, 4, 4), np.float32)
    check_finite(data)
    data[1, 2, 3] = np.nan
    with pytest.raises(scan_failure.ScanDataError, match="1 non-finite voxels of 64") as err:
        check_finite(data)
    assert err.value.reason_code == "non_finite_after_n4"


def test_a_rewrite_removes_partial_files_a_killed_writer_left(tmp_path):
    target = tmp_path / "I1.nii.gz"
    stale = tmp_path / f"{nifti_io.partial_prefix(target)}x8k2.nii.gz"
    stale.write_bytes(b"")  # what kill -9 during a write leaves behind
    other = tmp_path / ".I10.nii.gz.partial-abcd.nii.gz"  # another file's partial stays
    other.write_bytes(b"")
    nifti_io.save_nifti_atomic(image(), target)
    assert not stale.exists() and other.exists() and nib.load(target).shape == (20, 20, 20)


def scans() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["I1", "I2", "I3", "I4"], "subject": ["S1", "S1", "S2", "S3"],
                         "group": ["AD", "AD", "CN", "CN"], "visit": ["sc", "m12", "sc", "sc"]})


def test_usable_scans_drop_stage_failures_then_the_users_choice(tmp_path):
    pattern = str(tmp_path / "ras" / "{subject}" / "{image_id}.nii.gz")
    for row in scans().to_dict("records"):
        nifti_io.save_nifti_atomic(image(), pattern.format(**row))
    failed = {"stage": "stripped", "reason_code": "implausible_brain_mask", "reason": "12 mL"}
    scan_failure.write_failure([pattern.format(subject="S2", image_id="I3")], failed)
    failures = usable_scans.stage_failures(scans(), pattern)
    assert failures == {"I3": failed}
    user = pd.DataFrame({"image_id": ["I2", "I3"], "reason": ["motion", "also bad"]})
    usable, dropped = usable_scans.split_usable(scans(), failures, user, known_ids={"I1", "I2", "I3", "I4"})
    assert list(usable["image_id"]) == ["I1", "I4"]
    assert dropped.set_index("image_id")["reason_code"].to_dict() == {"I2": "excluded_by_user",
                                                                      "I3": "implausible_brain_mask"}
    assert dropped.set_index("image_id").loc["I2", "reason"] == "excluded by the user: motion"
    assert dropped.set_index("image_id").loc["I3", "stage"] == "stripped"
    with pytest.raises(cli.PipelineError, match="not in the collection: I99"):
        usable_scans.split_usable(scans(), failures, pd.DataFrame({"image_id": ["I99"], "reason": ["x"]}),
                                  known_ids={"I1", "I2", "I3", "I4"})


def test_the_user_exclusion_table_is_checked(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("image_id\treason\n I2 \tmotion on the montage\n\t\n")
    assert usable_scans.read_user_exclusions(good).to_dict("records") == [
        {"image_id": "I2", "reason": "motion on the montage"}]
    no_reason = tmp_path / "no_reason.tsv"
    no_reason.write_text("image_id\treason\nI2\t\n")
    with pytest.raises(cli.PipelineError, match="no reason for I2"):
        usable_scans.read_user_exclusions(no_reason)
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("image\twhy\nI2\tx\n")
    with pytest.raises(cli.PipelineError, match="lacks column.s. image_id, reason"):
        usable_scans.read_user_exclusions(wrong)


def test_the_cli_writes_both_tables_and_the_run_line_counts_them(tmp_path):
    pattern = str(tmp_path / "ras" / "{subject}" / "{image_id}.nii.gz")
    for row in scans().to_dict("records"):
        nifti_io.save_nifti_atomic(image(), pattern.format(**row))
    scan_failure.write_failure([pattern.format(subject="S1", image_id="I1")],
                               {"stage": "nifti", "reason_code": "conversion_failed", "reason": "truncated"})
    scans().to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    pd.DataFrame({"image_id": ["I9"], "reason_code": ["not_t1_mprage"]}).to_csv(tmp_path / "excluded.tsv",
                                                                                 sep="\t", index=False)
    (tmp_path / "mine.tsv").write_text("image_id\treason\nI9\talready out\nI4\tghosting\n")
    usable_scans.main(["--scans", str(tmp_path / "scans.tsv"), "--excluded", str(tmp_path / "excluded.tsv"),
                       "--ras-pattern", pattern, "--user-exclusions", str(tmp_path / "mine.tsv"),
                       "--usable", str(tmp_path / "usable.tsv"), "--dropped", str(tmp_path / "dropped.tsv")])
    usable = pd.read_csv(tmp_path / "usable.tsv", sep="\t", dtype=str)
    dropped = pd.read_csv(tmp_path / "dropped.tsv", sep="\t", dtype=str)
    assert list(usable.columns) == list(scans().columns) and list(usable["image_id"]) == ["I2", "I3"]
    assert list(dropped.columns) == list(usable_scans.DROPPED_COLUMNS)
    assert dict(zip(dropped["image_id"], dropped["reason_code"])) == {"I1": "conversion_failed",
                                                                      "I4": "excluded_by_user"}
    line = usable_scans.outcome_line(tmp_path)
    assert line.startswith("scans: 2 used, 2 dropped after ingest") and "1 left out by ingest" in line
    assert str(tmp_path / "dropped.tsv") in line and str(tmp_path / "excluded.tsv") in line
