"""Ingest: the ADNI collection CSV and DICOM tree -> ``scans.tsv`` and ``excluded.tsv``.

One row per usable T1 MPRAGE scan, and every scan left out with a reason a person
understands. The DICOM checks are dicom2nifti's own validators run on the headers only,
so a series the converter would reject is excluded here with the converter's reason
instead of failing its conversion job later.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from workflow_scripts import cli
from workflow_scripts.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

COLLECTION_COLUMNS = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality",
                      "Description", "Type", "Acq Date", "Format", "Downloaded")
SCAN_COLUMNS = ("image_id", "subject", "group", "sex", "age", "visit", "acq_date", "description",
                "phase", "manufacturer", "n_slices", "dicom_dir")
EXCLUDED_COLUMNS = ("image_id", "subject", "group", "visit", "description", "reason_code", "reason")

# ADNI enrolment phase by roster id (RID, the last four digits of a subject id); the
# collection CSV has no phase column, so this table (config ``data.phase_rid_ranges``)
# decides which phase a subject came in with.
DEFAULT_PHASE_RID_RANGES = (("ADNI1", 1, 1999), ("ADNIGO", 2000, 3999), ("ADNI2", 4000, 5999),
                            ("ADNI3", 6000, 6999), ("ADNI4", 7000, 9999))

# dicom2nifti's validation codes, said in words.
CONVERTER_REASONS = {
    "TOO_FEW_SLICES/LOCALIZER": "too few slices for a volume (a localizer?)",
    "NON_CUBICAL_IMAGE/GANTRY_TILT": "slices do not form a rectangular volume (gantry tilt or not a volume)",
    "SLICE_INCREMENT_INCONSISTENT": "inconsistent slice spacing (a missing slice?)",
    "IMAGE_ORIENTATION_INCONSISTENT": "slices with different orientations",
    "INSTANCE_NUMBER_INCONSISTENT": "inconsistent instance numbers",
    "NON_IMAGING_DICOM_FILES": "no imaging DICOM files",
}
_SUBJECT_RE = re.compile(r"^\d{3}_S_(\d{4})$")


def normalise_description(text: str) -> str:
    """Compare series descriptions the way a person would: case, spaces, '_' and '-' ignored."""
    return re.sub(r"[\s_\-]+", "", str(text)).lower()


def phase_of(subject: str, ranges: Sequence[Sequence] = DEFAULT_PHASE_RID_RANGES) -> str:
    """The ADNI phase a subject enrolled in, from the RID in its id ('unknown' if none fits)."""
    match = _SUBJECT_RE.match(str(subject))
    if not match:
        return "unknown"
    rid = int(match.group(1))
    for name, low, high in ranges:
        if int(low) <= rid <= int(high):
            return str(name)
    return "unknown"


def read_collection_csv(path: str | Path) -> pd.DataFrame:
    """Read an IDA collection CSV, failing with the missing column names if it is not one."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the collection CSV {path}: {err}") from err
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("Image Data ID", "Subject", "Group", "Description") if c not in table.columns]
    if missing:
        raise cli.PipelineError(
            f"{path} is not an ADNI/IDA collection CSV: missing column(s) {', '.join(missing)}; "
            f"expected the columns {', '.join(COLLECTION_COLUMNS)}")
    for column in COLLECTION_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    return table.apply(lambda col: col.str.strip())


def iso_date(text: str) -> str:
    """IDA writes dates as M/D/YYYY; the tables use ISO dates ('' when unparseable)."""
    for fmt in ("%m/%d/%Y", "%Y-%m-%d", "%m/%d/%y"):
        try:
            return pd.to_datetime(text, format=fmt).strftime("%Y-%m-%d")
        except (ValueError, TypeError):
            continue
    return ""


def find_image_dir(adni_root: Path, subject: str, image_id: str) -> Path | None:
    """The DICOM folder ``ADNI/<subject>/<description>/<date-time>/<image id>``, if present."""
    hits = sorted(p for p in (adni_root / "ADNI" / subject).glob(f"*/*/{image_id}") if p.is_dir())
    return hits[0] if hits else None


@dataclass(frozen=True)
class SeriesCheck:
    """What the header check of one DICOM series found."""
    ok: bool
    reason: str = ""
    series_uid: str = ""
    manufacturer: str = ""
    n_slices: int = 0


def _series_fingerprint(folder: Path) -> str:
    """Changes whenever a file in the series is added, removed or rewritten."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()]
    return json.dumps(stats)


def check_series(folder: Path) -> SeriesCheck:
    """Validate a DICOM series with dicom2nifti's validators, reading headers only."""
    import warnings

    from dicom2nifti import common
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            headers = common.read_dicom_directory(str(folder), stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types for damaged files
        return SeriesCheck(False, f"unreadable DICOM: {err}")
    headers = [h for h in headers if common.is_valid_imaging_dicom(h)]
    if not headers:
        return SeriesCheck(False, "unreadable or not a volume: no imaging DICOM files in the folder")
    first = headers[0]
    info = dict(series_uid=str(getattr(first, "SeriesInstanceUID", "")),
                manufacturer=str(getattr(first, "Manufacturer", "")))
    try:
        if common.is_multiframe_dicom(headers):
            common.multiframe_validate_slicecount(headers)
            common.multiframe_validate_orientation(headers)
            common.multiframe_validate_orthogonal(headers)
            common.multiframe_validate_slice_increment(headers)
            n_slices = int(getattr(first, "NumberOfFrames", 0))
        else:
            headers = common.sort_dicoms(headers)
            common.validate_slicecount(headers)
            common.validate_orientation(headers)
            common.validate_orthogonal(headers)
            common.validate_slice_increment(headers)
            n_slices = len(headers)
    except (ConversionValidationError, ConversionError) as err:
        code = str(err.args[0]) if err.args else type(err).__name__
        words = CONVERTER_REASONS.get(code, code)
        return SeriesCheck(False, f"not a volume: dicom2nifti rejects the series ({code}: {words})", **info)
    except Exception as err:
        return SeriesCheck(False, f"unreadable DICOM headers: {type(err).__name__}: {err}", **info)
    return SeriesCheck(True, "", n_slices=n_slices, **info)


def _cached_check(folder: Path, cache: dict) -> SeriesCheck:
    """Header checks are the slow part of ingest; re-check only series that changed."""
    key = str(folder)
    fingerprint = _series_fingerprint(folder)
    hit = cache.get(key)
    if hit and hit["fingerprint"] == fingerprint:
        return SeriesCheck(**hit["check"])
    result = check_series(folder)
    cache[key] = {"fingerprint": fingerprint, "check": result.__dict__}
    return result


def build_tables(collection: pd.DataFrame, adni_root: str | Path, *, classes: Iterable[str],
                 descriptions: Iterable[str], types: Iterable[str] = ("Original",),
                 phase_ranges: Sequence[Sequence] = DEFAULT_PHASE_RID_RANGES,
                 check_cache: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the collection into usable scans and excluded scans (first applicable reason)."""
    adni_root = Path(adni_root).resolve()
    classes = [str(c) for c in classes]
    accepted = {normalise_description(d) for d in descriptions}
    accepted_types = {t.lower() for t in types}
    cache = {} if check_cache is None else check_cache
    groups_by_subject = collection.groupby("Subject")["Group"].agg(lambda g: sorted(set(g) - {""}))

    scans, excluded = [], []
    seen_ids: dict[str, int] = {}
    seen_series: dict[str, str] = {}

    def exclude(row, code: str, reason: str) -> None:
        excluded.append({"image_id": row["Image Data ID"], "subject": row["Subject"], "group": row["Group"],
                         "visit": row["Visit"], "description": row["Description"],
                         "reason_code": code, "reason": reason})

    for index, row in collection.iterrows():
        image_id, subject, group = row["Image Data ID"], row["Subject"], row["Group"]
        if image_id in seen_ids:
            exclude(row, "duplicate_row", f"duplicate: image {image_id} is listed again in the collection "
                                          f"CSV (first on data row {seen_ids[image_id] + 1})")
            continue
        seen_ids[image_id] = index
        if row["Modality"] and row["Modality"].upper() != "MRI":
            exclude(row, "not_mri", f"not MRI (modality '{row['Modality']}')")
        elif normalise_description(row["Description"]) not in accepted:
            exclude(row, "not_t1_mprage", f"not T1 MPRAGE: description '{row['Description']}' is not "
                                          f"one of data.descriptions")
        elif row["Type"] and row["Type"].lower() not in accepted_types:
            exclude(row, "not_original", f"not a raw scan: type '{row['Type']}' is not one of data.types")
        elif group not in classes:
            exclude(row, "group_not_in_classes",
                    f"group '{group}' is not one of the configured classes ({', '.join(classes)})")
        elif len(groups_by_subject[subject]) > 1:
            exclude(row, "conflicting_group", f"subject {subject} has conflicting group labels in the "
                                              f"collection CSV ({', '.join(groups_by_subject[subject])})")
        elif (folder := find_image_dir(adni_root, subject, image_id)) is None:
            exclude(row, "missing_on_disk", f"missing on disk: no folder ADNI/{subject}/*/*/{image_id} "
                                            f"under {adni_root}")
        elif not (check := _cached_check(folder, cache)).ok:
            exclude(row, "not_a_volume", check.reason)
        elif check.series_uid and check.series_uid in seen_series:
            exclude(row, "duplicate_series", f"duplicate: same DICOM series (SeriesInstanceUID) as "
                                             f"image {seen_series[check.series_uid]}")
        else:
            if check.series_uid:
                seen_series[check.series_uid] = image_id
            scans.append({"image_id": image_id, "subject": subject, "group": group, "sex": row["Sex"],
                          "age": row["Age"], "visit": row["Visit"], "acq_date": iso_date(row["Acq Date"]),
                          "description": row["Description"], "phase": phase_of(subject, phase_ranges),
                          "manufacturer": check.manufacturer, "n_slices": check.n_slices,
                          "dicom_dir": str(folder)})
    scans_df = pd.DataFrame(scans, columns=list(SCAN_COLUMNS))
    excluded_df = pd.DataFrame(excluded, columns=list(EXCLUDED_COLUMNS))
    return scans_df.sort_values(["subject", "acq_date", "image_id"], ignore_index=True), excluded_df


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--collection-csv", required=True)
    p.add_argument("--adni-root", required=True, help="folder holding ADNI/")
    p.add_argument("--classes", nargs="+", required=True)
    p.add_argument("--descriptions", nargs="+", required=True)
    p.add_argument("--types", nargs="+", default=["Original"])
    p.add_argument("--phase-ranges", default=json.dumps(DEFAULT_PHASE_RID_RANGES),
                   help="JSON list of [phase, first RID, last RID]")
    p.add_argument("--check-cache", help="JSON file caching per-series header checks between runs")
    p.add_argument("--scans", required=True)
    p.add_argument("--excluded", required=True)
    args = p.parse_args(argv)

    if not (Path(args.adni_root) / "ADNI").is_dir():
        raise cli.PipelineError(f"no ADNI/ folder under data.adni_root={args.adni_root}; point data.adni_root "
                                f"at the folder that holds the unzipped ADNI download")
    cache_path = Path(args.check_cache) if args.check_cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    scans, excluded = build_tables(read_collection_csv(args.collection_csv), args.adni_root,
                                   classes=args.classes, descriptions=args.descriptions, types=args.types,
                                   phase_ranges=json.loads(args.phase_ranges), check_cache=cache)
    if cache_path:
        write_text_atomic(json.dumps(cache), cache_path)
    write_text_atomic(excluded.to_csv(sep="\t", index=False), args.excluded)
    write_text_atomic(scans.to_csv(sep="\t", index=False), args.scans)
    LOG.info("%d usable scans of %d subjects; %d excluded (%s)", len(scans), scans["subject"].nunique(),
             len(excluded), excluded["reason_code"].value_counts().to_dict())
    if scans.empty:
        raise cli.PipelineError(f"no usable scans in {args.collection_csv}; see {args.excluded} for the reasons")


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
