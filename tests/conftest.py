"""Shared fixtures: paths, tiny collections, and running Snakemake on them."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENDOR_DICOM = REPO.parent / "shared" / "fixtures" / "vendor-dicom"
COLLECTION_HEADER = ["Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description",
                     "Type", "Acq Date", "Format", "Downloaded"]

# Vendor series that must convert, and those dicom2nifti must reject (see the fixtures' README).
VENDOR_GOOD = ["siemens/anatomical/001", "siemens/anatomical/001_implicit", "ge/anatomical/001",
               "ge/anatomical/001_implicit", "hitachi/anatomical/001", "hitachi/anatomical/001_implicit",
               "generic/anatomical/001", "generic/anatomical/001_implicit",
               "generic/anatomical/002_non_isotropic", "siemens_multiframe/anatomical/001"]
VENDOR_FAILING = ["failing/slicecount/001", "failing/gantrytilting/001", "failing/notavolume/001",
                  "failing/sliceincrement/001", "failing/sliceincrement/002", "failing/sliceorientation/001"]


CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
RAS_PATTERN = "results/ras/{subject}/{image_id}.nii.gz"  # the split's --path-pattern: stage ras of results/


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as module ``name``, registered in sys.modules so that
    its dataclasses can look their module up."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ingest_options(diagnosis_table: str | None = None, **overrides) -> dict:
    """ingest.build_tables' settings as the workflow resolves config.yaml's data section, with ``overrides``
    (build_tables' own keyword names) applied after resolution."""
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.data import ingest

    return {**ingest.table_options(resolve("data", CONFIG["data"]), diagnosis_table), **overrides}


def demo_options(**overrides) -> dict:
    """demo.generate_collection's settings: the schema's demo defaults and config.yaml's data.phase_rid_ranges,
    with ``overrides`` (generate_collection's keyword names)."""
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.data import demo

    return {**demo.collection_options(resolve("demo"), CONFIG["data"]["phase_rid_ranges"]), **overrides}


def split_options(**overrides) -> dict:
    """split.make_split's settings: the schema's defaults of split, cv, data.classes and data.label_policy, the
    stage-ras path pattern, and ``overrides`` (make_split's keyword names)."""
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.learning import split

    options = split.split_options(resolve("split"), resolve("cv"), resolve("data.classes"),
                                  resolve("data.label_policy"))
    return {"path_of": RAS_PATTERN, **options, **overrides}


def discard_unless_failed(request: pytest.FixtureRequest, folder: Path, failed_before: int) -> None:
    """Remove a module fixture's folder at teardown unless a test failed while it lived.

    pytest's retention policy clears function folders only; module fixtures that train networks
    hold gigabytes of checkpoints, which would otherwise stay until the session ends.
    """
    if request.session.testsfailed == failed_before:
        shutil.rmtree(folder, ignore_errors=True)


def collection_row(image_id: str, subject: str, group: str = "CN", description: str = "MPRAGE",
                   visit: str = "sc", acq_date: str = "4/18/2006") -> dict:
    return {"Image Data ID": image_id, "Subject": subject, "Group": group, "Sex": "F", "Age": "74",
            "Visit": visit, "Modality": "MRI", "Description": description, "Type": "Original",
            "Acq Date": acq_date, "Format": "DCM", "Downloaded": "11/23/2026"}


def place_series(root: Path, source: Path, subject: str, image_id: str, description: str = "MPRAGE",
                 acq: str = "2006-04-18_08_20_30.0") -> Path:
    """Copy a DICOM series into the ADNI layout ADNI/<subject>/<description>/<date-time>/<image id>/."""
    target = root / "ADNI" / subject / description.replace(" ", "_") / acq / image_id
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def vendor_collection(tmp_path_factory) -> dict:
    """An ADNI-shaped tree and collection CSV made of the real vendor series: one subject each."""
    if not VENDOR_DICOM.is_dir():
        pytest.fail(f"vendor DICOM fixtures missing at {VENDOR_DICOM}")
    root = tmp_path_factory.mktemp("vendor_adni")
    rows, expected = [], {}
    for n, rel in enumerate(VENDOR_GOOD + VENDOR_FAILING):
        subject, image_id = f"{100 + n:03d}_S_{n + 1:04d}", f"I{90000 + n}"
        place_series(root, VENDOR_DICOM / rel, subject, image_id)
        rows.append(collection_row(image_id, subject, group="AD" if n % 2 else "CN"))
        expected[image_id] = rel
    pd.DataFrame(rows, columns=COLLECTION_HEADER).to_csv(root / "collection.csv", index=False)
    return {"root": root, "csv": root / "collection.csv", "series": expected}


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    """The system Chromium that Playwright drives for the HTML pages' browser tests."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium on PATH: install Debian's chromium package (apt-get install chromium) for the "
                "HTML pages' browser tests")


def write_config(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def run_snakemake(workdir: Path, *args: str, configfiles: list[Path] = (), check: bool = True,
                  timeout: int = 1500, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile from ``workdir`` (not the repo), as a user would."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--nolock"]
    cmd += list(args)
    if configfiles:  # last: --configfile takes every word after it
        cmd += ["--configfile", *map(str, configfiles)]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """A tiny demo collection (3 mm voxels) generated once per test session."""
    from workflow_scripts.data.demo import generate_collection
    from workflow_scripts.data.ingest import find_image_dir

    root = tmp_path_factory.mktemp("tiny_demo")
    generate_collection(root, **demo_options(n_subjects=4, seed=7, visits=1, voxel_scale=3.0))
    collection = pd.read_csv(root / "collection.csv", dtype=str)
    mprage = collection[collection["Description"].eq("MPRAGE") & collection["Group"].isin(["AD", "CN"])].copy()
    mprage["dicom_dir"] = [find_image_dir(root, s, i) for s, i in zip(mprage["Subject"], mprage["Image Data ID"])]
    return {"root": root, "csv": root / "collection.csv", "collection": collection, "mprage": mprage}


# The workflow's `all` on a tiny demo collection: the quick profile's settings (3 mm voxels, 32^3 inputs,
# two epochs, every experiment kind), read from its file, not copied, plus the broken series a real
# download has that reach the workflow (workflow_scripts/data/demo_faults.py; the kinds ingest uses,
# duplicate_copy and lower_case_group, are checked at ingest in tests/test_ingest.py): each must be
# excluded or dropped with its reason while the rest of the study runs to the end. With 12 subjects,
# ratios 0.6/0.2/0.2 and 2 CV folds, after the scan the demo_run fixture excludes by hand and class
# balance, each fold's other folds still hold 2+ subjects per class.
QUICK_SETTINGS = REPO / "profiles" / "quick" / "settings.yaml"
TINY = yaml.safe_load(QUICK_SETTINGS.read_text())
TINY["demo"]["faults"] = ["truncated_pixels", "partial_series", "mixed_folder", "ambiguous_id", "excel_csv",
                          "not_a_head"]


USER_EXCLUSION_REASON = "motion artefacts on the QC montage"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`snakemake all` on the tiny demo collection, from a folder outside the repository: run once per
    test session; every test file that checks a phase's outputs reads them from here."""
    workdir = tmp_path_factory.mktemp("demo_run")
    # as a user would: look at the ingested scans, exclude one by hand (data.exclude_scans), run everything
    config = write_config(workdir / "tiny.yaml", {**TINY, "data": {"exclude_scans": "exclusions.tsv"}})
    run_snakemake(workdir, "results/scans.tsv", configfiles=[config])
    scans = pd.read_csv(workdir / "results" / "scans.tsv", sep="\t", dtype=str)
    planted = pd.read_csv(workdir / "demo_data" / "truth" / "faults.tsv", sep="\t", dtype=str)
    chosen = scans.loc[~scans["image_id"].isin(planted["image_id"]), "image_id"].iloc[-1]  # a good scan
    (workdir / "exclusions.tsv").write_text(f"image_id\treason\n{chosen}\t{USER_EXCLUSION_REASON}\n")
    result = run_snakemake(workdir, "all", configfiles=[config])
    (workdir / "snakemake_output.txt").write_text(result.stdout + result.stderr)
    return workdir
