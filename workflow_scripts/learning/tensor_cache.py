"""Per-scan tensor cache: the RAS volume as float16 .npy with intensities rescaled to [0, 1].

Training reads each scan every epoch; a .npy of 128^3 float16 (4 MiB) loads in
milliseconds where decompressing the .nii.gz costs far more. The per-scan rescaling
(clip at the 0.5 and 99.5 percentiles of the brain voxels, i.e. voxels > 0, then map to
[0, 1]) puts every scan on one scale, so the augmentation's noise standard deviation (up
to 0.1) and gamma mean the same thing for every scanner. Background stays 0.

    python -m workflow_scripts.learning.tensor_cache --input results/ras/S/I1.nii.gz --output results/tensors/S/I1.npy
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import load_nifti, write_atomic

LOG = logging.getLogger(__name__)

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def rescale_intensities(data: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE,
                        name: str = "volume") -> np.ndarray:
    """``data`` clipped at the ``low``/``high`` percentiles of its voxels > 0 and mapped to [0, 1] (float32)."""
    data = np.asarray(data, dtype=np.float32)
    brain = data[data > 0]
    if brain.size == 0:
        raise cli.PipelineError(f"{name} has no voxel above 0: no brain to rescale; check its skull-stripping output")
    lo, hi = np.percentile(brain, [low, high])
    if not hi > lo:
        raise cli.PipelineError(f"{name} has constant brain intensity ({lo}); check its preprocessing outputs")
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def volume_of(nifti_path: str | os.PathLike) -> np.ndarray:
    """The image's voxels in RAS+ axis order (x, y, z), whatever orientation the file has."""
    img = nib.as_closest_canonical(load_nifti(nifti_path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise cli.PipelineError(f"{nifti_path} is not a 3D volume (shape {data.shape})")
    return data


def normalised_volume(nifti_path: str | os.PathLike) -> np.ndarray:
    """The cached representation of one scan, float16 in [0, 1], shape (x, y, z)."""
    return rescale_intensities(volume_of(nifti_path), name=str(nifti_path)).astype(np.float16)


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` atomically (through a file handle: ``np.save`` would append .npy to a name)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return write_atomic(path, write)


def cache_scan(nifti_path: str | os.PathLike, out_npy: str | os.PathLike) -> Path:
    """Write the scan's float16 [0, 1] RAS volume to ``out_npy``."""
    return save_npy_atomic(normalised_volume(nifti_path), out_npy)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="RAS NIfTI volume (results/ras/<subject>/<image_id>.nii.gz)")
    p.add_argument("--output", required=True, help="float16 .npy to write")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    out = cache_scan(args.input, args.output)
    LOG.info("cached %s -> %s", args.input, out)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
