"""QC montage: mid slices through every preprocessing stage of one scan, for the report.

A researcher looks at pictures of each step before trusting numbers: one row per stage,
axial, coronal and sagittal slices through the brain's centre, the brain mask outlined.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts import cli
from workflow_scripts.nifti_io import load_nifti

LOG = logging.getLogger(__name__)
PLANES = ("axial", "coronal", "sagittal")


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


def montage(stages: Sequence[tuple[str, str | Path]], mask: str | Path | None, output: str | Path,
            title: str = "") -> Path:
    """Write a PNG grid: one row per (stage name, NIfTI path), three planes per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask_img = load_nifti(mask) if mask else None
    centre = mask_centre(mask_img) if mask_img is not None else None
    fig, axes = plt.subplots(len(stages), 3, figsize=(7.5, 2.5 * len(stages)), squeeze=False)
    for row, (name, path) in enumerate(stages):
        img = load_nifti(path)
        slices = mid_slices(img, centre)
        high = np.percentile(np.concatenate([s.ravel() for s in slices]), 99.5) or 1.0
        zooms = nib.as_closest_canonical(img).header.get_zooms()[:3]
        aspects = (zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1])
        for col, (plane, sl) in enumerate(zip(PLANES, slices)):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=high, aspect=aspects[col])
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(plane, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{name}\n{'x'.join(map(str, img.shape))}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(output)
    return output


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--stage", nargs=2, action="append", metavar=("NAME", "NIFTI"), required=True)
    p.add_argument("--mask", help="brain mask in any stage's space: slices go through its centre")
    p.add_argument("--title", default="")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    montage(args.stage, args.mask, args.output, args.title)
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
