"""Lossless hand-over of images between nibabel (RAS world) and ANTsPy (ITK, LPS world)."""
from __future__ import annotations

import nibabel as nib
import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0])


def to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None):
    """An ``ants.ANTsImage`` with the same voxels and world geometry as ``img``."""
    import ants

    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = _LPS @ (affine[:3, :3] / spacing)
    origin = _LPS @ affine[:3, 3]
    array = np.asarray(img.dataobj if data is None else data, dtype=np.float32)
    return ants.from_numpy(array, origin=tuple(float(v) for v in origin),
                           spacing=tuple(float(v) for v in spacing), direction=direction)


def ants_affine(image) -> np.ndarray:
    """The RAS voxel-to-world affine of an ``ants.ANTsImage``."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = _LPS @ np.asarray(image.origin)
    return affine
