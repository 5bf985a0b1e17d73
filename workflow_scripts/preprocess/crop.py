"""Stage 4, cropped128: crop to the brain's bounding box plus a margin, then zoom to a cube.

The margin is guaranteed: where the brain touches the edge of the field of view the volume
is padded with background. The zoom is scipy's spline zoom (cubic by default); each axis
is scaled to the target size (the dissertation's method) unless ``keep_aspect`` pads the
box to a cube first so the brain keeps its proportions.
"""
from __future__ import annotations

import logging
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import clean_image, extend_provenance, load_nifti, provenance_of, save_nifti_atomic
from workflow_scripts.common.scan_failure import ScanDataError, run_stage

LOG = logging.getLogger(__name__)


def bounding_box(mask: np.ndarray, *, margin: int, cube: bool) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and stop (exclusive) voxel indices of the mask's box plus ``margin``.

    The box may reach outside the volume; ``cube`` grows it symmetrically to equal sides.
    """
    coords = np.argwhere(mask)
    if coords.size == 0:
        raise ScanDataError("empty_brain_mask", "the brain mask is empty: nothing to crop to")
    start = coords.min(axis=0) - margin
    stop = coords.max(axis=0) + 1 + margin
    if cube:
        grow = (stop - start).max() - (stop - start)
        start = start - grow // 2
        stop = stop + (grow - grow // 2)
    return start, stop


def extract_box(data: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``data[start:stop]`` where parts outside the volume are filled with zeros."""
    out = np.zeros(tuple(stop - start), dtype=data.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(stop, data.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def zoom_to_shape(data: np.ndarray, target_shape: Sequence[int], order: int) -> np.ndarray:
    """Resize with scipy's grid-aligned spline zoom so the output has exactly ``target_shape``."""
    factors = np.asarray(target_shape, float) / np.asarray(data.shape, float)
    return ndimage.zoom(data, factors, order=order, grid_mode=True, mode="grid-constant", cval=0.0)


def zoom_affine(affine: np.ndarray, start: np.ndarray, in_shape: Sequence[int],
                out_shape: Sequence[int]) -> np.ndarray:
    """The affine of the zoomed box: voxel centres of a grid-aligned zoom of the cropped box."""
    scale = np.asarray(in_shape, float) / np.asarray(out_shape, float)
    box_to_vox = np.eye(4)
    box_to_vox[:3, :3] = np.diag(scale)
    box_to_vox[:3, 3] = np.asarray(start, float) + 0.5 * scale - 0.5
    return affine @ box_to_vox


def crop_and_zoom(img: nib.Nifti1Image, mask: nib.Nifti1Image, *, margin: int, target_shape: Sequence[int],
                  order: int, keep_aspect: bool) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Crop image and mask to the brain box plus ``margin`` voxels, then zoom to ``target_shape``."""
    mask_data = np.asanyarray(mask.dataobj) > 0
    start, stop = bounding_box(mask_data, margin=margin, cube=keep_aspect)
    box = extract_box(np.asarray(img.dataobj, dtype=np.float32), start, stop)
    box_mask = extract_box(mask_data.astype(np.uint8), start, stop)
    zoomed = zoom_to_shape(box, target_shape, order)
    zoomed_mask = zoom_to_shape(box_mask, target_shape, 0) > 0
    zoomed = np.where(zoomed_mask, np.clip(zoomed, 0, None), 0).astype(np.float32)
    affine = zoom_affine(img.affine, start, box.shape, target_shape)
    provenance = extend_provenance(provenance_of(img), f"crop{margin}zoom{'x'.join(map(str, target_shape))}")
    return (clean_image(zoomed, affine, provenance, dtype=np.float32),
            clean_image(zoomed_mask.astype(np.uint8), affine, provenance, dtype=np.uint8))


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--input-mask", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--output-mask", required=True)
    settings.add_argument(p, "preprocess.crop", "preprocess.target_shape")
    args = p.parse_args(argv)
    crop, target_shape = settings.read_job(args.settings, "preprocess.crop", "preprocess.target_shape")

    def work() -> None:
        img, mask = crop_and_zoom(load_nifti(args.input), load_nifti(args.input_mask), margin=crop.margin,
                                  target_shape=list(target_shape), order=crop.zoom_order, keep_aspect=crop.keep_aspect)
        save_nifti_atomic(mask, args.output_mask)
        save_nifti_atomic(img, args.output)
        LOG.info("cropped and zoomed to %s (voxel size %s mm)", img.shape,
                 tuple(round(float(z), 3) for z in img.header.get_zooms()))

    run_stage("cropped128", [args.input, args.input_mask], [args.output, args.output_mask], work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
