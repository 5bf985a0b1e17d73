"""Lossless hand-over of images between nibabel (RAS world) and ANTsPy (ITK, LPS world), and a lean import."""
from __future__ import annotations

import sys
import types

import nibabel as nib
import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0])
# antspyx imports every subpackage when it starts; these four (decompositions with statsmodels and scikit-learn,
# matplotlib plots, deep-learning helpers, image statistics with statsmodels) take about 1.4 s of its 1.8 s on
# the 2-core machine and no stage uses them: every per-scan resampling and N4 job paid that.
UNUSED_ANTS_SUBPACKAGES = ("learn", "plotting", "deeplearn", "math")


class _NotLoaded(types.ModuleType):
    """Stands in for an antspyx subpackage that ``import_ants`` skipped; any use of it says so."""

    __all__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__} was not loaded (workflow_scripts.common.ants_bridge.import_ants skips it to "
                          f"save start-up time); import ants before import_ants() in a module that needs it")


def import_ants() -> types.ModuleType:
    """The ``ants`` package without its analysis and plotting subpackages (the full one if already imported).

    Registration, resampling, N4 and image I/O are unaffected: antspyx's other modules do not import the
    skipped ones, which only add names to the top-level namespace (``ants.plot``, ``ants.quantile``...).
    """
    if "ants" in sys.modules:
        return sys.modules["ants"]
    skipped = [f"ants.{name}" for name in UNUSED_ANTS_SUBPACKAGES]
    for name in skipped:
        sys.modules[name] = _NotLoaded(name)
    try:
        import ants
    except ImportError:  # a future antspyx that needs one of them at start-up: load it whole
        for name in [m for m in sys.modules if m == "ants" or m.startswith("ants.")]:
            del sys.modules[name]
        import ants
    return ants


def to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None):
    """An ``ants.ANTsImage`` with the same voxels and world geometry as ``img``."""
    ants = import_ants()

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
