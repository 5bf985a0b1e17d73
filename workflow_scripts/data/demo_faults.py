"""Demo faults: plant the broken series a real ADNI download has into an ADNI-shaped tree.

Each kind adds NEW subjects and images (copies of good series already in the tree, rewritten
with their own UIDs and the new subject's id) and their rows in the collection CSV; nothing
that was there is changed. What ingest must do with each (``FAULT_KINDS``):

=================  ==============================================================  =====================
kind               what is planted                                                 ingest outcome
=================  ==============================================================  =====================
truncated_pixels   a copy whose last bytes of pixel data are cut from a few files  truncated_pixel_data
                   (headers intact: a header-only check cannot see it)
partial_series     the first ~30% of a series' slices (by InstanceNumber): an      partial_series
                   interrupted download, still a valid-looking volume
mixed_folder       two series (different SeriesInstanceUIDs) in one image folder   mixed_series
ambiguous_id       one image id in two folders holding different series            ambiguous_image_id
duplicate_copy     one image id in two folders holding identical copies            used (once)
lower_case_group   two good copies whose CSV group is written ``ad`` and `` cn``   used (as AD and CN)
excel_csv          the CSV rewritten as Excel on Windows saves it: Windows-1252,   not_t1_mprage (its
                   CRLF, two trailing empty rows, and a new localizer row with an  description read
                   en dash in its description                                      back intact)
not_a_head         a valid series whose pixels are a small bright ball (a QA       used; then dropped at
                   phantom, not a head): it converts, and only skull stripping     the stripped stage
                   can tell                                                        (NOT_A_HEAD_DROPS)
=================  ==============================================================  =====================

Used copies are new images of their source's own subject (a repeat scan at its visit), so a
copied brain never appears under two subject ids (it could otherwise sit in training and in the
test set at once); they get the source's truth files and volumes row under their own ids, so the
rest of the demo (segmentation, volumetry) treats them like any scan.
"""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from workflow_scripts.data import ingest
from workflow_scripts.data.demo import _existing_state, _uid, phase_rid_range
from workflow_scripts.data.ingest import COLLECTION_COLUMNS, FALLBACK_ENCODING
from workflow_scripts.common.nifti_io import write_text_atomic

# kind -> what ingest must report for each image the kind plants ("used": in scans.tsv).
FAULT_KINDS = {
    "truncated_pixels": "truncated_pixel_data",
    "partial_series": "partial_series",
    "mixed_folder": "mixed_series",
    "ambiguous_id": "ambiguous_image_id",
    "duplicate_copy": "used",
    "lower_case_group": "used",
    "excel_csv": "not_t1_mprage",
    "not_a_head": "used",
}
# What the stripped stage must drop a not_a_head series for (results/dropped.tsv).
NOT_A_HEAD_DROPS = ("empty_brain_mask", "implausible_brain_mask")
USED_KINDS = ("duplicate_copy", "lower_case_group")  # planted as new images of the source's own subject
PHANTOM_RADIUS = 0.1     # the ball's radius as a share of the slice's smaller side
# Copies are made of good series of these groups (the demo's diagnostic groups), so a planted
# fault is excluded for its own reason, not for its group.
SOURCE_GROUPS = ("AD", "CN")
PARTIAL_SHARE = 0.3      # share of the slices a partial series keeps
TRUNCATED_FILES = 3      # files whose pixel data is cut in a truncated copy
EXCEL_DESCRIPTION = "Localizer \u2013 3 plane"  # en dash: byte 0x96 in Windows-1252
PLANTED_COLUMNS = ("kind", "image_id", "subject", "group", "expected")


@dataclass(frozen=True)
class Source:
    """A good series of the tree that copies are made from."""
    row: dict
    folder: Path


@dataclass
class Planter:
    """Hands out new subject ids and image numbers that the tree and CSV do not use yet."""
    rng: np.random.Generator
    used_subjects: set
    last_number: int
    phase_ranges: Sequence[Sequence]  # data.phase_rid_ranges

    def new_subject(self, like: str) -> str:
        """An unused subject id at the source's site, its RID in the source's phase range."""
        phase = ingest.phase_of(like, self.phase_ranges)
        low, high = phase_rid_range(phase, self.phase_ranges) if phase != "unknown" else (1, 9999)
        taken = {int(s[-4:]) for s in self.used_subjects if s[-4:].isdigit()}
        free = sorted(set(range(low, high + 1)) - taken)
        if not free:
            raise ValueError(f"no free RID left in {low}-{high} (phase {phase}) for a planted subject")
        subject = f"{like[:6]}{int(self.rng.choice(free)):04d}"
        self.used_subjects.add(subject)
        return subject

    def new_image_id(self) -> str:
        self.last_number += int(self.rng.integers(3, 900))
        return f"I{self.last_number}"


def _sorted_by_instance(files: Sequence[Path]) -> list[Path]:
    """Series files in slice order (InstanceNumber), read header-only."""
    import pydicom

    return sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).get("InstanceNumber") or 0))


def copy_series(source: Path, target: Path, *, subject: str, image_id: str, key: str,
                files: Sequence[Path] | None = None) -> list[Path]:
    """Rewrite a series' files into ``target`` as a new series of ``subject`` (UIDs derived from ``key``)."""
    import pydicom

    target.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = _uid("planted series", key), _uid("planted study", key)
    written = []
    for number, path in enumerate(files or ingest.series_files(source), start=1):
        ds = pydicom.dcmread(path)
        ds.PatientID = subject
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("planted instance", key, path.name)
        out = target / f"ADNI_{subject}_MR_planted_{key.split(':')[-1]}_{number}_{image_id}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def cut_pixel_data(path: Path) -> None:
    """Drop the second half of a file's pixel data (the last element), keeping its header intact."""
    import pydicom

    pixel_bytes = len(pydicom.dcmread(path).PixelData)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - pixel_bytes // 2)


def paint_phantom(files: Sequence[Path]) -> None:
    """Replace a series' pixels (files in slice order) by a bright ball in the middle of the volume,
    zero elsewhere: a valid volume of a few mL that is not a head."""
    import pydicom

    n = len(files)
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        rows, cols = pixels.shape[-2:]
        radius = PHANTOM_RADIUS * min(rows, cols)
        depth = (index - (n - 1) / 2) / max(n / 2, 1) * min(rows, cols) / 2  # the slice's offset in pixels
        yy, xx = np.mgrid[:rows, :cols]
        ball = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 + depth ** 2 <= radius ** 2
        value = int(np.iinfo(pixels.dtype).max * 0.4) if np.issubdtype(pixels.dtype, np.integer) else 1000
        ds.PixelData = np.where(ball, value, 0).astype(pixels.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)


def _copy_truth(root: Path, source: Source, subject: str, image_id: str) -> dict | None:
    """The source's truth masks under the new ids, and its volumes row (None without truth)."""
    truth = root / "truth"
    old_subject, old_id = source.row["Subject"], source.row["Image Data ID"]
    masks = sorted((truth / old_subject).glob(f"{old_id}_*.nii.gz"))
    if not masks:
        return None
    (truth / subject).mkdir(parents=True, exist_ok=True)
    for mask in masks:
        shutil.copy2(mask, truth / subject / mask.name.replace(old_id, image_id, 1))
    volumes = pd.read_csv(truth / "volumes.tsv", sep="\t", dtype=str, keep_default_na=False)
    hit = volumes[volumes["image_id"] == old_id]
    return {**hit.iloc[0].to_dict(), "image_id": image_id, "subject": subject} if len(hit) else None


def good_sources(root: Path, table: pd.DataFrame, rng: np.random.Generator, needed: int = 2) -> list[Source]:
    """Up to ``needed`` good series of diagnosed subjects, drawn at random, checked by ingest."""
    candidates = table[table["Group"].isin(SOURCE_GROUPS)]
    sources = []
    for index in rng.permutation(len(candidates)):
        row = candidates.iloc[int(index)].to_dict()
        folder = ingest.find_image_dir(root, row["Subject"], row["Image Data ID"])
        if folder is None:
            continue
        check = ingest.check_series(folder)
        if check.ok and check.n_slices >= 10 and check.series_uid not in {s.row.get("uid") for s in sources}:
            sources.append(Source({**row, "uid": check.series_uid}, folder))
        if len(sources) == needed:
            break
    if not sources:
        raise ValueError(f"no good series of groups {', '.join(SOURCE_GROUPS)} with 10+ slices in {root}/ADNI "
                         f"to plant faults from; generate the demo collection first")
    return sources


def _row(source: Source, subject: str, image_id: str, **changes) -> dict:
    """The source's CSV row for a new image of a new subject."""
    return {**{c: source.row[c] for c in COLLECTION_COLUMNS}, "Image Data ID": image_id, "Subject": subject,
            "Visit": "sc", **changes}


def plant_faults(root: str | Path, collection_csv: str | Path, kinds: Sequence[str], seed: int,
                 phase_ranges: Sequence[Sequence]) -> pd.DataFrame:
    """Plant each kind of fault into ``root``'s ADNI tree and ``collection_csv``; returns the planted
    images with the outcome ingest must give each (``expected``: a reason code or 'used'). ``phase_ranges``:
    data.phase_rid_ranges (a planted subject's RID stays in its source's phase)."""
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; the kinds are {', '.join(FAULT_KINDS)}")
    root, csv_path = Path(root), Path(collection_csv)
    text = ingest.read_collection_text(csv_path)
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    table = table[table.ne("").any(axis=1)]
    rng = np.random.default_rng([int(seed), 0xFA17])
    subjects, last_number = _existing_state(root, csv_path)
    planter = Planter(rng, set(subjects), last_number, phase_ranges)
    sources = good_sources(root, table, rng)
    first, second = sources[0], sources[-1]
    rows, planted, volume_rows = [], [], []

    def place(kind: str, source: Source, *, group: str | None = None, truth: bool = False,
              **changes) -> tuple[str, str, Path]:
        """A new image id for ``source`` (of its own subject for a used kind, else of a new subject), its CSV
        row, and the image folder to fill."""
        subject = source.row["Subject"] if kind in USED_KINDS else planter.new_subject(source.row["Subject"])
        image_id = planter.new_image_id()
        group = source.row["Group"] if group is None else group
        rows.append(_row(source, subject, image_id, Group=group, **changes))
        planted.append({"kind": kind, "image_id": image_id, "subject": subject, "group": group.strip().upper(),
                        "expected": FAULT_KINDS[kind]})
        if truth and (volume := _copy_truth(root, source, subject, image_id)):
            volume_rows.append(volume)
        folder = root / "ADNI" / subject / source.folder.parent.parent.name / source.folder.parent.name / image_id
        return subject, image_id, folder

    for kind in (k for k in FAULT_KINDS if k in kinds):
        if kind == "truncated_pixels":
            subject, image_id, folder = place(kind, first)
            files = copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}")
            for path in rng.choice(files, size=min(TRUNCATED_FILES, len(files)), replace=False):
                cut_pixel_data(Path(path))
        elif kind == "partial_series":
            subject, image_id, folder = place(kind, first)
            ordered = _sorted_by_instance(ingest.series_files(first.folder))
            copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}",
                        files=ordered[:max(4, int(round(PARTIAL_SHARE * len(ordered))))])
        elif kind == "mixed_folder":
            subject, image_id, folder = place(kind, first)
            copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}:a")
            copy_series(second.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}:b")
        elif kind == "ambiguous_id":
            subject, image_id, folder = place(kind, first)
            other = folder.parent.with_name(folder.parent.name + "_rescan") / image_id
            copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}:a")
            copy_series(second.folder, other, subject=subject, image_id=image_id, key=f"{seed}:{image_id}:b")
        elif kind == "duplicate_copy":
            subject, image_id, folder = place(kind, first, truth=True)
            copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}")
            shutil.copytree(folder, folder.parent.with_name(folder.parent.name + "_copy") / image_id)
        elif kind == "lower_case_group":  # a new image of an AD and of a CN subject, group written by hand
            for group, written in (("AD", "ad"), ("CN", " cn")):
                source = good_sources(root, table[table["Group"] == group], rng, needed=1)[0]
                subject, image_id, folder = place(kind, source, group=written, truth=True)
                copy_series(source.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}")
        elif kind == "excel_csv":
            place(kind, first, Description=EXCEL_DESCRIPTION)   # a distractor row: no folder needed
        elif kind == "not_a_head":
            subject, image_id, folder = place(kind, first)
            files = copy_series(first.folder, folder, subject=subject, image_id=image_id, key=f"{seed}:{image_id}")
            paint_phantom(_sorted_by_instance(files))

    out = pd.concat([table, pd.DataFrame(rows, columns=list(COLLECTION_COLUMNS))], ignore_index=True)
    if "excel_csv" in kinds:
        blank = ",".join([""] * len(COLLECTION_COLUMNS))
        body = out.to_csv(index=False, lineterminator="\r\n") + f"{blank}\r\n{blank}\r\n"
        csv_path.write_bytes(body.encode(FALLBACK_ENCODING))
    else:
        write_text_atomic(out.to_csv(index=False, lineterminator="\n"), csv_path)
    if volume_rows:
        volumes_path = root / "truth" / "volumes.tsv"
        volumes = pd.read_csv(volumes_path, sep="\t", dtype=str, keep_default_na=False)
        write_text_atomic(pd.concat([volumes, pd.DataFrame(volume_rows)], ignore_index=True)
                          .to_csv(sep="\t", index=False, lineterminator="\n"), volumes_path)
    return pd.DataFrame(planted, columns=list(PLANTED_COLUMNS))
