"""Demo collection: a seeded synthetic ADNI download (DICOM tree, IDA collection CSV, ground truth).

The tree, file names and CSV follow a real IDA download, so ingest reads the demo and a
user's ADNI data the same way:

    ADNI/<subject>/<description>/<acq date-time>/<image id>/ADNI_<subject>_MR_..._I<image id>.dcm
    <csv_name>                                   the IDA collection CSV
    truth/<subject>/<image id>_brainmask.nii.gz  brain mask on the scan's own voxel grid
    truth/<subject>/<image id>_hippocampus.nii.gz  1 = left, 2 = right hippocampus
    truth/volumes.tsv                            planted volumes, one row per MPRAGE image

Each head is the MNI152 brain shipped with nilearn, wrapped in synthetic CSF, skull, scalp
and a crude neck, with Harvard-Oxford hippocampi shrunk and lateral ventricles grown for
AD, posed at random in a 1.5T-like (GE) or 3T-like (Siemens) sagittal MPRAGE grid.

Adding a phase (calling again with another ``phase`` on the same root) adds new subjects,
images and rows and leaves every existing file untouched. Distractors (a 3-slice
localizer, a duplicated series under a new image id, MCI subjects) are generated in
every phase.
"""
from __future__ import annotations

import datetime as dt
import functools
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.data.ingest import COLLECTION_COLUMNS
from workflow_scripts.common.nifti_io import clean_image, save_nifti_atomic, write_text_atomic
from workflow_scripts.common.package_data import package_file
from workflow_scripts.hippocampus.harvard_oxford import HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT, VENTRICLE, harvard_oxford_labels

# Demo subjects take RIDs from the range of their phase, the table ingest reads them back with.
# Per phase: the first image number, the first enrolment year, and the T1 series
# description IDA lists for it (all of them in config data.descriptions).
PHASE_STYLE = {"ADNI1": (10_000, 2005, "MPRAGE"), "ADNIGO": (140_000, 2009, "MPRAGE"),
               "ADNI2": (250_000, 2011, "MPRAGE"),
               "ADNI3": (860_000, 2016, "Accelerated Sagittal MPRAGE"),
               "ADNI4": (1_900_000, 2022, "Accelerated Sagittal MPRAGE")}
VOLUME_COLUMNS = ("image_id", "subject", "group", "visit", "brain_ml", "hippocampus_left_mm3",
                  "hippocampus_right_mm3", "ventricles_mm3")
LOCALIZER_DESCRIPTION = "Localizer"
# Personal identifiers planted in every DICOM file, so a privacy test can show that none
# of them reaches an output.
PLANTED_IDENTIFIERS = {
    "PatientName": "Quixote^Dulcinea",
    "PatientBirthDate": "19381107",
    "PatientAddress": "742 Evergreen Terrace, Springfield",
    "InstitutionName": "Miskatonic University Hospital",
    "ReferringPhysicianName": "Zhivago^Yuri",
    "OperatorsName": "Oyelaran^Folake",
    "OtherPatientIDs": "MRN-55120873",
}
# ADNI site numbers the subject ids are drawn from.
SITES = (2, 3, 5, 6, 7, 11, 13, 16, 18, 22, 23, 27, 31, 32, 33, 35, 36, 41, 52, 57, 62, 67, 68,
         70, 73, 82, 94, 98, 99, 100, 109, 114, 116, 123, 126, 127, 128, 130, 131, 133, 135, 136,
         137, 141, 153, 941)
# CN subjects age a little: this fraction of hippocampus is lost per visit (ventricles grow twice that).
CN_AGEING_PER_VISIT = 0.01
# MCI subjects (a distractor) carry this share of the AD atrophy.
MCI_ATROPHY_SHARE = 0.5
MAX_HIPPOCAMPUS_LOSS = 0.9


@dataclass(frozen=True)
class ScannerKind:
    """A scanner/protocol: grid (columns A-P, rows S-I, sagittal slices L-R) at voxel_scale 1."""
    name: str
    manufacturer: str
    model: str
    field_strength: float
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    repetition_ms: float
    echo_ms: float
    inversion_ms: float
    flip_deg: float
    image_type: tuple[str, ...]
    noise: float   # Rician sigma as a fraction of white matter
    bias: float    # amplitude of the smooth multiplicative bias field


SCANNERS = (
    ScannerKind("1.5T", "GE MEDICAL SYSTEMS", "SIGNA EXCITE", 1.5, (1.0, 1.0, 1.2), (256, 256, 170),
                8.9, 3.9, 1000.0, 8.0, ("ORIGINAL", "PRIMARY", "OTHER"), 0.035, 0.12),
    ScannerKind("3T", "SIEMENS", "TrioTim", 3.0, (1.0, 1.0, 1.0), (256, 256, 176),
                2300.0, 2.98, 900.0, 9.0, ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), 0.025, 0.2),
)

# Label codes of the head model (MNI space); the hippocampi and ventricles are the atlas's codes.
OUTSIDE, BRAIN = 0, 1
# T1 signal (white matter = 1) by MNI template intensity: CSF 72, GM ~167, WM ~220.
T1_CURVE = ((0.0, 72.0, 167.0, 220.0, 255.0), (0.10, 0.15, 0.55, 1.0, 1.08))
CSF_SIGNAL = 0.15
# Layers outside the brain by distance (mm) from its closed surface: (outer edge, T1 signal).
HEAD_LAYERS = ((2.5, 0.12),   # CSF
               (4.0, 0.05),   # inner table of the skull (cortical bone)
               (6.0, 0.40),   # diploe (marrow)
               (7.5, 0.05),   # outer table
               (9.0, 0.30),   # galea / temporal muscle
               (12.5, 0.85),  # subcutaneous fat
               (14.0, 0.55))  # skin
PAD_MM, NECK_MM = 25, 60      # MNI grid margin around the brain, extra length below it
WHITE_MATTER_COUNTS = 3000.0  # uint16 value of white matter before gain and bias
# The MNI152 brain is larger than an elderly ADNI brain: heads are this size times a
# per-subject 0.93-1.07, giving brain masks of about 1.2-1.8 l.
MNI_HEAD_SCALE = 0.92


def planted_identifier_strings() -> list[str]:
    """Every planted string a privacy test should find in no output (each >= 6 characters)."""
    found = set()
    for value in PLANTED_IDENTIFIERS.values():
        found.add(value)
        found.update(part.strip() for part in re.split(r"[\^,]", value) if len(part.strip()) >= 6)
    birth = PLANTED_IDENTIFIERS["PatientBirthDate"]
    found.add(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    return sorted(found)


def phase_rid_range(phase: str, phase_ranges: Sequence[Sequence]) -> tuple[int, int]:
    """First and last RID of an ADNI phase in ``phase_ranges`` (config data.phase_rid_ranges, the table ingest
    reads the phase from); a ValueError lists the known phases."""
    for name, low, high in phase_ranges:
        if name == phase:
            return int(low), int(high)
    raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(p for p, _, _ in phase_ranges)}")


# --------------------------------------------------------------------------- head model

def _embed(array: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Place ``array`` in a zero array of ``shape`` with its first voxel at ``start`` (cropping)."""
    out = np.zeros(tuple(shape), array.dtype)
    src = tuple(slice(max(0, -s), min(a, n - s)) for s, a, n in zip(start, array.shape, shape))
    dst = tuple(slice(max(0, s), min(n, s + a)) for s, a, n in zip(start, array.shape, shape))
    out[dst] = array[src]
    return out


@dataclass(frozen=True)
class HeadModel:
    """The synthetic head in padded 1 mm MNI space, shared by every subject."""
    intensity: np.ndarray     # float32 T1 signal, white matter ~1
    labels: np.ndarray        # uint8 label codes (OUTSIDE, BRAIN, HIPPOCAMPUS_*, VENTRICLE)
    affine: np.ndarray        # voxel -> MNI mm (RAS)
    brain_center: np.ndarray  # centre of the brain's bounding box, MNI mm
    boxes: dict               # label code -> bounding box (slices) with room for atrophy
    counts: dict              # label code -> voxels (BRAIN: the whole brain mask)


def _skull_distance(brain: np.ndarray) -> np.ndarray:
    """Distance (mm) from the brain's closed surface, with a smoothly varying skull thickness.

    Computed on a 2 mm grid (8x cheaper) and interpolated back: the layers need no finer
    detail, and the brain's own edge comes from the exact mask.
    """
    from scipy import ndimage

    coarse = brain[::2, ::2, ::2]
    outside = ndimage.distance_transform_edt(~coarse, sampling=2.0)
    closed = ndimage.distance_transform_edt(outside <= 8.0, sampling=2.0) > 8.0
    distance = ndimage.distance_transform_edt(~closed, sampling=2.0)
    rng = np.random.default_rng(152)  # one anatomy for everyone: a fixed seed
    knots = rng.uniform(-1, 1, tuple(max(2, n // 10) for n in coarse.shape))
    bumps = ndimage.zoom(knots, np.array(coarse.shape) / np.array(knots.shape), order=1, grid_mode=True,
                         mode="nearest")
    thickness = 1.0 + 0.2 * bumps / max(np.abs(bumps).max(), 1e-6)
    inner = HEAD_LAYERS[0][0]
    distance = np.where(distance > inner, inner + (distance - inner) / thickness, distance)
    return ndimage.affine_transform(distance.astype(np.float32), np.diag([0.5] * 3), 0.0,
                                    output_shape=brain.shape, order=1, mode="nearest", prefilter=False)


def _neck(affine: np.ndarray, shape: tuple[int, int, int], brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A crude neck below the head (muscle, fat, skin, airway, spine) and the spinal canal.

    Returns the neck's signal and the signal of the cord column that runs up through the
    skull base into the brainstem (NaN where there is none).
    """
    x = affine[0, 3] + np.arange(shape[0])
    y = affine[1, 3] + np.arange(shape[1])
    z = affine[2, 3] + np.arange(shape[2])
    bottom = int(np.argwhere(brain.any(axis=(0, 1)))[0, 0])
    cx, cy = (c.mean() for c in np.nonzero(brain[:, :, bottom]))
    cx, cy = x[0] + cx, y[0] + cy
    X, Y = np.meshgrid(x, y, indexing="ij")
    depth = (1.0 - np.hypot((X - cx) / 48.0, (Y - cy - 22.0) / 54.0)) * 48.0
    neck2d = np.select([depth < 0, depth < 1.5, depth < 6.0], [0.0, 0.55, 0.85], 0.35)
    body = np.hypot(X - cx, Y - cy - 20.0)
    neck2d = np.where(body < 13.5, np.where(body < 12.0, 0.45, 0.08), neck2d)
    neck2d = np.where(np.hypot((X - cx) / 9.0, (Y - cy - 42.0) / 6.0) < 1.0, 0.0, neck2d)
    canal = np.hypot(X - cx, Y - cy)
    cord2d = np.select([canal < 4.5, canal < 7.0, canal < 11.0], [0.5, 0.12, 0.38], np.nan)
    neck2d = np.where(np.isnan(cord2d), neck2d, cord2d)
    below = z <= z[bottom] + 20.0
    neck = np.zeros(shape, np.float32)
    neck[:, :, below] = neck2d[:, :, None]
    cord = np.full(shape, np.nan, np.float32)
    cord[:, :, z <= z[bottom] + 10.0] = cord2d[:, :, None]
    return neck, cord


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of a mask, widened by ``margin`` voxels."""
    hits = np.argwhere(mask)
    return tuple(slice(max(0, int(lo) - margin), min(n, int(hi) + margin + 1))
                 for lo, hi, n in zip(hits.min(axis=0), hits.max(axis=0), mask.shape))


@functools.lru_cache(maxsize=1)
def head_model() -> HeadModel:
    """Build the MNI-space head once per process (template, layers, atlas labels; ~4 s)."""
    from scipy import ndimage

    template = nib.load(package_file("nilearn", "datasets", "data",
                                      "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    t1 = np.asarray(template.dataobj, dtype=np.float32)
    # nilearn's load_mni152_brain_mask(): the template above 20% of its maximum; holes filled.
    brain = ndimage.binary_fill_holes(t1 > 0.2 * t1.max())
    hits = np.argwhere(brain)
    low = hits.min(axis=0) - PAD_MM - np.array([0, 0, NECK_MM])
    high = hits.max(axis=0) + PAD_MM
    shape = tuple(int(n) for n in high - low + 1)
    start = [int(-s) for s in low]
    affine = template.affine @ np.vstack([np.column_stack([np.eye(3), low]), [0, 0, 0, 1]])
    brain = _embed(brain, start, shape)
    t1 = _embed(t1, start, shape)

    distance = _skull_distance(brain)
    edges = np.array([edge for edge, _ in HEAD_LAYERS], np.float32)
    signals = np.array([signal for _, signal in HEAD_LAYERS] + [0.0], np.float32)
    neck, cord = _neck(affine, shape, brain)
    intensity = np.where(distance < edges[-1], signals[np.searchsorted(edges, distance)], neck)
    intensity = np.where(np.isnan(cord), intensity, cord)
    intensity[brain] = np.interp(t1[brain], *T1_CURVE)

    labels = np.where(brain, BRAIN, OUTSIDE).astype(np.uint8)
    atlas = harvard_oxford_labels(affine, shape)
    inside = brain & (atlas > 0)
    labels[inside] = atlas[inside]
    center = affine[:3, :3] @ ((hits.min(axis=0) + hits.max(axis=0)) / 2 + start) + affine[:3, 3]
    intensity = intensity.astype(np.float32)
    for array in (intensity, labels):
        array.setflags(write=False)
    boxes = {code: _bbox(labels == code, 15 if code == VENTRICLE else 1)
             for code in (HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT, VENTRICLE)}
    counts = {code: int(np.count_nonzero(labels == code)) for code in boxes}
    counts[BRAIN] = int(np.count_nonzero(brain))
    return HeadModel(intensity, labels, affine, center, boxes, counts)


# --------------------------------------------------------------------------- atrophy

def _full_index(local: np.ndarray, box: tuple[slice, ...], box_shape: tuple[int, ...],
                shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices inside a bounding box -> flat indices of the whole grid."""
    coords = np.unravel_index(local, box_shape)
    return np.ravel_multi_index(tuple(c + b.start for c, b in zip(coords, box)), shape)


def atrophy_order(model: HeadModel, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Per subject, the order in which voxels change: hippocampus boundary voxels first (by
    inner distance), ventricle growth into the nearest brain first; a little jitter breaks
    ties so the shrinkage is not a perfect onion peel. One order serves every visit, so a
    later visit's atrophy contains the earlier one's."""
    from scipy import ndimage

    labels, order = model.labels, {}
    for code in (HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT):
        box = model.boxes[code]
        sub = labels[box] == code
        depth = ndimage.distance_transform_edt(sub)
        local = np.flatnonzero(sub)
        key = depth.ravel()[local] + rng.uniform(0.0, 0.9, local.size)
        order[code] = _full_index(local[np.argsort(key, kind="stable")], box, sub.shape, labels.shape)
    box = model.boxes[VENTRICLE]
    sub = labels[box]
    distance = ndimage.distance_transform_edt(sub != VENTRICLE)
    local = np.flatnonzero(sub == BRAIN)
    key = distance.ravel()[local] + rng.uniform(0.0, 0.9, local.size)
    order[VENTRICLE] = _full_index(local[np.argsort(key, kind="stable")], box, sub.shape, labels.shape)
    return order


def atrophied_head(model: HeadModel, order: dict[int, np.ndarray], hippocampus_loss: float,
                   ventricle_growth: float) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """The head with a fraction of each hippocampus turned to CSF and the lateral ventricles
    grown by a fraction of their volume; returns intensity, labels and voxel counts."""
    intensity, labels = model.intensity.copy(), model.labels.copy()
    counts = {}
    for code in (HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT):
        n = int(round(min(hippocampus_loss, MAX_HIPPOCAMPUS_LOSS) * order[code].size))
        intensity.flat[order[code][:n]] = CSF_SIGNAL
        labels.flat[order[code][:n]] = BRAIN
        counts[code] = order[code].size - n
    grow = order[VENTRICLE][:int(round(ventricle_growth * model.counts[VENTRICLE]))]
    intensity.flat[grow] = CSF_SIGNAL
    labels.flat[grow] = VENTRICLE
    counts[VENTRICLE] = model.counts[VENTRICLE] + grow.size
    counts[BRAIN] = model.counts[BRAIN]
    return intensity, labels, counts


# --------------------------------------------------------------------------- scanner geometry

@dataclass(frozen=True)
class Geometry:
    """A DICOM slice stack: voxel (column, row, slice) -> patient LPS mm."""
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    row_cosine: tuple[float, float, float]     # direction of increasing column index
    column_cosine: tuple[float, float, float]  # direction of increasing row index
    slice_cosine: tuple[float, float, float]   # direction of increasing slice index

    def lps_affine(self) -> np.ndarray:
        """Voxel -> LPS, centred on the magnet's isocentre (LPS 0, 0, 0)."""
        axes = np.column_stack([np.array(c, float) * s for c, s in
                                zip((self.row_cosine, self.column_cosine, self.slice_cosine), self.spacing)])
        origin = -axes @ ((np.array(self.shape) - 1) / 2.0)
        return np.vstack([np.column_stack([axes, origin]), [0, 0, 0, 1]])

    def ras_affine(self) -> np.ndarray:
        """The NIfTI affine dicom2nifti gives this stack before reorienting (LPS with x, y negated)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.lps_affine()


SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0))   # A->P columns, S->I rows, R->L slices
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0))
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def mprage_geometry(scanner: ScannerKind, voxel_scale: float) -> Geometry:
    """The sagittal MPRAGE grid; voxel_scale enlarges voxels and keeps the field of view."""
    shape = tuple(max(4, int(round(n / voxel_scale))) for n in scanner.shape)
    spacing = tuple(round(s * voxel_scale, 4) for s in scanner.spacing)
    return Geometry(shape, spacing, *SAGITTAL)


def localizer_geometries(voxel_scale: float) -> list[Geometry]:
    """The three single-slice planes (sagittal, coronal, axial) of a tri-plane localizer."""
    n, step = max(8, int(round(128 / voxel_scale))), round(2.0 * voxel_scale, 4)
    return [Geometry((n, n, 1), (step, step, step), *plane) for plane in (SAGITTAL, CORONAL, AXIAL)]


def head_pose(rng: np.random.Generator, scale: float, brain_center: np.ndarray) -> np.ndarray:
    """World (RAS mm) from MNI mm: scale about the brain centre, rotate up to 10 degrees about
    each axis, and place the brain 15 mm above isocentre give or take 10 mm (5 mm L-R)."""
    ax, ay, az = np.deg2rad(rng.uniform(-10.0, 10.0, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx * scale
    shift = rng.uniform(-1.0, 1.0, 3) * np.array([5.0, 10.0, 10.0]) + np.array([0.0, 0.0, 15.0])
    return np.vstack([np.column_stack([linear, shift - linear @ brain_center]), [0, 0, 0, 1]])


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field within 1 +- amplitude (quadratic in space), like coil shading."""
    u, v, w = np.ix_(*(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape))
    field = np.zeros(shape, np.float32)
    for coefficient, term in zip(rng.uniform(-1.0, 1.0, 9), (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)):
        field += np.float32(coefficient) * term
    field *= amplitude / max(float(np.abs(field).max()), 1e-6)
    field += 1.0
    return field


def render(intensity: np.ndarray, labels: np.ndarray, model_affine: np.ndarray, world_from_mni: np.ndarray,
           geometry: Geometry, rng: np.random.Generator, scanner: ScannerKind,
           gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample the posed head on the scanner grid (trilinear; labels nearest), then bias field and
    Rician noise; returns uint16 counts and labels, both indexed (column, row, slice)."""
    from scipy import ndimage

    to_model = np.linalg.inv(model_affine) @ np.linalg.inv(world_from_mni) @ geometry.ras_affine()
    args = dict(matrix=to_model[:3, :3], offset=to_model[:3, 3], output_shape=geometry.shape,
                mode="constant", cval=0.0, prefilter=False)
    image = ndimage.affine_transform(intensity, order=1, output=np.float32, **args)
    sampled = ndimage.affine_transform(labels, order=0, **args)
    image *= bias_field(geometry.shape, rng, scanner.bias)
    real = rng.standard_normal(geometry.shape, dtype=np.float32)
    real *= scanner.noise
    real += image
    np.square(real, out=real)
    imaginary = rng.standard_normal(geometry.shape, dtype=np.float32)
    imaginary *= scanner.noise
    np.square(imaginary, out=imaginary)
    real += imaginary
    np.sqrt(real, out=real)
    real *= gain
    np.rint(real, out=real)
    np.clip(real, 0, 4095, out=real)
    return real.astype(np.uint16), sampled


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Subject:
    """One generated subject and its per-subject variation."""
    index: int
    subject: str
    group: str
    sex: str
    age: int
    scanner: ScannerKind
    head_scale: float
    gain: float
    visits: int


@dataclass(frozen=True)
class Scan:
    """One image of the collection (an MPRAGE, the localizer, or the duplicate)."""
    subject: Subject
    visit_index: int
    acquired: dt.datetime
    description: str
    kind: str              # "mprage", "localizer" or "duplicate"
    image_number: int = 0
    series_number: int = 0

    @property
    def image_id(self) -> str:
        return f"I{self.image_number}"

    @property
    def visit(self) -> str:
        return "sc" if self.visit_index == 0 else f"m{12 * self.visit_index:02d}"

    @property
    def age(self) -> int:
        return self.subject.age + self.visit_index

    def folder(self, root: Path) -> Path:
        """ADNI/<subject>/<description>/<date-time>/<image id>, as IDA unzips it."""
        return (root / "ADNI" / self.subject.subject / self.description.replace(" ", "_")
                / self.acquired.strftime("%Y-%m-%d_%H_%M_%S.0") / self.image_id)

    def row(self, downloaded: dt.date) -> dict:
        return {"Image Data ID": self.image_id, "Subject": self.subject.subject, "Group": self.subject.group,
                "Sex": self.subject.sex, "Age": self.age, "Visit": self.visit, "Modality": "MRI",
                "Description": self.description, "Type": "Original", "Acq Date": _ida_date(self.acquired),
                "Format": "DCM", "Downloaded": _ida_date(downloaded)}


def _ida_date(day: dt.date) -> str:
    """IDA writes M/D/YYYY without leading zeros."""
    return f"{day.month}/{day.day}/{day.year}"


def _rng(seed: int, phase: str, *keys: int) -> np.random.Generator:
    """A generator keyed by (seed, phase, purpose, ...), independent of generation order."""
    return np.random.default_rng([int(seed), zlib.crc32(phase.encode()), *keys])


def plan_subjects(*, n_subjects: int, n_mci: int, visits: int, seed: int, phase: str,
                  rid_range: tuple[int, int]) -> list[Subject]:
    """Subjects with RIDs in the phase's range; AD and CN split evenly (AD first when odd), and
    each group alternates the two scanner kinds so scanner and diagnosis are not confounded."""
    rng = _rng(seed, phase, 0)
    low, high = rid_range
    n_ad, n_cn = (n_subjects + 1) // 2, n_subjects // 2
    total = n_ad + n_cn + n_mci
    rids = np.sort(rng.choice(np.arange(low, high + 1), size=total, replace=False))
    groups = np.array(["AD"] * n_ad + ["CN"] * n_cn + ["MCI"] * n_mci)[rng.permutation(total)]
    first_scanner = {"AD": 0, "CN": 1, "MCI": 0}
    seen = {"AD": 0, "CN": 0, "MCI": 0}
    subjects = []
    for index, (rid, group) in enumerate(zip(rids, groups)):
        group = str(group)
        scanner = SCANNERS[(first_scanner[group] + seen[group]) % len(SCANNERS)]
        seen[group] += 1
        subjects.append(Subject(index=index, subject=f"{int(rng.choice(SITES)):03d}_S_{int(rid):04d}",
                                group=group, sex=str(rng.choice(["M", "F"])), age=int(rng.integers(62, 90)),
                                scanner=scanner, head_scale=MNI_HEAD_SCALE * float(rng.uniform(0.93, 1.07)),
                                gain=WHITE_MATTER_COUNTS * float(rng.uniform(0.9, 1.1)),
                                visits=1 if group == "MCI" else visits))
    return subjects


def plan_scans(subjects: list[Subject], *, seed: int, phase: str, distractors: bool,
               first_image_number: int) -> list[Scan]:
    """Every image: one MPRAGE per visit about a year apart, plus (with distractors) a localizer
    before one subject's baseline MPRAGE and a duplicate of another's. Image numbers rise with
    acquisition time from ``first_image_number``; the duplicate comes last, like a re-upload."""
    rng = _rng(seed, phase, 1)
    _, first_year, description = PHASE_STYLE[phase]
    scans = []
    for subject in subjects:
        baseline = dt.datetime(first_year, 1, 3) + dt.timedelta(days=int(rng.integers(0, 730)))
        for visit in range(subject.visits):
            day = baseline + dt.timedelta(days=365 * visit + (int(rng.integers(-30, 31)) if visit else 0))
            at = day.replace(hour=int(rng.integers(7, 18)), minute=int(rng.integers(0, 60)),
                             second=int(rng.integers(0, 60)))
            scans.append(Scan(subject, visit, at, description, "mprage"))
    duplicate = None
    diagnosed = [s for s in scans if s.subject.group != "MCI" and s.visit_index == 0]
    if distractors and diagnosed:
        localized = diagnosed[0]
        scans.append(Scan(localized.subject, 0, localized.acquired - dt.timedelta(minutes=int(rng.integers(2, 6))),
                          LOCALIZER_DESCRIPTION, "localizer"))
        duplicate = diagnosed[-1]
    number, numbered = first_image_number, []
    for scan in sorted(scans, key=lambda s: (s.acquired, s.subject.index)):
        number += int(rng.integers(3, 900))
        numbered.append(_numbered(scan, number))
    if duplicate is not None:
        source = next(s for s in numbered if s.subject is duplicate.subject and s.kind == "mprage"
                      and s.visit_index == 0)
        number += int(rng.integers(3, 900))
        numbered.append(Scan(source.subject, 0, source.acquired, source.description, "duplicate",
                             number, source.series_number))
    return numbered


def _numbered(scan: Scan, number: int) -> Scan:
    """The scan with its image number and series number (S = I - 314, as in ADNI's I13722/S13408)."""
    return Scan(scan.subject, scan.visit_index, scan.acquired, scan.description, scan.kind, number, number - 314)


# --------------------------------------------------------------------------- DICOM

def _ds(value: float) -> str:
    """A DICOM decimal string (16 characters at most)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _uid(*parts: object) -> str:
    """A UID derived from its parts, so the same arguments give the same UIDs."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def series_header(scan: Scan, geometry: Geometry, *, seed: int, phase: str):
    """The header every slice of a series shares, planted identifiers included."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID

    subject, scanner = scan.subject, scan.subject.scanner
    study_key = (seed, phase, subject.subject, scan.visit_index)
    series_kind = "mprage" if scan.kind == "duplicate" else scan.kind
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    date, clock = scan.acquired.strftime("%Y%m%d"), scan.acquired.strftime("%H%M%S")
    localizer = scan.kind == "localizer"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if localizer else list(scanner.image_type)
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = clock
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    for keyword, value in PLANTED_IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.StudyDescription = "ADNI RESEARCH"
    ds.SeriesDescription = scan.description
    ds.ProtocolName = scan.description
    ds.PatientID = subject.subject
    ds.PatientSex = subject.sex
    ds.PatientAge = f"{scan.age:03d}Y"
    ds.ScanningSequence = ["GR"] if localizer else ["GR", "IR"]
    ds.SequenceVariant = ["SP"] if localizer else ["SP", "MP"]
    ds.MRAcquisitionType = "2D" if localizer else "3D"
    ds.SliceThickness = _ds(geometry.spacing[2])
    ds.SpacingBetweenSlices = _ds(geometry.spacing[2])
    ds.RepetitionTime = _ds(scanner.repetition_ms)
    ds.EchoTime = _ds(scanner.echo_ms)
    if not localizer:
        ds.InversionTime = _ds(scanner.inversion_ms)
    ds.FlipAngle = _ds(scanner.flip_deg)
    ds.MagneticFieldStrength = _ds(scanner.field_strength)
    ds.StudyInstanceUID = _uid("study", *study_key)
    ds.SeriesInstanceUID = _uid("series", series_kind, *study_key)
    ds.FrameOfReferenceUID = _uid("frame", *study_key)
    ds.StudyID = str(scan.subject.index + 1)
    ds.SeriesNumber = 1 if localizer else 3
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[0]
    ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "1500", "3000"
    return ds


def write_slices(folder: Path, scan: Scan, ds, slices: Sequence[tuple[Geometry, np.ndarray, int]]) -> None:
    """Write one file per slice, named as IDA names them; ``slices`` holds (geometry, volume, k)."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    stamp = scan.acquired.strftime("%Y%m%d%H%M%S")
    prefix = f"ADNI_{scan.subject.subject}_MR_{scan.description.replace(' ', '_')}_br_raw_{stamp}"
    for number, (geometry, volume, k) in enumerate(slices, start=1):
        affine = geometry.lps_affine()
        position = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
        uid = _uid("instance", ds.SeriesInstanceUID, number)
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = [_ds(v) for v in (*geometry.row_cosine, *geometry.column_cosine)]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(np.dot(position, geometry.slice_cosine)))
        ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[0]
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()
        pydicom.dcmwrite(folder / f"{prefix}_{number}_S{scan.series_number}_{scan.image_id}.dcm", ds,
                         enforce_file_format=True)


# --------------------------------------------------------------------------- the collection

def _existing_state(root: Path, csv_path: Path) -> tuple[set[str], int]:
    """Subjects and the highest image number already in the root (CSV and tree)."""
    subjects, numbers = set(), [0]
    if csv_path.exists():
        table = _read_existing_csv(csv_path)
        subjects.update(table["Subject"])
        numbers += [int(m.group(1)) for m in map(re.compile(r"^I(\d+)$").match, table["Image Data ID"]) if m]
    adni = root / "ADNI"
    if adni.is_dir():
        subjects.update(p.name for p in adni.iterdir() if p.is_dir())
        numbers += [int(p.name[1:]) for p in adni.glob("*/*/*/I*") if p.name[1:].isdigit()]
    return subjects, max(numbers)


def _read_existing_csv(csv_path: Path) -> pd.DataFrame:
    """An existing collection CSV, checked to have exactly the IDA columns."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the existing collection CSV {csv_path}: {err}") from err
    if tuple(table.columns) != COLLECTION_COLUMNS:
        raise cli.PipelineError(f"{csv_path} exists but is not a demo/IDA collection CSV (columns "
                                f"{', '.join(table.columns)}); use another --csv-name or a new --root")
    return table


def _check_arguments(*, n_subjects: int, seed: int, phase: str, visits: int, voxel_scale: float,
                     hippocampus_atrophy: float, ventricle_enlargement: float, progression_per_visit: float,
                     n_mci: int, phase_ranges: Sequence[Sequence], csv_name: str) -> None:
    """Reject arguments that cannot give a sensible collection, naming the argument."""
    low, high = phase_rid_range(phase, phase_ranges)
    checks = [(n_subjects >= 1, f"n_subjects must be at least 1, got {n_subjects}"),
              (n_subjects + n_mci <= high - low + 1, f"n_subjects + n_mci = {n_subjects + n_mci} subjects do "
                                                     f"not fit the {high - low + 1} RIDs of phase {phase}"),
              (seed >= 0, f"seed must be >= 0, got {seed}"),
              (visits >= 1, f"visits must be at least 1, got {visits}"),
              (n_mci >= 0, f"n_mci must be >= 0, got {n_mci}"),
              (0.25 <= voxel_scale <= 4.0, f"voxel_scale must be within 0.25..4, got {voxel_scale}"),
              (progression_per_visit >= 0, f"progression_per_visit must be >= 0, got {progression_per_visit}"),
              (0 <= ventricle_enlargement <= 3, f"ventricle_enlargement must be within 0..3, got "
                                                f"{ventricle_enlargement}"),
              (0 <= hippocampus_atrophy * (1 + progression_per_visit * (visits - 1)) <= MAX_HIPPOCAMPUS_LOSS,
               f"hippocampus_atrophy x (1 + progression_per_visit x (visits - 1)) must stay within 0..0.9 "
               f"(the share of hippocampus lost by the last visit), got hippocampus_atrophy="
               f"{hippocampus_atrophy}, progression_per_visit={progression_per_visit}, visits={visits}"),
              (bool(re.fullmatch(r"[\w.\-]+\.csv", csv_name)), f"csv_name must be a plain file name ending "
                                                                 f".csv, got {csv_name!r}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def atrophy_fractions(group: str, visit_index: int, *, hippocampus_atrophy: float,
                      ventricle_enlargement: float, progression_per_visit: float) -> tuple[float, float]:
    """(hippocampal share lost, ventricular growth) at a visit: AD as configured and progressing,
    MCI half of AD's baseline, CN a small ageing term."""
    if group == "AD":
        progress = 1.0 + progression_per_visit * visit_index
        return hippocampus_atrophy * progress, ventricle_enlargement * progress
    if group == "MCI":
        return MCI_ATROPHY_SHARE * hippocampus_atrophy, MCI_ATROPHY_SHARE * ventricle_enlargement
    return CN_AGEING_PER_VISIT * visit_index, 2 * CN_AGEING_PER_VISIT * visit_index


def _save_truth(folder: Path, image_id: str, labels: np.ndarray, affine: np.ndarray) -> None:
    """Brain mask and hippocampus labels of one image, on the scan's grid."""
    brain = (labels != OUTSIDE).astype(np.uint8)
    hippocampus = np.zeros(labels.shape, np.uint8)
    hippocampus[labels == HIPPOCAMPUS_LEFT] = 1
    hippocampus[labels == HIPPOCAMPUS_RIGHT] = 2
    save_nifti_atomic(clean_image(brain, affine, "demo_truth_brainmask", np.uint8),
                      folder / f"{image_id}_brainmask.nii.gz")
    save_nifti_atomic(clean_image(hippocampus, affine, "demo_truth_hippocampus", np.uint8),
                      folder / f"{image_id}_hippocampus.nii.gz")


def _volume_row(scan: Scan, counts: dict[int, int]) -> dict:
    """Planted volumes of the anatomy: MNI voxel counts x head scale^3 (exact, not the truth
    masks' voxel counts, which carry the scanner grid's discretisation)."""
    cube = scan.subject.head_scale ** 3
    return {"image_id": scan.image_id, "subject": scan.subject.subject, "group": scan.subject.group,
            "visit": scan.visit, "brain_ml": round(counts[BRAIN] * cube / 1000.0, 2),
            "hippocampus_left_mm3": round(counts[HIPPOCAMPUS_LEFT] * cube, 1),
            "hippocampus_right_mm3": round(counts[HIPPOCAMPUS_RIGHT] * cube, 1),
            "ventricles_mm3": round(counts[VENTRICLE] * cube, 1)}


def _append_table(path: Path, table: pd.DataFrame, sep: str) -> None:
    """Append rows to a table, keeping the existing bytes as they are (header written once)."""
    old = ""
    if path.exists():
        with open(path, encoding="utf-8", newline="") as handle:  # keep its line endings
            old = handle.read()
    if old and not old.endswith("\n"):
        old += "\n"
    text = table.to_csv(sep=sep, index=False, header=not old, lineterminator="\n")
    write_text_atomic(old + text, path)


def write_subject(staging: Path, subject: Subject, scans: list[Scan], *, seed: int, phase: str,
                  voxel_scale: float, hippocampus_atrophy: float, ventricle_enlargement: float,
                  progression_per_visit: float) -> list[dict]:
    """Render and write every image of one subject: per visit, the atrophied head is built once
    and sampled for the MPRAGE (and its duplicate, and the localizer); returns volumes rows."""
    model = head_model()
    order = atrophy_order(model, _rng(seed, phase, 2, subject.index))
    volume_rows = []
    for visit in range(subject.visits):
        loss, growth = atrophy_fractions(subject.group, visit, hippocampus_atrophy=hippocampus_atrophy,
                                         ventricle_enlargement=ventricle_enlargement,
                                         progression_per_visit=progression_per_visit)
        intensity, labels, counts = atrophied_head(model, order, loss, growth)
        rng = _rng(seed, phase, 3, subject.index, visit)
        pose = head_pose(rng, subject.head_scale, model.brain_center)
        geometry = mprage_geometry(subject.scanner, voxel_scale)
        pixels, sampled = render(intensity, labels, model.affine, pose, geometry, rng, subject.scanner, subject.gain)
        for scan in (s for s in scans if s.visit_index == visit and s.kind in ("mprage", "duplicate")):
            write_slices(scan.folder(staging), scan, series_header(scan, geometry, seed=seed, phase=phase),
                         [(geometry, pixels, k) for k in range(geometry.shape[2])])
            _save_truth(staging / "truth" / subject.subject, scan.image_id, sampled, geometry.ras_affine())
            volume_rows.append(_volume_row(scan, counts))
        for scan in (s for s in scans if s.visit_index == visit and s.kind == "localizer"):
            planes = localizer_geometries(voxel_scale)
            slices = [(plane, render(intensity, labels, model.affine, pose, plane, rng, subject.scanner,
                                     subject.gain)[0], 0) for plane in planes]
            write_slices(scan.folder(staging), scan, series_header(scan, planes[0], seed=seed, phase=phase), slices)
    return volume_rows


def collection_options(demo: Mapping[str, Any], phase_ranges: Sequence[Sequence]) -> dict:
    """generate_collection's keyword arguments from the resolved config ``demo`` section (its ``faults`` are
    planted afterwards, by demo_faults) and data.phase_rid_ranges."""
    return {**{key: value for key, value in demo.items() if key != "faults"}, "phase_ranges": phase_ranges}


def generate_collection(root: Path, *, n_subjects: int, seed: int, phase: str, visits: int, voxel_scale: float,
                        hippocampus_atrophy: float, ventricle_enlargement: float, progression_per_visit: float,
                        n_mci: int, phase_ranges: Sequence[Sequence], distractors: bool = True,
                        csv_name: str = "collection.csv") -> pd.DataFrame:
    """Generate (or add a phase to) a synthetic ADNI download under ``root``; returns the rows added.
    The settings are config ``demo``'s (``collection_options``); ``phase_ranges`` is data.phase_rid_ranges.

    Everything is written into ``root/.demo-staging-<phase>`` first and moved into place at
    the end, so a crash never leaves half a phase that would block a re-run.
    """
    _check_arguments(n_subjects=n_subjects, seed=seed, phase=phase, visits=visits, voxel_scale=voxel_scale,
                     hippocampus_atrophy=hippocampus_atrophy, ventricle_enlargement=ventricle_enlargement,
                     progression_per_visit=progression_per_visit, n_mci=n_mci, phase_ranges=phase_ranges,
                     csv_name=csv_name)
    root = Path(root)
    csv_path, volumes_path = root / csv_name, root / "truth" / "volumes.tsv"
    existing, last_number = _existing_state(root, csv_path)
    low, high = phase_rid_range(phase, phase_ranges)
    clash = sorted(s for s in existing if re.fullmatch(r"\d{3}_S_\d{4}", s) and low <= int(s[-4:]) <= high)
    if clash:
        raise cli.PipelineError(
            f"phase {phase} is already in {root} ({len(clash)} subject(s) with RIDs {low}-{high}, e.g. "
            f"{clash[0]}); add another phase (demo.phase) or generate into a new --root")

    subjects = plan_subjects(n_subjects=n_subjects, n_mci=n_mci, visits=visits, seed=seed, phase=phase,
                             rid_range=(low, high))
    first_number = max(PHASE_STYLE[phase][0], last_number + 1)
    scans = plan_scans(subjects, seed=seed, phase=phase, distractors=distractors, first_image_number=first_number)
    staging = root / f".demo-staging-{phase}"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run of this same phase
    atrophy = dict(hippocampus_atrophy=hippocampus_atrophy, ventricle_enlargement=ventricle_enlargement,
                   progression_per_visit=progression_per_visit)
    volume_rows = []
    for subject in subjects:
        own = [scan for scan in scans if scan.subject is subject]
        volume_rows += write_subject(staging, subject, own, seed=seed, phase=phase, voxel_scale=voxel_scale,
                                     **atrophy)

    for part in ("ADNI", "truth"):
        (root / part).mkdir(parents=True, exist_ok=True)
        for folder in sorted((staging / part).iterdir()):
            os.replace(folder, root / part / folder.name)
    shutil.rmtree(staging)
    last_acquired = max(s.acquired for s in scans).date()
    downloaded = last_acquired + dt.timedelta(days=int(_rng(seed, phase, 4).integers(30, 365)))
    ordered = sorted(scans, key=lambda s: (s.subject.subject, s.acquired, s.image_number))
    rows = pd.DataFrame([s.row(downloaded) for s in ordered], columns=list(COLLECTION_COLUMNS))
    volumes = pd.DataFrame(volume_rows, columns=list(VOLUME_COLUMNS)).sort_values(["subject", "image_id"])
    _append_table(volumes_path, volumes, "\t")
    _append_table(csv_path, rows, ",")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder to hold ADNI/, the CSV and truth/ (created if absent)")
    settings.add_argument(p, "demo", "data.phase_rid_ranges")
    p.add_argument("--no-distractors", action="store_true", help="no localizer and no duplicated series")
    p.add_argument("--csv-name", default="collection.csv", help="collection CSV file name inside --root")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    demo, phase_ranges = settings.read_job(args.settings, "demo", "data.phase_rid_ranges")
    if phase_ranges is None:
        raise cli.PipelineError("the demo needs data.phase_rid_ranges (the subjects' RIDs come from its phase "
                                "ranges): pass --settings config.yaml, or a JSON object with the key "
                                "\"data.phase_rid_ranges\"")
    options = collection_options(demo, phase_ranges)
    try:
        _check_arguments(**options, csv_name=args.csv_name)
    except ValueError as err:
        p.error(str(err))
    started = time.perf_counter()
    rows = generate_collection(Path(args.root), distractors=not args.no_distractors, csv_name=args.csv_name,
                               **options)
    groups = rows.drop_duplicates("Subject")["Group"].value_counts().to_dict()
    print(f"demo {demo.phase}: {len(rows)} images of {rows['Subject'].nunique()} subjects "
          f"({', '.join(f'{n} {g}' for g, n in sorted(groups.items()))}) added to {Path(args.root) / args.csv_name} "
          f"in {time.perf_counter() - started:.1f} s")
    if demo.faults:
        from workflow_scripts.data.demo_faults import plant_faults

        planted = plant_faults(Path(args.root), Path(args.root) / args.csv_name, demo.faults, demo.seed, phase_ranges)
        write_text_atomic(planted.to_csv(sep="\t", index=False), Path(args.root) / "truth" / "faults.tsv")
        print(f"planted faults (truth/faults.tsv), with the outcome ingest must give:\n"
              f"{planted.to_string(index=False)}")


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
