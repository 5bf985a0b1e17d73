"""Stage images of two results folders compared voxel by voxel: what a change to the stages changed.

    python benchmarks/compare_stage_images.py /tmp/before/results /tmp/after/results [--json diff.json]

For every stage file present in both folders (same subject, image id and suffix): whether the
grids (shape, affine) and data types agree, the largest absolute voxel difference, that difference
relative to the image's largest value, and the share of voxels that differ. Exits non-zero when
a grid or data type differs, or a difference passes ``--tolerance`` (relative; default 1e-5).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

STAGES = ["nifti", "stripped", "resampled", "cropped128", "n4", "ras"]


def compare_files(a: Path, b: Path) -> dict:
    """Grid, data type and voxel differences of two NIfTI files."""
    img_a, img_b = nib.load(a), nib.load(b)
    row = {"same_grid": img_a.shape == img_b.shape and np.allclose(img_a.affine, img_b.affine, rtol=0, atol=1e-6),
           "same_dtype": img_a.get_data_dtype() == img_b.get_data_dtype()}
    if img_a.shape != img_b.shape:
        return {**row, "max_abs_diff": None, "max_rel_diff": None, "share_differing": None}
    x = np.asanyarray(img_a.dataobj).astype(np.float64)
    y = np.asanyarray(img_b.dataobj).astype(np.float64)
    diff = np.abs(x - y)
    scale = max(np.abs(x).max(), 1e-12)
    return {**row, "max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale),
            "share_differing": float(np.count_nonzero(diff) / diff.size)}


def compare_results(before: Path, after: Path) -> pd.DataFrame:
    """One row per stage file found in both results folders."""
    rows = []
    for stage in STAGES:
        for path in sorted((before / stage).glob("*/*.nii.gz")):
            other = after / stage / path.parent.name / path.name
            if other.is_file():
                rows.append({"stage": stage, "file": f"{path.parent.name}/{path.name}", **compare_files(path, other)})
    if not rows:
        raise SystemExit(f"no stage file is in both {before} and {after}")
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference accepted")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    table = compare_results(args.before, args.after)
    summary = table.groupby("stage", sort=False).agg(
        files=("file", "size"), same_grid=("same_grid", "all"), same_dtype=("same_dtype", "all"),
        identical=("max_abs_diff", lambda d: bool((d == 0).all())), max_abs_diff=("max_abs_diff", "max"),
        max_rel_diff=("max_rel_diff", "max"), share_differing=("share_differing", "max"))
    print(summary.to_markdown())
    if args.json:
        args.json.write_text(json.dumps(table.to_dict(orient="records"), indent=2))
    failed = (~summary["same_grid"]) | (~summary["same_dtype"]) | (summary["max_rel_diff"] > args.tolerance)
    if failed.any():
        print(f"stages beyond the tolerance {args.tolerance:g} or with another grid or data type: "
              f"{', '.join(summary.index[failed])}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
