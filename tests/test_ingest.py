"""Ingest: collection CSV + DICOM tree -> scans and excluded tables, each exclusion with its reason."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import nibabel as nib
import pandas as pd
import pytest

from conftest import (COLLECTION_HEADER, VENDOR_DICOM, VENDOR_FAILING, VENDOR_GOOD, collection_row,
                      place_series)
from workflow_scripts import ingest
from workflow_scripts.convert import convert_series

DESCRIPTIONS = ["MPRAGE", "MP-RAGE REPEAT", "Accelerated Sagittal MPRAGE"]


def tables(vendor_collection):
    return ingest.build_tables(ingest.read_collection_csv(vendor_collection["csv"]), vendor_collection["root"],
                               classes=["AD", "CN"], descriptions=DESCRIPTIONS)


def test_vendor_series_that_convert_are_accepted_and_failing_ones_excluded_with_the_converter_reason(
        vendor_collection):
    scans, excluded = tables(vendor_collection)
    by_image = vendor_collection["series"]
    assert sorted(by_image[i] for i in scans["image_id"]) == sorted(VENDOR_GOOD)
    assert sorted(by_image[i] for i in excluded["image_id"]) == sorted(VENDOR_FAILING)
    assert set(excluded["reason_code"]) == {"not_a_volume"}
    reasons = dict(zip((by_image[i] for i in excluded["image_id"]), excluded["reason"]))
    assert "TOO_FEW_SLICES/LOCALIZER" in reasons["failing/slicecount/001"]
    assert "GANTRY_TILT" in reasons["failing/gantrytilting/001"]
    assert "SLICE_INCREMENT_INCONSISTENT" in reasons["failing/sliceincrement/001"]
    assert "IMAGE_ORIENTATION_INCONSISTENT" in reasons["failing/sliceorientation/001"]
    assert all(r.startswith("not a volume: dicom2nifti rejects the series") for r in reasons.values())


@pytest.mark.parametrize("series", VENDOR_GOOD)
def test_vendor_series_convert_to_their_reference_volume(series):
    img = convert_series(VENDOR_DICOM / series)
    reference = nib.load(VENDOR_DICOM / f"{series}_ground_truth_reoriented.nii.gz")
    assert img.shape == reference.shape
    np.testing.assert_allclose(img.get_fdata(), reference.get_fdata(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-4)
    assert img.header["descrip"].tobytes().rstrip(b"\x00") == b"dicom2nifti"


def test_every_exclusion_reason(tmp_path):
    good = VENDOR_DICOM / "siemens/anatomical/001"
    rows = []

    def add(image_id, subject, folder=good, **kw):
        if folder is not None:
            place_series(tmp_path, folder, subject, image_id, kw.get("description", "MPRAGE"))
        rows.append(collection_row(image_id, subject, **kw))

    add("I1", "002_S_0001", group="AD")                                   # usable
    add("I2", "002_S_0002", group="MCI")                                  # group not in classes
    add("I3", "002_S_0003", description="Localizer")                      # not MPRAGE
    add("I4", "002_S_0004", folder=None)                                  # missing on disk
    add("I5", "002_S_0005", group="AD")                                   # conflicting labels ...
    add("I6", "002_S_0005", group="CN", visit="m12")                      # ... of one subject
    rows.append(collection_row("I1", "002_S_0001", group="AD"))           # duplicate row
    add("I7", "002_S_0007", group="CN")                                   # same series as I1
    add("I8", "002_S_0008", folder=VENDOR_DICOM / "failing/slicecount/001")  # not a volume
    add("I9", "002_S_0009", folder=VENDOR_DICOM / "ge/anatomical/001",
        description="MP-RAGE_repeat")                                     # variant spelling: usable
    (tmp_path / "ADNI/002_S_0010/MPRAGE/2006-04-18_08_20_30.0/I10").mkdir(parents=True)
    (tmp_path / "ADNI/002_S_0010/MPRAGE/2006-04-18_08_20_30.0/I10/junk.dcm").write_text("not dicom")
    rows.append(collection_row("I10", "002_S_0010"))                      # unreadable
    rows.append({**collection_row("I11", "002_S_0011"), "Type": "Processed"})  # derivative
    csv = tmp_path / "collection.csv"
    pd.DataFrame(rows, columns=COLLECTION_HEADER).to_csv(csv, index=False)

    scans, excluded = ingest.build_tables(ingest.read_collection_csv(csv), tmp_path, classes=["AD", "CN"],
                                          descriptions=DESCRIPTIONS)
    assert list(scans["image_id"]) == ["I1", "I9"]
    assert scans.loc[0, "group"] == "AD" and scans.loc[0, "phase"] == "ADNI1"
    assert scans.loc[0, "acq_date"] == "2006-04-18"
    codes = dict(zip(excluded["image_id"] + "/" + excluded.index.astype(str), excluded["reason_code"]))
    by_id = excluded.groupby("image_id")["reason_code"].apply(list).to_dict()
    assert by_id == {"I2": ["group_not_in_classes"], "I3": ["not_t1_mprage"], "I4": ["missing_on_disk"],
                     "I5": ["conflicting_group"], "I6": ["conflicting_group"], "I1": ["duplicate_row"],
                     "I7": ["duplicate_series"], "I8": ["not_a_volume"], "I10": ["not_a_volume"],
                     "I11": ["not_original"]}, codes
    reason = excluded.set_index("image_id")["reason"]
    assert "MCI" in reason["I2"] and "AD, CN" in reason["I2"]
    assert "ADNI/002_S_0004/*/*/I4" in reason["I4"]
    assert "I1" in reason["I7"]
    assert "no imaging DICOM" in reason["I10"] or "unreadable" in reason["I10"]


def test_phase_comes_from_the_rid():
    assert ingest.phase_of("002_S_0295") == "ADNI1"
    assert ingest.phase_of("941_S_4036") == "ADNI2"
    assert ingest.phase_of("033_S_6266") == "ADNI3"
    assert ingest.phase_of("not-an-id") == "unknown"


def test_a_csv_that_is_not_a_collection_is_named(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="other.csv is not an ADNI/IDA collection CSV.*Image Data ID"):
        ingest.read_collection_csv(bad)


def test_cli_writes_both_tables_and_reuses_the_series_check_cache(vendor_collection, tmp_path):
    cache = tmp_path / "cache.json"
    cmd = [sys.executable, "-m", "workflow_scripts.ingest", "--collection-csv", str(vendor_collection["csv"]),
           "--adni-root", str(vendor_collection["root"]), "--classes", "AD", "CN",
           "--descriptions", *DESCRIPTIONS, "--check-cache", str(cache),
           "--scans", str(tmp_path / "scans.tsv"), "--excluded", str(tmp_path / "excluded.tsv")]
    subprocess.run(cmd, check=True, capture_output=True)
    scans = pd.read_csv(tmp_path / "scans.tsv", sep="\t")
    assert len(scans) == len(VENDOR_GOOD) and "image_id" in scans.columns
    assert "image_id" in pd.read_csv(tmp_path / "excluded.tsv", sep="\t").columns
    cached = ingest.json.loads(cache.read_text())
    assert len(cached) == len(VENDOR_GOOD) + len(VENDOR_FAILING)
    # a cached verdict is reused as long as the series is unchanged
    folder = next(iter(cached))
    cached[folder]["check"]["reason"] = "from cache"
    cached[folder]["check"]["ok"] = False
    assert ingest._cached_check(ingest.Path(folder), cached).reason == "from cache"
