"""The skull-strip job's in-process SynthStrip against nipreps' own command on one scan: seconds and masks.

    python benchmarks/synthstrip_equivalence.py --image results/nifti/<subject>/<image>.nii.gz --threads 2

The official weights cannot be downloaded on the build machine, so the network is nipreps'
StripModel with seeded random weights whose last layer is rescaled so that the mask border
falls at the 70th percentile of its distance map: masks then depend on every step (conform,
network, resampling back, components), which is what the comparison needs. Prints the upstream
command's wall seconds, the in-process function's, how many mask voxels differ (Dice), and how the
network's input grid and voxels compare with upstream's ``conform``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.preprocess.skullstrip import dice, resample_spline, synthstrip_grid, synthstrip_mask  # noqa: E402


def spread_checkpoint(img: nib.Nifti1Image, path: Path, threads: int) -> None:
    """Random StripModel weights, the last layer scaled so the border (1 mm) cuts through the head."""
    from nipreps.synthstrip.model import StripModel

    torch.manual_seed(1)
    model = StripModel().eval()
    shape, affine = synthstrip_grid(img)
    x = resample_spline(np.asanyarray(img.dataobj), img.affine, shape, affine, threads=threads).astype(np.float32)
    x -= x.min()
    x = np.clip(x / np.percentile(x, 99), 0, 1)
    with torch.no_grad():
        sdt = model(torch.from_numpy(x[None, None])).numpy().squeeze()
    low, scale = np.percentile(sdt, 70), 50.0 / max(float(sdt.std()), 1e-6)
    state = model.state_dict()
    state["remaining.2.conv.weight"] *= scale
    state["remaining.2.conv.bias"] = (state["remaining.2.conv.bias"] - low) * scale + 1
    torch.save({"epoch": 0, "model_state_dict": state}, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True, help="a converted scan (stage nifti)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    img = nib.load(args.image)
    with tempfile.TemporaryDirectory(prefix="synthstrip_eq_") as tmp:
        weights, mask_path = Path(tmp) / "spread.pt", Path(tmp) / "mask.nii.gz"
        spread_checkpoint(img, weights, args.threads)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nipreps.synthstrip", "-i", str(args.image), "-m", str(mask_path),
                        "--model", str(weights), "-b", "1", "-n", str(args.threads)], check=True, capture_output=True)
        upstream_s = time.perf_counter() - started
        upstream = np.asanyarray(nib.load(mask_path).dataobj) > 0
        started = time.perf_counter()
        ours = synthstrip_mask(img, weights, threads=args.threads, border=1, gpu=False)  # as the command: -b 1, CPU
        ours_s = time.perf_counter() - started
    from nipreps.synthstrip.cli import conform

    upstream_conformed = conform(img)
    shape, affine = synthstrip_grid(img)
    conformed = resample_spline(np.asanyarray(img.dataobj), img.affine, shape, affine, threads=args.threads)
    conform_diff = np.abs(conformed.astype(np.float64) - np.asanyarray(upstream_conformed.dataobj))
    figures = {"image": str(args.image), "shape": list(img.shape), "threads": args.threads,
               "same_conform_grid": bool(shape == upstream_conformed.shape
                                         and np.allclose(affine, upstream_conformed.affine)),
               "conform_max_diff": float(conform_diff.max()),
               "conform_share_differing": float(np.count_nonzero(conform_diff) / conform_diff.size),
               "upstream_command_s": round(upstream_s, 1), "in_process_s": round(ours_s, 1),
               "mask_voxels": int(upstream.sum()), "voxels_differing": int(np.count_nonzero(upstream != ours)),
               "dice": dice(upstream, ours)}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
