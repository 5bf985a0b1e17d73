"""Hippocampus segmentation: a MONAI U-Net (2D slice by slice, or 3D) trained on known labels; one
mask per scan (1 = left, 2 = right hippocampus) on the model-input grid for volumetry and explanations.

    python -m workflow_scripts.hippocampus.segmentation train --train results/splits/train.csv \\
        --val results/splits/val.csv --test results/splits/test.csv --truth-dir results/segmentation/truth \\
        --out-dir results/segmentation
    python -m workflow_scripts.hippocampus.segmentation train --train results/splits/cv/fold0/train.csv \\
        --val results/splits/cv/fold0/val.csv --held-out results/splits/cv/fold0/held_out.csv \\
        --truth-dir results/segmentation/truth --out-dir results/segmentation/cv/fold0
    python -m workflow_scripts.hippocampus.segmentation train --msd-root /data/Task04_Hippocampus --out-dir ... \\
        --settings '{"segmentation": {"source": "msd"}}'
    python -m workflow_scripts.hippocampus.segmentation assign --scans results/usable.tsv --train results/splits/train.csv \\
        --val results/splits/val.csv --test results/splits/test.csv \\
        --held-out results/splits/cv/fold0/held_out.csv results/splits/cv/fold1/held_out.csv \\
        --output results/segmentation/mask_models.tsv
    python -m workflow_scripts.hippocampus.segmentation predict --checkpoint results/segmentation/best.pt \\
        --image results/ras/S/I1.nii.gz --brain-mask results/ras/S/I1_mask.nii.gz --subject S \\
        --output results/hippocampus/S/I1.nii.gz --sidecar results/hippocampus/S/I1.json

The design follows a hippocampus segmentation study (a modified 2D U-Net in PyTorch/MONAI trained
slice by slice with a Dice loss, about 1 hour for 1,000 steps on a T4) and its recommendations:
a 3D U-Net for anatomical continuity, residual units (``num_res_units``), group norm for small
batches, patches centred on the hippocampus (hippocampal ROI cropping, ``pos_fraction``), Dice +
cross-entropy (or focal) loss, flips, rotations within +-10 degrees and elastic deformation, and
no intensity jitter or heavy affine transforms (segmentation_data.train_transforms).

The network learns hippocampus versus background. At inference the foreground is split into
left and right at the brain's midline (the centre of mass of the scan's brain mask along the
RAS x axis: the demo poses heads within 10 degrees, so a hippocampus 25-30 mm off the midline
never crosses it) and, by default, only the largest connected component of each side is kept.
The same function makes the validation Dice table and the per-scan masks, so the Dice reported
is the Dice of the masks volumetry measures.

Training runs a fixed number of optimiser steps (batches drawn with replacement from the
training scans); every ``val_every`` steps the mean Dice over the validation scans (raw
foreground, before the clean-up) picks ``best.pt``. At the end the best checkpoint segments
every scan of every partition and ``dice.tsv`` records left, right and mean Dice per scan;
the test partition (demo source) holds subjects used neither for training nor for selection,
and so does ``held_out`` (a CV fold's outer fold, for the U-Net of that fold).

Masks that feed a model are cross-fitted (demo source): a CV fold's U-Net segments that fold's
held-out scans, the main U-Net the test scans and scans in no partition (``assign``, from
segmentation_data.mask_models). Each checkpoint records the subjects it was trained and selected
on; ``predict`` refuses a scan of one of them and writes a JSON sidecar beside the mask naming
the U-Net's run folder, those subject lists and their SHA-256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from workflow_scripts.common import cli
from workflow_scripts.common.settings import add_argument as add_settings_argument, read_job
from workflow_scripts.common.nifti_io import (clean_image, describe_volume, extend_provenance, load_nifti, provenance_of,
                                       save_nifti_atomic, write_atomic, write_text_atomic)
from workflow_scripts.hippocampus.segmentation_data import (MASK_MODEL_COLUMNS, PLANES, check_partitions, deal_msd, demo_items,
                                                eval_transforms, mask_models, msd_items, train_transforms)
from workflow_scripts.preprocess.skullstrip import dice
from workflow_scripts.learning.split import MANIFEST_COLUMNS

LOG = logging.getLogger(__name__)

MODELS = ("unet2d", "unet3d")
NORMS = ("batch", "group", "instance")
LOSSES = ("dice", "dicece", "dicefocal", "focal")
LEFT, RIGHT = 1, 2
DICE_COLUMNS = ("image_id", "subject", "group", "partition", "dice", "dice_left", "dice_right")
SEEN_PARTITIONS = ("train", "val")  # the partitions a U-Net learns from or is selected on
# The study's reference speed: about 1,000 training steps in an hour on an NVIDIA T4.
STUDY_STEPS_PER_HOUR_T4 = 1000


# ----------------------------------------------------------------------------- model and loss

def check_settings(settings: Mapping[str, Any]) -> None:
    """Reject settings the U-Net cannot run with, naming the setting and the value received."""
    model, strides, channels = settings["model"], list(settings["strides"]), list(settings["channels"])
    if model not in MODELS:
        raise cli.PipelineError(f"segmentation.model must be one of {', '.join(MODELS)}, not {model!r}")
    if settings["plane"] not in PLANES:
        raise cli.PipelineError(f"segmentation.plane must be one of {', '.join(PLANES)}, not {settings['plane']!r}")
    if len(channels) != len(strides) + 1:
        raise cli.PipelineError(f"segmentation.channels needs one entry more than segmentation.strides "
                                f"(one per resolution level), got {channels} and {strides}")
    if len(settings["patch_size"]) != 3:
        raise cli.PipelineError(f"segmentation.patch_size needs three numbers (x, y, z), got {settings['patch_size']}")
    factor = math.prod(strides)
    plane_axis = PLANES[settings["plane"]] if model == "unet2d" else None
    odd = [n for axis, n in enumerate(settings["patch_size"]) if axis != plane_axis and n % factor]
    if odd:
        raise cli.PipelineError(f"segmentation.patch_size {settings['patch_size']} must be divisible by "
                                f"{factor} (the product of segmentation.strides) in every patch axis")
    if settings["norm"] not in NORMS:
        raise cli.PipelineError(f"segmentation.norm must be one of {', '.join(NORMS)}, not {settings['norm']!r}")
    groups = settings["norm_groups"]
    if settings["norm"] == "group" and any(c % groups for c in channels):
        raise cli.PipelineError(f"segmentation.norm_groups={groups} must divide every entry of "
                                f"segmentation.channels {channels} for group norm")
    if settings["loss"] not in LOSSES:
        raise cli.PipelineError(f"segmentation.loss must be one of {', '.join(LOSSES)}, not {settings['loss']!r}")
    if not 0 <= settings["pos_fraction"] <= 1:
        raise cli.PipelineError(f"segmentation.pos_fraction must be within 0..1, got {settings['pos_fraction']}")


def build_unet(settings: Mapping[str, Any]) -> nn.Module:
    """MONAI's UNet, 2D or 3D, with residual units and the chosen normalisation; 2 outputs (background, hippocampus)."""
    from monai.networks.nets import UNet

    check_settings(settings)
    norm = {"batch": "batch", "instance": "instance", "group": ("group", {"num_groups": 1})}[settings["norm"]]
    model = UNet(spatial_dims=2 if settings["model"] == "unet2d" else 3, in_channels=1, out_channels=2,
                 channels=tuple(settings["channels"]), strides=tuple(settings["strides"]),
                 num_res_units=settings["num_res_units"], norm=norm, dropout=settings["dropout"])
    if settings["norm"] == "group":
        regroup(model, settings["norm_groups"])
    return model


def regroup(model: nn.Module, groups: int) -> None:
    """Give every GroupNorm ``groups`` groups, or the largest divisor of its channels below that: MONAI's
    UNet also normalises its 2-channel top layer, where 8 groups cannot divide the channels."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, nn.GroupNorm(math.gcd(groups, child.num_channels), child.num_channels,
                                                   eps=child.eps, affine=child.affine))


def build_loss(name: str) -> nn.Module:
    """Dice, Dice + cross-entropy, Dice + focal, or focal loss on softmax outputs against integer labels."""
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss

    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "dicefocal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, gamma=2.0)
    if name == "focal":
        return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)
    raise cli.PipelineError(f"segmentation.loss must be one of {', '.join(LOSSES)}, not {name!r}")


def make_inferer(settings: Mapping[str, Any]):
    """Whole-volume inference: sliding 3D patches, or the 2D network slice by slice along the plane."""
    from monai.inferers import SliceInferer, SlidingWindowInferer

    patch = [int(n) for n in settings["patch_size"]]
    common = {"sw_batch_size": settings["sw_batch_size"], "overlap": settings["overlap"], "progress": False}
    if settings["model"] == "unet2d":
        axis = PLANES[settings["plane"]]
        return SliceInferer(spatial_dim=axis, roi_size=[n for i, n in enumerate(patch) if i != axis], **common)
    return SlidingWindowInferer(roi_size=patch, mode="gaussian", **common)


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def foreground(model: nn.Module, image: torch.Tensor, settings: Mapping[str, Any], device: torch.device) -> np.ndarray:
    """Binary hippocampus mask (argmax of the softmax) of one (1, X, Y, Z) image, before any clean-up."""
    model.eval()
    logits = make_inferer(settings)(torch.as_tensor(image)[None].float().to(device), model)
    return (logits.argmax(dim=1)[0] > 0).cpu().numpy()


def assign_sides(mask: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Foreground voxels left of the brain's midline (RAS x below its centre of mass) become 1, the rest 2."""
    if brain_mask.shape != mask.shape:
        raise cli.PipelineError(f"brain mask shape {brain_mask.shape} differs from the image's {mask.shape}; "
                                f"pass the mask written beside the image (<image_id>_mask.nii.gz)")
    brain_x = np.nonzero(brain_mask)[0]
    if brain_x.size == 0:
        raise cli.PipelineError("the brain mask is empty, so there is no midline to tell left from right; "
                                "look at the scan's skull stripping (its QC montage)")
    midline = brain_x.mean()
    x = np.arange(mask.shape[0])[:, None, None]
    return np.where(mask, np.where(x < midline, LEFT, RIGHT), 0).astype(np.uint8)


def keep_largest(labels: np.ndarray, applied: Sequence[int]) -> np.ndarray:
    """Only the largest connected component of each label (MONAI's KeepLargestConnectedComponent)."""
    from monai.transforms import KeepLargestConnectedComponent

    clean = KeepLargestConnectedComponent(applied_labels=list(applied), independent=True)
    return np.asarray(clean(torch.as_tensor(labels)[None]))[0].astype(np.uint8)


def segment(model: nn.Module, image: torch.Tensor, settings: Mapping[str, Any], device: torch.device,
            brain_mask: np.ndarray | None = None) -> np.ndarray:
    """Labels of one image: 1 = left, 2 = right with a brain mask; 1 = hippocampus without (an MSD crop)."""
    mask = foreground(model, image, settings, device)
    if brain_mask is None:
        labels, applied = mask.astype(np.uint8), (1,)
    else:
        labels, applied = assign_sides(mask, brain_mask), (LEFT, RIGHT)
    return keep_largest(labels, applied) if settings["largest_component"] else labels


def dice_row(predicted: np.ndarray, truth: np.ndarray, sided: bool) -> dict[str, float]:
    """Dice per side and their mean (sided labels), or of hippocampus vs background."""
    if not sided:
        return {"dice": dice(predicted > 0, truth > 0), "dice_left": float("nan"), "dice_right": float("nan")}
    left, right = dice(predicted == LEFT, truth == LEFT), dice(predicted == RIGHT, truth == RIGHT)
    return {"dice": (left + right) / 2, "dice_left": left, "dice_right": right}


def load_brain_mask(path: str | Path) -> np.ndarray:
    """A brain mask as a boolean RAS+ array (the axis order of the loaded images)."""
    return np.asanyarray(nib.as_closest_canonical(load_nifti(path)).dataobj) > 0


# ----------------------------------------------------------------------------- training

def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    settings: Mapping[str, Any], val_dice: float, subjects: Mapping[str, list[str]]) -> None:
    """A torchvision-style checkpoint (model, optimiser, step, settings, and the subjects it was trained
    and selected on, so every mask can say which brains its model saw), written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "settings": dict(settings), "val_dice": val_dice, "labels": {"0": "background", "1": "hippocampus"},
             "subjects": {name: list(subjects[name]) for name in SEEN_PARTITIONS}}
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def seen_subjects(items: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The subjects a U-Net trains on and is selected on, sorted, by partition."""
    return {name: sorted({i["subject"] for i in items if i["partition"] == name}) for name in SEEN_PARTITIONS}


def subjects_digest(subjects: Mapping[str, Sequence[str]]) -> str:
    """SHA-256 of the training and validation subjects (each once, sorted): one short key to compare U-Nets by."""
    text = json.dumps({name: sorted(set(subjects[name])) for name in SEEN_PARTITIONS}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_segmenter_state(checkpoint: str | Path) -> dict[str, Any]:
    """A segmentation checkpoint's contents, checked to hold its settings and the subjects it saw."""
    from workflow_scripts.learning.checkpoints import load_checkpoint

    state = load_checkpoint(checkpoint)
    if "settings" not in state:
        raise cli.PipelineError(f"{checkpoint} is not a segmentation checkpoint (no settings); pass "
                                f"results/segmentation/best.pt")
    if "subjects" not in state:
        raise cli.PipelineError(f"{checkpoint} does not record the subjects it was trained and selected on (made "
                                f"before masks were cross-fitted); delete its folder and re-run the segmentation rule")
    return state


def load_segmenter(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained U-Net in eval mode and the settings it was trained with."""
    state = read_segmenter_state(checkpoint)
    return segmenter_from_state(state, device), state["settings"]


def segmenter_from_state(state: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The U-Net of a checkpoint's contents, in eval mode on ``device``."""
    model = build_unet(state["settings"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def validation_dice(model: nn.Module, dataset, settings: Mapping[str, Any], device: torch.device) -> float:
    """Mean raw foreground Dice over the validation scans (the selection metric)."""
    scores = [dice(foreground(model, item["image"], settings, device), np.asarray(item["label"][0]) > 0)
              for item in dataset]
    return float(np.mean(scores))


def train_steps(model: nn.Module, batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> list[float]:
    """One optimiser step per batch; the training losses."""
    model.train()
    losses = []
    for batch in batches:
        image, label = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def training_loader(items: Sequence[dict[str, Any]], settings: Mapping[str, Any]):
    """``steps`` batches of augmented patches drawn with replacement; the deterministic loading is cached."""
    from monai.data import CacheDataset, DataLoader

    transforms = train_transforms(settings)
    transforms.set_random_state(seed=settings["seed"])
    dataset = CacheDataset(list(items), transforms, progress=False)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=settings["steps"] * settings["batch_size"],
                                             generator=torch.Generator().manual_seed(settings["seed"]))
    return DataLoader(dataset, batch_size=settings["batch_size"], sampler=sampler,
                      num_workers=settings["num_workers"])


def fit(settings: dict[str, Any], items: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Train, select the best validation checkpoint, score every scan with it; returns the summary."""
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    from workflow_scripts.common.devices import pick_device
    from workflow_scripts.common.nifti_io import write_json_atomic

    check_settings(settings)
    out = Path(out_dir)
    parts = check_partitions(items)
    subjects = seen_subjects(items)
    set_determinism(seed=settings["seed"])
    device = pick_device(settings["device"])
    model = build_unet(settings).to(device)
    loss_fn = build_loss(settings["loss"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    val_set = CacheDataset(parts["val"], eval_transforms(), progress=False)
    LOG.info("training %s on %d scans (%d subjects), validating on %d, %d steps of batch %d on %s", settings["model"],
             len(parts["train"]), len({i["subject"] for i in parts["train"]}), len(parts["val"]), settings["steps"],
             settings["batch_size"], device)

    history, best, pending, train_seconds, step = [], -1.0, [], 0.0, 0
    started = time.perf_counter()
    batches = iter(training_loader(parts["train"], settings))
    while step < settings["steps"]:
        chunk = min(settings["val_every"], settings["steps"] - step)
        tick = time.perf_counter()
        pending = train_steps(model, (next(batches) for _ in range(chunk)), loss_fn, optimizer, device)
        train_seconds += time.perf_counter() - tick
        step += chunk
        val = validation_dice(model, val_set, settings, device)
        history.append({"step": step, "train_loss": float(np.mean(pending)), "val_dice": val,
                        "seconds": round(time.perf_counter() - started, 2)})
        eta = (time.perf_counter() - started) / step * (settings["steps"] - step)
        LOG.info("step %d/%d: training loss %.4f, validation Dice %.4f, ETA %d:%02d", step, settings["steps"],
                 history[-1]["train_loss"], val, eta // 60, eta % 60)
        save_checkpoint(out / "last.pt", model, optimizer, step, settings, val, subjects)
        if val > best or best < 0:
            best = val
            save_checkpoint(out / "best.pt", model, optimizer, step, settings, val, subjects)
    write_json_atomic(history, out / "history.json")

    model, _ = load_segmenter(out / "best.pt", device)
    table, predictions, seconds = score_items(model, items, settings, device)
    write_text_atomic(table.to_csv(sep="\t", index=False, float_format="%.4f", na_rep="NaN"), out / "dice.tsv")
    held_out = table[table["partition"] != "train"].dropna(subset=["dice"])
    chosen = held_out.sort_values("dice", kind="stable")
    best_worst = [chosen.iloc[-1], chosen.iloc[0]] if len(chosen) else []
    by_id = {item["image_id"]: item for item in items}
    plot_best_worst([(row, by_id[row["image_id"]], predictions[row["image_id"]]) for row in best_worst],
                    out / "best_worst.png")
    summary = run_summary(settings, parts, history, table, best_worst, model, device,
                          steps_per_s=settings["steps"] / max(train_seconds, 1e-9), inference_s=seconds)
    write_json_atomic(summary, out / "summary.json")
    return summary


def score_items(model: nn.Module, items: Sequence[dict[str, Any]], settings: Mapping[str, Any],
                device: torch.device) -> tuple[pd.DataFrame, dict[str, np.ndarray], float]:
    """Segment every item as the inference rule does, with its Dice; also the masks and seconds per scan."""
    transform = eval_transforms()
    rows, predictions, seconds = [], {}, []
    for item in items:
        loaded = transform({"image": item["image"], "label": item["label"]})
        brain = load_brain_mask(item["brain_mask"]) if item["brain_mask"] else None
        tick = time.perf_counter()
        predicted = segment(model, loaded["image"], settings, device, brain)
        seconds.append(time.perf_counter() - tick)
        predictions[item["image_id"]] = predicted
        truth = np.asarray(loaded["label"][0]).astype(np.uint8)
        rows.append({k: item[k] for k in DICE_COLUMNS[:4]} | dice_row(predicted, truth, brain is not None))
    return pd.DataFrame(rows, columns=list(DICE_COLUMNS)), predictions, float(np.mean(seconds))


def dice_stats(values: pd.Series) -> dict[str, Any]:
    values = values.dropna()
    if values.empty:
        return {"n": 0}
    return {"n": int(len(values)), "mean": float(values.mean()), "median": float(values.median()),
            "min": float(values.min()), "max": float(values.max())}


def run_summary(settings: Mapping[str, Any], parts: Mapping[str, list], history: list[dict], table: pd.DataFrame,
                best_worst: list, model: nn.Module, device: torch.device, *, steps_per_s: float,
                inference_s: float) -> dict[str, Any]:
    """Settings, partitions, Dice per partition, best and worst held-out scans, speed and provenance."""
    import monai

    from workflow_scripts.common.provenance import code_version

    best_step = max(history, key=lambda row: row["val_dice"])["step"] if history else None
    return {
        "settings": dict(settings),
        "partitions": {p: {"scans": len(v), "subjects": sorted({i["subject"] for i in v})} for p, v in parts.items()},
        "subjects_sha256": subjects_digest({p: [i["subject"] for i in parts[p]] for p in SEEN_PARTITIONS}),
        "best_step": best_step,
        "dice": {p: {col: dice_stats(table.loc[table["partition"] == p, col])
                     for col in ("dice", "dice_left", "dice_right")} for p in parts},
        "best_volume": _volume_record(best_worst[0]) if best_worst else None,
        "worst_volume": _volume_record(best_worst[1]) if best_worst else None,
        "speed": {"device": str(device), "train_steps_per_s": round(steps_per_s, 4),
                  "train_steps_per_hour": round(steps_per_s * 3600, 1),
                  "study_steps_per_hour_t4": STUDY_STEPS_PER_HOUR_T4, "inference_s_per_scan": round(inference_s, 4)},
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "labels": {"0": "background", "1": "left hippocampus", "2": "right hippocampus"},
        "code_version": code_version(),
        "libraries": {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__},
    }


def _volume_record(row: pd.Series) -> dict[str, Any]:
    return {"image_id": row["image_id"], "subject": row["subject"], "partition": row["partition"],
            "dice": float(row["dice"])}


# ----------------------------------------------------------------------------- figure

def plot_best_worst(cases: Sequence[tuple[pd.Series, dict[str, Any], np.ndarray]], path: str | Path) -> Path:
    """Best and worst held-out scans: three planes through the true hippocampus, truth outlined, prediction filled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workflow_scripts.common.figures import save_figure
    from workflow_scripts.preprocess.qc import PLANES as VIEW_NAMES, mask_centre, mid_slices

    fig, axes = plt.subplots(max(1, len(cases)), 3, figsize=(7.5, 2.7 * max(1, len(cases))), squeeze=False)
    for row_axes, (row, item, predicted), title in zip(axes, cases, ("best", "worst")):
        scan = nib.as_closest_canonical(load_nifti(item["image"]))
        truth = nib.as_closest_canonical(load_nifti(item["label"]))
        predicted_img = nib.Nifti1Image(predicted.astype(np.uint8), scan.affine)
        labels = np.asanyarray(truth.dataobj)
        centre = mask_centre(truth) if labels.any() else None
        # sagittal through one hippocampus, not the midline between them
        side = nib.Nifti1Image((labels == labels.max()).astype(np.uint8), truth.affine) if labels.any() else None
        zooms = scan.header.get_zooms()[:3]
        aspects = (zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1])
        views = []
        for img in (scan, truth, predicted_img):
            slices = mid_slices(img, centre)
            slices[2] = mid_slices(img, mask_centre(side))[2] if side is not None else slices[2]
            views.append(slices)
        planes = zip(*views)
        for col, (ax, (image_slice, truth_slice, predicted_slice)) in enumerate(zip(row_axes, planes)):
            ax.imshow(image_slice, cmap="gray", origin="lower", aspect=aspects[col])
            ax.imshow(np.ma.masked_equal(np.rint(predicted_slice), 0), cmap="autumn", origin="lower", alpha=0.45,
                      aspect=aspects[col], interpolation="nearest")
            if truth_slice.any():
                ax.contour(truth_slice > 0.5, levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(VIEW_NAMES[col], fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{title}: {row['image_id']}\n{row['partition']}, Dice {row['dice']:.3f}", fontsize=8)
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no held-out scan with a label", ha="center", va="center")
    fig.suptitle("held-out scans: prediction filled, truth outlined in green", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


# ----------------------------------------------------------------------------- command line

# The keys of config segmentation that are paths or workflow switches, not the U-Net's settings.
NOT_SETTINGS = ("in_all", "msd_root")


def flat_settings(segmentation: Mapping[str, Any]) -> dict[str, Any]:
    """config segmentation (a resolved Settings or plain dict) as the flat record the training reads and its
    checkpoints keep: every setting, the augmentation's keys beside the others."""
    plain = dict(segmentation.plain() if hasattr(segmentation, "plain") else segmentation)
    augmentation = plain.pop("augmentation")
    return {**{k: v for k, v in plain.items() if k not in NOT_SETTINGS}, **augmentation}


def read_manifests(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """The project's split manifests by partition (test optional)."""
    from workflow_scripts.learning.scan_data import read_manifest

    paths = {"train": args.train, "val": args.val, "test": args.test, "held_out": args.held_out}
    missing = [name for name in ("train", "val") if not paths[name]]
    if missing:
        raise cli.PipelineError(f"source demo needs --{' and --'.join(missing)} (the split's manifests)")
    return {name: read_manifest(path)[list(MANIFEST_COLUMNS)] for name, path in paths.items() if path}


def train_main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("Train the hippocampus U-Net and score every scan with its best checkpoint.")
    p.add_argument("--train", help="demo: the split's train.csv")
    p.add_argument("--val", help="demo: the split's val.csv (checkpoint selection)")
    p.add_argument("--test", help="demo: the split's test.csv (scored only, never trained on or selected by)")
    p.add_argument("--held-out", help="demo: a CV fold's held_out.csv (scored only), with that fold's train/val.csv")
    p.add_argument("--truth-dir", help="demo: the labels on the model grid, <truth-dir>/<subject>/<image_id>.nii.gz")
    p.add_argument("--msd-root", help="msd: the Task04_Hippocampus folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out-dir", required=True)
    add_settings_argument(p, "segmentation")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    unet = flat_settings(read_job(args.settings, "segmentation")[0])
    if unet["source"] == "demo":
        if not args.truth_dir:
            raise cli.PipelineError("source demo needs --truth-dir (the hippocampus_truth rule's output folder)")
        items = demo_items(read_manifests(args), args.truth_dir)
    else:
        if not args.msd_root:
            raise cli.PipelineError("source msd needs --msd-root (config segmentation.msd_root)")
        items = deal_msd(msd_items(args.msd_root), unet["val_share"])
    summary = fit(unet, items, args.out_dir)
    for partition, block in summary["dice"].items():
        if block["dice"]["n"]:
            LOG.info("%s: mean Dice %.3f over %d scans", partition, block["dice"]["mean"], block["dice"]["n"])


def check_unseen(subject: str, subjects: Mapping[str, Sequence[str]], checkpoint: str | Path) -> None:
    """Refuse to segment a subject the U-Net was trained or selected on: its mask would be in-sample."""
    seen = [name for name in SEEN_PARTITIONS if subject in subjects[name]]
    if seen:
        raise cli.PipelineError(f"subject {subject} is among the {' and '.join(seen)} subjects of the U-Net "
                                f"{checkpoint}, so its mask would be in-sample; segment it with the U-Net of the CV "
                                f"fold that holds it out (see results/segmentation/mask_models.tsv, rule "
                                f"segmentation_mask_models)")


def mask_sidecar(image: str | Path, subject: str, checkpoint: str | Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """Which U-Net made a mask: its run folder, checkpoint step and the subjects it trained and was selected on."""
    subjects = state["subjects"]
    return {"image": str(image), "subject": subject, "model_dir": str(Path(checkpoint).parent),
            "checkpoint": str(checkpoint), "step": int(state["step"]), "val_dice": float(state["val_dice"]),
            "source": state["settings"]["source"], "train_subjects": list(subjects["train"]),
            "val_subjects": list(subjects["val"]), "subjects_sha256": subjects_digest(subjects)}


def predict_main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("Segment the hippocampi of one scan: uint8 labels 1 = left, 2 = right on the scan's grid.")
    p.add_argument("--checkpoint", required=True, help="results/segmentation/best.pt")
    p.add_argument("--image", required=True, help="results/ras/<subject>/<image_id>.nii.gz")
    p.add_argument("--brain-mask", required=True, help="results/ras/<subject>/<image_id>_mask.nii.gz (the midline)")
    p.add_argument("--subject", required=True, help="the scan's subject (refused if the U-Net trained or was "
                                                    "selected on it)")
    p.add_argument("--output", required=True)
    p.add_argument("--sidecar", required=True, help="results/hippocampus/<subject>/<image_id>.json: the mask's U-Net")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    from workflow_scripts.common.devices import pick_device
    from workflow_scripts.common.nifti_io import write_json_atomic

    state = read_segmenter_state(args.checkpoint)
    check_unseen(args.subject, state["subjects"], args.checkpoint)
    device = pick_device(state["settings"]["device"])  # the training's setting (config segmentation.device)
    model, settings = segmenter_from_state(state, device), state["settings"]
    image = eval_transforms(with_label=False)({"image": args.image})["image"]
    reference = load_nifti(args.image)
    if not np.allclose(image.affine.numpy(), reference.affine, atol=1e-4):
        raise cli.PipelineError(f"{args.image} is not in RAS+ orientation; segment the ras stage's image "
                                f"(results/ras/...), whose grid the mask must share")
    LOG.info("segmenting %s (%s) with %s on %s", args.image, describe_volume(reference), settings["model"], device)
    tick = time.perf_counter()
    labels = segment(model, image, settings, device, load_brain_mask(args.brain_mask))
    provenance = extend_provenance(provenance_of(reference), settings["model"])
    save_nifti_atomic(clean_image(labels, reference.affine, provenance, np.uint8), args.output)
    write_json_atomic(mask_sidecar(args.image, args.subject, args.checkpoint, state), Path(args.sidecar))
    LOG.info("%s: left %d, right %d voxels in %.2f s on %s", args.output, np.count_nonzero(labels == LEFT),
             np.count_nonzero(labels == RIGHT), time.perf_counter() - tick, device)


def assign_main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("Name the U-Net that segments each scan: its CV fold's (held-out scans) or the main one.")
    p.add_argument("--scans", required=True, help="results/usable.tsv (every usable scan gets a mask)")
    p.add_argument("--train", required=True, help="results/splits/train.csv")
    p.add_argument("--val", required=True, help="results/splits/val.csv")
    p.add_argument("--test", required=True, help="results/splits/test.csv")
    p.add_argument("--held-out", nargs="+", required=True,
                   help="results/splits/cv/fold<k>/held_out.csv of every fold, in fold order")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    from workflow_scripts.learning.scan_data import read_manifest

    scans = pd.read_csv(args.scans, sep="\t", dtype=str, keep_default_na=False)
    main = {name: read_manifest(getattr(args, name)) for name in ("train", "val", "test")}
    table = mask_models(scans, main, [read_manifest(path) for path in args.held_out])
    write_text_atomic(table.to_csv(sep="\t", index=False, columns=list(MASK_MODEL_COLUMNS)), args.output)
    LOG.info("%s: %s", args.output, ", ".join(f"{n} scans by {m}" for m, n in table["model"].value_counts().items()))


def main(argv: Sequence[str] | None = None) -> None:
    """``train ...``, ``assign ...`` or ``predict ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "assign": assign_main, "predict": predict_main}
    if not argv or argv[0] not in commands:
        raise cli.PipelineError("usage: python -m workflow_scripts.hippocampus.segmentation {train|assign|predict} ... "
                                "(see --help)")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
