"""QC metrics: numbers per scan (brain volume, coverage, intensities, SNR, contrast, geometry),
the QC table of all scans with robust outlier flags, and the scans an absolute threshold drops.

One JSON per scan (rule qc_metrics, results/qc/<subject>/<image_id>.json); the table and the
drops are plain functions on those records, for the report and for the checkpoint that decides
which scans go on. Settings (thresholds, outlier rule) come from config ``qc:``, documented in
schemas/config.schema.yaml.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import load_nifti, write_text_atomic
from workflow_scripts.common.scan_failure import read_failure, run_stage

LOG = logging.getLogger(__name__)

# Background noise of a magnitude image is Rayleigh distributed: its SD is sqrt((4 - pi) / 2) = 0.655
# of the underlying Gaussian sigma (Dietrich et al. 2007, J Magn Reson Imaging 26:375-385; MRIQC snrd).
DIETRICH_FACTOR = math.sqrt((4.0 - math.pi) / 2.0)
# For a normal sample, sigma = 1.4826 MAD (Iglewicz and Hoaglin's 0.6745 = 1 / 1.4826) and
# sigma = sqrt(pi / 2) * mean absolute deviation = 1.2533 * meanAD (the fallback when MAD is 0).
MEAN_AD_TO_SIGMA = math.sqrt(math.pi / 2.0)
ID_COLUMNS = ("subject", "image_id")
AXES = ("x", "y", "z")  # RAS: x left-right, y posterior-anterior, z inferior-superior


# --- per-scan metrics -------------------------------------------------------------------

def _finite(value: float) -> float | None:
    """A float for JSON: None where the metric is undefined (NaN or infinite)."""
    value = float(value)
    return value if math.isfinite(value) else None


def intensity_summary(values: np.ndarray, prefix: str) -> dict[str, float | None]:
    """Median, IQR and 1st/99th percentiles of ``values`` (None for an empty set)."""
    if values.size == 0:
        return {f"{prefix}_{k}": None for k in ("median", "iqr", "p01", "p99")}
    p01, q1, median, q3, p99 = np.percentile(values, [1, 25, 50, 75, 99])
    return {f"{prefix}_{name}": _finite(round(float(value), 4))
            for name, value in (("median", median), ("iqr", q3 - q1), ("p01", p01), ("p99", p99))}


def air_mask(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Voxels outside the head: below the image's Otsu threshold and not enclosed by the head.

    The head is the Otsu foreground (Otsu 1979) plus the brain, closed, hole-filled and grown by one
    voxel so that the partial-volume rim of the scalp is not taken for noise.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if np.ptp(image) == 0:
        return np.zeros(image.shape, bool)
    head = ndimage.binary_closing(image > threshold_otsu(image), iterations=2) | brain
    head = ndimage.binary_dilation(ndimage.binary_fill_holes(head))
    return ~head


def snr_dietrich(brain_values: np.ndarray, air_values: np.ndarray) -> float | None:
    """Mean brain signal over the noise sigma estimated from the air's SD (Dietrich et al. 2007)."""
    if brain_values.size == 0 or air_values.size < 2:
        return None
    sd = float(np.std(air_values, ddof=1))
    return _finite(round(DIETRICH_FACTOR * float(np.mean(brain_values)) / sd, 3)) if sd > 0 else None


def wm_gm_contrast(brain_values: np.ndarray) -> float | None:
    """(WM - GM) / (WM + GM) of the class medians of a three-class Otsu of the brain voxels.

    Classes CSF < GM < WM by the two thresholds of skimage's threshold_multiotsu (Otsu 1979; Liao,
    Chen and Chung 2001); a T1 contrast proxy, near 0 when grey and white matter blur together.
    """
    from skimage.filters import threshold_multiotsu

    values = np.asarray(brain_values, dtype=np.float32)
    try:
        low, high = threshold_multiotsu(values, classes=3)
    except ValueError:  # fewer than three distinct intensities: no tissue classes to tell apart
        return None
    grey, white = values[(values > low) & (values <= high)], values[values > high]
    if grey.size == 0 or white.size == 0:
        return None
    gm, wm = float(np.median(grey)), float(np.median(white))
    return _finite(round((wm - gm) / (wm + gm), 4)) if wm + gm != 0 else None


def geometry_metrics(img: nib.Nifti1Image) -> dict[str, float | int]:
    """Voxels, voxel size and field of view in mm per RAS axis, and the slice count.

    The slice count is the shortest axis: a 3D MPRAGE acquires fewer partitions than its in-plane
    matrix (ADNI: 160-208 sagittal slices against 240-256), and dicom2nifti's reorientation hides
    which array axis was the slice axis.
    """
    canonical = nib.as_closest_canonical(img)
    shape = canonical.shape[:3]
    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    out: dict[str, float | int] = {"n_slices": int(min(shape))}
    for axis, n, size in zip(AXES, shape, zooms):
        out[f"voxels_{axis}"] = int(n)
        out[f"voxel_mm_{axis}"] = round(size, 4)
        out[f"fov_mm_{axis}"] = round(n * size, 2)
    return out


def _check_grid(image: nib.Nifti1Image, mask: nib.Nifti1Image, image_path: Any, mask_path: Any) -> None:
    if image.shape[:3] != mask.shape[:3] or not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise cli.PipelineError(
            f"mask {mask_path} (shape {mask.shape[:3]}) is not on the grid of {image_path} (shape {image.shape[:3]}); "
            f"both must come from the same stage of the same scan - re-run that stage for this scan")


def native_metrics(image: nib.Nifti1Image, mask: nib.Nifti1Image, image_path: Any = "image",
                   mask_path: Any = "mask") -> dict[str, Any]:
    """Brain volume, brain share of the FOV, intensities inside/outside the brain, SNR, geometry."""
    _check_grid(image, mask, image_path, mask_path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = np.asanyarray(mask.dataobj) > 0
    voxel_ml = float(np.prod(image.header.get_zooms()[:3], dtype=float)) / 1000.0
    metrics: dict[str, Any] = {"brain_volume_ml": round(int(brain.sum()) * voxel_ml, 3),
                               "brain_fov_share": round(float(brain.mean()), 5)}
    metrics.update(intensity_summary(data[brain], "brain"))
    metrics.update(intensity_summary(data[~brain], "outside"))
    metrics["snr"] = snr_dietrich(data[brain], data[air_mask(data, brain)])
    metrics.update(geometry_metrics(image))
    return metrics


def final_metrics(image: nib.Nifti1Image, mask: nib.Nifti1Image, image_path: Any = "image",
                  mask_path: Any = "mask") -> dict[str, Any]:
    """The model input's brain share, intensity range and white/grey contrast (bias-corrected)."""
    _check_grid(image, mask, image_path, mask_path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = np.asanyarray(mask.dataobj) > 0
    return {"ras_brain_share": round(float(brain.mean()), 5), "ras_min": _finite(data.min()),
            "ras_max": _finite(data.max()), "wm_gm_contrast": wm_gm_contrast(data[brain])}


def scan_metrics(nifti: str | Path, mask: str | Path, ras: str | Path, ras_mask: str | Path,
                 subject: str, image_id: str) -> dict[str, Any]:
    """Every QC metric of one scan from its stage files, keyed by ADNI's subject and image ids."""
    record: dict[str, Any] = {"subject": subject, "image_id": image_id}
    record.update(native_metrics(load_nifti(nifti), load_nifti(mask), nifti, mask))
    record.update(final_metrics(load_nifti(ras), load_nifti(ras_mask), ras, ras_mask))
    return record


# --- the QC table of all scans -------------------------------------------------------------

def robust_z(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Iglewicz and Hoaglin's modified z-score 0.6745 (x - median) / MAD (NaN stays NaN).

    When more than half the values are equal the MAD is 0; then 1.2533 x the mean absolute deviation
    estimates sigma instead (0 when every value is the median).
    """
    from scipy.stats import median_abs_deviation

    x = np.asarray(values, dtype=float)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full(x.shape, np.nan)
    median = np.median(finite)
    mad = median_abs_deviation(finite, scale="normal")  # 1.4826 MAD = MAD / 0.6745
    if mad == 0:
        mad = MEAN_AD_TO_SIGMA * float(np.mean(np.abs(finite - median)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(x), (x - median) / mad if mad > 0 else 0.0, np.nan)


def qc_table(records: Sequence[Mapping[str, Any]], *, outlier_metrics: Sequence[str],
             z_threshold: float) -> pd.DataFrame:
    """One row per scan: its metrics, ``<metric>_z`` and ``<metric>_outlier`` per flagged metric,
    and ``outliers`` naming the flagged metrics (|robust z| > z_threshold)."""
    table = pd.DataFrame([dict(r) for r in records])
    if table.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "outliers"])
    missing = [m for m in outlier_metrics if m not in table.columns]
    if missing:
        raise cli.PipelineError(f"qc.outlier_metrics names {', '.join(missing)}, which no QC record holds; "
                                f"choose among {', '.join(c for c in table.columns if c not in ID_COLUMNS)}")
    flagged = []
    for metric in outlier_metrics:
        z = robust_z(pd.to_numeric(table[metric], errors="coerce").to_numpy())
        table[f"{metric}_z"] = np.round(z, 3)
        table[f"{metric}_outlier"] = np.abs(np.nan_to_num(z)) > z_threshold
        flagged.append(table[f"{metric}_outlier"].map({True: metric, False: ""}))
    table["outliers"] = [",".join(n for n in names if n) for names in zip(*flagged)] if flagged else ""
    return table.sort_values(list(ID_COLUMNS), kind="stable").reset_index(drop=True)


def bound_violation(value: float, low: float | None, high: float | None) -> str | None:
    """Why ``value`` lies outside [low, high] (None when inside); the one bound check of QC and of the
    skull-strip stage's brain-volume guard."""
    if low is not None and value < low:
        return f"{value:g} < {low:g} (minimum)"
    if high is not None and value > high:
        return f"{value:g} > {high:g} (maximum)"
    return None


def qc_drops(table: pd.DataFrame, thresholds: Mapping[str, Sequence[float | None]],
             drop_outliers: bool) -> pd.DataFrame:
    """The scans QC drops, one row each: subject, image_id, reason_code, reason.

    reason_code is ``qc_<metric>`` of the first failed threshold in the order of ``thresholds``
    ([min, max], null for no bound), then ``qc_outlier_<metric>`` when ``drop_outliers``; the
    reason lists every failure with its value and bound. A metric that is undefined (empty) for a
    scan drops nothing.
    """
    unknown = [m for m in thresholds if m not in table.columns]
    if unknown and not table.empty:
        raise cli.PipelineError(f"qc.thresholds names {', '.join(unknown)}, which no QC record holds; choose among "
                                f"{', '.join(c for c in table.columns if c not in ID_COLUMNS)}")
    crossed = {m: b for m, b in thresholds.items() if None not in b[:2] and b[0] > b[1]}
    if crossed:
        raise cli.PipelineError(f"qc.thresholds gives a minimum above the maximum for {crossed}; write [min, max]")
    rows = []
    for _, scan in table.iterrows():
        failures = []
        for metric, (low, high) in thresholds.items():
            value = pd.to_numeric(scan[metric], errors="coerce")
            why = None if pd.isna(value) else bound_violation(float(value), low, high)
            if why:
                failures.append((f"qc_{metric}", f"{metric} {why}"))
        if drop_outliers:
            for metric in filter(None, str(scan.get("outliers", "") or "").split(",")):
                failures.append((f"qc_outlier_{metric}",
                                 f"{metric} {scan[metric]:g} is an outlier (robust z {scan[f'{metric}_z']:g})"))
        if failures:
            rows.append({"subject": scan["subject"], "image_id": scan["image_id"], "reason_code": failures[0][0],
                         "reason": "QC: " + "; ".join(reason for _, reason in failures)})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, "reason_code", "reason"])


def apply_qc(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(QC table, drops) of all scans under the config's ``qc:`` section (resolved by the schema)."""
    table = qc_table(records, outlier_metrics=settings["outlier_metrics"], z_threshold=settings["outlier_z"])
    return table, qc_drops(table, settings["thresholds"], settings["drop_outliers"])


def read_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The per-scan QC JSONs, naming any that cannot be read; a dropped scan's failure record is left
    out (usable_scans lists it with its stage and reason)."""
    records = []
    for path in paths:
        if read_failure(path) is not None:
            continue
        try:
            records.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise cli.PipelineError(f"cannot read the QC record {path}: {err}; re-run rule qc_metrics for "
                                    f"this scan") from err
    return records


# --- command line ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--nifti", required=True, help="the converted image (stage nifti)")
    p.add_argument("--mask", required=True, help="the native skull-strip mask (stripped/<..>_mask.nii.gz)")
    p.add_argument("--ras", required=True, help="the final image (stage ras)")
    p.add_argument("--ras-mask", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--image-id", required=True)
    p.add_argument("--output", required=True, help="the scan's QC JSON")
    args = p.parse_args(argv)

    def work() -> None:
        record = scan_metrics(args.nifti, args.mask, args.ras, args.ras_mask, args.subject, args.image_id)
        write_text_atomic(json.dumps(record, indent=2) + "\n", args.output)
        LOG.info("wrote %s: brain %.0f mL, %.1f%% of the FOV, SNR %s, WM/GM contrast %s", args.output,
                 record["brain_volume_ml"], 100 * record["brain_fov_share"], record["snr"], record["wm_gm_contrast"])

    # A scan dropped at a stage has no images to measure: its failure record is passed on.
    run_stage("qc_metrics", [args.nifti, args.mask, args.ras, args.ras_mask], [args.output], work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
