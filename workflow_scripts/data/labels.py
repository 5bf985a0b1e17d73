"""Labels: the class of every scan under the label policy (config ``data.label_policy``).

Three policies:

- ``collection_group`` (default; the dissertation's): the IDA collection's Group column. A
  subject whose rows carry different groups is a converter: all its scans are excluded
  (``converter``), the reason naming the visits where the group changes.
- ``visit_diagnosis`` (ClinicaDL's per-session labels): each scan takes the diagnosis at its
  visit from a local ADNIMERGE or DXSUM table (``data.diagnosis_table``); a scan whose visit has
  none is excluded (``missing_diagnosis``). A converter keeps its scans, each with its own label;
  the split keeps the subject in one partition.
- ``stable`` (ClinicaDL's stable cohorts): a subject is kept only if its diagnosis is the same at
  every visit of its follow-up (every visit of the diagnosis table when one is given, else every
  collection row's Group); otherwise all its scans are excluded (``unstable_diagnosis``). A kept
  subject's scans all take that one diagnosis.

Diagnosis tables, columns matched by name in any case (ADNI data dictionary conventions):

- ADNIMERGE: PTID, VISCODE, DX (CN / MCI / Dementia; older releases NL and "MCI to Dementia",
  read as the state after "to"). DX_bl, the baseline diagnosis (CN, SMC, EMCI, LMCI, AD), is used
  only at the bl visit, where it is that visit's diagnosis.
- DXSUM (DXSUM_PDXCONV_ADNIALL): PTID or RID, VISCODE2 (else VISCODE), DIAGNOSIS (1=CN, 2=MCI,
  3=Dementia), or in older phases DXCURREN (ADNI1: 1=NL, 2=MCI, 3=AD) or DXCHANGE (ADNIGO/2:
  1/7/9 = NL, 2/4/8 = MCI, 3/5/6 = Dementia, the state after the change). Negative codes
  (ADNI's "not done") count as missing.

Dementia/AD becomes the positive class (the first of ``data.classes``); CN, NL and SMC become CN;
MCI, EMCI and LMCI become MCI (excluded by ingest unless MCI is a configured class).

Visits: codes are lower-cased, ``mN`` is written ``mNN`` (m6 -> m06), then ``data.visit_aliases``
is applied to the collection's and the table's codes alike (default sc, scmri and m00 -> bl: ADNI's
screening MRI is the baseline scan, and ADNIMERGE files it under bl). Where the table has a row
under the visit's own code and another reached through an alias (bl and sc), the own code wins.
Subjects are matched on PTID when the table has that column, else on RID (the last four digits of
the subject id).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from workflow_scripts.common import cli

LOG = logging.getLogger(__name__)

POLICIES = ("collection_group", "visit_diagnosis", "stable")
# Reason codes of the scans a policy excludes (ingest's excluded.tsv); the split counts them.
POLICY_CODES = ("converter", "unstable_diagnosis", "missing_diagnosis")
VERDICT_COLUMNS = ("group", "reason_code", "reason")

CN, MCI, DEMENTIA = "CN", "MCI", "Dementia"
_TEXT_DIAGNOSES = {"cn": CN, "nl": CN, "smc": CN, "normal": CN, "mci": MCI, "emci": MCI, "lmci": MCI,
                   "dementia": DEMENTIA, "ad": DEMENTIA}
_CODED_DIAGNOSES = {
    "DIAGNOSIS": {1: CN, 2: MCI, 3: DEMENTIA},
    "DXCURREN": {1: CN, 2: MCI, 3: DEMENTIA},
    "DXCHANGE": {1: CN, 7: CN, 9: CN, 2: MCI, 4: MCI, 8: MCI, 3: DEMENTIA, 5: DEMENTIA, 6: DEMENTIA},
}
DIAGNOSIS_COLUMNS = ("DX", "DIAGNOSIS", "DXCURREN", "DXCHANGE", "DX_BL")  # first non-empty one per row
_RID_RE = re.compile(r"(\d{1,4})$")


@dataclass(frozen=True)
class LabelPolicy:
    """The label settings of one run (``data.label_policy``, ``data.diagnosis_table``, ``data.visit_aliases``)."""
    policy: str
    diagnosis_table: str | None
    visit_aliases: Mapping[str, str] | Sequence[Sequence[str]]  # or [code, matched as] pairs, as in config.yaml

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise cli.PipelineError(f"data.label_policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy == "visit_diagnosis" and not self.diagnosis_table:
            raise cli.PipelineError(
                "data.label_policy visit_diagnosis labels each scan by the diagnosis at its visit, so it needs "
                "data.diagnosis_table: the path of ADNIMERGE.csv or DXSUM_PDXCONV_ADNIALL.csv, downloaded from "
                "IDA (Study Files) with the collection")
        object.__setattr__(self, "visit_aliases",
                           {visit_code(k): visit_code(v) for k, v in dict(self.visit_aliases).items()})


# ---------------------------------------------------------------- visits and diagnoses

def visit_code(visit: str, aliases: Mapping[str, str] | None = None) -> str:
    """A visit code in one spelling: lower case, mN as mNN, then the aliases (sc -> bl)."""
    code = str(visit).strip().lower()
    if (month := re.fullmatch(r"m0*(\d+)", code)) is not None:
        code = f"m{int(month.group(1)):02d}"
    return (aliases or {}).get(code, code)


def visit_month(code: str) -> float:
    """Months since baseline of a visit code, for ordering visits (unknown codes sort last)."""
    code = visit_code(code)
    if code in ("sc", "scmri"):
        return -1.0
    if code == "bl":
        return 0.0
    if (month := re.fullmatch(r"m(\d+)", code)) is not None:
        return float(month.group(1))
    if (year := re.fullmatch(r"y(\d+)", code)) is not None:
        return 12.0 * int(year.group(1))
    return float("inf")


def diagnosis_name(value: str, column: str) -> str | None:
    """CN, MCI or Dementia for one cell of a diagnosis column; None when empty or 'not done'."""
    text = str(value).strip()
    if not text or text.lower() in ("nan", "na"):
        return None
    if column in _CODED_DIAGNOSES:
        try:
            code = int(float(text))
        except ValueError:
            code = None
        if code is not None and code < 0:  # ADNI's -1 / -4: not done, not applicable
            return None
        if code in _CODED_DIAGNOSES[column]:
            return _CODED_DIAGNOSES[column][code]
        raise ValueError(f"{text!r} is not a {column} code ({sorted(_CODED_DIAGNOSES[column])})")
    state = re.split(r"\s+to\s+", text, flags=re.IGNORECASE)[-1].strip().lower()  # "MCI to Dementia"
    if state in _TEXT_DIAGNOSES:
        return _TEXT_DIAGNOSES[state]
    raise ValueError(f"{text!r} is not a diagnosis ({', '.join(sorted(_TEXT_DIAGNOSES))})")


def class_of(diagnosis: str, positive_class: str) -> str:
    """The class name a diagnosis becomes: Dementia is the positive class, CN and MCI keep their names."""
    return positive_class if diagnosis == DEMENTIA else diagnosis


@dataclass(frozen=True)
class Diagnoses:
    """A diagnosis table read into one row per (subject key, visit, diagnosis)."""
    table: pd.DataFrame  # columns key, visit, diagnosis
    key: str  # "PTID" or "RID": what a collection subject is matched on
    path: str

    def subject_key(self, subject: str) -> str:
        """A collection subject id as this table names subjects (PTID as is, else the RID digits)."""
        if self.key == "PTID":
            return str(subject).strip()
        match = _RID_RE.search(str(subject).strip())
        return str(int(match.group(1))) if match else str(subject).strip()


def read_diagnosis_table(path: str | Path, visit_aliases: Mapping[str, str] | None = None) -> Diagnoses:
    """Read an ADNIMERGE or DXSUM table (columns found by name) into per-visit diagnoses."""
    path = Path(path)
    where = (f"data.diagnosis_table={path}; point it at ADNIMERGE.csv or DXSUM_PDXCONV_ADNIALL.csv as "
             f"downloaded from IDA (Study Files)")
    if not path.is_file():
        raise cli.PipelineError(f"no diagnosis table at {where}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, low_memory=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the diagnosis table {where}: {err}") from err
    columns = {str(c).strip().upper(): c for c in raw.columns}
    key = "PTID" if "PTID" in columns else "RID" if "RID" in columns else None
    visit_columns = [columns[c] for c in ("VISCODE2", "VISCODE") if c in columns]
    dx_columns = [c for c in DIAGNOSIS_COLUMNS if c in columns]
    if key is None or not visit_columns or not dx_columns:
        raise cli.PipelineError(
            f"{path} is not an ADNIMERGE or DXSUM table: it needs a subject column (PTID or RID), a visit column "
            f"(VISCODE2 or VISCODE) and a diagnosis column ({', '.join(DIAGNOSIS_COLUMNS)}); it has "
            f"{', '.join(map(str, raw.columns[:20]))}; {where}")
    if dx_columns == ["DX_BL"]:
        LOG.warning("%s has only DX_bl (the baseline diagnosis): only bl visits get a diagnosis", path)
    visits = raw[visit_columns[0]].str.strip()
    for other in visit_columns[1:]:  # VISCODE where VISCODE2 is empty
        visits = visits.where(visits != "", raw[other].str.strip())
    own = visits.map(visit_code)
    rows = pd.DataFrame({"key": raw[columns[key]].str.strip(), "own": own,
                         "visit": own.map(lambda c: (visit_aliases or {}).get(c, c))})
    if key == "RID":
        rows["key"] = rows["key"].map(lambda r: str(int(float(r))) if r.replace(".", "", 1).isdigit() else r)
    diagnosis = pd.Series([None] * len(raw), index=raw.index, dtype=object)
    for column in dx_columns:
        cells = raw[columns[column]]
        if column == "DX_BL":
            cells = cells.where(rows["visit"] == "bl", "")
        unknown: dict[str, str] = {}

        def parse(text: str, column: str = column) -> str | None:
            try:
                return diagnosis_name(text, "DX" if column == "DX_BL" else column)
            except ValueError as err:
                unknown[str(text)] = str(err)
                return None
        parsed = cells.map(parse)
        if unknown:
            raise cli.PipelineError(f"{path} column {columns[column]}: {'; '.join(list(unknown.values())[:5])}; "
                                    f"fix the table, or point data.diagnosis_table at ADNIMERGE or DXSUM as "
                                    f"downloaded from IDA")
        diagnosis = diagnosis.where(diagnosis.notna(), parsed)
    rows["diagnosis"] = diagnosis
    rows = rows[rows["diagnosis"].notna() & (rows["key"] != "") & (rows["visit"] != "")]
    exact = rows["own"] == rows["visit"]
    has_exact = exact.groupby([rows["key"], rows["visit"]]).transform("any")
    rows = rows[exact | ~has_exact]  # bl beats sc -> bl for the same subject
    rows = rows[["key", "visit", "diagnosis"]].drop_duplicates().reset_index(drop=True)
    return Diagnoses(table=rows, key=key, path=str(path))


def read_policy_diagnoses(policy: LabelPolicy) -> Diagnoses | None:
    """The policy's diagnosis table, read once (None when the policy does not use one)."""
    if policy.policy == "collection_group" or not policy.diagnosis_table:
        return None
    return read_diagnosis_table(policy.diagnosis_table, policy.visit_aliases)


# ---------------------------------------------------------------- labelling the collection

def describe_changes(pairs: Sequence[tuple[str, str]]) -> str:
    """'bl CN -> m24 MCI -> m36 AD': the first visit and every visit where the label changes."""
    ordered = sorted(set(pairs), key=lambda p: (visit_month(p[0]), p[0], p[1]))
    steps: list[str] = []
    last = None
    for visit, label in ordered:
        if label != last:
            steps.append(f"{visit or '(no visit)'} {label}")
            last = label
    return " -> ".join(steps)


def label_scans(collection: pd.DataFrame, policy: LabelPolicy, positive_class: str,
                diagnoses: Diagnoses | None = None) -> pd.DataFrame:
    """Each collection row's class under the policy, or the reason code and reason it is excluded.

    Returns VERDICT_COLUMNS indexed like ``collection``: ``group`` is the label to use ('' when
    excluded), ``reason_code`` '' for a kept row. ``collection`` has Subject, Group and Visit
    columns (groups already normalised by ingest).
    """
    if policy.policy != "collection_group" and diagnoses is None and policy.diagnosis_table:
        diagnoses = read_policy_diagnoses(policy)
    if diagnoses is not None and positive_class in (CN, MCI):
        raise cli.PipelineError(f"data.classes lists {positive_class} first, but the diagnosis table's Dementia "
                                f"becomes the first (positive) class; list the AD class first, e.g. [AD, CN]")
    verdicts = pd.DataFrame({"group": collection["Group"], "reason_code": "", "reason": ""},
                            index=collection.index)
    visits = collection["Visit"].map(lambda v: visit_code(v, policy.visit_aliases))
    by_subject = collection.groupby("Subject", sort=True).groups
    if diagnoses is None:  # collection_group, or stable judged on the Group column
        code = "converter" if policy.policy == "collection_group" else "unstable_diagnosis"
        for subject, index in by_subject.items():
            pairs = [(v, g) for v, g in zip(collection.loc[index, "Visit"], collection.loc[index, "Group"]) if g]
            if len({g for _, g in pairs}) > 1:
                verdicts.loc[index, ["group", "reason_code", "reason"]] = [
                    "", code, _group_change_reason(subject, pairs, policy.policy)]
        return verdicts
    table = diagnoses.table.assign(label=diagnoses.table["diagnosis"].map(lambda d: class_of(d, positive_class)))
    per_key = dict(tuple(table.groupby("key")))
    for subject, index in by_subject.items():
        rows = per_key.get(diagnoses.subject_key(subject))
        if rows is None:
            verdicts.loc[index, ["group", "reason_code", "reason"]] = [
                "", "missing_diagnosis",
                f"no diagnosis: subject {subject} (matched on {diagnoses.key} "
                f"{diagnoses.subject_key(subject)}) is not in the diagnosis table {diagnoses.path}"]
            continue
        if policy.policy == "stable":
            labels = set(rows["label"])
            if len(labels) > 1:
                verdicts.loc[index, ["group", "reason_code", "reason"]] = [
                    "", "unstable_diagnosis",
                    f"unstable diagnosis: subject {subject}'s diagnosis changes over the follow-up in "
                    f"{diagnoses.path} ({describe_changes(list(zip(rows['visit'], rows['label'])))}); "
                    f"data.label_policy stable keeps only subjects with one diagnosis at every visit"]
            else:
                verdicts.loc[index, "group"] = labels.pop()
            continue
        at_visit = rows.groupby("visit")["label"].agg(lambda s: sorted(set(s)))
        for i in index:
            found = at_visit.get(visits[i])
            if found is not None and len(found) == 1:
                verdicts.at[i, "group"] = found[0]
                continue
            raw = collection.at[i, "Visit"]
            why = (f"the table gives {' and '.join(found)} for that visit" if found is not None else
                   f"its visits there are {', '.join(sorted(at_visit.index, key=visit_month))}")
            verdicts.loc[i, ["group", "reason_code", "reason"]] = [
                "", "missing_diagnosis",
                f"no diagnosis at visit {raw or '(empty)'} (matched as {visits[i] or '(empty)'}) for subject "
                f"{subject} in {diagnoses.path}: {why}"]
    return verdicts


def _group_change_reason(subject: str, pairs: Sequence[tuple[str, str]], policy: str) -> str:
    """Why a subject whose collection Group changes between visits is left out, and what to do."""
    changes = describe_changes(pairs)
    if policy == "collection_group":
        return (f"converter: subject {subject}'s Group changes between visits in the collection CSV ({changes}); "
                f"data.label_policy collection_group needs one group per subject. To keep its scans, each under "
                f"its visit's diagnosis, set data.label_policy: visit_diagnosis and data.diagnosis_table")
    return (f"unstable diagnosis: subject {subject}'s Group changes between visits in the collection CSV "
            f"({changes}); data.label_policy stable keeps only subjects with one diagnosis at every visit")


# ---------------------------------------------------------------- what the split reports

def read_excluded(path: str | Path) -> pd.DataFrame:
    """Ingest's excluded.tsv, as text; fails naming the file if it lacks subject or reason_code."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the excluded table {path}: {err}; it is written by ingest "
                                f"(results/excluded.tsv)") from err
    missing = [c for c in ("subject", "reason_code") if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"{path} is not ingest's excluded table: missing column(s) {', '.join(missing)}")
    return table


def dropped_by_partition(excluded: pd.DataFrame | None, placed: Mapping[str, str], present: set[str]) -> dict:
    """Scans and subjects the label policy excluded, counted under the partition each subject had.

    ``placed`` maps subject -> partition (the split ledger's, updated by this run's); a subject in
    neither was never placed. ``present`` are the subjects still in the scans table: their excluded
    scans are counted apart, as scans of kept subjects; the others are dropped whole.
    """
    partitions = ("train", "val", "test", "never placed")
    rows = pd.DataFrame(columns=["subject", "reason_code"])
    if excluded is not None and {"subject", "reason_code"} <= set(excluded.columns):
        rows = excluded[excluded["reason_code"].isin(POLICY_CODES)]
    rows = rows.assign(partition=[placed.get(s) if placed.get(s) in partitions else "never placed"
                                  for s in rows["subject"]],
                       whole=[s not in present for s in rows["subject"]])

    def count(frame: pd.DataFrame) -> dict:
        table = {}
        for p in partitions:
            here = frame[frame["partition"] == p]
            table[p] = {"subjects": int(here.loc[here["whole"], "subject"].nunique()),
                        "scans": int(here["whole"].sum()), "scans_of_kept_subjects": int((~here["whole"]).sum())}
        return table
    dropped = rows[rows["whole"] & (rows["partition"] != "never placed")]
    return {"counted": excluded is not None, "by_partition": count(rows),
            "by_code": {c: count(rows[rows["reason_code"] == c]) for c in POLICY_CODES
                        if (rows["reason_code"] == c).any()},
            "placed_subjects_dropped": {p: sorted(dropped.loc[dropped["partition"] == p, "subject"].unique())
                                        for p in partitions[:3]}}
