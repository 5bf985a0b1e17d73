"""NIfTI reading and atomic, de-identified writing shared by every stage.

A stage never leaves a half-written file behind and never lets a header field carry
anything but the pipeline's own provenance tag: DICOM-derived text (names, dates,
institutions) could otherwise travel into the NIfTI ``descrip``/``aux_file`` fields or
header extensions.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

PROVENANCE_SEPARATOR = ">"
# The free-text fields of a NIfTI-1 header; all are cleared except ``descrip``, which
# carries the pipeline's provenance chain (e.g. "dicom2nifti>deepbet>bspline1mm").
_FREE_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI image, naming the file in the error a person sees.

    A dropped scan's failure record (see ``scan_failure``) is refused by name, so it can never
    be read as a brain.
    """
    from workflow_scripts.common.scan_failure import read_failure

    record = read_failure(path)
    if record is not None:
        raise OSError(f"{path} is the failure record of a scan dropped at stage {record['stage']} "
                      f"({record['reason_code']}: {record['reason']}), not an image; only scans listed in "
                      f"usable.tsv may be read")
    try:
        return nib.load(os.fspath(path))
    except Exception as err:  # nibabel raises several types for a broken file
        raise OSError(f"cannot read NIfTI file {path}: {err}") from err


def describe_volume(img: nib.Nifti1Image) -> str:
    """A volume's grid in words for the job logs, e.g. '192x256x256 voxels of 1x1x1.2 mm'."""
    shape = "x".join(str(n) for n in img.shape[:3])
    zooms = "x".join(f"{z:.3g}" for z in img.header.get_zooms()[:3])
    return f"{shape} voxels of {zooms} mm"


def provenance_of(img: nib.Nifti1Image) -> str:
    """The provenance chain recorded in an image written by this pipeline ('' if none)."""
    descrip = img.header.get("descrip")
    if descrip is None:
        return ""
    return bytes(np.asarray(descrip)).decode("ascii", errors="ignore").strip("\x00 ")


def extend_provenance(parent: str, step: str) -> str:
    """Append one step to a provenance chain (NIfTI ``descrip`` holds 80 bytes)."""
    chain = f"{parent}{PROVENANCE_SEPARATOR}{step}" if parent else step
    if len(chain) > 79:
        raise ValueError(f"provenance chain longer than the 79 characters NIfTI allows: {chain!r}")
    return chain


def clean_image(data: np.ndarray, affine: np.ndarray, provenance: str,
                dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
    """Build a fresh NIfTI-1 image whose header holds only geometry and provenance."""
    if dtype is not None:
        data = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    header = img.header
    for field in _FREE_TEXT_FIELDS:
        header[field] = b""
    header["descrip"] = provenance.encode("ascii")
    header.extensions.clear()
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def partial_prefix(path: Path) -> str:
    """The name every partial (not yet renamed) file of ``path`` starts with: hidden, beside it."""
    return f".{path.name}.partial-"


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove partial files of ``path`` left by a writer killed mid-write (kill -9, node failure).

    Only the one job that makes ``path`` writes it, so any partial file of it is stale by the time
    that job writes again.
    """
    stale = sorted(path.parent.glob(glob.escape(partial_prefix(path)) + "*"))
    for partial in stale:
        partial.unlink(missing_ok=True)
    return stale


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A crash or kill mid-write leaves no file at ``path`` that Snakemake (or a resuming run)
    could mistake for a finished output. Every output of the package is written this way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` atomically (nibabel picks the format from the suffix)."""
    suffix = "".join(Path(path).suffixes) or ".nii.gz"
    return write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (table, JSON sidecar) atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON, atomically (anything JSON cannot hold written as its str)."""
    write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)
