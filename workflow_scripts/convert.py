"""Stage 1, nifti: one DICOM series -> one compressed NIfTI with dicom2nifti (reoriented).

The converter's file is read back and rewritten with a clean header, so nothing from the
DICOM headers but geometry and voxels reaches the output.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts import cli
from workflow_scripts.nifti_io import clean_image, save_nifti_atomic

LOG = logging.getLogger(__name__)
PROVENANCE = "dicom2nifti"


def convert_series(dicom_dir: str | Path) -> nib.Nifti1Image:
    """Convert a DICOM series with dicom2nifti (``reorient_nifti=True``) into a clean image."""
    import dicom2nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise cli.PipelineError(f"DICOM folder {dicom_dir} does not exist; re-run ingest or restore the download")
    with tempfile.TemporaryDirectory(prefix="dicom2nifti_") as tmp:
        out = Path(tmp) / "series.nii.gz"
        try:
            dicom2nifti.dicom_series_to_nifti(str(dicom_dir), str(out), reorient_nifti=True)
        except (ConversionValidationError, ConversionError) as err:
            raise cli.PipelineError(f"dicom2nifti cannot convert {dicom_dir}: {err}; the series should have "
                                    f"been excluded at ingest - please report it") from err
        converted = nib.load(out)
        data = np.asanyarray(converted.dataobj)
        affine = converted.affine
    if data.ndim != 3:
        raise cli.PipelineError(f"{dicom_dir} converts to a {data.ndim}-D image of shape {data.shape}; a T1 "
                                f"MPRAGE series must give one 3-D volume")
    dtype = data.dtype if np.issubdtype(data.dtype, np.integer) else np.float32
    return clean_image(data, affine, PROVENANCE, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--dicom-dir", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    img = convert_series(args.dicom_dir)
    save_nifti_atomic(img, args.output)
    LOG.info("wrote %s: shape %s, voxel size %s mm", args.output, img.shape,
             tuple(round(float(z), 3) for z in img.header.get_zooms()))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
