"""The hippocampus segmentation branch: truth mapping, MSD layout, partitions, transforms, the U-Net
and its losses, side assignment, training of each variant on the tiny demo (Dice on held-out scans
above a floor), and the workflow's masks and volumes (read from the shared ``demo_run``)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import load_nifti, provenance_of
from workflow_scripts.hippocampus.segmentation import (LOSSES, assign_sides, build_loss, build_unet, check_settings, dice_row,
                                           fit, keep_largest, load_segmenter, main as segmentation_main, segment,
                                           subjects_digest)
from workflow_scripts.hippocampus.segmentation_data import (check_partitions, deal_msd, demo_items, eval_transforms, mask_models,
                                                msd_items, train_transforms, truth_on_grid)
from workflow_scripts.preprocess.skullstrip import dice
from conftest import REPO, TINY, demo_options, split_options

# The settings of the tiny runs: the TINY config's U-Net (a 3D U-Net on the whole 32^3 volume).
SMALL = {"model": "unet3d", "plane": "coronal", "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
         "num_res_units": 2, "norm": "batch", "norm_groups": 8, "dropout": 0.0, "loss": "dicece", "steps": 300,
         "val_every": 50, "batch_size": 2, "lr": 3e-3, "weight_decay": 1e-5, "patch_size": [32, 32, 32],
         "pos_fraction": 0.75, "flip_p": 0.5, "rotate_p": 0.5, "rotate_deg": 10.0, "elastic_p": 0.2,
         "elastic_3d_sigma": [5.0, 8.0], "elastic_3d_magnitude": [50.0, 150.0], "elastic_2d_spacing": [16, 16],
         "elastic_2d_magnitude": [1.0, 2.0], "sw_batch_size": 4, "overlap": 0.25, "largest_component": True,
         "seed": 0, "device": "cpu", "num_workers": 0, "source": "demo", "val_share": 0.2}


def settings(**overrides) -> dict:
    return dict(SMALL, **overrides)


def save(data: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def blobs(shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like ball and two 'hippocampi' (1 at low x, 2 at high x), in array (RAS) order."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    brain = (((grid - centre[:, None, None, None]) / (np.array(shape) * 0.45)[:, None, None, None]) ** 2).sum(0) < 1
    labels = np.zeros(shape, np.uint8)
    for side, dx in ((1, -5), (2, 5)):
        c = centre + np.array([dx, 0, -2])
        labels[(((grid - c[:, None, None, None]) / np.array([2, 4, 2])[:, None, None, None]) ** 2).sum(0) < 1] = side
    return brain, labels


# ----------------------------------------------------------------------------- data


def test_truth_on_grid_puts_each_label_where_it_lies_in_the_world(tmp_path):
    """Native labels on a 1 mm LPS-ordered grid mapped onto a 2 mm RAS grid: same world positions,
    the reference's grid and affine, uint8 labels only."""
    native = np.zeros((40, 40, 40), np.uint8)
    native[5:12, 15:25, 15:25] = 1    # array x low = world x high (L->R flipped below): right of the world
    native[28:35, 15:25, 15:25] = 2
    lps_affine = np.array([[-1.0, 0, 0, 20], [0, -1, 0, 20], [0, 0, 1, -20], [0, 0, 0, 1]])
    reference = nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]) @
                                np.array([[1.0, 0, 0, -10], [0, 1, 0, -10], [0, 0, 1, -10], [0, 0, 0, 1]]))
    mapped = truth_on_grid(nib.Nifti1Image(native, lps_affine), reference)
    data = np.asanyarray(mapped.dataobj)
    assert data.dtype == np.uint8 and data.shape == (20, 20, 20)
    np.testing.assert_allclose(mapped.affine, reference.affine)
    assert set(np.unique(data)) == {0, 1, 2}
    world_x = {k: (reference.affine @ np.r_[np.argwhere(data == k).mean(axis=0), 1])[0] for k in (1, 2)}
    native_x = {k: (lps_affine @ np.r_[np.argwhere(native == k).mean(axis=0), 1])[0] for k in (1, 2)}
    for k in (1, 2):
        assert abs(world_x[k] - native_x[k]) < 1.0
        assert abs((data == k).sum() * 8 - (native == k).sum()) / (native == k).sum() < 0.35
    assert provenance_of(mapped).endswith("truth")


def test_msd_folder_missing_or_incomplete_is_a_clear_error(tmp_path):
    with pytest.raises(cli.PipelineError, match=r"does not exist.*Task04_Hippocampus.*never downloads"):
        msd_items(tmp_path / "nowhere")
    with pytest.raises(cli.PipelineError, match="no dataset.json"):
        msd_items(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Anterior",
                                                                  "2": "Posterior"},
                                                       "training": [{"image": "./imagesTr/h_001.nii.gz",
                                                                     "label": "./labelsTr/h_001.nii.gz"}]}))
    with pytest.raises(cli.PipelineError, match=r"2 file\(s\) listed in .*dataset.json are missing"):
        msd_items(tmp_path)


def test_msd_images_are_dealt_subject_by_subject_with_the_val_share():
    items = [{"subject": f"hippocampus_{i:03d}", "image_id": f"hippocampus_{i:03d}", "partition": ""}
             for i in range(10)]
    dealt = deal_msd(items, 0.2)
    parts = pd.Series([d["partition"] for d in dealt])
    assert parts.value_counts().to_dict() == {"train": 8, "val": 2}
    assert deal_msd(items, 0.2) == dealt  # the same every time
    with pytest.raises(cli.PipelineError, match="val_share"):
        deal_msd(items, 1.0)


def test_partitions_must_hold_training_and_validation_scans_and_never_share_a_subject():
    item = lambda s, p: {"subject": s, "partition": p}  # noqa: E731
    assert {k: len(v) for k, v in check_partitions([item("a", "train"), item("b", "val")]).items()} == \
        {"train": 1, "val": 1, "test": 0, "held_out": 0}
    with pytest.raises(cli.PipelineError, match="no val scans"):
        check_partitions([item("a", "train"), item("b", "test")])
    with pytest.raises(cli.PipelineError, match="a sit in two"):
        check_partitions([item("a", "train"), item("a", "val")])
    with pytest.raises(cli.PipelineError, match="c sit in two"):
        check_partitions([item("a", "train"), item("b", "val"), item("c", "val"), item("c", "held_out")])


def manifest(*scans: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"path": f"{s}/{i}.nii.gz", "subject": s, "image_id": i, "group": "CN", "label": 0}
                         for s, i in scans])


def test_the_subjects_hash_names_the_set_of_subjects_per_partition():
    """A subject with several scans counts once and the order does not matter; moving a subject from
    training to validation, or swapping one, changes the hash."""
    key = subjects_digest({"train": ["a", "b", "b"], "val": ["c"]})
    assert key == subjects_digest({"train": ["b", "a"], "val": ["c", "c"]})
    assert key != subjects_digest({"train": ["a"], "val": ["b", "c"]})
    assert key != subjects_digest({"train": ["a", "d"], "val": ["c"]})


def test_each_scan_is_segmented_by_the_unet_that_holds_its_subject_out():
    """Outer-fold scans go to their fold's U-Net; test scans and scans in no partition to the main one;
    a scan in two outer folds, a test scan in a fold, or a train/val scan in none stops the run."""
    scans = pd.DataFrame({"image_id": ["I1", "I2", "I3", "I4", "I5"], "subject": ["a", "b", "c", "d", "e"]})
    main = {"train": manifest(("a", "I1"), ("e", "I5")), "val": manifest(("b", "I2")), "test": manifest(("c", "I3"))}
    folds = [manifest(("a", "I1"), ("b", "I2")), manifest(("e", "I5"))]
    table = mask_models(scans, main, folds).set_index("image_id")
    assert table["model"].to_dict() == {"I1": "fold0", "I2": "fold0", "I3": "main", "I4": "main", "I5": "fold1"}
    assert table["role"].to_dict() == {"I1": "held_out", "I2": "held_out", "I3": "test", "I4": "unpartitioned",
                                       "I5": "held_out"}
    with pytest.raises(cli.PipelineError, match=r"I1 sit in the held_out.csv of two CV folds \(0 and 1\)"):
        mask_models(scans, main, [folds[0], manifest(("a", "I1"), ("e", "I5"))])
    with pytest.raises(cli.PipelineError, match="test scan.* I3"):
        mask_models(scans, main, [folds[0], manifest(("e", "I5"), ("c", "I3"))])
    with pytest.raises(cli.PipelineError, match="I5 are in no CV fold"):
        mask_models(scans, main, folds[:1])


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    """One image with labels 1/2 on a 24^3 RAS grid, and its brain mask."""
    folder = tmp_path_factory.mktemp("synthetic_pair")
    brain, labels = blobs()
    i, j, _ = np.indices(brain.shape)
    image = (brain * (0.5 + 0.02 * i + 0.01 * j) - 0.3 * (labels > 0)).astype(np.float32)  # no mirror symmetry
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return {"image": save(image, affine, folder / "img.nii.gz"), "label": save(labels, affine, folder / "lab.nii.gz"),
            "brain_mask": save(brain.astype(np.uint8), affine, folder / "img_mask.nii.gz"),
            "labels": labels, "brain": brain}


@pytest.mark.parametrize("model,plane,shape", [("unet3d", "coronal", (1, 16, 16, 16)),
                                               ("unet2d", "coronal", (1, 16, 16)),
                                               ("unet2d", "sagittal", (1, 16, 16))])
def test_training_patches_are_centred_on_hippocampus_and_binary(synthetic_pair, model, plane, shape):
    """pos_fraction 1: every patch holds hippocampus (ROI cropping); labels become hippocampus vs background."""
    transform = train_transforms(settings(model=model, plane=plane, patch_size=[16, 16, 16], pos_fraction=1.0))
    transform.set_random_state(seed=3)
    for _ in range(5):
        out = transform({"image": synthetic_pair["image"], "label": synthetic_pair["label"]})[0]
        assert tuple(out["image"].shape) == shape and tuple(out["label"].shape) == shape
        assert set(torch.unique(out["label"]).tolist()) == {0, 1}
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0


def test_the_flip_is_a_left_right_mirror(synthetic_pair):
    """With only the flip on, a whole-volume 3D patch comes back mirrored along RAS x."""
    plain = train_transforms(settings(patch_size=[24, 24, 24], flip_p=0.0, rotate_p=0.0, elastic_p=0.0))
    flip = train_transforms(settings(patch_size=[24, 24, 24], flip_p=1.0, rotate_p=0.0, elastic_p=0.0))
    pair = {"image": synthetic_pair["image"], "label": synthetic_pair["label"]}
    a, b = plain(pair)[0]["image"][0].numpy(), flip(pair)[0]["image"][0].numpy()
    np.testing.assert_allclose(b, a[::-1], atol=1e-6)
    assert not np.allclose(b, a[:, ::-1])


# ----------------------------------------------------------------------------- model, loss, inference


@pytest.mark.parametrize("change,named", [({"channels": [8, 16, 32]}, "one entry more"),
                                          ({"patch_size": [32, 30, 32]}, "divisible by 8"),
                                          ({"norm": "group", "norm_groups": 3}, "norm_groups=3"),
                                          ({"plane": "oblique"}, "plane"),
                                          ({"loss": "l2"}, "loss")])
def test_bad_settings_are_named(change, named):
    with pytest.raises(cli.PipelineError, match=named):
        check_settings(settings(**change))


def test_a_2d_patch_need_not_divide_along_its_slice_axis():
    check_settings(settings(model="unet2d", plane="axial", patch_size=[32, 32, 1]))


@pytest.mark.parametrize("model,norm", [("unet3d", "group"), ("unet2d", "instance"), ("unet2d", "batch")])
def test_unet_variants_give_two_class_maps_of_the_input_size(model, norm):
    net = build_unet(settings(model=model, norm=norm)).eval()
    x = torch.rand((2, 1) + ((32, 32, 32) if model == "unet3d" else (32, 32)))
    assert net(x).shape == (2, 2) + tuple(x.shape[2:])
    groups = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    if norm == "group":  # 8 groups wherever the channels allow, fewer only on MONAI's 2-channel top layer
        assert groups and all(m.num_channels % m.num_groups == 0 for m in groups)
        assert {m.num_groups for m in groups} == {8, 2}
    else:
        assert not groups


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_prefers_the_true_labels(name):
    label = torch.zeros((2, 1, 8, 8, 8), dtype=torch.long)
    label[:, :, 2:5, 2:5, 2:5] = 1
    right = torch.cat([(label == 0).float(), (label == 1).float()], dim=1) * 8 - 4
    loss = build_loss(name)
    assert float(loss(right, label)) < 0.5 * float(loss(-right, label))


def test_sides_split_at_the_brain_midline_not_the_array_centre():
    brain = np.zeros((20, 10, 10), bool)
    brain[8:20] = True                      # brain midline at x = 13.5, array centre at 9.5
    mask = np.zeros_like(brain)
    mask[10:12, 4:6, 4:6] = True            # left of the brain's midline, right of the array centre
    mask[16:18, 4:6, 4:6] = True
    sides = assign_sides(mask, brain)
    assert set(np.unique(sides[10:12])) == {0, 1} and set(np.unique(sides[16:18])) == {0, 2}
    assert (sides > 0).sum() == mask.sum()
    with pytest.raises(cli.PipelineError, match="brain mask is empty"):
        assign_sides(mask, np.zeros_like(brain))


def test_the_largest_component_of_each_side_is_kept():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[8, 8, 8] = 1
    labels[6:10, 1:3, 1:3] = 2
    labels[1, 10, 10] = 2
    clean = keep_largest(labels, (1, 2))
    assert (clean == 1).sum() == 27 and (clean == 2).sum() == 16 and clean[8, 8, 8] == 0 and clean[1, 10, 10] == 0


def test_dice_rows_score_each_side():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[1:3, 1:3, 1:3], truth[6:8, 1:3, 1:3] = 1, 2
    predicted = truth.copy()
    predicted[6:8, 1:3, 1:2] = 0  # half of the right one missed
    row = dice_row(predicted, truth, sided=True)
    assert row["dice_left"] == 1.0 and row["dice_right"] == pytest.approx(2 * 4 / (8 + 4))
    assert row["dice"] == pytest.approx((1 + 2 / 3) / 2)
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0))
    assert dice_row(swapped, truth, sided=True)["dice"] == 0 and dice_row(swapped, truth, sided=False)["dice"] == 1


# ----------------------------------------------------------------------------- training on a tiny demo


def location_prior_dice(train: pd.DataFrame, held_out: pd.DataFrame, truth_dir) -> float:
    """Mean held-out Dice of the trivial 'atlas' predictor: each voxel gets the side most training
    scans have there (crop and zoom align the brains, so position alone says a lot)."""
    read = lambda r: np.asanyarray(load_nifti(Path(truth_dir) / r.subject / f"{r.image_id}.nii.gz").dataobj)  # noqa
    stack = np.stack([read(r) for r in train.itertuples()])
    prior = np.zeros(stack.shape[1:], np.uint8)
    for side in (1, 2):
        prior[(stack == side).mean(axis=0) >= 0.5] = side
    return float(np.mean([dice_row(prior, read(r), sided=True)["dice"] for r in held_out.itertuples()]))


def held_out_dice(table: pd.DataFrame) -> float:
    return float(table.loc[table["partition"] != "train", "dice"].mean())


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A tiny demo study for training: 20 subjects (10 AD, 10 CN, 3 mm voxels) from the demo generator,
    brought to the model's 32^3 RAS grid with the pipeline's own functions (dicom2nifti conversion,
    brain crop and zoom, RAS), the demo's true brain mask standing in for skull stripping, N4 and the
    1 mm resampling left out (about 20 s in all, against minutes through the workflow); true labels
    mapped with ``truth_on_grid``; a subject-level split by the project's split module (10 train,
    2 val, 8 test subjects)."""
    from nibabel.processing import resample_from_to

    from workflow_scripts.preprocess.convert import convert_series
    from workflow_scripts.preprocess.crop import crop_and_zoom
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.data.demo import generate_collection
    from workflow_scripts.data.ingest import find_image_dir
    from workflow_scripts.common.nifti_io import clean_image, save_nifti_atomic
    from workflow_scripts.preprocess.reorient import to_ras
    from workflow_scripts.learning.split import make_split

    root = tmp_path_factory.mktemp("segmentation_study")
    crop = resolve("preprocess.crop")  # the schema's crop settings (defaults)
    generate_collection(root, **demo_options(n_subjects=20, seed=5, visits=1, voxel_scale=3.0, n_mci=0,
                                             distractors=False))
    rows = []
    for row in pd.read_csv(root / "collection.csv", dtype=str).itertuples():
        subject, image_id = row.Subject, row._1
        image = convert_series(find_image_dir(root, subject, image_id))
        truth = root / "truth" / subject
        brain = np.asanyarray(resample_from_to(load_nifti(truth / f"{image_id}_brainmask.nii.gz"), image,
                                               order=0).dataobj) > 0
        stripped = clean_image(np.asarray(image.dataobj, np.float32) * brain, image.affine, "dicom2nifti>truthmask")
        cropped, mask = crop_and_zoom(stripped, clean_image(brain, image.affine, "truthmask", np.uint8),
                                      margin=crop.margin, target_shape=(32, 32, 32), order=crop.zoom_order,
                                      keep_aspect=crop.keep_aspect)
        ras = to_ras(cropped)
        save_nifti_atomic(ras, root / "ras" / subject / f"{image_id}.nii.gz")
        save_nifti_atomic(to_ras(mask), root / "ras" / subject / f"{image_id}_mask.nii.gz")
        save_nifti_atomic(truth_on_grid(load_nifti(truth / f"{image_id}_hippocampus.nii.gz"), ras),
                          root / "truth_grid" / subject / f"{image_id}.nii.gz")
        rows.append({"image_id": image_id, "subject": subject, "group": row.Group})
    split = make_split(pd.DataFrame(rows), **split_options(
        path_of=str(root / "ras" / "{subject}" / "{image_id}.nii.gz"), ratios=(0.5, 0.1, 0.4), folds=2))
    manifests = split.manifests
    held_out = pd.concat([manifests["val"], manifests["test"]])
    return {"root": root, "manifests": manifests, "truth_dir": root / "truth_grid",
            "items": demo_items(manifests, root / "truth_grid"),
            "prior": location_prior_dice(manifests["train"], held_out, root / "truth_grid")}


# The study's 1,000 steps: at 32^3 about a minute on 2 idle cores.
STUDY_STEPS = {"steps": 1000, "val_every": 250}


@pytest.fixture(scope="module")
def study_3d(study, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("study_unet3d")
    summary = fit(settings(**STUDY_STEPS), study["items"], out)
    return {"out": out, "summary": summary,
            "dice": pd.read_csv(out / "dice.tsv", sep="\t", dtype={"image_id": str, "subject": str})}


def test_unet3d_beats_the_trivial_predictors_on_held_out_subjects(study, study_3d):
    """The Dice floor of every demo variant, on held-out scans (validation and test subjects): an
    empty mask scores 0 and labelling every voxel 0.003 (the hippocampi are about 0.15% of a 32^3
    volume); the strongest trivial predictor, the location prior of the training labels
    (``location_prior_dice``, computed here, not written in), scored about 0.4 on the demo, since
    crop and zoom align the brains. A U-Net that learnt the hippocampus must beat that prior and
    reach 0.5."""
    table = study_3d["dice"]
    assert set(table["partition"]) == {"train", "val", "test"}
    score = held_out_dice(table)
    assert score > max(0.5, study["prior"]), (score, study["prior"])
    assert study_3d["summary"]["best_volume"]["partition"] in ("val", "test")
    history = json.loads((study_3d["out"] / "history.json").read_text())
    assert [row["step"] for row in history] == [250, 500, 750, 1000]
    best = torch.load(study_3d["out"] / "best.pt", weights_only=True)
    assert best["val_dice"] == max(row["val_dice"] for row in history)


def test_held_out_volumes_follow_the_planted_volumes_and_atrophy(study, study_3d):
    """Volumes of the U-Net's masks on the 10 held-out subjects against the demo's planted volumes
    (truth/volumes.tsv): correlated over their 20 hippocampi (the masks' own truth on this grid
    correlates about 0.8 with the planted volumes: that is the ceiling at 32^3), and smaller in AD
    than in CN, raw and divided by the brain mask's volume (the demo plants a 25% loss in AD)."""
    from workflow_scripts.hippocampus.volumetry import label_volumes, mask_volume

    model, trained = load_segmenter(study_3d["out"] / "best.pt")
    planted = pd.read_csv(study["root"] / "truth" / "volumes.tsv", sep="\t", dtype={"image_id": str})
    held_out = pd.concat([study["manifests"]["val"], study["manifests"]["test"]])
    rows = []
    for row in held_out.itertuples():
        image = eval_transforms(with_label=False)({"image": row.path})["image"]
        brain_img = load_nifti(row.path.replace(".nii.gz", "_mask.nii.gz"))
        labels = segment(model, image, trained, torch.device("cpu"), np.asanyarray(brain_img.dataobj) > 0)
        left, right = label_volumes(nib.Nifti1Image(labels, brain_img.affine))
        rows.append({"image_id": row.image_id, "group": row.group, "left": left, "right": right,
                     "icv": mask_volume(brain_img)})
    both = pd.DataFrame(rows).merge(planted, on="image_id", suffixes=("", "_planted"))
    r, p = stats.pearsonr(np.r_[both["left"], both["right"]],
                          np.r_[both["hippocampus_left_mm3"], both["hippocampus_right_mm3"]])
    assert r > 0.4 and p < 0.05, (r, p)
    total = both["left"] + both["right"]
    assert total[both["group"] == "AD"].mean() < total[both["group"] == "CN"].mean()
    share = total / both["icv"]
    assert share[both["group"] == "AD"].mean() < share[both["group"] == "CN"].mean()


def test_the_2d_slice_model_trains_on_the_demo(study, tmp_path):
    """The study's own model (2D, coronal slices) against the same floor as the 3D U-Net above."""
    summary = fit(settings(model="unet2d", plane="coronal", batch_size=8, **STUDY_STEPS), study["items"], tmp_path)
    table = pd.read_csv(tmp_path / "dice.tsv", sep="\t")
    score = held_out_dice(table)
    assert score > max(0.5, study["prior"]), (score, study["prior"])
    assert torch.load(tmp_path / "best.pt", weights_only=True)["settings"]["model"] == "unet2d"
    assert summary["speed"]["train_steps_per_s"] > 0


def test_msd_source_trains_from_a_decathlon_layout_and_sides_come_from_the_midline(study, tmp_path):
    """A Task04-shaped folder built from the demo study (one 16^3 crop around one hippocampus per scan,
    stored LAS to prove the RAS reorientation, labels 1 anterior / 2 posterior) is read with MONAI's
    loaders and trained as hippocampus vs background; applied to a whole RAS scan, left and right
    come from the brain mask's midline. The floor is lower than the demo's: each crop holds about 30
    hippocampus voxels of 4096, so labelling every voxel scores 0.015, and 0.3 needs a learnt shape."""
    root = tmp_path / "Task04_Hippocampus"
    (root / "imagesTr").mkdir(parents=True), (root / "labelsTr").mkdir()
    entries = []
    scans = pd.concat(study["manifests"].values())
    for n, row in enumerate(scans.itertuples()):
        image = load_nifti(row.path)
        truth = np.asanyarray(load_nifti(study["truth_dir"] / row.subject / f"{row.image_id}.nii.gz").dataobj)
        side = 1 + n % 2
        centre = np.rint(np.argwhere(truth == side).mean(axis=0)).astype(int)
        lo = np.clip(centre - 8, 0, np.array(truth.shape) - 16)
        box = tuple(slice(a, a + 16) for a in lo)
        crop = truth[box] == side
        labels = np.where(crop, np.where(np.indices(crop.shape)[1] < centre[1] - lo[1], 2, 1), 0).astype(np.uint8)
        flip = np.diag([-1.0, 1, 1, 1])
        flip[0, 3] = 15  # LAS: the x axis reversed, the world unchanged
        affine = image.affine @ np.vstack([np.column_stack([np.eye(3), lo]), [0, 0, 0, 1]]) @ flip
        name = f"hippocampus_{n + 1:03d}.nii.gz"
        save(np.asanyarray(image.dataobj)[box][::-1].astype(np.float32), affine, root / "imagesTr" / name)
        save(labels[::-1], affine, root / "labelsTr" / name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"name": "Hippocampus", "labels": {"0": "background",
                                                   "1": "Anterior", "2": "Posterior"}, "training": entries}))
    items = deal_msd(msd_items(root), 0.2)
    loaded = eval_transforms()({"image": items[0]["image"], "label": items[0]["label"]})
    assert loaded["image"].affine[0, 0] > 0  # read back as RAS+
    small = settings(source="msd", channels=[8, 16, 32], strides=[2, 2], patch_size=[16, 16, 16], steps=300,
                     val_every=100, norm="group", loss="dicefocal")
    summary = fit(small, items, tmp_path / "model")
    table = pd.read_csv(tmp_path / "model" / "dice.tsv", sep="\t")
    assert table["dice_left"].isna().all()  # one hippocampus per crop: no sides
    assert held_out_dice(table) > 0.3, table
    assert summary["partitions"]["val"]["scans"] == 4 and summary["partitions"]["test"]["scans"] == 0

    model, trained = load_segmenter(tmp_path / "model" / "best.pt")
    row = scans.iloc[0]
    image = eval_transforms(with_label=False)({"image": row["path"]})["image"]
    brain = np.asanyarray(load_nifti(row["path"].replace(".nii.gz", "_mask.nii.gz")).dataobj) > 0
    labels = segment(model, image, trained, torch.device("cpu"), brain)
    midline = np.nonzero(brain)[0].mean()
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert (np.nonzero(labels == 1)[0] < midline).all() and (np.nonzero(labels == 2)[0] >= midline).all()


# ----------------------------------------------------------------------------- the workflow's outputs


def test_workflow_unet3d_beats_the_location_prior(demo_run):
    """The workflow's own U-Net (TINY: 300 steps on the 2 training scans of the shared tiny run)
    against the floor above, on its 4 held-out scans."""
    results = demo_run / "results"
    manifests = {p: pd.read_csv(results / "splits" / f"{p}.csv", dtype=str) for p in ("train", "val", "test")}
    prior = location_prior_dice(manifests["train"], pd.concat([manifests["val"], manifests["test"]]),
                                results / "segmentation" / "truth")
    table = pd.read_csv(results / "segmentation" / "dice.tsv", sep="\t", dtype={"image_id": str})
    assert held_out_dice(table) > max(0.5, prior), (held_out_dice(table), prior)


def test_one_mask_per_scan_on_the_model_input_grid(demo_run):
    results = demo_run / "results"
    scans = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    both_sides = 0
    for row in scans.itertuples():
        mask = load_nifti(results / "hippocampus" / row.subject / f"{row.image_id}.nii.gz")
        ras = load_nifti(results / "ras" / row.subject / f"{row.image_id}.nii.gz")
        data = np.asanyarray(mask.dataobj)
        assert data.dtype == np.uint8 and mask.shape == ras.shape
        np.testing.assert_allclose(mask.affine, ras.affine, atol=1e-5)
        labels = set(np.unique(data).tolist())
        assert labels <= {0, 1, 2}
        if labels == {0, 1, 2}:
            both_sides += 1
            x = {side: (mask.affine @ np.r_[np.argwhere(data == side).mean(axis=0), 1])[0] for side in (1, 2)}
            assert x[1] < x[2]  # left hippocampus at smaller RAS x than the right
        assert provenance_of(mask).endswith(">ras>unet3d")
    # the tiny fold U-Nets (300 steps on 2 training scans) may miss a scan's hippocampi; most scans have both
    assert both_sides >= 0.8 * len(scans), (both_sides, len(scans))


def test_the_dice_table_is_the_dice_of_the_masks_volumetry_reads(demo_run):
    """dice.tsv is computed with the inference rule's own function: each mask has the Dice that the
    dice.tsv of the U-Net that made it (its sidecar's run folder) gives its scan."""
    results = demo_run / "results"
    rows = []
    for sidecar in (results / "hippocampus").glob("*/*.json"):
        run = demo_run / json.loads(sidecar.read_text())["model_dir"]
        table = pd.read_csv(run / "dice.tsv", sep="\t", dtype={"image_id": str, "subject": str})
        rows.append(table[table["image_id"] == sidecar.stem])  # none for a scan in no partition
    table = pd.concat(rows)
    assert len(table) and set(table["partition"]) <= {"test", "held_out"}  # never a scan its U-Net learnt from
    for row in table.itertuples():
        predicted = np.asanyarray(load_nifti(results / "hippocampus" / row.subject / f"{row.image_id}.nii.gz").dataobj)
        truth = np.asanyarray(load_nifti(results / "segmentation" / "truth" / row.subject /
                                         f"{row.image_id}.nii.gz").dataobj)
        assert dice(predicted == 1, truth == 1) == pytest.approx(row.dice_left, abs=1e-4)
        assert dice(predicted == 2, truth == 2) == pytest.approx(row.dice_right, abs=1e-4)


def test_workflow_masks_are_cross_fitted(demo_run):
    """In the workflow's own run: each scan of fold k's held_out.csv has a mask from fold k's U-Net and each
    test scan one from the main U-Net, neither trained nor selected on its subject (the sidecar's U-Net is
    the summary's, by the subjects' hash); fold k's U-Net was trained on the subjects of its fold's
    train.csv, selected on its val.csv, and scored held_out.csv only."""
    results = demo_run / "results"
    evaluated = {"results/segmentation": pd.read_csv(results / "splits" / "test.csv", dtype=str)}
    for fold in range(TINY["cv"]["folds"]):
        folder = results / "splits" / "cv" / f"fold{fold}"
        parts = {name: pd.read_csv(folder / f"{name}.csv", dtype=str) for name in ("train", "val", "held_out")}
        run = f"results/segmentation/cv/fold{fold}"
        seen = torch.load(demo_run / run / "best.pt", weights_only=True)["subjects"]
        assert seen == {name: sorted(set(parts[name]["subject"])) for name in ("train", "val")}
        summary = json.loads((demo_run / run / "summary.json").read_text())
        assert {p: set(v["subjects"]) for p, v in summary["partitions"].items() if v["scans"]} == \
            {name: set(table["subject"]) for name, table in parts.items()}
        dice = pd.read_csv(demo_run / run / "dice.tsv", sep="\t", dtype=str)
        for name, table in parts.items():
            assert sorted(dice.loc[dice["partition"] == name, "image_id"]) == sorted(table["image_id"])
        evaluated[run] = parts["held_out"]
    checked = set()
    for run, table in evaluated.items():
        summary = json.loads((demo_run / run / "summary.json").read_text())
        for row in table.itertuples():
            sidecar = json.loads((results / "hippocampus" / row.subject / f"{row.image_id}.json").read_text())
            assert sidecar["model_dir"] == run and sidecar["subject"] == row.subject
            assert row.subject not in sidecar["train_subjects"] + sidecar["val_subjects"]
            assert sidecar["subjects_sha256"] == summary["subjects_sha256"]
            checked.add(row.image_id)
    partitioned = pd.concat([pd.read_csv(results / "splits" / f"{p}.csv", dtype=str) for p in ("train", "val", "test")])
    assert set(partitioned["image_id"]) <= checked  # every scan of the split is segmented out of sample


def test_predict_refuses_a_subject_its_unet_trained_or_selected_on(demo_run, tmp_path):
    """The mask job's guard: the workflow's main U-Net asked to segment one of its training or validation
    scans stops, names the subject, and writes neither mask nor sidecar."""
    results = demo_run / "results"
    for partition in ("train", "val"):
        row = pd.read_csv(results / "splits" / f"{partition}.csv", dtype=str).iloc[0]
        image = results / "ras" / row["subject"] / f"{row['image_id']}.nii.gz"
        argv = ["predict", "--checkpoint", str(results / "segmentation" / "best.pt"), "--image", str(image),
                "--brain-mask", str(image).replace(".nii.gz", "_mask.nii.gz"), "--subject", row["subject"],
                "--output", str(tmp_path / "mask.nii.gz"), "--sidecar", str(tmp_path / "m.json")]
        with pytest.raises(cli.PipelineError, match=f"subject {row['subject']} is among the {partition} subjects"):
            segmentation_main(argv)
        assert not (tmp_path / "mask.nii.gz").exists() and not (tmp_path / "m.json").exists()


def test_training_summary_names_partitions_best_and_worst_and_speed(demo_run):
    results = demo_run / "results"
    summary = json.loads((results / "segmentation" / "summary.json").read_text())
    split = {p: set(pd.read_csv(results / "splits" / f"{p}.csv", dtype=str)["subject"]) for p in ("train", "val", "test")}
    assert {p: set(v["subjects"]) for p, v in summary["partitions"].items() if v["scans"]} == split
    assert summary["best_volume"]["dice"] >= summary["worst_volume"]["dice"]
    assert {summary["best_volume"]["partition"], summary["worst_volume"]["partition"]} <= {"val", "test"}
    speed = summary["speed"]
    assert speed["train_steps_per_s"] > 0 and speed["inference_s_per_scan"] > 0
    assert speed["study_steps_per_hour_t4"] == 1000
    assert summary["settings"]["steps"] == TINY["segmentation"]["steps"]
    figure = results / "segmentation" / "best_worst.png"
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"
    assert (results / "benchmarks" / "segmentation" / "train.tsv").is_file()
    assert len(list((results / "benchmarks" / "hippocampus_unet").glob("*/*.tsv"))) == len(
        pd.read_csv(results / "usable.tsv", sep="\t"))


def test_the_unet_volumes_table_covers_every_scan(demo_run):
    results = demo_run / "results"
    volumes = pd.read_csv(results / "volumetry" / "unet" / "volumes.tsv", sep="\t", dtype={"image_id": str})
    scans = pd.read_csv(results / "usable.tsv", sep="\t", dtype=str)
    assert sorted(volumes["image_id"]) == sorted(scans["image_id"])
    sides = volumes[["left_mm3", "right_mm3"]]
    assert (sides >= 0).all().all()
    assert (sides > 0).all(axis=1).mean() >= 0.8  # as in test_one_mask_per_scan_on_the_model_input_grid


def test_the_comparison_shows_both_volumetry_baselines(demo_run):
    table = pd.read_csv(demo_run / "results" / "comparison.csv")
    assert {"hippocampal_volumetry", "hippocampal_volumetry_unet"} <= set(table["experiment"])


# ----------------------------------------------------------------------------- command line and benchmark


def test_predict_refuses_an_image_that_is_not_ras(demo_run, tmp_path):
    results = demo_run / "results"
    row = pd.read_csv(results / "splits" / "test.csv", dtype=str).iloc[0]
    ras = load_nifti(demo_run / row["path"])
    flipped = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(ras.dataobj)[::-1].copy(),
                             ras.affine @ np.array([[-1.0, 0, 0, ras.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                                    [0, 0, 0, 1]])), flipped)
    argv = ["predict", "--checkpoint", str(results / "segmentation" / "best.pt"), "--image", str(flipped),
            "--brain-mask", str(demo_run / row["path"].replace(".nii.gz", "_mask.nii.gz")),
            "--subject", row["subject"], "--output", str(tmp_path / "out.nii.gz"),
            "--sidecar", str(tmp_path / "out.json")]
    assert cli.run(segmentation_main, argv) == 1
    assert not (tmp_path / "out.nii.gz").exists()


def test_speed_benchmark_reports_steps_and_inference_per_model(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "segmentation_speed.py"), "--size", "32",
                    "--patch-size", "32", "32", "32", "--steps", "2", "--warmup", "1", "--scans", "2",
                    "--infer-scans", "1", "--json", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["unet2d", "unet3d"]
    for r in rows:
        assert r["train_steps_per_s"] > 0 and r["inference_s_per_scan"] > 0
        assert math.isclose(r["vs_study_t4"], r["train_steps_per_hour"] / 1000, rel_tol=0.01)
