"""Explain a trained video network on test scans: 3D Grad-CAM, occlusion sensitivity, depth
profiles, the hippocampal share of attribution, and the randomisation sanity check.

    python -m workflow_scripts.explain.explain choose --predictions results/evaluation/E/test_predictions.csv \\
        --settings '{"explain": {"n_correct": 2, "n_wrong": 1}}' --output results/explain/E/scans.csv
    python -m workflow_scripts.explain.explain run --scans results/explain/E/scans.csv --checkpoint results/models/E/best_acc.pt \\
        --tensor-pattern 'results/tensors/{subject}/{image_id}.npy' --image-pattern 'results/ras/{subject}/{image_id}.nii.gz' \\
        --brain-pattern 'results/ras/{subject}/{image_id}_mask.nii.gz' \\
        --hippocampus-pattern 'results/hippocampus_atlas/{subject}/{image_id}.nii.gz' --out-dir results/explain/E \\
        --settings '{"explain": {"occlusion_patch": 16}, "train.device": "cpu"}'

What a map explains: the log-odds of the target class, log p(target) - log p(other) (the
difference of the two logits), for the scan's input exactly as prediction sees it (the cached
[0, 1] tensor, z-normalised over the brain). Maps live on the tensor's grid, whose axes
(x, y, z) are the RAS NIfTI's, so they are saved as NIfTI with the RAS scan's affine and
overlay it in any viewer.

- Grad-CAM (Selvaraju et al. 2017), with captum's LayerGradCam on the last convolutional block
  (``layer4`` of the video ResNets): the block's channels weighted by their mean gradient,
  summed, ReLU, then upsampled trilinearly to the input. At 128^3 input r3d_18's layer4 is
  16x8x8 (x is halved three times, y and z four), mc3_18's and r2plus1d_18's similar or coarser.
  MViT-V2-S is a transformer (tokens, no spatial feature map of the input): it gets occlusion
  only, and summary.json says so.
- Occlusion (Zeiler and Fergus 2014), captum's Occlusion: a cube of ``patch`` voxels, moved by
  ``stride``, is set to 0 in the z-normalised input (the brain's mean intensity); a voxel's
  attribution is the mean drop of the log-odds over the cubes that cover it (voxels no cube
  covers get 0).

Depth profile: the map summed over each slice along each axis (x: sagittal slices, the axis
the video networks treat as time; y: coronal; z: axial), divided by the map's total absolute
attribution so scans weigh equally in the class mean. Hippocampal share: the fraction of the
map's positive attribution inside the brain that lies in the hippocampi, divided by the
hippocampi's fraction of the brain's volume (1: no preference; > 1: the map favours the
hippocampi). Class summaries give the mean with a 95% percentile bootstrap interval that
resamples subjects (their scans together). Sanity check (Adebayo et al. 2018, "Sanity checks for
saliency maps"): every layer of the network re-initialised at random, the same maps computed
again, and Spearman's rank correlation between trained and randomised maps over the brain
voxels: a method whose maps barely change explains the input, not the model.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import clean_image, load_nifti, save_nifti_atomic, write_text_atomic

LOG = logging.getLogger(__name__)

METHODS = ("gradcam", "occlusion")
TARGETS = ("AD", "CN", "predicted", "label")
CLASS_NAMES = ("CN", "AD")  # label 0, label 1
GRADCAM_ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")  # convolutional video networks
OCCLUSION_ONLY_ARCHS = ("mvit_v2_s",)  # transformers: no spatial feature map for Grad-CAM
AXES = (("x", "sagittal slices, left to right: the video networks' time axis"),
        ("y", "coronal slices, posterior to anterior"),
        ("z", "axial slices, inferior to superior"))
SCAN_COLUMNS = ("image_id", "subject", "label", "group", "prob", "pred", "outcome")
INTERVAL_ALPHA = 0.05  # the class means' intervals are 95% (fixed, not a setting; summary.json says so)


# --- which scans --------------------------------------------------------------------------

def choose_scans(predictions: pd.DataFrame, n_correct: int, n_wrong: int) -> pd.DataFrame:
    """Per class, up to ``n_correct`` correctly and ``n_wrong`` wrongly classified test scans, the most
    confident first (clear cases and confident mistakes say the most); ties broken by image id."""
    from workflow_scripts.evaluation.evaluate import validate_predictions

    if n_correct < 0 or n_wrong < 0 or n_correct + n_wrong == 0:
        raise cli.PipelineError(f"n_correct ({n_correct}) and n_wrong ({n_wrong}) must be >= 0, not both 0")
    table = validate_predictions(predictions)
    table["confidence"] = (table["prob"] - 0.5).abs()
    table["outcome"] = np.where(table["pred"] == table["label"], "correct", "wrong")
    table["group"] = [CLASS_NAMES[v] for v in table["label"]]
    chosen = []
    for label in (1, 0):
        for outcome, n in (("correct", n_correct), ("wrong", n_wrong)):
            part = table[(table["label"] == label) & (table["outcome"] == outcome)]
            chosen.append(part.sort_values(["confidence", "image_id"], ascending=[False, True]).head(n))
    result = pd.concat(chosen)[list(SCAN_COLUMNS)].reset_index(drop=True)
    if result.empty:
        raise cli.PipelineError("no test scans to explain: the predictions table has none of the requested kinds")
    return result


def target_class(scan: pd.Series | dict, target: str) -> int:
    """The class a scan's maps explain: its predicted class, its true label, or a fixed class."""
    if target == "predicted":
        return int(scan["pred"])
    if target == "label":
        return int(scan["label"])
    if target in CLASS_NAMES:
        return CLASS_NAMES.index(target)
    raise cli.PipelineError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")


# --- the model ----------------------------------------------------------------------------

class LogOdds(nn.Module):
    """Wraps a two-class network: output column c is logit_c - logit_other, the log-odds of class c."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        if logits.shape[1] != 2:
            raise cli.PipelineError(f"explanations need a two-class network; this one has {logits.shape[1]} outputs")
        difference = logits[:, 1] - logits[:, 0]
        return torch.stack([-difference, difference], dim=1)


def methods_for(arch: str, methods: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The requested methods that apply to ``arch``, and the reason for each left out."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise cli.PipelineError(f"unknown explanation method(s) {unknown}; choose from {', '.join(METHODS)}")
    if arch not in GRADCAM_ARCHS + OCCLUSION_ONLY_ARCHS:
        raise cli.PipelineError(f"explanations cover the video networks ({', '.join(GRADCAM_ARCHS + OCCLUSION_ONLY_ARCHS)}"
                                f"), not {arch!r} (the 2D slice baseline sees slices, not the volume); leave this "
                                "experiment out of explain.experiments")
    skipped = {}
    if arch in OCCLUSION_ONLY_ARCHS and "gradcam" in methods:
        skipped["gradcam"] = (f"{arch} is a transformer: its tokens form no spatial feature map of the input for "
                              "Grad-CAM to weight; occlusion only")
    kept = [m for m in methods if m not in skipped]
    if not kept:
        raise cli.PipelineError(f"none of the methods {list(methods)} applies to {arch}: {skipped}")
    return kept, skipped


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised at random (Adebayo et al. 2018's full
    randomisation; BatchNorm statistics reset too), in eval mode."""
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in twin.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return twin.eval()


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise cli.PipelineError(f"the network has no layer {name!r} for Grad-CAM (its top-level blocks: "
                                f"{', '.join(n for n, _ in model.named_children())}); set explain.gradcam_layer") \
            from err


def gradcam_map(model: nn.Module, x: torch.Tensor, target: int, *, layer: str) -> np.ndarray:
    """3D Grad-CAM of the target's log-odds at ``layer``, upsampled trilinearly to the input's (x, y, z)."""
    from captum.attr import LayerAttribution, LayerGradCam

    wrapped = LogOdds(model).eval()
    x = x.detach().clone().requires_grad_(True)  # gradients reach a layer whose weights are all frozen
    cam = LayerGradCam(wrapped, _layer(model, layer)).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[2:]), interpolate_mode="trilinear")
    return cam[0, 0].cpu().numpy().astype(np.float32)


def occlusion_map(model: nn.Module, x: torch.Tensor, target: int, *, patch: int, stride: int,
                  batch: int) -> np.ndarray:
    """Occlusion sensitivity of the target's log-odds: mean drop when a ``patch``^3 cube around each
    voxel is set to 0 (the brain's mean in the z-normalised input)."""
    from captum.attr import Occlusion

    shape = tuple(x.shape[2:])
    if patch < 1 or stride < 1 or patch > min(shape):
        raise cli.PipelineError(f"occlusion patch {patch} and stride {stride} must be >= 1, and the patch no larger "
                                f"than the input {shape}; set explain.occlusion_patch and occlusion_stride")
    with torch.no_grad():
        attribution = Occlusion(LogOdds(model).eval()).attribute(
            x, sliding_window_shapes=(1, patch, patch, patch), strides=(1, stride, stride, stride), baselines=0.0,
            target=target, perturbations_per_eval=max(1, batch))
    return attribution[0, 0].cpu().numpy().astype(np.float32)


def attribution_map(method: str, model: nn.Module, x: torch.Tensor, target: int, settings: dict) -> np.ndarray:
    """One method's map of one scan (``settings``: gradcam_layer, occlusion_patch/stride/batch)."""
    if method == "gradcam":
        return gradcam_map(model, x, target, layer=settings["gradcam_layer"])
    if method == "occlusion":
        return occlusion_map(model, x, target, patch=settings["occlusion_patch"],
                             stride=settings["occlusion_stride"], batch=settings["occlusion_batch"])
    raise cli.PipelineError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")


# --- measures on a map ----------------------------------------------------------------------

def depth_profile(attribution: np.ndarray, axis: int) -> np.ndarray:
    """The map summed over each slice along ``axis`` (0 = x, 1 = y, 2 = z)."""
    other = tuple(a for a in range(3) if a != axis)
    return np.asarray(attribution, dtype=np.float64).sum(axis=other)


def hippocampal_share(attribution: np.ndarray, hippocampus: np.ndarray, brain: np.ndarray) -> float:
    """(share of the brain's positive attribution inside the hippocampi) / (their share of brain volume).

    1 means no preference for the hippocampi; NaN when the map has no positive attribution in the
    brain or the mask no hippocampus voxel in it.
    """
    brain = np.asarray(brain, dtype=bool)
    inside = np.asarray(hippocampus, dtype=bool) & brain
    if inside.sum() == 0 or brain.sum() == 0:
        return float("nan")
    positive = np.clip(np.asarray(attribution, dtype=np.float64), 0.0, None)
    total = positive[brain].sum()
    if total <= 0:
        return float("nan")
    return float((positive[inside].sum() / total) / (inside.sum() / brain.sum()))


def rank_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Spearman's rank correlation of two maps over the voxels of ``mask`` (NaN if either is constant)."""
    from scipy.stats import spearmanr

    mask = np.asarray(mask, dtype=bool)
    first, second = np.asarray(a)[mask], np.asarray(b)[mask]
    if first.size < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")
    return float(spearmanr(first, second).statistic)


def hottest_voxel(attribution: np.ndarray, brain: np.ndarray, sigma: float = 1.0) -> tuple[int, int, int]:
    """The centre of the hottest region: the maximum of the smoothed map inside the brain."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(attribution, dtype=np.float32), sigma)
    smooth = np.where(np.asarray(brain, dtype=bool), smooth, -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(smooth)), smooth.shape))


def bootstrap_mean(values: Sequence[float], groups: Sequence, *, n_boot: int, seed: int,
                   alpha: float) -> tuple[float | None, float | None, float | None]:
    """Mean of ``values`` and its percentile bootstrap interval, resampling ``groups`` (subjects) with
    their values together; NaN values are left out. (None, None, None) when nothing is left."""
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v)
    if not keep.any():
        return None, None, None
    from workflow_scripts.evaluation.evaluate import group_codes, resample_weights

    v = v[keep]
    weights = resample_weights(group_codes(np.asarray(list(groups), dtype=object)[keep]), n_boot,
                               np.random.default_rng(seed))
    means = weights @ v / weights.sum(axis=1)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(v.mean()), float(low), float(high)


# --- inputs --------------------------------------------------------------------------------

def model_input(tensor_path: str | Path, config: dict) -> torch.Tensor:
    """The scan's (1, 1, x, y, z) input exactly as prediction prepares it."""
    from workflow_scripts.learning.scan_data import input_transform, load_volume

    return input_transform(config, False)(load_volume(Path(tensor_path)))[None]


def read_mask(path: str | Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A label image in the tensor's (RAS) axis order, checked against the tensor's shape."""
    from workflow_scripts.learning.tensor_cache import volume_of

    data = np.asarray(volume_of(path))
    if data.shape != tuple(shape):
        raise cli.PipelineError(f"{what} {path} has shape {data.shape}, the scan's tensor {tuple(shape)}: it must be "
                                "on the model's input grid (results/ras); re-run the rule that wrote it")
    return np.rint(data).astype(np.int16)


def read_scans(path: str | Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "subject": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise cli.PipelineError(f"cannot read the chosen scans table {path}: {err}") from err
    missing = [c for c in SCAN_COLUMNS if c not in table.columns]
    if missing or table.empty:
        raise cli.PipelineError(f"{path} must list scans with the columns {', '.join(SCAN_COLUMNS)} "
                                f"(missing: {missing}); write it with `explain choose`")
    return table


def scan_files(scans: pd.DataFrame, pattern: str) -> list[str]:
    """Each scan's file by a path pattern with {subject} and {image_id} (the workflow's layout)."""
    try:
        return [pattern.format(subject=s, image_id=i) for s, i in zip(scans["subject"], scans["image_id"])]
    except (KeyError, IndexError, ValueError) as err:
        raise cli.PipelineError(f"path pattern {pattern!r} must hold {{subject}} and {{image_id}} and no other "
                                f"field: {err}") from err


# --- figures -------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scan(volume: np.ndarray, maps: dict[str, np.ndarray], hippocampus: np.ndarray, brain: np.ndarray,
              path: str | Path, title: str) -> Path:
    """Axial, coronal and sagittal slices through each map's hottest region: the positive attribution
    over the scan, hippocampi outlined in cyan; one row per method."""
    from workflow_scripts.common.figures import save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(len(maps), 3, figsize=(9.6, 3.3 * len(maps)), squeeze=False)
    for row, (method, attribution) in enumerate(maps.items()):
        centre = hottest_voxel(attribution, brain)
        top = float(np.clip(attribution[brain], 0, None).max(initial=0.0)) or 1.0
        for col, (axis, plane) in enumerate(((2, "axial"), (1, "coronal"), (0, "sagittal"))):
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            ax = axes[row, col]
            ax.imshow(volume[tuple(index)].T, cmap="gray", origin="lower", interpolation="nearest")
            positive = np.where(brain[tuple(index)], np.clip(attribution[tuple(index)], 0, None) / top, 0.0)
            ax.imshow(np.ma.masked_less_equal(positive, 0.05).T, cmap="hot", vmin=0, vmax=1, alpha=0.55,
                      origin="lower", interpolation="nearest")
            hip = hippocampus[tuple(index)] > 0
            if hip.any():
                ax.contour(hip.T.astype(float), levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
            ax.set_title(f"{method}: {plane} {'xyz'[axis]} = {centre[axis]}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def profiles_table(profiles: pd.DataFrame) -> pd.DataFrame:
    """Per method, class and axis: the mean and standard deviation over scans of each slice's share."""
    columns = ["method", "group", "axis", "slices", "index", "position", "mean", "sd", "n_scans"]
    if profiles.empty:  # every map was empty
        return pd.DataFrame(columns=columns)
    grouped = profiles.groupby(["method", "group", "axis", "index"], sort=True)["share"]
    table = grouped.agg(mean="mean", sd="std", n_scans="count").reset_index()
    table["sd"] = table["sd"].fillna(0.0)
    sizes = profiles.groupby("axis")["index"].max() + 1
    table["position"] = (table["index"] + 0.5) / table["axis"].map(sizes)
    table["slices"] = table["axis"].map(dict((a, d.split(",")[0]) for a, d in AXES))
    return table[columns]


def plot_profiles(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Depth profiles per class (mean +- sd over scans), one row per method, one column per axis."""
    from workflow_scripts.common.figures import save_figure

    plt = _pyplot()
    methods = list(dict.fromkeys(table["method"]))
    if not methods:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no map had any attribution inside the brain", ha="center", va="center")
        ax.set_axis_off()
        return save_figure(fig, Path(path))
    fig, axes = plt.subplots(len(methods), 3, figsize=(11, 2.9 * len(methods)), squeeze=False)
    colours = {"AD": "tab:red", "CN": "tab:blue"}
    for row, method in enumerate(methods):
        for col, (axis, description) in enumerate(AXES):
            ax = axes[row, col]
            for group, part in table[(table["method"] == method) & (table["axis"] == axis)].groupby("group"):
                ax.plot(part["position"], part["mean"], color=colours.get(group), label=f"{group} (n={part['n_scans'].max()})")
                ax.fill_between(part["position"], part["mean"] - part["sd"], part["mean"] + part["sd"],
                                color=colours.get(group), alpha=0.2, linewidth=0)
            ax.axhline(0, color="grey", linewidth=0.6)
            ax.set_title(f"{method}: {description.split(':')[0]}", fontsize=8)
            ax.set_xlabel(f"position along {axis} (0-1){' = time for the video network' if axis == 'x' else ''}",
                          fontsize=8)
            ax.set_ylabel("share of |attribution| per slice", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_shares(shares: pd.DataFrame, summary: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Hippocampal share per scan (points) and per class (mean with its 95% interval), log scale; 1 = no preference."""
    from workflow_scripts.common.figures import save_figure

    plt = _pyplot()
    methods = list(dict.fromkeys(shares["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for position, group in enumerate(("AD", "CN")):
            part = shares[(shares["method"] == method) & (shares["group"] == group)]
            values = part["share"].to_numpy(dtype=float)
            shown = values[np.isfinite(values) & (values > 0)]
            jitter = np.linspace(-0.12, 0.12, len(shown)) if len(shown) > 1 else np.zeros(len(shown))
            ax.scatter(position + jitter, shown, s=14, color="grey", zorder=2)
            row = summary[(summary["method"] == method) & (summary["group"] == group)]
            if len(row) and row["mean"].notna().all() and row["ci_low"].iloc[0] > 0:
                mean, low, high = (float(row[c].iloc[0]) for c in ("mean", "ci_low", "ci_high"))
                ax.errorbar(position + 0.3, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="black",
                            capsize=4, zorder=3)
        ax.axhline(1.0, color="tab:red", linestyle="--", linewidth=1, label="1 = no preference")
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, 0.5), max(high, 2.0))
        ax.set_xticks([0, 1], ["AD", "CN"])
        ax.set_xlim(-0.5, 1.6)
        ax.set_title(method, fontsize=9)
        ax.set_ylabel("hippocampal share of positive attribution", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


# --- tables and summaries ---------------------------------------------------------------------

def class_summary(table: pd.DataFrame, column: str, by: Sequence[str], n_boot: int, seed: int) -> pd.DataFrame:
    """Mean of ``column`` with its subject-resampled 95% interval, per combination of ``by``."""
    rows = []
    for keys, part in table.groupby(list(by), sort=True):
        mean, low, high = bootstrap_mean(part[column], part["subject"], n_boot=n_boot, seed=seed, alpha=INTERVAL_ALPHA)
        finite = part[column][np.isfinite(part[column].astype(float))]
        rows.append({**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))), "mean": mean, "ci_low": low,
                     "ci_high": high, "median": float(finite.median()) if len(finite) else None,
                     "n_scans": int(len(finite)), "n_subjects": int(part.loc[finite.index, "subject"].nunique())})
    return pd.DataFrame(rows)


def _records(table: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (NaN becomes None)."""
    return json.loads(table.to_json(orient="records"))


def explain_page(experiment: str, share_summary: pd.DataFrame, sanity_summary: pd.DataFrame,
                 shares: pd.DataFrame, skipped: dict[str, str], settings: dict) -> str:
    """The report page: hippocampal share and sanity check tables with what they mean."""
    from workflow_scripts.report.report_tables import heading, html_page, html_table, paragraph

    def rounded(table: pd.DataFrame) -> pd.DataFrame:
        return table.round(3)

    parts = [paragraph(f"Maps explain the log-odds of the {settings['target']} class on {len(shares['image_id'].unique())} "
                       f"test scans. Grad-CAM at {settings['gradcam_layer']}; occlusion with a "
                       f"{settings['occlusion_patch']}-voxel cube moved by {settings['occlusion_stride']} voxels. "
                       f"Hippocampus masks: {settings['hippocampus_masks']}."),
             heading("Hippocampal share (1 = no preference; 95% interval: bootstrap over subjects)"),
             html_table(rounded(share_summary)),
             heading("Sanity check: Spearman correlation, trained vs randomised weights (Adebayo et al. 2018)"),
             paragraph("Low correlation: the maps depend on what the network learned. High: they mostly "
                       "reflect the input (edges, intensities), whatever the weights."),
             html_table(rounded(sanity_summary)),
             heading("Per scan"),
             html_table(rounded(shares))]
    for method, reason in skipped.items():
        parts.append(paragraph(f"{method} not computed: {reason}", note=True))
    return html_page(f"Explanations: {experiment}", parts)


# --- the run ---------------------------------------------------------------------------------

def explain_experiment(scans: pd.DataFrame, checkpoint: str | Path, tensors: Sequence[str], images: Sequence[str],
                       brains: Sequence[str], hippocampi: Sequence[str], out_dir: str | Path, *,
                       methods: Sequence[str], target: str, gradcam_layer: str, occlusion_patch: int,
                       occlusion_stride: int, occlusion_batch: int, hippocampus_masks: str, n_boot: int, seed: int,
                       device: str, experiment: str = "") -> dict:
    """Maps, figures, depth profiles, hippocampal shares and the sanity check of the chosen scans;
    writes everything into ``out_dir`` and returns the summary."""
    from workflow_scripts.common.devices import pick_device
    from workflow_scripts.learning.train import load_trained_model

    for name, files in (("tensors", tensors), ("images", images), ("brains", brains), ("hippocampi", hippocampi)):
        if len(files) != len(scans):
            raise cli.PipelineError(f"{len(files)} {name} for {len(scans)} chosen scans: give one per row of the "
                                    "scans table, in its order")
    out_dir = Path(out_dir)
    dev = pick_device(device)
    model, config = load_trained_model(checkpoint, dev)
    kept, skipped = methods_for(config["arch"], methods)
    for method, reason in skipped.items():
        LOG.warning("%s: %s", method, reason)
    random_model = randomised_copy(model, seed)
    settings = {"target": target, "gradcam_layer": gradcam_layer, "occlusion_patch": occlusion_patch,
                "occlusion_stride": occlusion_stride, "occlusion_batch": occlusion_batch,
                "hippocampus_masks": hippocampus_masks}
    share_rows, profile_rows, sanity_rows = [], [], []
    for i, scan in scans.reset_index(drop=True).iterrows():
        x = model_input(tensors[i], config).to(dev)
        shape = tuple(x.shape[2:])
        brain = read_mask(brains[i], shape, "brain mask") > 0
        hippocampus = read_mask(hippocampi[i], shape, "hippocampus labels")
        affine = nib.as_closest_canonical(load_nifti(images[i])).affine  # the tensor's (RAS) grid
        target_index = target_class(scan, target)
        maps = {}
        for method in kept:
            trained = attribution_map(method, model, x, target_index, settings)
            randomised = attribution_map(method, random_model, x, target_index, settings)
            maps[method] = trained
            save_nifti_atomic(clean_image(trained, affine, f"explain_{method}", np.float32),
                              out_dir / "scans" / scan["subject"] / f"{scan['image_id']}_{method}.nii.gz")
            info = {k: scan[k] for k in SCAN_COLUMNS} | {"target": CLASS_NAMES[target_index], "method": method}
            share_rows.append(info | {
                "share": hippocampal_share(trained, hippocampus > 0, brain),
                "share_left": hippocampal_share(trained, hippocampus == 1, brain),
                "share_right": hippocampal_share(trained, hippocampus == 2, brain),
                "share_randomised": hippocampal_share(randomised, hippocampus > 0, brain),
                "hippocampus_voxels": int(((hippocampus > 0) & brain).sum()), "brain_voxels": int(brain.sum())})
            sanity_rows.append(info | {"spearman": rank_correlation(trained, randomised, brain)})
            total = float(np.abs(trained[brain]).sum())
            for axis, (name, _) in enumerate(AXES if total > 0 else ()):  # an empty map has no profile
                for index, value in enumerate(depth_profile(np.where(brain, trained, 0.0), axis) / total):
                    profile_rows.append({"image_id": scan["image_id"], "subject": scan["subject"],
                                         "group": scan["group"], "method": method, "axis": name, "index": index,
                                         "share": value})
        volume = x[0, 0].detach().cpu().numpy()
        plot_scan(volume, maps, hippocampus, brain, out_dir / "scans" / scan["subject"] / f"{scan['image_id']}.png",
                  f"{experiment} {scan['subject']} {scan['image_id']}: {scan['group']}, predicted "
                  f"{CLASS_NAMES[int(scan['pred'])]} (p(AD) = {float(scan['prob']):.2f}), maps of "
                  f"{CLASS_NAMES[target_index]}")
        LOG.info("%s %s: %s", scan["subject"], scan["image_id"],
                 ", ".join(f"{r['method']} share {r['share']:.2f}" for r in share_rows[-len(kept):]))
    return write_outputs(pd.DataFrame(share_rows), pd.DataFrame(profile_rows), pd.DataFrame(sanity_rows), out_dir,
                         experiment=experiment, checkpoint=str(checkpoint), config=config, methods=kept,
                         skipped=skipped, settings=settings, n_boot=n_boot, seed=seed)


def write_outputs(shares: pd.DataFrame, profiles: pd.DataFrame, sanity: pd.DataFrame, out_dir: Path, *,
                  experiment: str, checkpoint: str, config: dict, methods: list[str], skipped: dict[str, str],
                  settings: dict, n_boot: int, seed: int) -> dict:
    """Tables, figures, the report page and summary.json of one experiment's explanations."""
    title = f"{experiment}: " if experiment else ""
    share_summary = class_summary(shares, "share", ["method", "group"], n_boot, seed)
    randomised_summary = class_summary(shares, "share_randomised", ["method", "group"], n_boot, seed)
    sanity_summary = class_summary(sanity, "spearman", ["method"], n_boot, seed)
    profile_summary = profiles_table(profiles)
    write_text_atomic(shares.to_csv(index=False), out_dir / "hippocampal_share.csv")
    write_text_atomic(share_summary.to_csv(index=False), out_dir / "hippocampal_share_summary.csv")
    write_text_atomic(profile_summary.to_csv(index=False), out_dir / "depth_profiles.csv")
    write_text_atomic(sanity.to_csv(index=False), out_dir / "sanity.csv")
    plot_shares(shares, share_summary, out_dir / "hippocampal_share.png", f"{title}hippocampal share of attribution")
    plot_profiles(profile_summary, out_dir / "depth_profiles.png", f"{title}depth profiles (mean +- sd over scans)")
    write_text_atomic(explain_page(experiment, share_summary, sanity_summary, shares, skipped, settings),
                      out_dir / "explain.html")
    summary = {
        "experiment": experiment, "checkpoint": checkpoint, "arch": config["arch"], "methods": methods,
        "skipped": skipped, "settings": settings,
        "explained": "log-odds of the target class (logit difference) on the z-normalised input",
        "scans": _records(shares.drop_duplicates("image_id")[list(SCAN_COLUMNS) + ["target"]]),
        "hippocampal_share": _records(share_summary),
        "hippocampal_share_randomised": _records(randomised_summary),
        "sanity_spearman": _records(sanity_summary),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "interval": "95% percentile",
                      "resampled": "subjects (their scans together)"},
        "randomisation": "every layer re-initialised (torch reset_parameters), BatchNorm statistics reset; seed "
                         f"{seed} (Adebayo et al. 2018)",
    }
    write_text_atomic(json.dumps(summary, indent=2, default=_json_default) + "\n", out_dir / "summary.json")
    for row in _records(share_summary):
        LOG.info("%s %s: hippocampal share %s [%s, %s] (%d scans)", row["method"], row["group"],
                 _fmt(row["mean"]), _fmt(row["ci_low"]), _fmt(row["ci_high"]), row["n_scans"])
    for row in _records(sanity_summary):
        LOG.info("%s: Spearman trained vs randomised %s [%s, %s]", row["method"], _fmt(row["mean"]),
                 _fmt(row["ci_low"]), _fmt(row["ci_high"]))
    return summary


def _fmt(value) -> str:
    return "undefined" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


# --- command line -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    choose = sub.add_parser("choose", help="choose the test scans to explain")
    choose.add_argument("--predictions", required=True, help="test_predictions.csv (image_id, subject, label, prob, pred)")
    choose.add_argument("--output", required=True, help="CSV of the chosen scans")
    settings.add_argument(choose, "explain")  # n_correct, n_wrong
    run = sub.add_parser("run", help="explain the chosen scans")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--scans", required=True, help="the chosen scans (written by `choose`)")
    run.add_argument("--checkpoint", required=True, help="checkpoint written by training (best_acc.pt, ...)")
    for name, what in (("tensor", "cached .npy tensor"), ("image", "RAS NIfTI scan (for the affine)"),
                       ("brain", "RAS brain mask"), ("hippocampus", "hippocampus labels on the RAS grid (1 left, 2 right)")):
        run.add_argument(f"--{name}-pattern", required=True,
                         help=f"path of each scan's {what}, with {{subject}} and {{image_id}}")
    run.add_argument("--out-dir", required=True)
    run.add_argument("--experiment", default="", help="the experiment's name (recorded)")
    settings.add_argument(run, "explain", "train.device")
    args = p.parse_args(argv)
    if args.command == "choose":
        from workflow_scripts.evaluation.evaluate import read_predictions

        explain_settings, = settings.read_job(args.settings, "explain")
        chosen = choose_scans(read_predictions(args.predictions), explain_settings.n_correct,
                              explain_settings.n_wrong)
        write_text_atomic(chosen.to_csv(index=False), args.output)
        LOG.info("chose %d scans: %s", len(chosen), ", ".join(f"{r.image_id} ({r.group} {r.outcome})"
                                                              for r in chosen.itertuples()))
        return
    cli.limit_threads(args.threads)
    scans = read_scans(args.scans)
    tensors, images, brains, hippocampi = (scan_files(scans, pattern) for pattern in (
        args.tensor_pattern, args.image_pattern, args.brain_pattern, args.hippocampus_pattern))
    e, device = settings.read_job(args.settings, "explain", "train.device")
    explain_experiment(scans, args.checkpoint, tensors, images, brains, hippocampi, args.out_dir,
                       methods=list(e.methods), target=e.target, gradcam_layer=e.gradcam_layer,
                       occlusion_patch=e.occlusion_patch, occlusion_stride=e.occlusion_stride,
                       occlusion_batch=e.occlusion_batch, hippocampus_masks=e.hippocampus_masks, n_boot=e.n_boot,
                       seed=e.seed, device=device, experiment=args.experiment)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
