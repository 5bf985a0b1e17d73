"""Each preprocessing stage's function on synthetic volumes with known answers."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from workflow_scripts.preprocess.crop import bounding_box, crop_and_zoom, zoom_affine
from workflow_scripts.preprocess.n4 import n4_correct
from workflow_scripts.common.nifti_io import clean_image, provenance_of
from workflow_scripts.common.settings import resolve
from workflow_scripts.preprocess.reorient import to_ras
from workflow_scripts.preprocess.resample import resampled_grid, resample_to_spacing

# the schema's preprocessing settings (defaults), for the calls that do not set their own
CROP = resolve("preprocess.crop")
RESAMPLE = {"spacing": resolve("preprocess.resample").spacing,
            "interpolation": resolve("preprocess.resample").interpolation}
N4 = {key: resolve("preprocess.n4")[key] for key in ("shrink_factor", "iterations", "tolerance", "spline_param")}


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def oblique_affine(zooms, angles=(12, -7, 25), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def world_centroid(img) -> np.ndarray:
    coords = np.argwhere(np.asanyarray(img.dataobj) > 0)
    return (img.affine @ np.r_[coords.mean(axis=0), 1.0])[:3]


# --- crop -------------------------------------------------------------------------------

@pytest.mark.parametrize("margin", [0, 3, 5])
def test_crop_keeps_every_brain_voxel_and_leaves_the_margin(margin):
    mask = ellipsoid((60, 70, 50), (30, 40, 22), (12, 15, 9))
    data = np.where(mask, 100.0, 0.0).astype(np.float32)
    img, mask_img = clean_image(data, np.eye(4), "t"), clean_image(mask.astype(np.uint8), np.eye(4), "t")
    box_shape = tuple(int(s) for s in np.ptp(np.argwhere(mask), axis=0) + 1 + 2 * margin)
    # zoom to the box's own shape: a pure crop, so voxels can be compared one to one
    cropped, cropped_mask = crop_and_zoom(img, mask_img, margin=margin, target_shape=box_shape, order=0,
                                          keep_aspect=CROP.keep_aspect)
    m = np.asanyarray(cropped_mask.dataobj) > 0
    assert m.sum() == mask.sum()  # every brain voxel kept
    coords = np.argwhere(m)
    assert (coords.min(axis=0) == margin).all()
    assert (np.array(m.shape) - 1 - coords.max(axis=0) == margin).all()
    # and they sit at the same place in the world
    np.testing.assert_allclose(world_centroid(cropped_mask), world_centroid(mask_img), atol=1e-6)


def test_crop_pads_when_the_brain_touches_the_edge():
    mask = np.zeros((40, 40, 40), bool)
    mask[0:10, 5:20, 30:40] = True  # touches three faces
    start, stop = bounding_box(mask, margin=3, cube=CROP.keep_aspect)
    assert tuple(start) == (-3, 2, 27) and tuple(stop) == (13, 23, 43)
    img = clean_image(mask.astype(np.float32), np.eye(4), "t")
    _, cropped_mask = crop_and_zoom(img, clean_image(mask.astype(np.uint8), np.eye(4), "t"), margin=3,
                                    target_shape=(16, 21, 16), order=0, keep_aspect=CROP.keep_aspect)
    m = np.asanyarray(cropped_mask.dataobj) > 0
    assert m.sum() == mask.sum()
    coords = np.argwhere(m)
    assert (coords.min(axis=0) == 3).all() and (np.array(m.shape) - 1 - coords.max(axis=0) == 3).all()


@pytest.mark.parametrize("target", [(128, 128, 128), (64, 48, 32), (33, 33, 33)])
def test_zoom_hits_the_target_shape_and_keeps_the_brain_in_place(target):
    mask = ellipsoid((90, 110, 80), (45, 50, 40), (30, 40, 28))
    img = clean_image(np.where(mask, 50.0, 0).astype(np.float32), oblique_affine((1.0, 1.0, 1.0)), "t")
    mask_img = clean_image(mask.astype(np.uint8), img.affine, "t")
    zoomed, zoomed_mask = crop_and_zoom(img, mask_img, margin=CROP.margin, target_shape=target,
                                        order=CROP.zoom_order, keep_aspect=CROP.keep_aspect)
    assert zoomed.shape == target and zoomed_mask.shape == target
    np.testing.assert_allclose(world_centroid(zoomed_mask), world_centroid(mask_img), atol=1.0)
    # brain volume in mm^3 is preserved by the affine within a few per cent
    vol = lambda im: (np.asanyarray(im.dataobj) > 0).sum() * abs(np.linalg.det(im.affine[:3, :3]))
    assert vol(zoomed_mask) == pytest.approx(vol(mask_img), rel=0.05)
    assert np.asanyarray(zoomed.dataobj).min() >= 0


def test_keep_aspect_gives_isotropic_voxels():
    mask = ellipsoid((90, 110, 80), (45, 55, 40), (20, 40, 25))
    mask_img = clean_image(mask.astype(np.uint8), np.eye(4), "t")
    zoomed, _ = crop_and_zoom(clean_image(mask.astype(np.float32), np.eye(4), "t"), mask_img,
                              margin=CROP.margin, target_shape=(64, 64, 64), order=CROP.zoom_order,
                              keep_aspect=True)
    zooms = zoomed.header.get_zooms()
    assert max(zooms) - min(zooms) < 1e-6


def test_zoom_affine_maps_box_corners_consistently():
    # a 10-voxel box zoomed to 5: new voxel 0 centre lies at old 0.5, new voxel 4 at old 8.5
    affine = zoom_affine(np.eye(4), np.array([2, 0, 0]), (10, 10, 10), (5, 5, 5))
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [2.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(affine @ [4, 4, 4, 1], [10.5, 8.5, 8.5, 1])


# --- ras --------------------------------------------------------------------------------

@pytest.mark.parametrize("perm,flips", [(p, f) for p in itertools.permutations(range(3))
                                        for f in [(1, 1, 1), (-1, 1, -1), (-1, -1, -1)]])
def test_ras_output_is_ras_whatever_the_input_orientation(perm, flips):
    base = np.arange(24 * 20 * 16, dtype=np.float32).reshape(24, 20, 16)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, perm] * np.array(flips)[None, :] * 1.5
    img = clean_image(base, oblique_affine((1, 1, 1), angles=(3, -4, 5)) @ affine, "prev")
    ras = to_ras(img)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    # the same voxel values sit at the same world positions
    probe = np.array([5, 7, 3, 1.0])
    world = img.affine @ probe
    ras_index = np.rint(np.linalg.solve(ras.affine, world)[:3]).astype(int)
    assert np.asanyarray(ras.dataobj)[tuple(ras_index)] == base[5, 7, 3]
    assert provenance_of(ras) == "prev>ras"


# --- resampled --------------------------------------------------------------------------

def test_resampled_spacing_is_1mm_and_geometry_is_kept():
    zooms = (1.2, 0.9375, 0.9375)
    shape = (80, 100, 100)
    mask = ellipsoid(shape, (40, 50, 50), (25, 35, 30))
    affine = oblique_affine(zooms)
    img = clean_image(np.where(mask, 300.0, 0).astype(np.float32), affine, "dicom2nifti>deepbet")
    out, out_mask = resample_to_spacing(img, clean_image(mask.astype(np.uint8), affine, "x"), **RESAMPLE)
    np.testing.assert_allclose(out.header.get_zooms(), (1.0, 1.0, 1.0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), 1.0, atol=1e-5)
    # field of view kept: extent along each axis within one voxel
    assert all(abs(n * 1.0 - o * z) <= 1.01 for n, o, z in zip(out.shape, shape, zooms))
    np.testing.assert_allclose(world_centroid(out_mask), world_centroid(img), atol=0.6)
    data = np.asanyarray(out.dataobj)
    assert data.min() >= 0 and (data[np.asanyarray(out_mask.dataobj) == 0] == 0).all()
    assert provenance_of(out) == "dicom2nifti>deepbet>bspline1x1x1mm"


def test_bspline_interpolation_is_not_nearest_neighbour():
    # a linear ramp resampled at half-voxel positions gets in-between values only from a spline
    ramp = np.tile(np.arange(40, dtype=np.float32)[:, None, None], (1, 20, 20)) * 10 + 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out, _ = resample_to_spacing(clean_image(ramp, affine, "t"),
                                 clean_image(np.ones_like(ramp, np.uint8), affine, "t"), **RESAMPLE)
    profile = np.asanyarray(out.dataobj)[10:60, 10, 10]
    assert len(np.unique(np.round(profile, 3))) > 40  # nearest neighbour would give 25 values
    np.testing.assert_allclose(np.diff(profile), 5.0, atol=0.2)



@pytest.mark.parametrize("seed", range(4))
def test_resampled_grid_is_the_one_ants_resample_image_makes(seed):
    # the stage builds the 1 mm grid itself (to evaluate the B-spline only in the brain's box): it must be
    # exactly ANTs ResampleImage's grid, odd sizes, oblique axes and rounding halves included
    from workflow_scripts.common.ants_bridge import import_ants

    ants = import_ants()
    rng = np.random.default_rng(seed)
    for _ in range(25):
        shape = tuple(int(n) for n in rng.integers(3, 30, 3))
        spacing = tuple(float(z) for z in rng.choice([0.5, 0.8333333, 0.9375, 1.0, 1.2, 1.25, 1.5], 3))
        target = tuple(float(z) for z in rng.choice([0.7, 1.0, 1.5, 2.0], 3))
        direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        image = ants.from_numpy(rng.random(shape).astype(np.float32), origin=tuple(rng.normal(size=3) * 50),
                                spacing=spacing, direction=direction)
        made = ants.resample_image(image, target, use_voxels=False, interp_type=1)
        grid = resampled_grid(image, target)
        assert grid.shape == made.shape
        assert grid.origin == made.origin and grid.spacing == made.spacing
        np.testing.assert_array_equal(grid.direction, made.direction)


def test_bspline_in_the_brain_box_equals_the_whole_grid_resampling_inside_the_mask():
    # what the stage keeps (voxels inside the resampled mask) is what ants.resample_image's B-spline gives
    # on the whole grid, to float32 rounding; nothing outside the mask survives either way
    from workflow_scripts.common.ants_bridge import import_ants, to_ants

    ants = import_ants()
    rng = np.random.default_rng(3)
    zooms, shape = (1.2, 0.9375, 0.9375), (70, 90, 90)
    mask = ellipsoid(shape, (30, 50, 40), (20, 30, 25))
    affine = oblique_affine(zooms)
    brain = np.where(mask, 200 + 50 * rng.random(shape), 0).astype(np.float32)
    img = clean_image(brain, affine, "t")
    out, out_mask = resample_to_spacing(img, clean_image(mask.astype(np.uint8), affine, "t"), **RESAMPLE)
    whole = ants.resample_image(to_ants(img), (1.0, 1.0, 1.0), use_voxels=False, interp_type=4).numpy()
    inside = np.asanyarray(out_mask.dataobj) > 0
    assert whole.shape == out.shape and inside.sum() > 10_000
    expected = np.where(inside, np.clip(whole, 0, None), 0)
    np.testing.assert_allclose(np.asanyarray(out.dataobj), expected, rtol=0, atol=1e-5 * expected.max())


def test_lean_ants_import_skips_the_heavy_subpackages_and_resamples_alike(tmp_path):
    # each resampling and N4 job imports ants; without its plotting and statistics subpackages it starts
    # about 1.3 s sooner, and what the stages call gives the same voxels as with the full package
    import subprocess
    import sys

    script = """
import sys, numpy as np
lean = sys.argv[1] == "lean"
if lean:
    from workflow_scripts.common.ants_bridge import import_ants
    ants = import_ants()
else:
    import ants
rng = np.random.default_rng(0)
img = ants.from_numpy(rng.random((30, 32, 28)).astype(np.float32) + 1, spacing=(1.2, 1.0, 1.0))
out = ants.resample_image(img, (1.0, 1.0, 1.0), use_voxels=False, interp_type=4)
n4 = ants.n4_bias_field_correction(out, shrink_factor=2, convergence={"iters": [5, 5], "tol": 1e-7})
np.save(sys.argv[2], np.stack([out.numpy(), n4.numpy()]))
heavy = [m for m in ("statsmodels", "sklearn", "matplotlib") if m in sys.modules]
print(",".join(heavy))
"""
    loaded = {}
    for mode in ("lean", "full"):
        run = subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / f"{mode}.npy")],
                             capture_output=True, text=True, check=True)
        loaded[mode] = run.stdout.strip()
    assert loaded["lean"] == "" and "statsmodels" in loaded["full"]
    np.testing.assert_array_equal(np.load(tmp_path / "lean.npy"), np.load(tmp_path / "full.npy"))


def test_a_skipped_ants_subpackage_says_why_when_used():
    from workflow_scripts.common.ants_bridge import _NotLoaded

    with pytest.raises(ImportError, match="import_ants skips it"):
        _NotLoaded("ants.plotting").plot

# --- n4 ---------------------------------------------------------------------------------

def test_n4_removes_a_planted_smooth_bias_field():
    rng = np.random.default_rng(0)
    shape = (64, 64, 64)
    mask = ellipsoid(shape, (32, 32, 32), (26, 28, 24))
    tissue = np.where(mask, 1000.0, 0.0) * (1 + 0.02 * rng.standard_normal(shape))
    x, y, z = (np.indices(shape) / 63.0 - 0.5)
    bias = np.exp(0.6 * x - 0.4 * y + 0.5 * z + 0.3 * x * y)
    biased = (tissue * bias).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    img = clean_image(biased, affine, "crop")
    mask_img = clean_image(mask.astype(np.uint8), affine, "crop")
    cv = lambda d: float(d[mask].std() / d[mask].mean())
    corrected = np.asanyarray(n4_correct(img, mask_img, **N4).dataobj)
    assert cv(biased) > 0.15
    assert cv(corrected) < 0.5 * cv(biased)
    assert (corrected[~mask] == 0).all()
