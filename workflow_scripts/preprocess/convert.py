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

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import clean_image, save_nifti_atomic
from workflow_scripts.common.scan_failure import ScanDataError, run_stage

LOG = logging.getLogger(__name__)
PROVENANCE = "dicom2nifti"
# Raised by pydicom and dicom2nifti on a damaged series (truncated pixel data, missing or
# malformed attributes); inside the converter call they describe the scan's data, not a bug here.
CONVERTER_DATA_ERRORS = (ValueError, IndexError, KeyError, AttributeError, EOFError)


def convert_series(dicom_dir: str | Path) -> nib.Nifti1Image:
    """Convert a DICOM series with dicom2nifti (``reorient_nifti=True``) into a clean image."""
    import dicom2nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    from pydicom.errors import InvalidDicomError

    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise cli.PipelineError(f"DICOM folder {dicom_dir} does not exist; re-run ingest or restore the download")
    with tempfile.TemporaryDirectory(prefix="dicom2nifti_") as tmp:
        out = Path(tmp) / "series.nii"  # uncompressed: it is read once, right here
        try:
            dicom2nifti.dicom_series_to_nifti(str(dicom_dir), str(out), reorient_nifti=True)
        except (ConversionValidationError, ConversionError, InvalidDicomError) as err:
            raise ScanDataError("conversion_failed", f"dicom2nifti cannot convert {dicom_dir}: {err}") from err
        except CONVERTER_DATA_ERRORS as err:  # what pydicom/dicom2nifti raise on damaged files and headers
            LOG.exception("dicom2nifti failed on %s", dicom_dir)
            raise ScanDataError("conversion_failed", f"dicom2nifti cannot convert {dicom_dir}: "
                                                     f"{type(err).__name__}: {err}") from err
        converted = nib.load(out)
        data = np.array(converted.dataobj)  # a copy in memory, not a map of a file about to be deleted
        affine = converted.affine
    if data.ndim != 3:
        raise ScanDataError("not_3d", f"{dicom_dir} converts to a {data.ndim}-D image of shape {data.shape}; "
                                      f"a T1 MPRAGE series must give one 3-D volume")
    if not np.isfinite(data).all():
        raise ScanDataError("non_finite_values", f"{dicom_dir} converts to an image with NaN or infinite voxels")
    dtype = data.dtype if np.issubdtype(data.dtype, np.integer) else np.float32
    return clean_image(data, affine, PROVENANCE, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--dicom-dir", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    def work() -> None:
        img = convert_series(args.dicom_dir)
        save_nifti_atomic(img, args.output)
        LOG.info("wrote %s: shape %s, voxel size %s mm", args.output, img.shape,
                 tuple(round(float(z), 3) for z in img.header.get_zooms()))

    run_stage("nifti", [], [args.output], work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
