"""Explanations: depth profiles, hippocampal share, Grad-CAM and occlusion maps, scan choice, the
randomisation sanity check; a video network trained here on heads whose only class signal is
planted hippocampal atrophy must put its attribution on the hippocampi; the workflow's outputs."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import discard_unless_failed
from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.explain import explain

SIDE = 32
EXPLAIN = resolve("explain")  # the schema's explain settings (defaults)


# ----------------------------------------------------------------------------- measures

def test_depth_profiles_sum_to_the_map_total_and_peak_where_the_mass_is():
    rng = np.random.default_rng(0)
    attribution = rng.normal(size=(6, 7, 8))
    for axis in range(3):
        profile = explain.depth_profile(attribution, axis)
        assert profile.shape == (attribution.shape[axis],)
        assert profile.sum() == pytest.approx(attribution.sum())
    block = np.zeros((6, 7, 8))
    block[1, 2:4, 5] = 3.0
    assert [int(np.argmax(explain.depth_profile(block, a))) for a in range(3)] == [1, 2, 5]


def test_hippocampal_share_is_one_for_a_uniform_map_and_the_inverse_volume_share_on_the_hippocampi():
    brain = np.zeros((10, 10, 10), bool)
    brain[1:9, 1:9, 1:9] = True
    hippocampus = np.zeros_like(brain)
    hippocampus[3:5, 3:5, 3:5] = True
    uniform = np.where(brain, 0.7, 5.0)  # outside the brain does not count
    assert explain.hippocampal_share(uniform, hippocampus, brain) == pytest.approx(1.0)
    only_there = np.where(hippocampus, 2.0, -1.0)  # negative attribution elsewhere does not count either
    assert explain.hippocampal_share(only_there, hippocampus, brain) == pytest.approx(brain.sum() / hippocampus.sum())
    assert explain.hippocampal_share(np.where(hippocampus, 0.0, 1.0), hippocampus, brain) == 0.0
    assert np.isnan(explain.hippocampal_share(np.zeros(brain.shape), hippocampus, brain))
    assert np.isnan(explain.hippocampal_share(uniform, np.zeros_like(brain), brain))


def test_rank_correlation_and_bootstrap_mean():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8, 8))
    mask = np.ones(a.shape, bool)
    assert explain.rank_correlation(a, a ** 3, mask) == pytest.approx(1.0)  # monotone: ranks agree
    assert explain.rank_correlation(a, -a, mask) == pytest.approx(-1.0)
    assert np.isnan(explain.rank_correlation(a, np.zeros_like(a), mask))
    interval = {"seed": EXPLAIN.seed, "alpha": explain.INTERVAL_ALPHA}
    mean, low, high = explain.bootstrap_mean([1.0, 3.0, np.nan, 5.0], ["s1", "s1", "s2", "s2"], n_boot=500,
                                             **interval)
    assert mean == pytest.approx(3.0)
    assert low == pytest.approx(2.0) and high == pytest.approx(5.0)  # resamples of {s1: 1, 3} and {s2: 5}
    assert explain.bootstrap_mean([2.0], ["s"], n_boot=100, **interval) == (2.0, 2.0, 2.0)
    assert explain.bootstrap_mean([np.nan], ["s"], n_boot=EXPLAIN.n_boot, **interval) == (None, None, None)


# ----------------------------------------------------------------------------- maps

class RegionModel(nn.Module):
    """A two-class 'network' whose AD logit is the mean input inside one box and nothing else."""

    def __init__(self, box: tuple[slice, slice, slice]):
        super().__init__()
        self.box = box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[(slice(None), 0, *self.box)].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_occlusion_puts_the_attribution_on_the_region_the_model_reads():
    box = (slice(8, 16), slice(16, 24), slice(8, 16))  # on the stride's grid
    x = torch.ones(1, 1, SIDE, SIDE, SIDE)
    attribution = explain.occlusion_map(RegionModel(box), x, target=1, patch=8, stride=4, batch=16)
    assert attribution.shape == (SIDE,) * 3
    region = np.zeros(attribution.shape, bool)
    region[box] = True
    assert region[explain.hottest_voxel(attribution, np.ones_like(region))]
    assert attribution[region].min() > 0
    # voxels whose covering cubes all miss the box get nothing; the map favours the box
    assert np.abs(attribution[20:, :, :]).max() == 0 and np.abs(attribution[:, :, :4]).max() == 0
    assert explain.hippocampal_share(attribution, region, np.ones_like(region)) > 5
    # explaining CN (the other side of the log-odds) flips the sign
    cn = explain.occlusion_map(RegionModel(box), x, target=0, patch=8, stride=4, batch=16)
    np.testing.assert_allclose(cn, -attribution, atol=1e-6)


def test_occlusion_rejects_a_patch_larger_than_the_input():
    with pytest.raises(cli.PipelineError, match="patch"):
        explain.occlusion_map(RegionModel((slice(0, 2),) * 3), torch.ones(1, 1, 8, 8, 8), 1, patch=16, stride=8,
                              batch=EXPLAIN.occlusion_batch)


@pytest.fixture(scope="module")
def random_r3d():
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.learning.models import build_model

    slices = resolve("experiments.*", {})  # r3d_18 does not use them; the schema's defaults
    torch.manual_seed(0)
    return build_model(arch="r3d_18", weights="none", num_classes=2, in_channels=1, trainable_from="layer4",
                       plane=slices.plane, n_slices=slices.n_slices, slice_spacing=slices.slice_spacing).eval()


def test_gradcam_map_has_the_input_shape_and_is_not_negative(random_r3d):
    x = torch.randn(1, 1, 16, SIDE, 24)
    cam = explain.gradcam_map(random_r3d, x, target=1, layer="layer4")
    assert cam.shape == (16, SIDE, 24) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0
    with pytest.raises(cli.PipelineError, match="no layer 'layer9'"):
        explain.gradcam_map(random_r3d, x, target=1, layer="layer9")


def test_randomised_copy_changes_every_weight_and_leaves_the_model_alone(random_r3d):
    before = {k: v.clone() for k, v in random_r3d.state_dict().items()}
    twin = explain.randomised_copy(random_r3d, seed=3)
    for name, value in random_r3d.state_dict().items():
        assert torch.equal(value, before[name]), name
    changed = [name for name, p in twin.named_parameters()
               if not torch.equal(p, dict(random_r3d.named_parameters())[name])]
    weights = [name for name, p in twin.named_parameters() if p.dim() > 1]
    assert set(weights) <= set(changed)
    assert not twin.training


def test_methods_for_each_architecture():
    assert explain.methods_for("r3d_18", ["gradcam", "occlusion"]) == (["gradcam", "occlusion"], {})
    kept, skipped = explain.methods_for("mvit_v2_s", ["gradcam", "occlusion"])
    assert kept == ["occlusion"] and "transformer" in skipped["gradcam"]
    with pytest.raises(cli.PipelineError, match="transformer"):
        explain.methods_for("mvit_v2_s", ["gradcam"])
    with pytest.raises(cli.PipelineError, match="2D slice baseline"):
        explain.methods_for("resnet50", ["occlusion"])


# ----------------------------------------------------------------------------- choosing scans

def _predictions() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ["I1", "I2", "I3", "I4", "I5", "I6", "I7"],
        "subject": ["a", "b", "c", "d", "e", "f", "g"],
        "label": [1, 1, 1, 1, 0, 0, 0],
        "prob": [0.9, 0.6, 0.2, 0.45, 0.1, 0.3, 0.8],
        "pred": [1, 1, 0, 0, 0, 0, 1]})


def test_choose_scans_takes_the_most_confident_correct_and_wrong_scans_per_class():
    chosen = explain.choose_scans(_predictions(), n_correct=1, n_wrong=1)
    assert list(chosen["image_id"]) == ["I1", "I3", "I5", "I7"]
    assert list(chosen["outcome"]) == ["correct", "wrong"] * 2
    assert list(chosen["group"]) == ["AD", "AD", "CN", "CN"]
    assert list(explain.choose_scans(_predictions(), 3, 0)["image_id"]) == ["I1", "I2", "I5", "I6"]
    with pytest.raises(cli.PipelineError, match="not both 0"):
        explain.choose_scans(_predictions(), 0, 0)


def test_target_class():
    scan = {"label": 0, "pred": 1}
    assert [explain.target_class(scan, t) for t in ("AD", "CN", "predicted", "label")] == [1, 0, 1, 0]


def test_a_mask_on_another_grid_is_named(tmp_path):
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path)
    with pytest.raises(cli.PipelineError, match="mask.nii.gz has shape"):
        explain.read_mask(path, (8, 8, 8), "brain mask")


# ----------------------------------------------------------------------------- a model trained for the test

# A 96 x 96 x 64 mm block of the demo's MNI head around the medial temporal lobes, brain-masked and
# averaged over 3 x 3 x 2 mm blocks into 32^3 volumes, so that the hippocampi are 1.6% of the brain in
# view (of a whole brain at 32^3 they would be 0.4%, a few voxels each, and a network trained from
# random weights on a CPU needs far longer to find them). AD heads lose 60-90% of each hippocampus
# (turned to CSF, boundary first, as the demo plants it), CN heads 0-10%; the ventricles are left alone,
# so the only class signal is in the hippocampi. Position (+-1 mm), gain and noise vary per scan.
CROP = ((50, 146), (60, 156), (113, 177))  # 1 mm voxels of the head model
BLOCK = (3, 3, 2)
SPLIT = {"train": 8, "val": 3, "test": 2}  # scans per class


def _blocks(volume: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Mean over each block of the crop moved by ``shift`` voxels -> (32, 32, 32)."""
    box = tuple(slice(lo + int(d), hi + int(d)) for (lo, hi), d in zip(CROP, shift))
    v = np.asarray(volume[box], dtype=np.float32)
    return v.reshape(SIDE, BLOCK[0], SIDE, BLOCK[1], SIDE, BLOCK[2]).mean(axis=(1, 3, 5))


def planted_heads(root: Path, seed: int = 0) -> pd.DataFrame:
    """Tensors, RAS scans, brain masks and hippocampus labels of heads whose classes differ only in
    hippocampal atrophy; returns one row per scan with its split part and file paths."""
    from workflow_scripts.data import demo
    from workflow_scripts.common.nifti_io import clean_image, save_nifti_atomic
    from workflow_scripts.learning.tensor_cache import rescale_intensities, save_npy_atomic

    model = demo.head_model()
    rows = []
    for label, group, loss_range in ((1, "AD", (0.6, 0.9)), (0, "CN", (0.0, 0.1))):
        parts = [p for p, n in SPLIT.items() for _ in range(n)]
        for i, part in enumerate(parts):
            rng = np.random.default_rng([seed, label, i])
            shift = rng.integers(-1, 2, 3)
            intensity, labels, _ = demo.atrophied_head(model, demo.atrophy_order(model, rng),
                                                       rng.uniform(*loss_range), 0.0)
            in_brain = _blocks(model.labels != demo.OUTSIDE, shift)
            volume = _blocks(np.where(labels != demo.OUTSIDE, intensity, 0.0), shift) * rng.uniform(0.8, 1.2)
            volume = np.clip(volume + rng.normal(0.0, 0.03, volume.shape), 0.0, None) * (in_brain > 0)
            hippocampus = np.zeros(volume.shape, np.uint8)  # the labels before atrophy, as an atlas gives them
            hippocampus[_blocks(model.labels == demo.HIPPOCAMPUS_LEFT, shift) >= 0.5] = 1
            hippocampus[_blocks(model.labels == demo.HIPPOCAMPUS_RIGHT, shift) >= 0.5] = 2
            affine = np.diag([*BLOCK, 1.0])
            affine[:3, 3] = model.affine[:3, :3] @ [lo + d for (lo, _), d in zip(CROP, shift)] + model.affine[:3, 3]
            subject, image_id = f"{label}{i:02d}_S_{100 * label + i:04d}", f"I{1000 * (label + 1) + i}"
            paths = {name: root / folder / subject / f"{image_id}{suffix}" for name, folder, suffix in
                     (("path", "tensors", ".npy"), ("image", "ras", ".nii.gz"), ("brain", "ras", "_mask.nii.gz"),
                      ("hippocampus", "hippocampus_atlas", ".nii.gz"))}
            save_npy_atomic(rescale_intensities(volume).astype(np.float16), paths["path"])
            save_nifti_atomic(clean_image(volume, affine, "test", np.float32), paths["image"])
            save_nifti_atomic(clean_image(in_brain >= 0.5, affine, "test", np.uint8), paths["brain"])
            save_nifti_atomic(clean_image(hippocampus, affine, "test", np.uint8), paths["hippocampus"])
            rows.append({"subject": subject, "image_id": image_id, "group": group, "label": label, "part": part,
                         **{k: str(v) for k, v in paths.items()}})
    return pd.DataFrame(rows)


# The recipe: layer4 and fc trained from random weights (AdamW 1e-3, batches of 4, no restart of the
# learning rate within the 6 epochs, BatchNorm recalibrated), the best-validation-loss checkpoint.
RECIPE = {"model": {"weights": "none", "trainable_from": "layer4"},
          "train": {"lr_head": 1e-3, "lr_backbone": 1e-3, "batch_size": 4, "t0": 50, "seed": 1, "recalibrate_bn": True,
                    "max_epochs": 6, "patience": 6, "selection": "loss", "augmentation": {"gamma_p": 0, "noise_p": 0},
                    "num_workers": 0, "wandb": {"mode": "disabled"}, "on_changed_settings": "error"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request) -> dict:
    """Heads with planted hippocampal atrophy, r3d_18 trained on them with the project's training code,
    its test predictions, and `explain choose` + `explain run` on every test scan (occlusion: 8^3 cubes)."""
    from workflow_scripts.learning.recipe import training_settings
    from workflow_scripts.learning.train import fit, predict, run_config

    failed_before = request.session.testsfailed
    root = tmp_path_factory.mktemp("explain_trained")
    table = planted_heads(root)
    for part in SPLIT:
        table[table["part"] == part][["path", "subject", "image_id", "group", "label"]].to_csv(
            root / f"{part}.csv", index=False)
    run = root / "model"
    fit(run_config(training_settings(RECIPE["train"], RECIPE["model"]), train=root / "train.csv", val=root / "val.csv",
                   out_dir=run, threads=2))
    checkpoint = run / "best_loss.pt"
    predict(checkpoint, root / "test.csv", root / "test_predictions.csv", device="cpu", num_workers=0)
    out = root / "explain"
    explain.main(["choose", "--predictions", str(root / "test_predictions.csv"),
                  "--settings", '{"explain": {"n_correct": 2, "n_wrong": 2}}', "--output", str(out / "scans.csv")])
    explain.main(["run", "--threads", "2", "--scans", str(out / "scans.csv"), "--checkpoint", str(checkpoint),
                  "--tensor-pattern", f"{root}/tensors/{{subject}}/{{image_id}}.npy",
                  "--image-pattern", f"{root}/ras/{{subject}}/{{image_id}}.nii.gz",
                  "--brain-pattern", f"{root}/ras/{{subject}}/{{image_id}}_mask.nii.gz",
                  "--hippocampus-pattern", f"{root}/hippocampus_atlas/{{subject}}/{{image_id}}.nii.gz",
                  "--out-dir", str(out), "--experiment", "planted", "--settings", json.dumps(
                      {"explain": {"occlusion_patch": 8, "occlusion_stride": 8, "occlusion_batch": 8, "n_boot": 500},
                       "train.device": "cpu"})])
    yield {"root": root, "table": table, "checkpoint": checkpoint, "out": out,
           "summary": json.loads((out / "summary.json").read_text()),
           "shares": pd.read_csv(out / "hippocampal_share.csv", dtype={"image_id": str, "subject": str}),
           "sanity": pd.read_csv(out / "sanity.csv", dtype={"image_id": str})}
    discard_unless_failed(request, root, failed_before)


def test_the_network_trained_on_planted_hippocampal_atrophy_separates_the_classes(trained):
    predictions = pd.read_csv(trained["root"] / "test_predictions.csv")
    assert len(predictions) == 2 * SPLIT["test"]
    assert (predictions["pred"] == predictions["label"]).all()  # held-out scans, all right
    history = json.loads((trained["root"] / "model" / "history.json").read_text())
    assert min(row["val_loss"] for row in history) < 0.2 and history[-1]["val_auc"] == 1.0


def test_its_occlusion_maps_favour_the_hippocampi_and_randomised_weights_lose_that(trained):
    occlusion = trained["shares"][trained["shares"]["method"] == "occlusion"]
    assert len(occlusion) == 4 and set(occlusion["group"]) == {"AD", "CN"}
    assert (occlusion["share"] > 1.5).all()  # every test scan, both classes
    assert (occlusion["share"] > 2 * occlusion["share_randomised"]).all()
    for row in trained["summary"]["hippocampal_share"]:
        if row["method"] == "occlusion":
            assert row["ci_low"] > 1, row  # the class mean's 95% interval lies above "no preference"
    # the planted atrophy is bilateral: each side is favoured on its own
    assert (occlusion["share_left"] > 1).all() and (occlusion["share_right"] > 1).all()


def test_randomised_weights_change_the_maps_while_the_trained_maps_are_reproducible(trained):
    from workflow_scripts.learning.train import load_trained_model

    sanity = trained["sanity"]
    assert set(sanity["method"]) == {"gradcam", "occlusion"}
    assert (sanity["spearman"].dropna().abs() < 0.6).all()
    for row in trained["summary"]["sanity_spearman"]:
        assert row["mean"] < 0.4, row
    # the same network gives the same map again: rank correlation 1, the reference the 0.4 is below
    scan = trained["table"][trained["table"]["part"] == "test"].iloc[0]
    model, config = load_trained_model(trained["checkpoint"])
    x = explain.model_input(scan["path"], config)
    brain = explain.read_mask(scan["brain"], tuple(x.shape[2:]), "brain mask") > 0
    first, again = (explain.gradcam_map(model, x, 1, layer="layer4") for _ in range(2))
    assert explain.rank_correlation(first, again, brain) == pytest.approx(1.0)
    saved = nib.load(trained["out"] / "scans" / scan["subject"] / f"{scan['image_id']}_gradcam.nii.gz")
    np.testing.assert_allclose(saved.get_fdata(), first, rtol=1e-4, atol=1e-6)


def test_the_outputs_of_a_run(trained):
    out, summary = trained["out"], trained["summary"]
    assert summary["arch"] == "r3d_18" and summary["skipped"] == {}
    assert summary["bootstrap"]["resampled"].startswith("subjects")
    scans = pd.read_csv(out / "scans.csv", dtype={"image_id": str, "subject": str})
    assert len(scans) == 4 and (scans["outcome"] == "correct").all()
    for scan in scans.itertuples():
        image = nib.load(trained["table"].set_index("image_id").loc[scan.image_id, "image"])
        for method in ("gradcam", "occlusion"):
            saved = nib.load(out / "scans" / scan.subject / f"{scan.image_id}_{method}.nii.gz")
            assert saved.shape == image.shape and np.allclose(saved.affine, image.affine)
        assert (out / "scans" / scan.subject / f"{scan.image_id}.png").is_file()
    profiles = pd.read_csv(out / "depth_profiles.csv")
    gradcam = profiles[profiles["method"] == "gradcam"]
    # Grad-CAM maps are not negative: each class's mean profile holds the whole attribution (sums to 1)
    np.testing.assert_allclose(gradcam.groupby(["group", "axis"])["mean"].sum(), 1.0, rtol=1e-5)
    page = (out / "explain.html").read_text()
    assert "Hippocampal share" in page and "Spearman" in page

# ----------------------------------------------------------------------------- the workflow's outputs

def test_the_workflow_explains_every_video_experiment_on_its_test_scans(demo_run):
    results = demo_run / "results"
    explained = sorted(p.name for p in (results / "explain").iterdir() if p.is_dir())
    assert explained == ["mc3_18_scratch", "r3d_18_kinetics400"]  # not the 2D baseline, not volumetry
    test = pd.read_csv(results / "splits" / "test.csv", dtype={"image_id": str, "subject": str})
    for experiment in explained:
        out = results / "explain" / experiment
        scans = pd.read_csv(out / "scans.csv", dtype={"image_id": str, "subject": str})
        assert set(scans["image_id"]) <= set(test["image_id"]) and len(scans) >= 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["methods"] == ["gradcam", "occlusion"] and summary["settings"]["target"] == "AD"
        assert summary["settings"]["occlusion_patch"] == 16
        for scan in scans.itertuples():
            ras = nib.load(results / "ras" / scan.subject / f"{scan.image_id}.nii.gz")
            for method in ("gradcam", "occlusion"):
                img = nib.load(out / "scans" / scan.subject / f"{scan.image_id}_{method}.nii.gz")
                assert img.shape == (SIDE,) * 3
                np.testing.assert_allclose(img.affine, nib.as_closest_canonical(ras).affine, atol=1e-4)
                assert np.isfinite(img.get_fdata()).all()
            assert (out / "scans" / scan.subject / f"{scan.image_id}.png").stat().st_size > 10_000
        shares = pd.read_csv(out / "hippocampal_share.csv", dtype={"image_id": str})
        assert len(shares) == 2 * len(scans) and (shares["hippocampus_voxels"] > 0).all()
        assert (shares["hippocampus_voxels"] < shares["brain_voxels"]).all()
        sanity = pd.read_csv(out / "sanity.csv")
        assert sanity["spearman"].dropna().between(-1, 1).all()
        profiles = pd.read_csv(out / "depth_profiles.csv")
        assert set(profiles["axis"]) == {"x", "y", "z"}
        assert (profiles.groupby(["method", "group", "axis"])["index"].count() == SIDE).all()
        # each scan's profile along any axis sums to the same total: its map's share of signed attribution
        totals = profiles.groupby(["method", "group", "axis"])["mean"].sum().unstack("axis")
        np.testing.assert_allclose(totals["x"], totals["y"], atol=1e-6)
        np.testing.assert_allclose(totals["x"], totals["z"], atol=1e-6)
        # the per-class summary is the mean of the per-scan shares; a bootstrap mean stays within their range
        share_summary = pd.read_csv(out / "hippocampal_share_summary.csv").set_index(["method", "group"])
        per_scan = shares.groupby(["method", "group"])["share"]
        np.testing.assert_allclose(share_summary["mean"], per_scan.mean().loc[share_summary.index], rtol=1e-9)
        assert (share_summary["n_scans"] == per_scan.count().loc[share_summary.index]).all()
        assert (share_summary["ci_low"] <= share_summary["ci_high"]).all()
        assert (share_summary["ci_low"] >= per_scan.min().loc[share_summary.index] - 1e-9).all()
        assert (share_summary["ci_high"] <= per_scan.max().loc[share_summary.index] + 1e-9).all()
        for name in ("hippocampal_share.png", "depth_profiles.png", "explain.html"):
            assert (out / name).stat().st_size > 500, name
