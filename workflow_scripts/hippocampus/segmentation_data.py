"""Segmentation data: the demo's true hippocampus labels on each scan's model grid, the Medical
Segmentation Decathlon Task04_Hippocampus layout, subject-level partitions and MONAI transforms.

    python -m workflow_scripts.hippocampus.segmentation_data --truth demo_data/truth/S/I1_hippocampus.nii.gz \\
        --reference results/ras/S/I1.nii.gz --output results/segmentation/truth/S/I1.nii.gz

Two training sources (config ``segmentation.source``):

- ``demo``: the demo collection's planted labels (1 = left, 2 = right hippocampus, on the native
  scanner grid) mapped onto the grid of ``results/ras/<subject>/<image_id>.nii.gz`` with
  nibabel's ``resample_from_to`` (nearest neighbour), so they lie exactly where the model's input
  voxels lie. Partitions are the project's own split (results/splits), cross-fitted: the main
  U-Net trains on train.csv, picks its checkpoint on val.csv and segments the test scans (and
  scans in no partition); the U-Net of CV fold k trains on cv/fold<k>/train.csv, picks on
  cv/fold<k>/val.csv and segments the scans of cv/fold<k>/held_out.csv (``mask_models``). Every
  scan's mask therefore comes from a U-Net that never saw its subject.
- ``msd``: a local copy of the Decathlon's Task04_Hippocampus (``dataset.json``, ``imagesTr/``,
  ``labelsTr/``; labels 1 = anterior, 2 = posterior hippocampus), read with MONAI's own
  ``load_decathlon_datalist`` and ``LoadImaged``. Each image is one subject, dealt to train or
  validation by the split module's round robin with ``val_share`` of the images validating.
  The images are small crops (about 35 x 50 x 35 mm) around ONE hippocampus, so the labels are
  trained as hippocampus versus background (anterior and posterior merged); left and right are
  assigned at inference from the side of the brain's midline. A model trained on these crops
  meets whole-brain scans at inference: a domain shift (field of view, contrast, scanners) that
  the largest-component clean-up only partly absorbs; check its masks before trusting volumes.

Every image is read as RAS+ (MONAI ``Orientationd``) and rescaled like the tensor cache
(``tensor_cache.rescale_intensities``: percentiles 0.5 and 99.5 of the voxels > 0 to [0, 1]).
Augmentation follows the hippocampus study's advice: left-right flips, small rotations
(+-10 degrees), elastic deformation, no intensity jitter and no heavy affine transforms.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to

from workflow_scripts.common import cli
from workflow_scripts.learning import split
from workflow_scripts.common.nifti_io import clean_image, extend_provenance, load_nifti, provenance_of, save_nifti_atomic
from workflow_scripts.learning.tensor_cache import rescale_intensities

LOG = logging.getLogger(__name__)

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis each plane's slices are stacked along
# train and val fit and select a U-Net; test (the split's) and held_out (a CV fold's outer fold) are scored only
PARTITION_NAMES = ("train", "val", "test", "held_out")
MSD_TASK = "Task04_Hippocampus"
MSD_HELP = (f"download {MSD_TASK}.tar from the Medical Segmentation Decathlon (http://medicaldecathlon.com) and "
            f"unpack it so that the folder holds dataset.json, imagesTr/ and labelsTr/, then set "
            f"segmentation.msd_root to it (the workflow never downloads it); or use segmentation.source: demo")


# ----------------------------------------------------------------------------- demo truth

def truth_on_grid(truth: nib.Nifti1Image, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """The demo's labels (native grid) on the reference (model input) grid, nearest neighbour, uint8."""
    moved = resample_from_to(truth, (reference.shape[:3], reference.affine), order=0)
    labels = np.rint(np.asanyarray(moved.dataobj)).astype(np.uint8)
    provenance = extend_provenance(provenance_of(reference), "truth")
    return clean_image(labels, reference.affine, provenance, np.uint8)


# ----------------------------------------------------------------------------- training items

def mask_path(image_path: str | Path) -> Path:
    """The brain mask written beside a stage's image (<image_id>_mask.nii.gz)."""
    path = Path(image_path)
    return path.with_name(path.name.replace(".nii.gz", "_mask.nii.gz"))


def demo_items(manifests: Mapping[str, pd.DataFrame], truth_dir: str | Path) -> list[dict[str, Any]]:
    """One item per scan of the split's manifests: its RAS image, mapped truth, brain mask and partition."""
    items, missing = [], []
    for partition, table in manifests.items():
        for row in table.itertuples(index=False):
            label = Path(truth_dir) / str(row.subject) / f"{row.image_id}.nii.gz"
            item = {"image": str(row.path), "label": str(label), "brain_mask": str(mask_path(row.path)),
                    "image_id": str(row.image_id), "subject": str(row.subject), "group": str(row.group),
                    "partition": partition}
            missing += [f"{row.image_id}: {item[k]}" for k in ("image", "label") if not Path(item[k]).is_file()]
            items.append(item)
    if missing:
        raise cli.PipelineError(f"{len(missing)} segmentation input file(s) missing ({', '.join(missing[:4])}); "
                                f"run the preprocessing and hippocampus_truth rules for these scans")
    return items


def msd_items(root: str | Path) -> list[dict[str, Any]]:
    """The training images and labels of a local Task04_Hippocampus copy, listed by its dataset.json."""
    from monai.data import load_decathlon_datalist

    root = Path(root)
    manifest = root / "dataset.json"
    if not root.is_dir():
        raise cli.PipelineError(f"segmentation.msd_root {root} does not exist: {MSD_HELP}")
    if not manifest.is_file():
        raise cli.PipelineError(f"{root} has no dataset.json, so it is not a Decathlon task folder: {MSD_HELP}")
    try:
        labels = json.loads(manifest.read_text(encoding="utf-8")).get("labels", {})
        listed = load_decathlon_datalist(manifest, is_segmentation=True, data_list_key="training", base_dir=root)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise cli.PipelineError(f"cannot read {manifest} as a Decathlon dataset.json ({err}): {MSD_HELP}") from err
    if set(map(str, labels)) - {"0", "1", "2"}:
        LOG.warning("%s lists labels %s; Task04_Hippocampus has 0, 1 (anterior), 2 (posterior): every label > 0 "
                    "is trained as hippocampus", manifest, labels)
    missing = [p for entry in listed for p in (entry["image"], entry["label"]) if not Path(p).is_file()]
    if missing:
        raise cli.PipelineError(f"{len(missing)} file(s) listed in {manifest} are missing (e.g. {missing[0]}); "
                                f"unpack the whole {MSD_TASK} archive there")
    if not listed:
        raise cli.PipelineError(f"{manifest} lists no training images")
    return [{"image": str(entry["image"]), "label": str(entry["label"]), "brain_mask": "",
             "image_id": Path(entry["image"]).name.removesuffix(".nii.gz"),
             "subject": Path(entry["image"]).name.removesuffix(".nii.gz"), "group": "", "partition": ""}
            for entry in listed]


def deal_msd(items: list[dict[str, Any]], val_share: float) -> list[dict[str, Any]]:
    """Deal the MSD images (one subject each) to train and val with the split module's round robin."""
    if not 0 < val_share < 1:
        raise cli.PipelineError(f"segmentation.val_share must be between 0 and 1, got {val_share}")
    n_scans = pd.Series(1, index=[item["subject"] for item in items])
    targets = split.partition_targets(len(items), {"train": 1 - val_share, "val": val_share, "test": 0.0})
    partition_of = split.deal_partitions(n_scans, targets)
    return [dict(item, partition=partition_of[item["subject"]]) for item in items]


def check_partitions(items: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Items by partition; training and validation must both hold scans, and no subject two partitions."""
    by_partition = {p: [i for i in items if i["partition"] == p] for p in PARTITION_NAMES}
    for name in ("train", "val"):
        if not by_partition[name]:
            raise cli.PipelineError(f"no {name} scans for the segmentation model ({len(items)} scans in all); "
                                    f"add subjects, or change split.ratios / segmentation.val_share")
    subjects = {p: {i["subject"] for i in group} for p, group in by_partition.items()}
    shared = sorted(set().union(*(subjects[a] & subjects[b] for n, a in enumerate(PARTITION_NAMES)
                                  for b in PARTITION_NAMES[n + 1:])))
    if shared:
        raise cli.PipelineError(f"subject(s) {', '.join(shared[:5])} sit in two segmentation partitions; "
                                f"the split must be subject-level (re-run the split rule)")
    return by_partition


MASK_MODEL_COLUMNS = ("image_id", "subject", "model", "role")


def mask_models(scans: pd.DataFrame, main: Mapping[str, pd.DataFrame],
                held_out: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Which U-Net segments each scan: ``fold<k>`` for the scans of fold k's held_out.csv, ``main``
    for test scans and scans in no partition; so no scan meets a U-Net trained or selected on it.

    ``main`` holds the split's train, val and test manifests; ``held_out[k]`` is fold k's outer fold.
    Stops if a scan sits in two outer folds or in an outer fold and the test set, or if a train/val
    scan is in no outer fold (the main U-Net, which saw it, would segment it).
    """
    fold_of: dict[str, int] = {}
    for fold, table in enumerate(held_out):
        twice = sorted(set(table["image_id"]) & set(fold_of))
        if twice:
            raise cli.PipelineError(f"scan(s) {', '.join(twice[:5])} sit in the held_out.csv of two CV folds "
                                    f"({fold_of[twice[0]]} and {fold}); re-run the split rule")
        fold_of.update(dict.fromkeys(table["image_id"], fold))
    in_test = sorted(set(main["test"]["image_id"]) & set(fold_of))
    if in_test:
        raise cli.PipelineError(f"test scan(s) {', '.join(in_test[:5])} sit in a CV fold's held_out.csv; the folds "
                                f"must cover train+val only (re-run the split rule)")
    trainval = pd.concat([main["train"], main["val"]])
    uncovered = sorted(set(trainval["image_id"]) - set(fold_of))
    if uncovered:
        raise cli.PipelineError(f"train/val scan(s) {', '.join(uncovered[:5])} are in no CV fold's held_out.csv, so "
                                f"only the main U-Net, which trained or was selected on them, could segment them; "
                                f"the folds must cover train+val (re-run the split rule)")
    test = set(main["test"]["image_id"])
    rows = []
    for row in scans.itertuples(index=False):
        image_id = str(row.image_id)
        if image_id in fold_of:
            model, role = f"fold{fold_of[image_id]}", "held_out"
        else:
            model, role = "main", "test" if image_id in test else "unpartitioned"
        rows.append({"image_id": image_id, "subject": str(row.subject), "model": model, "role": role})
    return pd.DataFrame(rows, columns=list(MASK_MODEL_COLUMNS))


# ----------------------------------------------------------------------------- transforms

def _rescale(image):
    """Tensor-cache intensities ([0, 1], percentiles of the voxels > 0), keeping MONAI's metadata."""
    import torch

    values = rescale_intensities(np.asarray(image), name="segmentation input")
    return image.new_tensor(values) if isinstance(image, torch.Tensor) else values


def _binary(label):
    """Hippocampus (any label > 0) versus background: side is assigned from the midline at inference."""
    return (label > 0).to(label.dtype) if hasattr(label, "to") else (label > 0).astype(label.dtype)


def load_transforms(keys: Sequence[str] = ("image", "label")) -> list:
    """Read with MONAI, channel first, RAS+, intensities rescaled like the tensor cache."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Lambdad, Orientationd

    keys = list(keys)
    return [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"), Lambdad(keys="image", func=_rescale)]


def crop_size(patch_size: Sequence[int], model: str, plane: str) -> list[int]:
    """The patch cut from a volume: 3D patch, or for the 2D model one slice of the plane."""
    size = [int(n) for n in patch_size]
    if model == "unet2d":
        size[PLANES[plane]] = 1
    return size


def train_transforms(settings: Mapping[str, Any]):
    """Load, binarise, pad, sample a patch (``pos_fraction`` of them centred on hippocampus), augment."""
    import math

    from monai.transforms import (Compose, Lambdad, Rand2DElasticd, Rand3DElasticd, RandCropByPosNegLabeld,
                                  RandFlipd, RandRotated, SpatialPadd, SqueezeDimd)

    keys = ["image", "label"]
    two_d = settings["model"] == "unet2d"
    size = crop_size(settings["patch_size"], settings["model"], settings["plane"])
    steps = load_transforms(keys) + [
        Lambdad(keys="label", func=_binary),
        SpatialPadd(keys=keys, spatial_size=size),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=size, pos=settings["pos_fraction"],
                               neg=1.0 - settings["pos_fraction"], num_samples=1, image_key="image"),
    ]
    lr_axis = 0  # RAS x: a left-right mirror of a brain is still a brain
    if two_d:
        axis = PLANES[settings["plane"]]
        steps.append(SqueezeDimd(keys=keys, dim=axis + 1))
        lr_axis = None if axis == 0 else 0  # sagittal slices have no left-right axis to mirror
    if lr_axis is not None:
        steps.append(RandFlipd(keys=keys, prob=settings["flip_p"], spatial_axis=lr_axis))
    angle = math.radians(settings["rotate_deg"])
    interpolation = {"mode": ("bilinear", "nearest"), "padding_mode": "zeros"}
    steps.append(RandRotated(keys=keys, range_x=angle, range_y=0.0 if two_d else angle,
                             range_z=0.0 if two_d else angle, prob=settings["rotate_p"], **interpolation))
    if two_d:
        steps.append(Rand2DElasticd(keys=keys, spacing=settings["elastic_2d_spacing"],
                                    magnitude_range=settings["elastic_2d_magnitude"], prob=settings["elastic_p"],
                                    **interpolation))
    else:
        steps.append(Rand3DElasticd(keys=keys, sigma_range=settings["elastic_3d_sigma"],
                                    magnitude_range=settings["elastic_3d_magnitude"], prob=settings["elastic_p"],
                                    **interpolation))
    return Compose(steps)


def eval_transforms(with_label: bool = True):
    """Whole volumes for inference and scoring: read, RAS+, rescaled; labels kept as they are (1/2)."""
    from monai.transforms import Compose

    return Compose(load_transforms(("image", "label") if with_label else ("image",)))


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("Map the demo's true hippocampus labels onto a scan's model-input grid (nearest neighbour).")
    p.add_argument("--truth", required=True, help="demo_data/truth/<subject>/<image_id>_hippocampus.nii.gz")
    p.add_argument("--reference", required=True, help="results/ras/<subject>/<image_id>.nii.gz")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    truth, reference = load_nifti(args.truth), load_nifti(args.reference)
    mapped = truth_on_grid(truth, reference)
    save_nifti_atomic(mapped, args.output)
    data = np.asanyarray(mapped.dataobj)
    LOG.info("%s: left %d, right %d voxels on the %s grid", args.output, np.count_nonzero(data == 1),
             np.count_nonzero(data == 2), "x".join(map(str, reference.shape[:3])))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
