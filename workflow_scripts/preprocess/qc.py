"""QC montage: mid slices through every preprocessing stage of one scan, for the report.

A researcher looks at pictures of each step before trusting numbers: one row per stage,
axial, coronal and sagittal slices through the brain's centre, the brain mask outlined.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import load_nifti, write_atomic
from workflow_scripts.common.scan_failure import read_failure

LOG = logging.getLogger(__name__)
PLANES = ("axial", "coronal", "sagittal")
MASK_COLOUR = "#ff3b30"  # the brain mask's outline: red, distinct from any grey level


def mid_slices(img: nib.Nifti1Image, centre_world: np.ndarray | None = None) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices (RAS display) through ``centre_world`` or the volume centre."""
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    if centre_world is None:
        centre = np.array(data.shape) // 2
    else:
        centre = np.rint(np.linalg.solve(canonical.affine, np.r_[centre_world, 1.0])[:3]).astype(int)
        centre = np.clip(centre, 0, np.array(data.shape) - 1)
    i, j, k = centre
    return [data[:, :, k].T, data[:, j, :].T, data[i, :, :].T]


def mask_centre(mask: nib.Nifti1Image) -> np.ndarray:
    """World coordinates of the mask's centre of mass (where every stage is sliced)."""
    coords = np.argwhere(np.asanyarray(mask.dataobj) > 0)
    return (mask.affine @ np.r_[coords.mean(axis=0), 1.0])[:3]


def contour_slices(img: nib.Nifti1Image, mask: nib.Nifti1Image, centre_world: np.ndarray | None,
                   image_path: str | Path = "image", mask_path: str | Path = "mask") -> list[np.ndarray]:
    """The mask's slices matching ``mid_slices(img, centre_world)``: the mask must share the image's grid."""
    if mask.shape[:3] != img.shape[:3] or not np.allclose(mask.affine, img.affine, atol=1e-3):
        raise cli.PipelineError(
            f"the QC mask {mask_path} (shape {mask.shape[:3]}) is not on the grid of {image_path} (shape "
            f"{img.shape[:3]}); give each stage the mask of that same stage (rule qc's inputs)")
    binary = nib.Nifti1Image((np.asanyarray(mask.dataobj) > 0).astype(np.uint8), mask.affine)
    return mid_slices(binary, centre_world)


def draw_stage(axes: Sequence, name: str, img: nib.Nifti1Image, centre_world: np.ndarray | None,
               mask_slices: Sequence[np.ndarray] | None = None) -> None:
    """One montage row: three planes of ``img`` in grey, the brain mask's boundary outlined in colour."""
    slices = mid_slices(img, centre_world)
    high = np.percentile(np.concatenate([s.ravel() for s in slices]), 99.5) or 1.0
    zooms = nib.as_closest_canonical(img).header.get_zooms()[:3]
    aspects = (zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1])
    for col, sl in enumerate(slices):
        ax = axes[col]
        ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=high, aspect=aspects[col])
        if mask_slices is not None and mask_slices[col].min() != mask_slices[col].max():
            ax.contour(mask_slices[col], levels=[0.5], colors=[MASK_COLOUR], linewidths=0.8)
        ax.set_xticks([]), ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(f"{name}\n{'x'.join(map(str, img.shape))}", fontsize=8)


def draw_failure(axes: Sequence, name: str, failure: Mapping[str, str]) -> None:
    """A montage row for a stage that holds a dropped scan's failure record: its stage and reason."""
    for ax in axes:
        ax.axis("off")
    axes[1].text(0.5, 0.5, f"{name}: scan dropped at stage {failure.get('stage', '?')}\n"
                           f"({failure.get('reason_code', '?')})", ha="center", va="center", fontsize=8,
                 wrap=True, transform=axes[1].transAxes)


def montage(stages: Sequence[tuple[str, str | Path]], mask: str | Path | None, output: str | Path,
            title: str = "", stage_masks: Mapping[str, str | Path] | None = None) -> Path:
    """Write a PNG grid: one row per (stage name, NIfTI path), three planes per row, sliced through
    the centre of ``mask``; each stage with an entry in ``stage_masks`` (a mask on that stage's own
    grid) has the mask's boundary drawn on its slices."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_masks = dict(stage_masks or {})
    unknown = sorted(set(stage_masks) - {name for name, _ in stages})
    if unknown:
        raise cli.PipelineError(f"QC masks given for stage(s) {', '.join(unknown)}, which the montage does not show; "
                                f"name one of {', '.join(name for name, _ in stages)}")
    mask_img = load_nifti(mask) if mask and read_failure(mask) is None else None
    centre = mask_centre(mask_img) if mask_img is not None and np.any(np.asanyarray(mask_img.dataobj)) else None
    fig, axes = plt.subplots(len(stages), 3, figsize=(7.5, 2.5 * len(stages)), squeeze=False)
    for row, (name, path) in enumerate(stages):
        failure = read_failure(path)
        if failure is not None:
            draw_failure(axes[row], name, failure)
            continue
        img = load_nifti(path)
        outline = None
        if name in stage_masks and read_failure(stage_masks[name]) is None:
            outline = contour_slices(img, load_nifti(stage_masks[name]), centre, path, stage_masks[name])
        draw_stage(axes[row], name, img, centre, outline)
    for ax, plane in zip(axes[0], PLANES):
        ax.set_title(plane, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return write_atomic(output, lambda tmp: fig.savefig(tmp, dpi=80), suffix=".png")
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--stage", nargs=2, action="append", metavar=("NAME", "NIFTI"), required=True)
    p.add_argument("--mask", help="brain mask in any stage's space: slices go through its centre")
    p.add_argument("--stage-mask", nargs=2, action="append", default=[], metavar=("NAME", "MASK"),
                   help="a stage's brain mask on that stage's grid, outlined on its slices")
    p.add_argument("--title", default="")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    montage(args.stage, args.mask, args.output, args.title, dict(args.stage_mask))
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
