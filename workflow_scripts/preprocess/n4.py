"""Stage 5, n4: ANTs N4 bias-field correction inside the brain mask.

Run on the cropped volume it is several times cheaper than on the full 1 mm head, and the
mask keeps the background out of the fit.
"""
from __future__ import annotations

import logging
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli, settings
from workflow_scripts.common.ants_bridge import import_ants, to_ants
from workflow_scripts.common.nifti_io import clean_image, extend_provenance, load_nifti, provenance_of, save_nifti_atomic
from workflow_scripts.common.scan_failure import ScanDataError, run_stage

LOG = logging.getLogger(__name__)


def n4_correct(img: nib.Nifti1Image, mask: nib.Nifti1Image | None = None, *, shrink_factor: int,
               iterations: Sequence[int], tolerance: float,
               spline_param: float | Sequence[int] | None) -> nib.Nifti1Image:
    """N4-corrected image (antspyx ``n4_bias_field_correction`` with these settings)."""
    ants = import_ants()

    kwargs = dict(shrink_factor=int(shrink_factor),
                  convergence={"iters": [int(i) for i in iterations], "tol": float(tolerance)})
    if spline_param is not None:
        kwargs["spline_param"] = spline_param
    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0, None)
    mask_data = None if mask is None else np.asanyarray(mask.dataobj) > 0
    ants_mask = None if mask_data is None else to_ants(mask, mask_data.astype(np.float32))
    corrected = ants.n4_bias_field_correction(to_ants(img, data), mask=ants_mask, **kwargs).numpy()
    if mask_data is not None:
        corrected = np.where(mask_data, corrected, 0)
    check_finite(corrected)
    provenance = extend_provenance(provenance_of(img), "n4")
    return clean_image(corrected.astype(np.float32), img.affine, provenance, dtype=np.float32)


def check_finite(corrected: np.ndarray) -> None:
    """N4 on a degenerate volume (a flat or near-empty brain) can return NaN or infinity: drop the scan."""
    bad = np.count_nonzero(~np.isfinite(corrected))
    if bad:
        raise ScanDataError("non_finite_after_n4", f"N4 bias-field correction returned {bad} non-finite voxels "
                                                   f"of {corrected.size}")


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--mask", help="brain mask; the fit uses only its voxels")
    p.add_argument("--output", required=True)
    settings.add_argument(p, "preprocess.n4")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    n4, = settings.read_job(args.settings, "preprocess.n4")

    def work() -> None:
        mask = load_nifti(args.mask) if args.mask else None
        out = n4_correct(load_nifti(args.input), mask, shrink_factor=n4.shrink_factor, iterations=list(n4.iterations),
                         tolerance=n4.tolerance, spline_param=n4.spline_param)
        save_nifti_atomic(out, args.output)
        LOG.info("N4 done: %s", args.output)

    run_stage("n4", [args.input] + ([args.mask] if args.mask else []), [args.output], work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
