"""Stage 6, ras: reorient to the closest canonical (RAS+) orientation with nibabel."""
from __future__ import annotations

import logging
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import clean_image, extend_provenance, load_nifti, provenance_of, save_nifti_atomic
from workflow_scripts.common.scan_failure import run_stage

LOG = logging.getLogger(__name__)


def to_ras(img: nib.Nifti1Image, step: str | None = "ras") -> nib.Nifti1Image:
    """``nibabel.as_closest_canonical`` with a clean header (voxel axes become R, A, S)."""
    canonical = nib.as_closest_canonical(img)
    provenance = provenance_of(img) if step is None else extend_provenance(provenance_of(img), step)
    data = np.asanyarray(canonical.dataobj)
    return clean_image(data, canonical.affine, provenance, dtype=data.dtype)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--input-mask", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--output-mask", required=True)
    args = p.parse_args(argv)

    def work() -> None:
        img = to_ras(load_nifti(args.input))
        save_nifti_atomic(to_ras(load_nifti(args.input_mask)), args.output_mask)
        save_nifti_atomic(img, args.output)
        LOG.info("orientation %s, shape %s", "".join(nib.aff2axcodes(img.affine)), img.shape)

    run_stage("ras", [args.input, args.input_mask], [args.output, args.output_mask], work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
