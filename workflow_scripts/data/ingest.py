"""Ingest: the ADNI collection CSV and DICOM tree -> ``scans.tsv`` and ``excluded.tsv``.

One row per usable T1 MPRAGE scan, and every scan left out with a reason a person
understands. Every file of every series is read completely (pydicom): a file that does not
parse, or whose pixel data is shorter than its header says, excludes its scan here instead
of failing a conversion job later, or worse, converting into a volume with missing slices.
dicom2nifti's own validators then run on the headers, so a series the converter would
reject is excluded with the converter's reason. Series far shorter than the others of their
protocol, or too small to hold a head, are left out too.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.data import labels
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

COLLECTION_COLUMNS = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality",
                      "Description", "Type", "Acq Date", "Format", "Downloaded")
SCAN_COLUMNS = ("image_id", "subject", "group", "sex", "age", "visit", "acq_date", "description",
                "phase", "manufacturer", "n_slices", "dicom_dir", "series_uid")
EXCLUDED_COLUMNS = ("image_id", "subject", "group", "visit", "description", "reason_code", "reason")

# dicom2nifti's validation codes, said in words.
CONVERTER_REASONS = {
    "TOO_FEW_SLICES/LOCALIZER": "too few slices for a volume (a localizer?)",
    "NON_CUBICAL_IMAGE/GANTRY_TILT": "slices do not form a rectangular volume (gantry tilt or not a volume)",
    "SLICE_INCREMENT_INCONSISTENT": "inconsistent slice spacing (a missing slice?)",
    "IMAGE_ORIENTATION_INCONSISTENT": "slices with different orientations",
    "INSTANCE_NUMBER_INCONSISTENT": "inconsistent instance numbers",
    "NON_IMAGING_DICOM_FILES": "no imaging DICOM files",
}
# Raise whenever check_series changes what it finds: a cached verdict of another version is
# never reused (version 1 read headers only; 2 reads every file completely).
CHECK_VERSION = 2
# Excel on Windows saves "CSV" in the ANSI code page; IDA and everything else write UTF-8.
FALLBACK_ENCODING = "cp1252"
_SUBJECT_RE = re.compile(r"^\d{3}_S_(\d{4})$")
_EXTENT_AXES = ("columns", "rows", "slices")


def normalise_description(text: str) -> str:
    """Compare series descriptions the way a person would: case, spaces, '_' and '-' ignored."""
    return re.sub(r"[\s_\-]+", "", str(text)).lower()


def phase_of(subject: str, ranges: Sequence[Sequence]) -> str:
    """The ADNI phase a subject enrolled in, from the RID in its id ('unknown' if none fits). ``ranges``:
    config data.phase_rid_ranges, [phase, first RID, last RID] rows (the collection CSV has no phase column)."""
    match = _SUBJECT_RE.match(str(subject))
    if not match:
        return "unknown"
    rid = int(match.group(1))
    for name, low, high in ranges:
        if int(low) <= rid <= int(high):
            return str(name)
    return "unknown"


# --------------------------------------------------------------------------- the collection CSV

def read_collection_text(path: str | Path) -> str:
    """The CSV's text: UTF-8 (with or without BOM), else Windows-1252 as Excel on Windows writes it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise cli.PipelineError(f"cannot read the collection CSV {path}: {err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        utf8_error = err
    try:
        text = raw.decode(FALLBACK_ENCODING)
    except UnicodeDecodeError as err:
        raise cli.PipelineError(f"{path} is neither UTF-8 ({utf8_error}) nor Windows-1252 ({err}); save it "
                                f"again as 'CSV UTF-8'") from err
    LOG.warning("%s is not UTF-8 (%s); read it as Windows-1252, the encoding Excel on Windows saves CSV "
                "in. Check the non-ASCII text in the tables, or save it again as 'CSV UTF-8'", path, utf8_error)
    return text


def read_collection_csv(path: str | Path) -> pd.DataFrame:
    """Read an IDA collection CSV (blank rows dropped), failing with the missing column names if it is not one."""
    try:
        table = pd.read_csv(io.StringIO(read_collection_text(path)), dtype=str, keep_default_na=False)
    except cli.PipelineError:
        raise
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
    table = table.apply(lambda col: col.str.strip())
    # Excel leaves rows of empty cells (",,,,") after the data; they list no image.
    return table[table.ne("").any(axis=1)]


def groups_in(collection_csv: str | Path) -> list[str]:
    """The distinct groups the collection CSV lists (trimmed, as written), for messages."""
    return sorted(set(read_collection_csv(collection_csv)["Group"]) - {""})


def classes_without_rows(collection_csv: str | Path, classes: Iterable[str]) -> list[str]:
    """The configured classes no row of the CSV belongs to (groups compared trimmed and case-folded).

    Called at parse time, so a misspelt data.classes stops the run before any job.
    """
    present = {group.casefold() for group in groups_in(collection_csv)}
    return [str(c) for c in classes if str(c).strip().casefold() not in present]


def canonical_group(group: str, classes: Sequence[str]) -> str:
    """The configured spelling of a group that matches a class after trimming and case folding."""
    folded = str(group).strip().casefold()
    return next((c for c in classes if c.strip().casefold() == folded), str(group).strip())


def iso_date(text: str) -> str:
    """IDA writes dates as M/D/YYYY; the tables use ISO dates ('' when unparseable)."""
    for fmt in ("%m/%d/%Y", "%Y-%m-%d", "%m/%d/%y"):
        try:
            return pd.to_datetime(text, format=fmt).strftime("%Y-%m-%d")
        except (ValueError, TypeError):
            continue
    return ""


def find_image_dirs(adni_root: Path, subject: str, image_id: str) -> list[Path]:
    """Every DICOM folder ``ADNI/<subject>/<description>/<date-time>/<image id>`` (sorted)."""
    return sorted(p for p in (Path(adni_root) / "ADNI" / subject).glob(f"*/*/{image_id}") if p.is_dir())


def find_image_dir(adni_root: Path, subject: str, image_id: str) -> Path | None:
    """The first DICOM folder of an image, if present."""
    hits = find_image_dirs(adni_root, subject, image_id)
    return hits[0] if hits else None


# --------------------------------------------------------------------------- one series

@dataclass(frozen=True)
class SeriesCheck:
    """What reading one DICOM series completely found (a JSON-able record for the cache)."""
    ok: bool
    reason: str = ""
    code: str = ""                  # the reason code when not ok
    series_uid: str = ""
    manufacturer: str = ""
    n_slices: int = 0
    extent_mm: tuple[float, ...] = ()   # field of view along columns, rows, slices
    instances: str = ""             # digest of the sorted SOPInstanceUIDs: tells identical copies apart


def _series_entries(folder: Path) -> list[tuple[str, os.DirEntry]]:
    """(path relative to the folder, directory entry) of every file of a series folder, sorted as paths.

    One os.scandir walk (no stat for what the directory listing already says): subfolders are
    included as dicom2nifti reads them, symlinked folders are not entered, hidden names skipped.
    """
    found, pending = [], [("", str(folder))]
    while pending:
        prefix, where = pending.pop()
        try:
            with os.scandir(where) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    relative = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((relative + os.sep, entry.path))
                    elif entry.is_file():
                        found.append((relative, entry))
        except OSError:  # an unreadable or vanished subfolder lists nothing, as Path.rglob does
            continue
    return sorted(found, key=lambda item: item[0].split(os.sep))


def series_files(folder: Path) -> list[Path]:
    """The files of a series folder, subfolders included as dicom2nifti reads them; hidden files skipped."""
    folder = Path(folder)
    return [folder / relative for relative, _ in _series_entries(folder)]


def _series_fingerprint(folder: Path) -> str:
    """Changes whenever a file in the series is added, removed or rewritten."""
    stats = []
    for relative, entry in _series_entries(Path(folder)):
        stat = entry.stat()
        stats.append((relative, stat.st_size, stat.st_mtime_ns))
    return json.dumps(stats)


def pixel_data_problem(ds, path: Path, file_size: int | None = None) -> tuple[str, str] | None:
    """(code, reason) when a file's pixel data is not what its header declares, else None.

    Native transfer syntaxes: the byte count must be rows x columns x frames x samples x bits
    allocated / 8 (plus one pad byte when that is odd). Compressed (encapsulated) ones: the
    fragments must parse into NumberOfFrames non-empty frames; pixels are not decoded.
    ``file_size``: the bytes the file was parsed from (None: the file is asked).
    """
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import get_expected_length

    if "PixelData" not in ds:
        size = path.stat().st_size if file_size is None else file_size
        return ("truncated_pixel_data", f"{path} has no pixel data: the file ends after {size} "
                                        f"bytes (an interrupted download?); download the image again")
    frames = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        try:
            sizes = [len(f) for f in generate_frames(ds.PixelData, number_of_frames=frames)]
        except Exception as err:  # pydicom raises ValueError/struct errors on broken item tags
            return ("bad_pixel_data", f"{path}: the compressed pixel data does not parse "
                                      f"({type(err).__name__}: {err}); download the image again")
        if len(sizes) < frames:
            return ("truncated_pixel_data", f"{path}: the compressed pixel data holds {len(sizes)} frame(s), "
                                            f"the header says {frames}; download the image again")
        if len(sizes) > frames or not all(sizes):
            return ("bad_pixel_data", f"{path}: the compressed pixel data holds {len(sizes)} frame(s) "
                                      f"({sizes.count(0)} empty), the header says {frames}; download the "
                                      f"image again")
        return None
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return ("unreadable_dicom", f"{path} lacks the image attributes its pixel data needs "
                                    f"({type(err).__name__}: {err}); download the image again")
    actual = len(ds.PixelData)
    if expected <= actual <= expected + expected % 2:
        return None
    shape = (f"{ds.Rows} rows x {ds.Columns} columns x {frames} frame(s) x {ds.SamplesPerPixel} sample(s) x "
             f"{ds.BitsAllocated} bits / 8 = {expected} bytes")
    if actual < expected:
        return ("truncated_pixel_data", f"{path}: pixel data has {actual} bytes where the header declares "
                                        f"{shape}; the file is cut short, download the image again")
    return ("bad_pixel_data", f"{path}: pixel data has {actual} bytes, more than the header declares "
                              f"({shape}); the file is damaged, download the image again")


def read_dicom_file(path: Path):
    """Read one file completely; returns (dataset, None) or (None, (code, reason)).

    The bytes are read in one call and parsed from memory: on the open file pydicom makes two or
    three small reads per element, about a fifth of its CPU time on the benchmark's files.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        return None, ("unreadable_dicom", f"{path} is not a readable DICOM file ({type(err).__name__}: {err}); "
                                          f"download the image again, or remove the file if it is not part "
                                          f"of the series")
    problem = pixel_data_problem(ds, path, len(data))
    return (None, problem) if problem else (ds, None)


def _read_ahead(files: Sequence[Path]) -> None:
    """Ask the kernel to start reading a series' files now (POSIX_FADV_WILLNEED), so a cold disk's
    reads overlap the parsing instead of adding to it; a no-op where the OS lacks posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # read_dicom_file names the file
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _pixel_spacing_mm(ds) -> tuple[float, float]:
    """(row spacing, column spacing) in mm of a classic header, or of an enhanced multi-frame one."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(group) or []
        if items and "PixelMeasuresSequence" in items[0]:
            spacing = items[0].PixelMeasuresSequence[0].PixelSpacing
            return float(spacing[0]), float(spacing[1])
    return float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])


def field_of_view_mm(headers: Sequence, multiframe: bool) -> tuple[float, float, float]:
    """Extent along columns, rows and slices: columns x column spacing, rows x row spacing, and the
    span of the slice positions along the slice normal plus one slice spacing."""
    from dicom2nifti import common

    first = headers[0]
    if multiframe:
        n_positions = len(first.PerFrameFunctionalGroupsSequence)
        positions = np.array([common._multiframe_get_image_position(first, k) for k in range(n_positions)], float)
        row_cosine, column_cosine = (np.asarray(v, float) for v in common._multiframe_get_image_orientations(first))
    else:
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        row_cosine, column_cosine = orientation[:3], orientation[3:]
    along_normal = positions @ np.cross(row_cosine, column_cosine)
    span = float(along_normal.max() - along_normal.min())
    if len(positions) > 1:
        step = span / (len(positions) - 1)
    else:
        step = float(first.get("SliceThickness") or 0.0)
    row_spacing, column_spacing = _pixel_spacing_mm(first)
    return (round(int(first.Columns) * column_spacing, 3), round(int(first.Rows) * row_spacing, 3),
            round(span + step, 3))


def _mixed_series_reason(folder: Path, uids: Counter) -> str:
    """Name every SeriesInstanceUID of a folder with its file count."""
    listed = ", ".join(f"{uid} ({n} files)" for uid, n in uids.most_common())
    return (f"{folder} holds files of {len(uids)} DICOM series (SeriesInstanceUID {listed}); one image folder "
            f"must hold one series: download the image again, or move the other series' files out")


def check_series(folder: Path) -> SeriesCheck:
    """Read every file of a series completely, then validate it with dicom2nifti's validators."""
    from dicom2nifti import common
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    folder = Path(folder)
    files = series_files(folder)
    if not files:
        return SeriesCheck(False, f"not a volume: {folder} holds no files", "not_a_volume")
    _read_ahead(files)
    headers = []
    for path in files:
        ds, problem = read_dicom_file(path)
        if problem:
            return SeriesCheck(False, problem[1], problem[0])
        headers.append(ds)
    uids = Counter(str(h.SeriesInstanceUID) for h in headers if "SeriesInstanceUID" in h)
    if len(uids) > 1:
        return SeriesCheck(False, _mixed_series_reason(folder, uids), "mixed_series")
    headers = [h for h in headers if common.is_valid_imaging_dicom(h)]
    if not headers:
        return SeriesCheck(False, "not a volume: dicom2nifti rejects the series (NON_IMAGING_DICOM_FILES: "
                                  "no imaging DICOM files)", "not_a_volume")
    first = headers[0]
    info = dict(series_uid=str(getattr(first, "SeriesInstanceUID", "")),
                manufacturer=str(getattr(first, "Manufacturer", "")),
                instances=hashlib.sha1("\n".join(sorted(str(h.get("SOPInstanceUID", "")) for h in headers))
                                       .encode()).hexdigest())
    try:
        multiframe = common.is_multiframe_dicom(headers)
        if multiframe:
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
        extent = field_of_view_mm(headers, multiframe)
    except (ConversionValidationError, ConversionError) as err:
        code = str(err.args[0]) if err.args else type(err).__name__
        words = CONVERTER_REASONS.get(code, code)
        return SeriesCheck(False, f"not a volume: dicom2nifti rejects the series ({code}: {words})",
                           "not_a_volume", **info)
    except Exception as err:
        return SeriesCheck(False, f"unreadable DICOM headers in {folder}: {type(err).__name__}: {err}",
                           "unreadable_dicom", **info)
    return SeriesCheck(True, n_slices=n_slices, extent_mm=extent, **info)


def _cache_hit(folder: Path, cache: dict, fingerprint: str) -> SeriesCheck | None:
    """The cached verdict of an unchanged series checked by this version of the checks, else None."""
    hit = cache.get(str(folder))
    if hit and hit.get("version") == CHECK_VERSION and hit.get("fingerprint") == fingerprint:
        record = dict(hit["check"])
        return SeriesCheck(**{**record, "extent_mm": tuple(record.get("extent_mm", ()))})
    return None


def _cached_check(folder: Path, cache: dict) -> SeriesCheck:
    """Reading every file is the slow part of ingest: re-check only series that changed, and never
    trust a verdict of another version of the checks."""
    fingerprint = _series_fingerprint(folder)
    result = _cache_hit(folder, cache, fingerprint)
    if result is None:
        result = check_series(folder)
        cache[str(folder)] = {"version": CHECK_VERSION, "fingerprint": fingerprint, "check": asdict(result)}
    return result


def prefetch_checks(folders: Iterable[Path], cache: dict, workers: int) -> None:
    """Check the series the cache lacks with ``workers`` processes (1: none, each is checked when met)."""
    if workers <= 1:
        return
    stale = [(f, fp) for f in dict.fromkeys(folders)
             if _cache_hit(f, cache, fp := _series_fingerprint(f)) is None]
    if len(stale) < 2:
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check_series, [f for f, _ in stale], chunksize=max(1, len(stale) // (8 * workers)))
        for (folder, fingerprint), result in zip(stale, results):
            cache[str(folder)] = {"version": CHECK_VERSION, "fingerprint": fingerprint, "check": asdict(result)}


def ambiguous_copies(folders: Sequence[Path], cache: dict) -> str:
    """Why the folders of one image id cannot be told apart ('' for one folder or identical copies).

    Identical copies (same SeriesInstanceUID and SOPInstanceUIDs) are one image: the first
    (sorted) is used, and the log says so.
    """
    if len(folders) < 2:
        return ""
    checks = [_cached_check(folder, cache) for folder in folders]
    first = checks[0]
    if first.series_uid and first.instances and all(
            (c.series_uid, c.instances) == (first.series_uid, first.instances) for c in checks[1:]):
        LOG.info("image folders %s are identical copies (same SeriesInstanceUID and SOPInstanceUIDs); using %s",
                 ", ".join(map(str, folders)), folders[0])
        return ""
    described = "; ".join(f"{folder} (SeriesInstanceUID {c.series_uid or 'unreadable: ' + c.code})"
                          for folder, c in zip(folders, checks))
    return (f"ambiguous image id: {len(folders)} folders hold different series for it: {described}; keep the "
            f"folder that belongs to this image id and remove the other(s)")


# --------------------------------------------------------------------------- the tables

def _median_of_others(counts: dict[str, int], key: str) -> float | None:
    """Median slice count of a protocol's other series (None when it has no other)."""
    others = [n for k, n in counts.items() if k != key]
    return float(np.median(others)) if others else None


def build_tables(collection: pd.DataFrame, adni_root: str | Path, *, classes: Iterable[str],
                 descriptions: Iterable[str], types: Iterable[str], phase_ranges: Sequence[Sequence],
                 min_slice_share: float | None, min_extent_mm: float | None, label_policy: labels.LabelPolicy,
                 check_cache: dict | None = None, workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the collection into usable scans and excluded scans (first applicable reason).

    ``min_slice_share`` and ``min_extent_mm`` are data.min_slice_share and data.min_extent_mm
    (None leaves that check out). ``workers`` processes read the series (the job's threads).
    ``label_policy`` (data.label_policy) gives each row its class, see labels.py.
    """
    adni_root = Path(adni_root).resolve()
    classes = [str(c) for c in classes]
    accepted = {normalise_description(d) for d in descriptions}
    accepted_types = {t.lower() for t in types}
    cache = {} if check_cache is None else check_cache
    collection = collection.assign(Group=[canonical_group(g, classes) for g in collection["Group"]])
    verdicts = labels.label_scans(collection, label_policy, classes[0])
    collection = collection.assign(Group=verdicts["group"].where(verdicts["reason_code"] == "", collection["Group"]))

    scans, excluded, on_disk, checked = [], [], [], []
    seen_ids: dict[str, int] = {}
    seen_series: dict[str, str] = {}

    def exclude(index, row, code: str, reason: str) -> None:
        excluded.append({"row": index, "image_id": row["Image Data ID"], "subject": row["Subject"],
                         "group": row["Group"], "visit": row["Visit"], "description": row["Description"],
                         "reason_code": code, "reason": reason})

    # Per row: the CSV's own reasons, and whether the image is on disk.
    for index, row in collection.iterrows():
        image_id, subject, group = row["Image Data ID"], row["Subject"], row["Group"]
        if image_id in seen_ids:
            exclude(index, row, "duplicate_row", f"duplicate: image {image_id} is listed again in the "
                                                 f"collection CSV (first on data row {seen_ids[image_id] + 1})")
            continue
        seen_ids[image_id] = index
        if row["Modality"] and row["Modality"].upper() != "MRI":
            exclude(index, row, "not_mri", f"not MRI (modality '{row['Modality']}')")
        elif normalise_description(row["Description"]) not in accepted:
            exclude(index, row, "not_t1_mprage", f"not T1 MPRAGE: description '{row['Description']}' is not "
                                                 f"one of data.descriptions")
        elif row["Type"] and row["Type"].lower() not in accepted_types:
            exclude(index, row, "not_original", f"not a raw scan: type '{row['Type']}' is not one of data.types")
        elif group not in classes:
            exclude(index, row, "group_not_in_classes",
                    f"group '{group}' is not one of the configured classes ({', '.join(classes)})")
        elif verdicts.at[index, "reason_code"]:  # the label policy's: converter, missing or unstable diagnosis
            exclude(index, row, verdicts.at[index, "reason_code"], verdicts.at[index, "reason"])
        elif not (folders := find_image_dirs(adni_root, subject, image_id)):
            exclude(index, row, "missing_on_disk", f"missing on disk: no folder ADNI/{subject}/*/*/{image_id} "
                                                   f"under {adni_root}")
        else:
            on_disk.append((index, row, folders))

    # Per series: every file read completely (by ``workers`` processes at once when more than 1).
    prefetch_checks((folder for *_, folders in on_disk for folder in folders), cache, workers)
    for index, row, folders in on_disk:
        if ambiguity := ambiguous_copies(folders, cache):
            exclude(index, row, "ambiguous_image_id", ambiguity)
        elif not (check := _cached_check(folders[0], cache)).ok:
            exclude(index, row, check.code or "not_a_volume", check.reason)
        else:
            checked.append((index, row, folders[0], check))

    # Across series: slice counts against the same protocol's others, field of view, duplicates.
    slices_by_protocol: dict[str, dict[str, int]] = {}
    for _, row, folder, check in checked:
        slices_by_protocol.setdefault(normalise_description(row["Description"]), {})[str(folder)] = check.n_slices
    for index, row, folder, check in checked:
        image_id, subject = row["Image Data ID"], row["Subject"]
        protocol = normalise_description(row["Description"])
        median = _median_of_others(slices_by_protocol[protocol], str(folder))
        short_axes = [f"{axis} {mm:g} mm" for axis, mm in zip(_EXTENT_AXES, check.extent_mm)
                      if min_extent_mm is not None and mm < min_extent_mm]
        if min_slice_share is not None and median is not None and check.n_slices < min_slice_share * median:
            exclude(index, row, "partial_series",
                    f"partial series: {check.n_slices} slices where the other "
                    f"{len(slices_by_protocol[protocol]) - 1} series of protocol '{row['Description']}' have a "
                    f"median of {median:g} (fewer than data.min_slice_share={min_slice_share:g} of it): an "
                    f"incomplete download? download the image again")
        elif short_axes:
            exclude(index, row, "too_small_extent",
                    f"field of view {' x '.join(f'{mm:g}' for mm in check.extent_mm)} mm (columns x rows x "
                    f"slices) is below data.min_extent_mm={min_extent_mm:g} along {', '.join(short_axes)}: "
                    f"not a whole-head scan (a slab or an incomplete series?)")
        elif check.series_uid and check.series_uid in seen_series:
            exclude(index, row, "duplicate_series", f"duplicate: same DICOM series (SeriesInstanceUID) as "
                                                    f"image {seen_series[check.series_uid]}")
        else:
            if check.series_uid:
                seen_series[check.series_uid] = image_id
            scans.append({"image_id": image_id, "subject": subject, "group": row["Group"], "sex": row["Sex"],
                          "age": row["Age"], "visit": row["Visit"], "acq_date": iso_date(row["Acq Date"]),
                          "description": row["Description"], "phase": phase_of(subject, phase_ranges),
                          "manufacturer": check.manufacturer, "n_slices": check.n_slices,
                          "dicom_dir": str(folder), "series_uid": check.series_uid})
    scans_df = pd.DataFrame(scans, columns=list(SCAN_COLUMNS))
    excluded_df = (pd.DataFrame(excluded, columns=["row", *EXCLUDED_COLUMNS]).sort_values("row", kind="stable")
                   .drop(columns="row").reset_index(drop=True))
    return scans_df.sort_values(["subject", "acq_date", "image_id"], ignore_index=True), excluded_df


def table_options(data: settings.Settings, diagnosis_table: str | None = None) -> dict:
    """build_tables' keyword arguments from the resolved ``data`` settings (and the diagnosis table's path)."""
    return dict(classes=data.classes, descriptions=data.descriptions, types=data.types,
                phase_ranges=data.phase_rid_ranges, min_slice_share=data.min_slice_share,
                min_extent_mm=data.min_extent_mm,
                label_policy=labels.LabelPolicy(data.label_policy, diagnosis_table, data.visit_aliases))


def load_check_cache(path: Path | None) -> dict:
    """The per-series check cache ({} when absent or unreadable: every series is read again)."""
    if path is None or not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        LOG.warning("ignoring the unreadable check cache %s (%s); every series is read again", path, err)
        return {}
    return cache if isinstance(cache, dict) else {}


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--collection-csv", required=True)
    p.add_argument("--adni-root", required=True, help="folder holding ADNI/")
    settings.add_argument(p, "data")
    p.add_argument("--check-cache", help="JSON file caching per-series checks between runs")
    p.add_argument("--diagnosis-table", help="data.diagnosis_table: a local ADNIMERGE or DXSUM CSV")
    p.add_argument("--scans", required=True)
    p.add_argument("--excluded", required=True)
    args = p.parse_args(argv)
    (data,) = settings.read_job(args.settings, "data")

    if not (Path(args.adni_root) / "ADNI").is_dir():
        raise cli.PipelineError(f"no ADNI/ folder under data.adni_root={args.adni_root}; point data.adni_root "
                                f"at the folder that holds the unzipped ADNI download")
    cache_path = Path(args.check_cache) if args.check_cache else None
    cache = load_check_cache(cache_path)
    scans, excluded = build_tables(read_collection_csv(args.collection_csv), args.adni_root,
                                   check_cache=cache, workers=args.threads,
                                   **table_options(data, args.diagnosis_table))
    if cache_path:
        write_text_atomic(json.dumps(cache), cache_path)
    write_text_atomic(excluded.to_csv(sep="\t", index=False), args.excluded)
    write_text_atomic(scans.to_csv(sep="\t", index=False), args.scans)
    LOG.info("%d usable scans of %d subjects; %d excluded (%s)", len(scans), scans["subject"].nunique(),
             len(excluded), excluded["reason_code"].value_counts().to_dict())
    if scans.empty:
        # Exit 0 so Snakemake keeps excluded.tsv (it deletes a failed job's outputs); the workflow
        # stops at the ingest checkpoint on the empty scans table.
        LOG.error("no usable scans in %s: every one of its %d image rows is excluded; see %s for the reasons",
                  args.collection_csv, len(excluded), args.excluded)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
