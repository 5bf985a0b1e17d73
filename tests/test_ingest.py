"""Ingest: collection CSV + DICOM tree -> scans and excluded tables, each exclusion with its reason."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import nibabel as nib
import pandas as pd
import pydicom
import pytest
import yaml

from conftest import (COLLECTION_HEADER, REPO, VENDOR_DICOM, VENDOR_FAILING, VENDOR_GOOD, collection_row,
                      ingest_options, place_series)
from workflow_scripts.data import demo_faults, ingest
from workflow_scripts.preprocess.convert import convert_series

DESCRIPTIONS = ["MPRAGE", "MP-RAGE REPEAT", "Accelerated Sagittal MPRAGE"]
DATA_DEFAULTS = yaml.safe_load((REPO / "config.yaml").read_text())["data"]
CONFIGURED = {"min_slice_share": DATA_DEFAULTS["min_slice_share"], "min_extent_mm": DATA_DEFAULTS["min_extent_mm"]}
# The vendor fixtures are 4-slice (one 8-frame) test volumes, 2-16 mm across their slices: no
# whole head passes data.min_extent_mm, so tests on them lower it (and keep the slice share).
VENDOR_LIMITS = {**CONFIGURED, "min_extent_mm": 1.0}
SIEMENS = VENDOR_DICOM / "siemens/anatomical/001"


def tables(collection_csv: Path, root: Path, cache: dict | None = None, **limits):
    return ingest.build_tables(ingest.read_collection_csv(collection_csv), root, check_cache=cache,
                               **ingest_options(classes=["AD", "CN"], descriptions=DESCRIPTIONS,
                                                **(limits or VENDOR_LIMITS)))


def write_collection(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows, columns=COLLECTION_HEADER).to_csv(path, index=False)
    return path


def reasons_by_id(excluded: pd.DataFrame) -> dict[str, tuple[str, str]]:
    return {i: (c, r) for i, c, r in zip(excluded["image_id"], excluded["reason_code"], excluded["reason"])}


def one_series(tmp_path: Path, source: Path = SIEMENS, image_id: str = "I1", group: str = "AD") -> Path:
    """A collection of one series copied from ``source``; returns the copied folder."""
    folder = place_series(tmp_path, source, "002_S_0001", image_id)
    write_collection(tmp_path / "collection.csv", [collection_row(image_id, "002_S_0001", group=group)])
    return folder


def test_vendor_series_that_convert_are_accepted_and_failing_ones_excluded_with_the_converter_reason(
        vendor_collection):
    scans, excluded = tables(vendor_collection["csv"], vendor_collection["root"])
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


def test_with_the_configured_min_extent_every_vendor_test_volume_is_too_small(vendor_collection):
    scans, excluded = tables(vendor_collection["csv"], vendor_collection["root"], **CONFIGURED)
    assert scans.empty
    small = excluded[excluded["reason_code"] == "too_small_extent"]
    assert sorted(vendor_collection["series"][i] for i in small["image_id"]) == sorted(VENDOR_GOOD)
    siemens = small.loc[small["image_id"].map(vendor_collection["series"]) == "siemens/anatomical/001", "reason"]
    assert "256 x 256 x 4 mm" in siemens.iloc[0] and "slices 4 mm" in siemens.iloc[0]
    assert f"data.min_extent_mm={CONFIGURED['min_extent_mm']:g}" in siemens.iloc[0]


@pytest.mark.parametrize("series", VENDOR_GOOD)
def test_vendor_series_convert_to_their_reference_volume(series):
    img = convert_series(VENDOR_DICOM / series)
    reference = nib.load(VENDOR_DICOM / f"{series}_ground_truth_reoriented.nii.gz")
    assert img.shape == reference.shape
    np.testing.assert_allclose(img.get_fdata(), reference.get_fdata(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-4)
    assert img.header["descrip"].tobytes().rstrip(b"\x00") == b"dicom2nifti"
    # the field of view ingest computes from the headers is the converted volume's
    reference_extent = np.array(reference.shape[:3]) * np.array(reference.header.get_zooms()[:3])
    check = ingest.check_series(VENDOR_DICOM / series)
    np.testing.assert_allclose(sorted(check.extent_mm), sorted(reference_extent), rtol=1e-3)


def test_every_exclusion_reason(tmp_path):
    rows = []

    def add(image_id, subject, folder=SIEMENS, **kw):
        if folder is not None:
            place_series(tmp_path, folder, subject, image_id, kw.get("description", "MPRAGE"))
        rows.append(collection_row(image_id, subject, **kw))

    add("I1", "002_S_0001", group="AD")                                   # usable
    add("I2", "002_S_0002", group="MCI")                                  # group not in classes
    add("I3", "002_S_0003", description="Localizer")                      # not MPRAGE
    add("I4", "002_S_0004", folder=None)                                  # missing on disk
    add("I5", "002_S_0005", group="AD")                                   # a converter (label policy) ...
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
    csv = write_collection(tmp_path / "collection.csv", rows)

    scans, excluded = tables(csv, tmp_path)
    assert list(scans["image_id"]) == ["I1", "I9"]
    assert scans.loc[0, "group"] == "AD" and scans.loc[0, "phase"] == "ADNI1"
    assert scans.loc[0, "acq_date"] == "2006-04-18"
    by_id = excluded.groupby("image_id")["reason_code"].apply(list).to_dict()
    assert by_id == {"I2": ["group_not_in_classes"], "I3": ["not_t1_mprage"], "I4": ["missing_on_disk"],
                     "I5": ["converter"], "I6": ["converter"], "I1": ["duplicate_row"],
                     "I7": ["duplicate_series"], "I8": ["not_a_volume"], "I10": ["unreadable_dicom"],
                     "I11": ["not_original"]}
    assert list(excluded["image_id"]) == ["I2", "I3", "I4", "I5", "I6", "I1", "I7", "I8", "I10", "I11"]  # CSV order
    reason = excluded.set_index("image_id")["reason"]
    assert "MCI" in reason["I2"] and "AD, CN" in reason["I2"]
    assert "ADNI/002_S_0004/*/*/I4" in reason["I4"]
    assert "I1" in reason["I7"]
    assert "I10/junk.dcm is not a readable DICOM file" in reason["I10"]


def _cut(path: Path, n_bytes: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - n_bytes)


@pytest.mark.parametrize("damage, code, words", [
    ("cut_pixels", "truncated_pixel_data", "pixel data has 130072 bytes where the header declares 256 rows x "
                                           "256 columns x 1 frame(s) x 1 sample(s) x 16 bits / 8 = 131072 bytes"),
    ("cut_header", "truncated_pixel_data", "has no pixel data: the file ends after 600 bytes"),
    ("long_pixels", "bad_pixel_data", "pixel data has 131076 bytes, more than the header declares"),
    ("garbage", "unreadable_dicom", "is not a readable DICOM file"),
])
def test_a_damaged_file_excludes_its_scan_with_its_own_reason_naming_the_file(tmp_path, damage, code, words):
    folder = one_series(tmp_path)
    victim = sorted(folder.iterdir())[2]
    if damage == "cut_pixels":
        _cut(victim, 1000)
    elif damage == "cut_header":
        _cut(victim, victim.stat().st_size - 600)
    elif damage == "long_pixels":
        ds = pydicom.dcmread(victim)
        ds.PixelData = ds.PixelData + b"\0\0\0\0"
        ds.save_as(victim)
    else:
        victim.write_bytes(b"GIF89a" + bytes(2000))   # not DICOM: no DICM marker
    scans, excluded = tables(tmp_path / "collection.csv", tmp_path)
    assert scans.empty
    assert reasons_by_id(excluded)["I1"][0] == code
    assert str(victim) in reasons_by_id(excluded)["I1"][1] and words in reasons_by_id(excluded)["I1"][1]


def _rle_series(source: Path, target: Path) -> list[Path]:
    """``source`` re-encoded as RLE Lossless, a compressed (encapsulated) transfer syntax."""
    from pydicom.uid import RLELossless

    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(target / path.name)
    return sorted(target.iterdir())


def test_compressed_series_are_accepted_and_broken_fragments_named(tmp_path):
    files = _rle_series(VENDOR_DICOM / "hitachi/anatomical/001", tmp_path / "rle")
    assert ingest.check_series(tmp_path / "rle").ok
    ds = pydicom.dcmread(files[1])
    data = ds.PixelData
    ds.PixelData = data[:12] + b"\0\0\0\0" + data[16:]   # the first fragment's item tag
    ds.save_as(files[1])
    check = ingest.check_series(tmp_path / "rle")
    assert (check.ok, check.code) == (False, "bad_pixel_data")
    assert str(files[1]) in check.reason and "compressed pixel data does not parse" in check.reason
    _cut(files[2], 100)   # a cut encapsulated element: pydicom finds no pixel data at all
    check = ingest.check_series(tmp_path / "rle")
    assert check.code in ("bad_pixel_data", "truncated_pixel_data")


def test_a_folder_with_two_series_is_mixed_series_naming_both_uids_and_counts(tmp_path):
    folder = one_series(tmp_path)
    ge = sorted((VENDOR_DICOM / "ge/anatomical/001").iterdir())
    for path in ge[:3]:
        shutil.copy(path, folder / f"ge_{path.name}")
    scans, excluded = tables(tmp_path / "collection.csv", tmp_path)
    code, reason = reasons_by_id(excluded)["I1"]
    assert scans.empty and code == "mixed_series"
    for series, count in ((SIEMENS, 4), (VENDOR_DICOM / "ge/anatomical/001", 3)):
        uid = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        assert f"{uid} ({count} files)" in reason


def test_same_image_id_in_two_folders_is_ambiguous_unless_the_copies_are_identical(tmp_path, caplog):
    first = one_series(tmp_path)
    other = place_series(tmp_path, VENDOR_DICOM / "ge/anatomical/001", "002_S_0001", "I1",
                         acq="2006-04-19_09_00_00.0")
    scans, excluded = tables(tmp_path / "collection.csv", tmp_path)
    code, reason = reasons_by_id(excluded)["I1"]
    assert scans.empty and code == "ambiguous_image_id"
    assert str(first) in reason and str(other) in reason

    shutil.rmtree(other)
    shutil.copytree(first, other)   # an identical copy: one image, used once, from the first folder
    with caplog.at_level(logging.INFO, logger="workflow_scripts.data.ingest"):
        scans, excluded = tables(tmp_path / "collection.csv", tmp_path)
    assert excluded.empty and list(scans["image_id"]) == ["I1"] and scans.loc[0, "dicom_dir"] == str(first)
    assert f"identical copies (same SeriesInstanceUID and SOPInstanceUIDs); using {first}" in caplog.text


def test_series_files_walks_subfolders_in_path_order_skipping_hidden_names_and_linked_folders(tmp_path):
    folder = tmp_path / "I1"
    for rel in ("b.dcm", "a/2.dcm", "a-b.dcm", "a/sub/1.dcm", "a/.DS_Store", ".hidden/x.dcm"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)  # entered, it would list I1 again
    (folder / "link.dcm").symlink_to(folder / "b.dcm")
    # path order, not string order ("a-b.dcm" < "a/2.dcm"): it decides which damaged file is named first
    assert ingest.series_files(folder) == [folder / r for r in ("a/2.dcm", "a/sub/1.dcm", "a-b.dcm", "b.dcm",
                                                                "link.dcm")]
    before = ingest._series_fingerprint(folder)
    (folder / ".hidden/x.dcm").write_bytes(b"changed")
    assert ingest._series_fingerprint(folder) == before
    (folder / "a/sub/1.dcm").write_bytes(b"changed")
    assert ingest._series_fingerprint(folder) != before


def test_the_check_cache_reads_only_new_or_changed_series(tmp_path, monkeypatch):
    rows = []
    for n, rel in enumerate(VENDOR_GOOD[:4]):
        place_series(tmp_path, VENDOR_DICOM / rel, f"002_S_000{n}", f"I{n}")
        rows.append(collection_row(f"I{n}", f"002_S_000{n}", group="AD" if n % 2 else "CN"))
    csv = write_collection(tmp_path / "collection.csv", rows)
    read = []
    real_check = ingest.check_series
    monkeypatch.setattr(ingest, "check_series", lambda folder: read.append(Path(folder).name) or real_check(folder))

    cache: dict = {}
    first, _ = tables(csv, tmp_path, cache)
    assert sorted(read) == ["I0", "I1", "I2", "I3"] and len(first) == 4
    read.clear()
    again, _ = tables(csv, tmp_path, cache)
    assert read == [] and again.equals(first)

    # a new phase: one more image; and a rewritten file in an old one
    place_series(tmp_path, VENDOR_DICOM / VENDOR_GOOD[4], "002_S_0004", "I4")
    write_collection(csv, rows + [collection_row("I4", "002_S_0004")])
    touched = sorted((tmp_path / "ADNI/002_S_0002").rglob("*.dcm"))[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    scans, _ = tables(csv, tmp_path, cache)
    assert sorted(read) == ["I2", "I4"] and len(scans) == 5


def test_parallel_workers_give_the_same_tables_and_fill_the_cache(vendor_collection):
    serial = tables(vendor_collection["csv"], vendor_collection["root"])
    cache: dict = {}
    parallel = ingest.build_tables(ingest.read_collection_csv(vendor_collection["csv"]), vendor_collection["root"],
                                   check_cache=cache, workers=2,
                                   **ingest_options(classes=["AD", "CN"], descriptions=DESCRIPTIONS, **VENDOR_LIMITS))
    assert parallel[0].equals(serial[0]) and parallel[1].equals(serial[1])
    assert len(cache) == len(VENDOR_GOOD) + len(VENDOR_FAILING)


def test_a_cache_written_by_another_version_of_the_checks_is_never_reused(tmp_path, monkeypatch):
    folder = one_series(tmp_path)
    _cut(sorted(folder.iterdir())[0], 500)
    fingerprint = ingest._series_fingerprint(folder)
    # what the header-only checker (version 1, no version field) wrote for this same series
    stale = {"fingerprint": fingerprint, "check": {"ok": True, "reason": "", "series_uid": "1.2.3",
                                                   "manufacturer": "SIEMENS", "n_slices": 4}}
    for entry in (stale, {**stale, "version": ingest.CHECK_VERSION - 1}):
        cache = {str(folder): dict(entry)}
        scans, excluded = tables(tmp_path / "collection.csv", tmp_path, cache)
        assert scans.empty and reasons_by_id(excluded)["I1"][0] == "truncated_pixel_data"
        assert cache[str(folder)]["version"] == ingest.CHECK_VERSION
        assert cache[str(folder)]["check"]["code"] == "truncated_pixel_data"


def test_cli_writes_both_tables_and_reuses_the_series_check_cache(vendor_collection, tmp_path):
    cache = tmp_path / "cache.json"
    cmd = [sys.executable, "-m", "workflow_scripts.data.ingest", "--collection-csv", str(vendor_collection["csv"]),
           "--adni-root", str(vendor_collection["root"]), "--check-cache", str(cache),
           "--settings", json.dumps({"data": {**DATA_DEFAULTS, "classes": ["AD", "CN"], "descriptions": DESCRIPTIONS,
                                              **VENDOR_LIMITS}}),
           "--scans", str(tmp_path / "scans.tsv"), "--excluded", str(tmp_path / "excluded.tsv")]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    scans = pd.read_csv(tmp_path / "scans.tsv", sep="\t")
    assert len(scans) == len(VENDOR_GOOD) and "image_id" in scans.columns
    assert "image_id" in pd.read_csv(tmp_path / "excluded.tsv", sep="\t").columns
    cached = ingest.json.loads(cache.read_text())
    assert len(cached) == len(VENDOR_GOOD) + len(VENDOR_FAILING)
    assert {entry["version"] for entry in cached.values()} == {ingest.CHECK_VERSION}
    # a cached verdict is reused as long as the series is unchanged
    folder = next(iter(cached))
    cached[folder]["check"]["reason"] = "from cache"
    cached[folder]["check"]["ok"] = False
    assert ingest._cached_check(Path(folder), cached).reason == "from cache"


def test_cli_with_no_usable_scan_exits_0_with_an_empty_scans_table_and_an_error_line(tmp_path):
    folder = one_series(tmp_path)
    _cut(sorted(folder.iterdir())[0], 500)
    cmd = [sys.executable, "-m", "workflow_scripts.data.ingest", "--collection-csv", str(tmp_path / "collection.csv"),
           "--adni-root", str(tmp_path),
           "--settings", json.dumps({"data": {**DATA_DEFAULTS, "classes": ["AD", "CN"], "descriptions": ["MPRAGE"],
                                              "min_slice_share": 0.5, "min_extent_mm": 1}}),
           "--scans", str(tmp_path / "scans.tsv"), "--excluded", str(tmp_path / "excluded.tsv")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scans.tsv").read_text().strip() == "\t".join(ingest.SCAN_COLUMNS)
    excluded = pd.read_csv(tmp_path / "excluded.tsv", sep="\t")
    assert list(excluded["reason_code"]) == ["truncated_pixel_data"]
    assert re.search(rf" ERROR [\w.]+: no usable scans in {re.escape(str(tmp_path / 'collection.csv'))}", result.stderr)
    assert str(tmp_path / "excluded.tsv") in result.stderr


def test_phase_comes_from_the_rid():
    ranges = DATA_DEFAULTS["phase_rid_ranges"]
    assert ingest.phase_of("002_S_0295", ranges) == "ADNI1"
    assert ingest.phase_of("941_S_4036", ranges) == "ADNI2"
    assert ingest.phase_of("033_S_6266", ranges) == "ADNI3"
    assert ingest.phase_of("not-an-id", ranges) == "unknown"


def test_a_csv_that_is_not_a_collection_is_named(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="other.csv is not an ADNI/IDA collection CSV.*Image Data ID"):
        ingest.read_collection_csv(bad)


def _encoded_collection(tmp_path: Path, encoding: str) -> Path:
    """Two images (groups ' ad' and 'cn '), an Excel-style blank row and a non-ASCII description."""
    rows = [collection_row("I1", "002_S_0001", group=" ad"),
            collection_row("I2", "002_S_0002", group="cn ", description="Localizer \u2013 3 plane")]
    text = pd.DataFrame(rows, columns=COLLECTION_HEADER).to_csv(index=False, lineterminator="\r\n")
    text += "," * (len(COLLECTION_HEADER) - 1) + "\r\n" + "\r\n"
    path = tmp_path / f"collection_{encoding}.csv"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252"])
def test_csv_encodings_blank_rows_and_case_folded_groups(tmp_path, caplog, encoding):
    csv = _encoded_collection(tmp_path, encoding)
    place_series(tmp_path, SIEMENS, "002_S_0001", "I1")
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.data.ingest"):
        table = ingest.read_collection_csv(csv)
        scans, excluded = tables(csv, tmp_path)
    assert list(table.columns[:1]) == ["Image Data ID"] and list(table["Image Data ID"]) == ["I1", "I2"]
    assert list(scans["image_id"]) == ["I1"] and list(scans["group"]) == ["AD"]
    assert list(excluded["reason_code"]) == ["not_t1_mprage"]   # the blank row is no excluded row
    assert list(excluded["description"]) == ["Localizer \u2013 3 plane"] and list(excluded["group"]) == ["CN"]
    warned = "read it as Windows-1252" in caplog.text
    assert warned == (encoding == "cp1252")
    assert ingest.groups_in(csv) == ["ad", "cn"]
    assert ingest.classes_without_rows(csv, ["AD", "CN"]) == []
    assert ingest.classes_without_rows(csv, ["AD", "MCI", "Dementia"]) == ["MCI", "Dementia"]


def test_a_csv_in_neither_encoding_is_named(tmp_path):
    bad = tmp_path / "collection.csv"
    bad.write_bytes(b"Image Data ID,Subject,Group,Description\nI1,002_S_0001,A\x81D,MPRAGE\n")
    with pytest.raises(Exception, match="collection.csv is neither UTF-8 .* nor Windows-1252"):
        ingest.read_collection_csv(bad)


def test_plant_faults_gives_exactly_the_expected_ingest_outcome_for_every_kind(tiny_demo, tmp_path):
    root = tmp_path / "demo"
    for part in ("ADNI", "truth"):
        shutil.copytree(tiny_demo["root"] / part, root / part)
    shutil.copy(tiny_demo["csv"], root / "collection.csv")
    limits = ingest_options(classes=["AD", "CN"], descriptions=["MPRAGE"], **CONFIGURED)
    before_scans, before_excluded = ingest.build_tables(ingest.read_collection_csv(root / "collection.csv"),
                                                        root, **limits)
    tree_before = {p: p.stat().st_mtime_ns for p in (root / "ADNI").rglob("*") if p.is_file()}

    planted = demo_faults.plant_faults(root, root / "collection.csv", list(demo_faults.FAULT_KINDS), seed=5,
                                       phase_ranges=DATA_DEFAULTS["phase_rid_ranges"])
    assert sorted(set(planted["kind"])) == sorted(demo_faults.FAULT_KINDS)
    scans, excluded = ingest.build_tables(ingest.read_collection_csv(root / "collection.csv"), root, **limits)

    outcome = {i: "used" for i in scans["image_id"]} | dict(zip(excluded["image_id"], excluded["reason_code"]))
    assert {i: outcome[i] for i in planted["image_id"]} == dict(zip(planted["image_id"], planted["expected"]))
    # the collection's own images keep their outcome, and no existing file changed
    assert scans[scans["image_id"].isin(before_scans["image_id"])].reset_index(drop=True).equals(before_scans)
    assert excluded[excluded["image_id"].isin(before_excluded["image_id"])].reset_index(drop=True).equals(
        before_excluded)
    assert all(p.stat().st_mtime_ns == t for p, t in tree_before.items())
    assert len(scans) + len(excluded) == len(before_scans) + len(before_excluded) + len(planted)

    used = planted[planted["expected"] == "used"]
    assert scans.set_index("image_id").loc[used["image_id"], "group"].tolist() == used["group"].tolist()
    reasons = reasons_by_id(excluded)
    partial = planted.loc[planted["kind"] == "partial_series", "image_id"].iloc[0]
    assert "partial series: 17 slices" in reasons[partial][1] or "partial series: 18 slices" in reasons[partial][1]
    assert "median of 5" in reasons[partial][1]
    excel = planted.loc[planted["kind"] == "excel_csv", "image_id"].iloc[0]
    assert excluded.set_index("image_id").loc[excel, "description"] == demo_faults.EXCEL_DESCRIPTION
    raw = (root / "collection.csv").read_bytes()
    assert b"\x96" in raw and raw.endswith(b",,,,,,,,,,,\r\n,,,,,,,,,,,\r\n")
    for kind in ("duplicate_copy", "lower_case_group"):   # used copies carry their truth, like any demo scan
        for image_id, subject in planted.loc[planted["kind"] == kind, ["image_id", "subject"]].itertuples(False):
            assert (root / "truth" / subject / f"{image_id}_hippocampus.nii.gz").exists()
