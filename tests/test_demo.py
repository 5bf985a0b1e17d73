"""Demo collection: IDA layout and CSV, determinism, adding a phase, conversion, planted truth."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from conftest import CONFIG, demo_options, ingest_options
from workflow_scripts.common import cli
from workflow_scripts.data import demo, ingest

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(voxel_scale=3.0, seed=11)
IDA_DATE = re.compile(r"^\d{1,2}/\d{1,2}/\d{4}$")
DICOM_PATH = re.compile(r"^ADNI/(?P<subject>\d{3}_S_(?P<rid>\d{4}))/(?P<desc>[^/]+)/"
                        r"(?P<when>\d{4}-\d{2}-\d{2}_\d{2}_\d{2}_\d{2})\.0/(?P<image>I\d+)/"
                        r"ADNI_(?P=subject)_MR_(?P=desc)_br_raw_(?P<stamp>\d{14})_(?P<n>\d+)_S\d+_(?P=image)\.dcm$")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """4 AD/CN subjects x 2 visits, 1 MCI, a localizer and a duplicate (ADNI1)."""
    root = tmp_path_factory.mktemp("demo")
    rows = demo.generate_collection(root, **demo_options(n_subjects=4, visits=2, **SMALL))
    return {"root": root, "rows": rows, "csv": pd.read_csv(root / "collection.csv", dtype=str),
            "volumes": pd.read_csv(root / "truth" / "volumes.tsv", sep="\t", dtype={"visit": str})}


def image_dirs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in (root / "ADNI").glob("*/*/*/I*") if p.is_dir()}


def convert(folder: Path, reorient: bool = True) -> nib.Nifti1Image:
    import dicom2nifti

    out = Path(tempfile.mkdtemp()) / "series.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dicom2nifti.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=reorient)
    img = nib.load(out)
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)


def mprages(collection) -> pd.DataFrame:
    csv = collection["csv"]
    return csv[csv["Description"] == "MPRAGE"]


def test_csv_has_the_ida_columns_and_one_row_per_image_folder(collection):
    csv, rows = collection["csv"], collection["rows"]
    assert tuple(csv.columns) == demo.COLLECTION_COLUMNS == tuple(rows.columns)
    header = (collection["root"] / "collection.csv").read_text().splitlines()[0]
    assert header == ",".join(demo.COLLECTION_COLUMNS)
    assert sorted(csv["Image Data ID"]) == sorted(image_dirs(collection["root"]))
    assert csv["Image Data ID"].is_unique and all(re.fullmatch(r"I\d+", i) for i in csv["Image Data ID"])
    assert csv.equals(rows.astype(str))
    # 4 AD/CN x 2 visits + 1 MCI + localizer + duplicate
    assert len(csv) == 11
    subjects = csv.drop_duplicates("Subject").set_index("Subject")["Group"]
    assert subjects.value_counts().to_dict() == {"AD": 2, "CN": 2, "MCI": 1}
    assert set(csv["Visit"]) == {"sc", "m12"}
    assert set(csv["Modality"]) == {"MRI"} and set(csv["Type"]) == {"Original"} and set(csv["Format"]) == {"DCM"}
    assert set(csv["Sex"]) <= {"M", "F"} and all(a.isdigit() and 55 <= int(a) <= 100 for a in csv["Age"])
    assert all(IDA_DATE.match(d) for d in pd.concat([csv["Acq Date"], csv["Downloaded"]]))
    ranges = CONFIG["data"]["phase_rid_ranges"]
    low, high = demo.phase_rid_range("ADNI1", ranges)
    assert all(low <= int(s[-4:]) <= high for s in csv["Subject"])
    assert all(ingest.phase_of(s, ranges) == "ADNI1" for s in csv["Subject"])


def test_tree_follows_the_ida_layout_and_headers_match_the_csv(collection):
    root, csv = collection["root"], collection["csv"].set_index("Image Data ID")
    files = sorted(root.joinpath("ADNI").rglob("*.dcm"))
    seen = set()
    for path in files:
        match = DICOM_PATH.match(path.relative_to(root).as_posix())
        assert match, path
        row = csv.loc[match["image"]]
        assert match["subject"] == row["Subject"] and match["desc"] == row["Description"].replace(" ", "_")
        when = pd.Timestamp(match["when"].replace("_", " ", 1).replace("_", ":"))
        assert f"{when.month}/{when.day}/{when.year}" == row["Acq Date"]
        assert match["stamp"] == when.strftime("%Y%m%d%H%M%S")
        seen.add(match["image"])
    assert seen == set(csv.index)
    for image_id, folder in image_dirs(root).items():
        ds = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
        row = csv.loc[image_id]
        assert ds.SeriesDescription == row["Description"] and ds.PatientID == row["Subject"]
        assert pd.Timestamp(ds.AcquisitionDate).strftime("%-m/%-d/%Y") == row["Acq Date"]
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.PhotometricInterpretation == "MONOCHROME2"


def test_ingest_accepts_the_mprages_and_excludes_each_distractor_with_its_reason(collection):
    scans, excluded = ingest.build_tables(ingest.read_collection_csv(collection["root"] / "collection.csv"),
                                          collection["root"],
                                          **ingest_options(classes=["AD", "CN"], descriptions=["MPRAGE"],
                                                           min_slice_share=None, min_extent_mm=None))
    assert len(scans) == 8 and set(scans["group"]) == {"AD", "CN"} and set(scans["phase"]) == {"ADNI1"}
    assert set(scans["manufacturer"]) == {"GE MEDICAL SYSTEMS", "SIEMENS"}
    assert sorted(excluded["reason_code"]) == ["duplicate_series", "group_not_in_classes", "not_t1_mprage"]


def test_same_arguments_give_the_same_collection(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        demo.generate_collection(root, **demo_options(n_subjects=2, visits=1, **SMALL))
    a, b = roots
    assert (a / "collection.csv").read_bytes() == (b / "collection.csv").read_bytes()
    assert (a / "truth/volumes.tsv").read_bytes() == (b / "truth/volumes.tsv").read_bytes()
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".dcm":
            da, db = pydicom.dcmread(a / rel), pydicom.dcmread(b / rel)
            assert da.PixelData == db.PixelData and da.SeriesInstanceUID == db.SeriesInstanceUID
        elif rel.name.endswith(".nii.gz"):
            assert np.array_equal(nib.load(a / rel).get_fdata(), nib.load(b / rel).get_fdata())
    demo.generate_collection(tmp_path / "c", **demo_options(n_subjects=2, visits=1, voxel_scale=3.0, seed=12))
    assert (tmp_path / "c/collection.csv").read_bytes() != (a / "collection.csv").read_bytes()


def test_adding_a_phase_adds_subjects_and_rows_and_touches_no_existing_file(tmp_path):
    root = tmp_path / "adni"
    first = demo.generate_collection(root, **demo_options(n_subjects=2, visits=1, n_mci=0, distractors=False,
                                                          **SMALL))
    growing = {root / "collection.csv", root / "truth" / "volumes.tsv"}
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    old_csv, old_volumes = (root / "collection.csv").read_bytes(), (root / "truth/volumes.tsv").read_bytes()

    added = demo.generate_collection(root, **demo_options(n_subjects=2, visits=1, phase="ADNI2", **SMALL))

    for path, (mtime, data) in before.items():
        if path not in growing:
            assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert (root / "collection.csv").read_bytes().startswith(old_csv)
    assert (root / "truth/volumes.tsv").read_bytes().startswith(old_volumes)
    csv = pd.read_csv(root / "collection.csv", dtype=str)
    assert len(csv) == len(first) + len(added) and csv["Image Data ID"].is_unique
    assert set(added["Subject"]).isdisjoint(first["Subject"])
    assert all(4000 <= int(s[-4:]) <= 5999 for s in added["Subject"])
    newest = max(int(i[1:]) for i in first["Image Data ID"])
    assert all(int(i[1:]) > newest for i in added["Image Data ID"])
    assert sorted(csv["Image Data ID"]) == sorted(image_dirs(root))
    volumes = pd.read_csv(root / "truth/volumes.tsv", sep="\t")
    assert set(volumes["image_id"]) == set(csv.loc[csv["Description"] != "Localizer", "Image Data ID"])
    assert not list(root.glob(".demo-staging-*"))

    with pytest.raises(cli.PipelineError, match="phase ADNI2 is already in"):
        demo.generate_collection(root, **demo_options(n_subjects=2, visits=1, phase="ADNI2", **SMALL))
    assert pd.read_csv(root / "collection.csv", dtype=str).equals(csv)


def test_every_mprage_converts_with_dicom2nifti_on_the_truth_grid(collection):
    root = collection["root"]
    dirs, manufacturers = image_dirs(root), set()
    for image_id, subject in zip(mprages(collection)["Image Data ID"], mprages(collection)["Subject"]):
        ds = pydicom.dcmread(next(dirs[image_id].iterdir()), stop_before_pixels=True)
        manufacturers.add(str(ds.Manufacturer))
        raw = convert(dirs[image_id], reorient=False)
        truth = nib.load(root / "truth" / subject / f"{image_id}_brainmask.nii.gz")
        assert raw.shape == truth.shape == (ds.Columns, ds.Rows, len(list(dirs[image_id].iterdir())))
        np.testing.assert_allclose(raw.affine, truth.affine, atol=1e-4)
        assert truth.get_data_dtype() == np.uint8
    assert manufacturers == {"GE MEDICAL SYSTEMS", "SIEMENS"}


def test_truth_brain_mask_lines_up_with_the_converted_image(collection):
    root, dirs = collection["root"], image_dirs(collection["root"])
    for image_id, subject in zip(mprages(collection)["Image Data ID"], mprages(collection)["Subject"]):
        img = convert(dirs[image_id])
        truth = nib.load(root / "truth" / subject / f"{image_id}_brainmask.nii.gz")
        mask = resample_from_to(truth, img, order=0).get_fdata() > 0
        assert mask.sum() == np.asarray(truth.dataobj).sum()  # same grid, only axes permuted/flipped
        data = img.get_fdata()
        outside = ndimage.distance_transform_edt(~mask, sampling=img.header.get_zooms()[:3])
        shell = (outside > 1) & (outside <= 6)  # CSF and skull: dark on T1
        background = outside > 40
        assert data[mask].mean() > 2.5 * data[shell].mean()
        assert data[mask].mean() > 10 * data[background].mean()
        bright = data > 0.5 * np.percentile(data[mask], 95)
        assert (mask & bright).sum() / mask.sum() > 0.7


def test_ad_hippocampi_shrink_and_ventricles_grow(collection):
    volumes = collection["volumes"]
    volumes = volumes.drop_duplicates(["subject", "visit"]).copy()  # the duplicated series
    hippocampi = volumes["hippocampus_left_mm3"] + volumes["hippocampus_right_mm3"]
    volumes["hippocampus"] = hippocampi / volumes["brain_ml"]  # normalised: head sizes differ
    volumes["ventricles"] = volumes["ventricles_mm3"] / volumes["brain_ml"]
    by_group = volumes.groupby("group")[["hippocampus", "ventricles"]].mean()
    assert by_group.loc["AD", "hippocampus"] < 0.85 * by_group.loc["CN", "hippocampus"]
    assert by_group.loc["AD", "ventricles"] > 1.3 * by_group.loc["CN", "ventricles"]
    assert by_group.loc["CN", "hippocampus"] > by_group.loc["MCI", "hippocampus"] > by_group.loc["AD", "hippocampus"]
    for _, visits in volumes[volumes["group"] == "AD"].groupby("subject"):
        sc, m12 = visits.set_index("visit").loc["sc"], visits.set_index("visit").loc["m12"]
        assert m12["hippocampus_left_mm3"] < sc["hippocampus_left_mm3"]
        assert m12["hippocampus_right_mm3"] < sc["hippocampus_right_mm3"]
        assert m12["ventricles_mm3"] > sc["ventricles_mm3"]
        assert m12["brain_ml"] == sc["brain_ml"]
    assert volumes["brain_ml"].between(1000, 2000).all()


def test_truth_hippocampus_labels_match_the_planted_volumes_left_on_the_left(collection):
    root, volumes = collection["root"], collection["volumes"]
    for row in volumes.itertuples():
        img = nib.load(root / "truth" / row.subject / f"{row.image_id}_hippocampus.nii.gz")
        labels = np.asarray(img.dataobj)
        assert set(np.unique(labels)) == {0, 1, 2}
        voxel_mm3 = abs(np.linalg.det(img.affine[:3, :3]))
        for label, planted in ((1, row.hippocampus_left_mm3), (2, row.hippocampus_right_mm3)):
            assert 0.7 < (labels == label).sum() * voxel_mm3 / planted < 1.3
        centre = {label: nib.affines.apply_affine(img.affine, np.argwhere(labels == label).mean(axis=0))
                  for label in (1, 2)}
        assert centre[1][0] < centre[2][0] - 30  # RAS: left hippocampus at more negative x
        brain = np.asarray(nib.load(root / "truth" / row.subject / f"{row.image_id}_brainmask.nii.gz").dataobj)
        assert brain[labels > 0].all()


def test_planted_identifiers_are_in_every_dicom_file(collection):
    strings = demo.planted_identifier_strings()
    assert strings and all(len(s) >= 6 for s in strings)
    birth = demo.PLANTED_IDENTIFIERS["PatientBirthDate"]
    for path in sorted(collection["root"].joinpath("ADNI").rglob("*.dcm"))[::7]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword, value in demo.PLANTED_IDENTIFIERS.items():
            assert str(ds.data_element(keyword).value) == value
        raw = path.read_bytes()
        assert all(s.encode() in raw for s in strings if s != f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")


def test_duplicate_shares_its_series_and_localizer_has_three_slices(collection):
    root, csv, dirs = collection["root"], collection["csv"], image_dirs(collection["root"])
    pairs = mprages(collection).groupby(["Subject", "Acq Date"])["Image Data ID"].agg(list)
    duplicated = [ids for ids in pairs if len(ids) == 2]
    assert len(duplicated) == 1
    source, copy = sorted(duplicated[0], key=lambda i: int(i[1:]))
    first = {int(pydicom.dcmread(p).InstanceNumber): pydicom.dcmread(p) for p in dirs[source].iterdir()}
    second = {int(pydicom.dcmread(p).InstanceNumber): pydicom.dcmread(p) for p in dirs[copy].iterdir()}
    assert first.keys() == second.keys() and len(first) > 20
    for key, ds in first.items():
        assert ds.SeriesInstanceUID == second[key].SeriesInstanceUID and ds.PixelData == second[key].PixelData

    localizer = csv[csv["Description"] == demo.LOCALIZER_DESCRIPTION]
    assert len(localizer) == 1
    image_id, subject = localizer["Image Data ID"].iloc[0], localizer["Subject"].iloc[0]
    files = sorted(dirs[image_id].iterdir())
    assert len(files) == 3
    orientations = {tuple(float(v) for v in pydicom.dcmread(f).ImageOrientationPatient) for f in files}
    assert len(orientations) == 3
    assert not (root / "truth" / subject / f"{image_id}_brainmask.nii.gz").exists()  # truth: volumes only


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown phase 'ADNI5'"):
        demo.generate_collection(Path("unused"), **demo_options(n_subjects=2, seed=1, phase="ADNI5"))
    with pytest.raises(ValueError, match="hippocampus_atrophy"):
        demo.generate_collection(Path("unused"), **demo_options(n_subjects=2, seed=1, hippocampus_atrophy=0.9,
                                                                visits=3))
    with pytest.raises(ValueError, match="csv_name"):
        demo.generate_collection(Path("unused"), **demo_options(n_subjects=2, seed=1, csv_name="../x.csv"))
    assert not Path("unused").exists()


def test_command_line_prints_a_summary_and_writes_the_named_csv(tmp_path):
    settings = {"demo": {"n_subjects": 2, "seed": 5, "visits": 1, "voxel_scale": 3, "n_mci": 0, "phase": "ADNI3"},
                "data.phase_rid_ranges": CONFIG["data"]["phase_rid_ranges"]}
    cmd = [sys.executable, "-m", "workflow_scripts.data.demo", "--root", str(tmp_path), "--no-distractors",
           "--settings", json.dumps(settings), "--csv-name", "my_collection.csv"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and "2 images of 2 subjects" in done.stdout
    csv = pd.read_csv(tmp_path / "my_collection.csv", dtype=str)
    assert set(csv["Description"]) == {"Accelerated Sagittal MPRAGE"}
    assert all(p.parent.parent.name == "Accelerated_Sagittal_MPRAGE" for p in image_dirs(tmp_path).values())
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "phase ADNI3 is already in" in again.stderr
