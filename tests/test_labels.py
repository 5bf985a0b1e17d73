"""Label policies: converters under collection_group, per-visit diagnoses, stable cohorts; what the split reports."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import (COLLECTION_HEADER, CONFIG, VENDOR_DICOM, collection_row, ingest_options, place_series,
                      RAS_PATTERN, split_options)
from workflow_scripts.common import cli
from workflow_scripts.data import ingest, labels
from workflow_scripts.learning import split

CLASSES = ["AD", "CN"]
ALIASES = CONFIG["data"]["visit_aliases"]


def policy(name: str = CONFIG["data"]["label_policy"], table: str | None = None) -> labels.LabelPolicy:
    """A label policy with config.yaml's visit aliases."""
    return labels.LabelPolicy(name, table, ALIASES)


def collection(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A collection table from (subject, Group, Visit) rows: the columns label_scans reads."""
    return pd.DataFrame(rows, columns=["Subject", "Group", "Visit"])


def adnimerge(path, rows: list[tuple[str, str, str]], dx_bl: dict[str, str] | None = None):
    """An ADNIMERGE-shaped CSV (PTID, VISCODE, DX, DX_bl, and columns the reader must ignore)."""
    frame = pd.DataFrame(rows, columns=["PTID", "VISCODE", "DX"])
    frame.insert(0, "RID", [str(int(p[-4:])) for p in frame["PTID"]])
    frame["DX_bl"] = frame["PTID"].map(dx_bl or {}).fillna("")
    frame["AGE"], frame["MMSE"] = "74.2", "28"
    frame.to_csv(path, index=False)
    return path


def dxsum(path, rows: list[dict]):
    """A DXSUM_PDXCONV_ADNIALL-shaped CSV: RID, VISCODE, VISCODE2 and the three phases' diagnosis columns."""
    columns = ["Phase", "RID", "VISCODE", "VISCODE2", "DIAGNOSIS", "DXCURREN", "DXCHANGE"]
    pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns).to_csv(path, index=False)
    return path


def verdict(frame: pd.DataFrame, subject_rows: pd.Series) -> list[tuple[str, str]]:
    return list(zip(frame.loc[subject_rows, "group"], frame.loc[subject_rows, "reason_code"]))


# ---------------------------------------------------------------- the three policies

def test_collection_group_excludes_a_converter_naming_the_visits_that_disagree():
    table = collection([("002_S_0001", "CN", "sc"), ("002_S_0001", "CN", "m06"), ("002_S_0001", "AD", "m24"),
                        ("002_S_0002", "AD", "sc"), ("002_S_0002", "AD", "m12"), ("002_S_0003", "MCI", "sc")])
    result = labels.label_scans(table, policy(), "AD")
    converter = table["Subject"] == "002_S_0001"
    assert set(result.loc[converter, "reason_code"]) == {"converter"}
    reason = result.loc[converter, "reason"].iloc[0]
    assert "sc CN -> m24 AD" in reason and "visit_diagnosis" in reason  # the visits, and what to do
    assert verdict(result, ~converter) == [("AD", ""), ("AD", ""), ("MCI", "")]  # others keep their Group


def test_visit_diagnosis_from_adnimerge_labels_each_scan_and_names_a_missing_visit(tmp_path):
    table = adnimerge(tmp_path / "ADNIMERGE.csv", [
        ("002_S_0001", "bl", "CN"), ("002_S_0001", "m06", "CN"), ("002_S_0001", "m24", "Dementia"),
        ("002_S_0002", "sc", "MCI"), ("002_S_0002", "bl", "CN"),  # bl wins over sc (aliased to bl)
        ("002_S_0002", "m12", "MCI to Dementia"),  # an older release's DX: the state after "to"
        ("002_S_0004", "m12", ""),                  # a visit without a diagnosis
    ], dx_bl={"002_S_0004": "LMCI"})
    rows = collection([("002_S_0001", "CN", "sc"), ("002_S_0001", "CN", "m6"), ("002_S_0001", "CN", "m24"),
                       ("002_S_0002", "CN", "sc"), ("002_S_0002", "CN", "m12"), ("002_S_0002", "CN", "m36"),
                       ("002_S_0003", "AD", "sc"), ("002_S_0004", "MCI", "m12")])
    result = labels.label_scans(rows, policy("visit_diagnosis", str(table)), "AD")
    assert verdict(result, rows.index[:6]) == [("CN", ""), ("CN", ""), ("AD", ""), ("CN", ""), ("AD", ""),
                                                ("", "missing_diagnosis")]
    assert "visit m36" in result.at[5, "reason"] and "bl, m12" in result.at[5, "reason"]
    assert result.at[6, "reason_code"] == "missing_diagnosis" and "not in the diagnosis table" in result.at[6, "reason"]
    assert result.at[7, "reason_code"] == "missing_diagnosis"  # DX_bl is the baseline's, not m12's


def test_visit_diagnosis_from_dxsum_reads_each_phase_column_and_matches_on_rid(tmp_path):
    table = dxsum(tmp_path / "DXSUM_PDXCONV_ADNIALL.csv", [
        {"Phase": "ADNI1", "RID": "1", "VISCODE": "bl", "VISCODE2": "bl", "DXCURREN": "1"},
        {"Phase": "ADNI1", "RID": "1", "VISCODE": "m12", "VISCODE2": "m12", "DXCURREN": "-4"},  # not done
        {"Phase": "ADNIGO", "RID": "2005", "VISCODE": "v03", "VISCODE2": "bl", "DXCHANGE": "2"},
        {"Phase": "ADNI2", "RID": "2005", "VISCODE": "v21", "VISCODE2": "m24", "DXCHANGE": "5"},  # MCI -> AD
        {"Phase": "ADNI3", "RID": "6001", "VISCODE": "sc", "VISCODE2": "sc", "DIAGNOSIS": "1"},
        {"Phase": "ADNI3", "RID": "6001", "VISCODE": "y1", "VISCODE2": "m12", "DIAGNOSIS": "3"},
    ])
    rows = collection([("011_S_0001", "CN", "bl"), ("011_S_0001", "CN", "m12"), ("941_S_2005", "MCI", "sc"),
                       ("941_S_2005", "AD", "m24"), ("033_S_6001", "CN", "sc"), ("033_S_6001", "CN", "m12")])
    result = labels.label_scans(rows, policy("visit_diagnosis", str(table)), "AD")
    assert verdict(result, rows.index) == [("CN", ""), ("", "missing_diagnosis"), ("MCI", ""), ("AD", ""),
                                           ("CN", ""), ("AD", "")]
    assert labels.read_diagnosis_table(table).key == "RID"


def test_stable_keeps_only_subjects_with_one_diagnosis_at_every_visit(tmp_path):
    table = adnimerge(tmp_path / "ADNIMERGE.csv", [
        ("002_S_0001", "bl", "CN"), ("002_S_0001", "m12", "CN"), ("002_S_0001", "m36", "MCI"),  # after the scans
        ("002_S_0002", "bl", "Dementia"), ("002_S_0002", "m12", "Dementia"), ("002_S_0002", "m24", "")])
    rows = collection([("002_S_0001", "CN", "sc"), ("002_S_0001", "CN", "m12"),
                       ("002_S_0002", "AD", "sc"), ("002_S_0002", "AD", "m24")])
    result = labels.label_scans(rows, policy("stable", str(table)), "AD")
    assert verdict(result, rows.index) == [("", "unstable_diagnosis")] * 2 + [("AD", "")] * 2
    assert "bl CN -> m36 MCI" in result.at[0, "reason"]  # the whole follow-up, as ClinicaDL's stable cohorts
    # without a diagnosis table the collection's Group decides
    by_group = labels.label_scans(collection([("002_S_0001", "CN", "sc"), ("002_S_0001", "AD", "m12"),
                                              ("002_S_0002", "AD", "sc")]), policy("stable"), "AD")
    assert list(by_group["reason_code"]) == ["unstable_diagnosis", "unstable_diagnosis", ""]
    assert "sc CN -> m12 AD" in by_group.at[0, "reason"]


@pytest.mark.parametrize("make, message", [
    (lambda p: policy("visit_diagnosis"), "needs data.diagnosis_table"),
    (lambda p: policy("by_vibes"), "must be one of collection_group"),
    (lambda p: labels.read_diagnosis_table(p / "absent.csv"), "no diagnosis table at data.diagnosis_table="),
    (lambda p: labels.read_diagnosis_table(adnimerge(p / "t.csv", [("002_S_0001", "bl", "Frontotemporal")])),
     "'Frontotemporal'"),
    (lambda p: labels.read_diagnosis_table(pd.DataFrame({"PTID": ["x"]}).to_csv(p / "t.csv") or p / "t.csv"),
     "not an ADNIMERGE or DXSUM table"),
])
def test_bad_label_settings_and_tables_are_named(tmp_path, make, message):
    with pytest.raises(cli.PipelineError, match=message):
        make(tmp_path)


# ---------------------------------------------------------------- through ingest

def test_ingest_applies_the_policy_to_real_series(tmp_path):
    series = ["siemens/anatomical/001", "ge/anatomical/001", "hitachi/anatomical/001", "generic/anatomical/001"]
    visits = [("I1", "002_S_0001", "CN", "sc"), ("I2", "002_S_0001", "AD", "m12"),
              ("I3", "002_S_0002", "CN", "m06"), ("I4", "002_S_0003", "CN", "sc")]
    rows = []
    for rel, (image_id, subject, group, visit) in zip(series, visits):
        place_series(tmp_path, VENDOR_DICOM / rel, subject, image_id,
                     acq=f"20{10 + int(image_id[1:])}-01-01_00_00_00.0")
        rows.append(collection_row(image_id, subject, group=group, visit=visit))
    csv = tmp_path / "collection.csv"
    pd.DataFrame(rows, columns=COLLECTION_HEADER).to_csv(csv, index=False)
    table = adnimerge(tmp_path / "ADNIMERGE.csv", [("002_S_0001", "bl", "CN"), ("002_S_0001", "m12", "Dementia"),
                                                    ("002_S_0002", "bl", "CN"), ("002_S_0003", "bl", "MCI")])

    def run(label_policy: labels.LabelPolicy):
        scans, excluded = ingest.build_tables(ingest.read_collection_csv(csv), tmp_path,
                                              **ingest_options(classes=CLASSES, descriptions=["MPRAGE"],
                                                               label_policy=label_policy, min_slice_share=None,
                                                               min_extent_mm=None))
        return dict(zip(scans["image_id"], scans["group"])), dict(zip(excluded["image_id"], excluded["reason_code"]))

    kept, dropped = run(policy())
    assert kept == {"I3": "CN", "I4": "CN"} and dropped == {"I1": "converter", "I2": "converter"}
    kept, dropped = run(policy("visit_diagnosis", str(table)))
    assert kept == {"I1": "CN", "I2": "AD"}  # the converter's scans, each with its visit's label
    assert dropped == {"I3": "missing_diagnosis", "I4": "group_not_in_classes"}  # m06 has none; bl is MCI


# ---------------------------------------------------------------- in the split

def scans_table(n_subjects: int = 30, visits: int = 2) -> pd.DataFrame:
    """A scans table: alternating AD/CN subjects, ``visits`` yearly scans each, with age, sex and dates."""
    rows = []
    for i in range(n_subjects):
        subject = f"{10 + i % 80:03d}_S_{i + 1:04d}"
        for v in range(visits):
            rows.append({"image_id": f"I{(i + 1) * 10 + v}", "subject": subject, "group": "AD" if i % 2 else "CN",
                         "sex": "F" if i % 3 else "M", "age": str(65 + i % 20 + v),
                         "visit": "bl" if v == 0 else f"m{12 * v:02d}",
                         "acq_date": f"{2006 + v}-03-01", "phase": "ADNI1"})
    return pd.DataFrame(rows)


def test_a_converter_stays_in_one_partition_with_each_scan_labelled_under_visit_diagnosis():
    scans = scans_table()
    converter = "099_S_0999"
    scans = pd.concat([scans, pd.DataFrame([
        {"image_id": "I9992", "subject": converter, "group": "AD", "visit": "m24", "acq_date": "2008-03-01",
         "sex": "F", "age": "77"},
        {"image_id": "I9990", "subject": converter, "group": "CN", "visit": "bl", "acq_date": "2006-03-01",
         "sex": "F", "age": "75"},
        {"image_id": "I9991", "subject": converter, "group": "CN", "visit": "m12", "acq_date": "2007-03-01",
         "sex": "F", "age": "76"}])], ignore_index=True)
    with pytest.raises(cli.PipelineError, match=f"{converter}.*collection_group.*visit_diagnosis"):
        split.make_split(scans, **split_options(balance=False))  # never a silent drop
    result = split.make_split(scans, **split_options(balance=False, label_policy="visit_diagnosis"))
    rows = pd.concat([m.assign(partition=p) for p, m in result.manifests.items()])
    mine = rows[rows["subject"] == converter].set_index("image_id")
    assert mine["partition"].nunique() == 1 and len(mine) == 3
    assert mine["label"].to_dict() == {"I9990": 0, "I9991": 0, "I9992": 1}  # each scan its own label
    ledger = result.ledger.set_index("subject")
    assert ledger.at[converter, "group"] == "CN"  # stratified by the first visit's label
    assert result.summary["input"]["mixed_class_subjects"] == [converter]
    assert split.audit_split(result.manifests, result.cv_folds)["passed"]
    part = mine["partition"].iloc[0]
    assert result.summary["scan_labels"][part] == {g: int((result.manifests[part]["group"] == g).sum())
                                                   for g in CLASSES}


def test_the_summary_counts_policy_drops_under_the_partition_the_ledger_had(tmp_path):
    scans = scans_table(40)
    out = tmp_path / "splits"

    def run(table: pd.DataFrame, excluded: pd.DataFrame) -> dict:
        table.to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
        excluded.to_csv(tmp_path / "excluded.tsv", sep="\t", index=False)
        argv = ["--scans", str(tmp_path / "scans.tsv"), "--excluded", str(tmp_path / "excluded.tsv"),
                "--path-pattern", RAS_PATTERN, "--out-dir", str(out)]
        assert cli.run(split.main, argv) == 0
        return json.loads((out / "summary.json").read_text())

    first = run(scans, pd.DataFrame(columns=ingest.EXCLUDED_COLUMNS))
    assert first["label_policy"]["dropped"]["by_partition"]["test"] == {"subjects": 0, "scans": 0,
                                                                        "scans_of_kept_subjects": 0}
    test_subject = pd.read_csv(out / "test.csv")["subject"].iloc[0]
    # a later download: the test subject converts at m24, and a new subject converts too
    grown = pd.concat([scans, pd.DataFrame([
        {"image_id": "I8880", "subject": test_subject, "group": "AD" if scans.loc[scans["subject"] == test_subject,
                                                                                  "group"].iloc[0] == "CN" else "CN",
         "visit": "m24"},
        {"image_id": "I7770", "subject": "099_S_0777", "group": "CN", "visit": "bl"},
        {"image_id": "I7771", "subject": "099_S_0777", "group": "AD", "visit": "m12"}])], ignore_index=True)
    verdicts = labels.label_scans(grown.rename(columns={"subject": "Subject", "group": "Group", "visit": "Visit"}),
                                  policy(), "AD")
    dropped = verdicts["reason_code"] != ""
    excluded = grown[dropped].assign(reason_code=verdicts.loc[dropped, "reason_code"],
                                     reason=verdicts.loc[dropped, "reason"])
    summary = run(grown[~dropped], excluded)
    counts = summary["label_policy"]["dropped"]
    n_test_scans = int((grown["subject"] == test_subject).sum())
    assert counts["by_partition"]["test"] == {"subjects": 1, "scans": n_test_scans, "scans_of_kept_subjects": 0}
    assert counts["by_partition"]["never placed"]["subjects"] == 1
    assert counts["by_partition"]["train"]["subjects"] == counts["by_partition"]["val"]["subjects"] == 0
    assert counts["placed_subjects_dropped"]["test"] == [test_subject]
    assert f"dropped from test: {test_subject}" in (out / "summary.txt").read_text()
    assert test_subject in set(pd.read_csv(out / split.LEDGER_NAME, sep="\t")["subject"])  # remembered
