"""QC: per-scan metrics on a synthetic head, robust outlier flags, threshold drops, the QC report
page, and the montage outlining each stage's brain mask."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import REPO
from workflow_scripts.common import cli
from workflow_scripts.preprocess import qc, qc_metrics
from workflow_scripts.report import report_tables
from workflow_scripts.common.scan_failure import MARKER, write_failure

# Array axes (i, j, k) point anterior, superior and right: the RAS x axis is k, y is i, z is j.
ZOOMS = (1.0, 1.5, 1.2)
AFFINE = np.array([[0, 0, ZOOMS[2], -20.0], [ZOOMS[0], 0, 0, -30.0], [0, ZOOMS[1], 0, -25.0], [0, 0, 0, 1]])
SHAPE = (48, 36, 40)
BRAIN_BOX = (slice(12, 36), slice(10, 26), slice(10, 30))  # 24 x 16 x 20 voxels
VENTRICLE = (slice(21, 27), slice(16, 20), slice(17, 23))
WM, GM, CSF = 1000.0, 600.0, 200.0


def synthetic_head(sigma: float, rng: np.random.Generator, grey: float = GM) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude image, brain mask): a box brain (GM rind, WM core, CSF ventricle) in a scalp shell, Rician noise."""
    clean = np.zeros(SHAPE, np.float32)
    head = tuple(slice(s.start - 5, s.stop + 5) for s in BRAIN_BOX)
    clean[head] = 700.0  # scalp (fat is bright on T1)
    clean[BRAIN_BOX] = grey
    clean[tuple(slice(s.start + 3, s.stop - 3) for s in BRAIN_BOX)] = WM
    clean[VENTRICLE] = CSF
    real = clean + rng.normal(0, sigma, SHAPE)
    imaginary = rng.normal(0, sigma, SHAPE)
    mask = np.zeros(SHAPE, np.uint8)
    mask[BRAIN_BOX] = 1
    return np.hypot(real, imaginary).astype(np.float32), mask


def save(data: np.ndarray, path, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def scan_files(tmp_path, sigma: float, seed: int = 0, grey: float = GM) -> dict[str, str]:
    """One scan's stage files: the native image and mask, and a RAS 'model input' with its mask."""
    image, mask = synthetic_head(sigma, np.random.default_rng(seed), grey)
    folder = tmp_path / f"s{sigma}_{seed}_{grey}"
    folder.mkdir()
    ras_image = np.where(mask > 0, image, 0).astype(np.float32)
    return {"nifti": save(image, folder / "n.nii.gz"), "mask": save(mask, folder / "m.nii.gz"),
            "ras": save(ras_image, folder / "r.nii.gz"), "ras_mask": save(mask, folder / "rm.nii.gz")}


def qc_settings() -> dict:
    """The config's qc: section, with the schema's defaults filled in."""
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    validate(config, str(REPO / "schemas" / "config.schema.yaml"), set_default=True)
    return config["qc"]


# --- per-scan metrics -----------------------------------------------------------------------

def test_brain_volume_share_and_geometry_come_from_the_mask_and_voxel_size(tmp_path):
    files = scan_files(tmp_path, sigma=20.0)
    record = qc_metrics.scan_metrics(**files, subject="002_S_0295", image_id="I13722")
    assert record["subject"] == "002_S_0295" and record["image_id"] == "I13722"
    assert record["brain_volume_ml"] == pytest.approx(24 * 16 * 20 * 1.0 * 1.5 * 1.2 / 1000)  # 11.52 mL
    assert record["brain_fov_share"] == pytest.approx(24 * 16 * 20 / np.prod(SHAPE), abs=1e-5)
    # per RAS axis: x is array axis k (40 voxels of 1.2 mm), y is i (48 of 1.0), z is j (36 of 1.5)
    assert (record["voxels_x"], record["voxels_y"], record["voxels_z"]) == (40, 48, 36)
    assert (record["voxel_mm_x"], record["voxel_mm_y"], record["voxel_mm_z"]) == (1.2, 1.0, 1.5)
    assert (record["fov_mm_x"], record["fov_mm_y"], record["fov_mm_z"]) == (48.0, 48.0, 54.0)
    assert record["n_slices"] == 36
    assert record["brain_p01"] < record["brain_median"] < record["brain_p99"]
    assert record["outside_median"] < record["brain_median"]
    assert record["ras_brain_share"] == pytest.approx(record["brain_fov_share"], abs=1e-5)
    assert record["ras_min"] == 0.0 and record["ras_max"] > WM
    json.dumps(record, allow_nan=False)  # strict JSON: no NaN or infinity


def test_the_snr_proxy_estimates_signal_over_noise_and_falls_on_a_noisy_scan(tmp_path):
    clean = qc_metrics.scan_metrics(**scan_files(tmp_path, sigma=20.0), subject="S", image_id="I1")
    noisy = qc_metrics.scan_metrics(**scan_files(tmp_path, sigma=100.0), subject="S", image_id="I2")
    brain_mean = np.mean(synthetic_head(0.0, np.random.default_rng(0))[0][BRAIN_BOX])
    # Dietrich's estimate recovers mean / sigma from the Rayleigh-distributed air alone
    assert clean["snr"] == pytest.approx(brain_mean / 20.0, rel=0.1)
    assert noisy["snr"] == pytest.approx(brain_mean / 100.0, rel=0.1)
    assert noisy["snr"] < clean["snr"] / 3


def test_white_grey_contrast_separates_the_otsu_classes_and_drops_when_they_blur(tmp_path):
    sharp = qc_metrics.scan_metrics(**scan_files(tmp_path, sigma=10.0), subject="S", image_id="I1")
    blurred = qc_metrics.scan_metrics(**scan_files(tmp_path, sigma=10.0, grey=900.0), subject="S", image_id="I2")
    assert sharp["wm_gm_contrast"] == pytest.approx((WM - GM) / (WM + GM), abs=0.02)
    assert blurred["wm_gm_contrast"] < sharp["wm_gm_contrast"] / 2
    assert qc_metrics.wm_gm_contrast(np.full(100, 5.0)) is None  # one intensity: no classes


def test_a_mask_on_another_grid_is_refused_naming_both_files(tmp_path):
    files = scan_files(tmp_path, sigma=20.0)
    files["mask"] = save(np.ones((10, 10, 10), np.uint8), tmp_path / "other_mask.nii.gz")
    with pytest.raises(cli.PipelineError, match="other_mask.nii.gz.*n.nii.gz"):
        qc_metrics.scan_metrics(**files, subject="S", image_id="I1")


def test_the_command_passes_a_dropped_scans_failure_record_on_and_the_table_skips_it(tmp_path):
    files = scan_files(tmp_path, sigma=20.0)
    write_failure([files["ras"], files["ras_mask"]], {"stage": "n4", "reason_code": "n4_not_finite",
                                                      "reason": "N4 gave NaN"})
    good, dropped = tmp_path / "good.json", tmp_path / "dropped.json"
    assert cli.run(qc_metrics.main, ["--nifti", files["nifti"], "--mask", files["mask"], "--ras", files["ras"],
                                     "--ras-mask", files["ras_mask"], "--subject", "S", "--image-id", "I2",
                                     "--output", str(dropped)]) == 0
    assert dropped.read_bytes().startswith(MARKER)
    good.write_text(json.dumps({"subject": "S", "image_id": "I1", "snr": 10.0}))
    assert [r["image_id"] for r in qc_metrics.read_records([good, dropped])] == ["I1"]


# --- the QC table: robust outlier flags ---------------------------------------------------------

def normal_sample(n: int, mean: float = 1400.0, sd: float = 60.0) -> list[float]:
    """n evenly spaced normal quantiles: a sample shaped like a normal one, with no outlier of its own."""
    from scipy.stats import norm

    return list(np.round(mean + sd * norm.ppf((np.arange(n) + 0.5) / n), 1))


def records(volumes, **other) -> list[dict]:
    return [{"subject": f"S{i:02d}", "image_id": f"I{i:02d}", "brain_volume_ml": v,
             **{k: values[i] for k, values in other.items()}} for i, v in enumerate(volumes)]


def test_mad_flags_a_planted_outlier_and_nothing_in_a_uniform_sample():
    volumes = normal_sample(30) + [2600.0]
    table = qc_metrics.qc_table(records(volumes), outlier_metrics=["brain_volume_ml"], z_threshold=3.5)
    assert table.loc[table["brain_volume_ml_outlier"], "image_id"].tolist() == ["I30"]
    assert table.set_index("image_id").loc["I30", "outliers"] == "brain_volume_ml"
    median = np.median(volumes)
    mad = np.median(np.abs(np.array(volumes) - median))
    assert table.set_index("image_id").loc["I30", "brain_volume_ml_z"] == pytest.approx(
        0.6745 * (2600.0 - median) / mad, rel=1e-3)

    uniform = qc_metrics.qc_table(records(np.linspace(1200, 1600, 31)), outlier_metrics=["brain_volume_ml"],
                                  z_threshold=3.5)
    assert not uniform["brain_volume_ml_outlier"].any() and (uniform["outliers"] == "").all()


def test_outliers_are_found_when_most_values_are_equal_and_missing_values_are_not_flagged():
    values = [1.0] * 15 + [3.0, None]
    table = qc_metrics.qc_table(records(range(17), snr=values), outlier_metrics=["snr"], z_threshold=3.5)
    assert table.loc[table["snr_outlier"], "image_id"].tolist() == ["I15"]  # MAD 0: mean absolute deviation
    assert np.isnan(table.set_index("image_id").loc["I16", "snr_z"])
    same = qc_metrics.qc_table(records([1400.0] * 5), outlier_metrics=["brain_volume_ml"], z_threshold=3.5)
    assert (same["brain_volume_ml_z"] == 0).all() and not same["brain_volume_ml_outlier"].any()
    with pytest.raises(cli.PipelineError, match="qc.outlier_metrics names cnr"):
        qc_metrics.qc_table(records([1.0]), outlier_metrics=["cnr"], z_threshold=3.5)


# --- threshold drops ----------------------------------------------------------------------------

def test_thresholds_drop_scans_with_reason_codes_naming_the_value_and_the_bound():
    table = qc_metrics.qc_table(records([500.0, 1500.0, 2500.0, 1400.0], snr=[3.0, 3.0, None, 20.0]),
                                outlier_metrics=[], z_threshold=3.5)
    drops = qc_metrics.qc_drops(table, {"brain_volume_ml": [800, 2200], "snr": [5, None]}, False).set_index("image_id")
    assert list(drops.index) == ["I00", "I01", "I02"]  # I03 passes; I02's missing SNR drops nothing
    assert drops.loc["I00", "reason_code"] == "qc_brain_volume_ml"  # the first failed threshold
    assert "brain_volume_ml 500 < 800 (minimum)" in drops.loc["I00", "reason"]
    assert "snr 3 < 5 (minimum)" in drops.loc["I00", "reason"]
    assert drops.loc["I01", "reason_code"] == "qc_snr"
    assert drops.loc["I02", "reason"] == "QC: brain_volume_ml 2500 > 2200 (maximum)"
    with pytest.raises(cli.PipelineError, match="minimum above the maximum"):
        qc_metrics.qc_drops(table, {"snr": [9, 2]}, False)
    with pytest.raises(cli.PipelineError, match="qc.thresholds names cnr"):
        qc_metrics.qc_drops(table, {"cnr": [1, None]}, False)


def test_outlier_flags_drop_only_when_drop_outliers_is_set():
    volumes = normal_sample(20) + [2100.0]
    table = qc_metrics.qc_table(records(volumes), outlier_metrics=["brain_volume_ml"], z_threshold=3.5)
    assert qc_metrics.qc_drops(table, {"brain_volume_ml": [800, 2200]}, False).empty
    drops = qc_metrics.qc_drops(table, {"brain_volume_ml": [800, 2200]}, True)
    assert drops[["image_id", "reason_code"]].values.tolist() == [["I20", "qc_outlier_brain_volume_ml"]]


def test_the_default_config_keeps_an_ordinary_adult_scan_and_drops_a_failed_skull_strip():
    settings = qc_settings()
    assert settings["drop_outliers"] is False and settings["outlier_z"] == 3.5
    ordinary = {"brain_volume_ml": 1400.0, "brain_fov_share": 0.1, "snr": 20.0, "wm_gm_contrast": 0.2,
                "ras_brain_share": 0.45}
    scans = [{"subject": "S1", "image_id": "I1", **ordinary},
             {"subject": "S2", "image_id": "I2", **ordinary, "brain_volume_ml": 420.0, "brain_fov_share": 0.03}]
    table, drops = qc_metrics.apply_qc(scans, settings)
    assert len(table) == 2
    assert drops[["image_id", "reason_code"]].values.tolist() == [["I2", "qc_brain_volume_ml"]]


# --- the report page ---------------------------------------------------------------------------

def test_the_qc_page_highlights_outliers_and_dropped_scans_and_escapes_ids():
    settings = {"outlier_z": 3.5, "outlier_metrics": ["brain_volume_ml"], "drop_outliers": False,
                "thresholds": {"snr": [5, None]}}
    volumes = normal_sample(12) + [2600.0]
    scans = records(volumes, snr=[20.0] * 12 + [2.0])
    scans[0]["image_id"] = "<b>I00</b>"
    table, drops = qc_metrics.apply_qc(scans, settings)
    shown, css = report_tables.qc_page_table(table, drops, settings)
    row = shown.index[shown["image_id"] == "I12"][0]
    assert css.loc[row, "brain mL"] == report_tables.QC_OUTLIER_CSS
    assert css.loc[row, "SNR (Dietrich)"] == report_tables.QC_DROPPED_CSS
    assert shown.loc[row, "dropped"] == "qc_snr" and "(z +" in shown.loc[row, "brain mL"]
    assert (css.drop(index=row) == "").all().all()
    page = report_tables.qc_html(table, drops, settings)
    assert "#fff3bf" in page and "#ffc9c9" in page and "qc_snr" in page
    assert "<b>I00</b>" not in page and "&lt;b&gt;I00&lt;/b&gt;" in page


# --- the montage outlines each stage's mask ------------------------------------------------------

def _red_pixels(path) -> int:
    import matplotlib.image

    rgb = (matplotlib.image.imread(path)[..., :3] * 255).astype(int)
    return int(np.count_nonzero(rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]) > 60))


def test_the_montage_draws_the_mask_outline_in_red_only_where_masks_are_given(tmp_path):
    files = scan_files(tmp_path, sigma=20.0)
    stages = [("nifti", files["nifti"]), ("ras", files["ras"])]
    plain = qc.montage(stages, files["mask"], tmp_path / "plain.png")
    outlined = qc.montage(stages, files["mask"], tmp_path / "outlined.png",
                          stage_masks={"nifti": files["mask"], "ras": files["ras_mask"]})
    assert _red_pixels(plain) == 0  # the slices are grey: R = G = B
    assert _red_pixels(outlined) > 100


def test_the_outline_follows_the_stages_own_mask_boundary():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, mask = synthetic_head(20.0, np.random.default_rng(0))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img, mask_img = nib.Nifti1Image(image, affine), nib.Nifti1Image(mask, affine)
    centre = qc.mask_centre(mask_img)
    fig, axes = plt.subplots(1, 3)
    qc.draw_stage(axes, "ras", img, centre, qc.contour_slices(img, mask_img, centre))
    # RAS-aligned affine: the axial slice shows (x = i, y = j); the mask spans i 12-35, j 10-25
    vertices = np.concatenate([p.vertices for p in axes[0].collections[-1].get_paths()])
    plt.close(fig)
    # a level-0.5 contour runs half a voxel outside the mask's first and last voxels
    x_range, y_range = (vertices[:, 0].min(), vertices[:, 0].max()), (vertices[:, 1].min(), vertices[:, 1].max())
    assert x_range == (pytest.approx(11.5, abs=0.01), pytest.approx(35.5, abs=0.01))
    assert y_range == (pytest.approx(9.5, abs=0.01), pytest.approx(25.5, abs=0.01))
    with pytest.raises(cli.PipelineError, match="not on the grid"):
        qc.contour_slices(img, nib.Nifti1Image(mask[:-1], np.eye(4)), centre)


def test_a_dropped_stage_shows_its_reason_instead_of_failing_the_montage(tmp_path):
    files = scan_files(tmp_path, sigma=20.0)
    write_failure([files["ras"], files["ras_mask"]], {"stage": "n4", "reason_code": "n4_not_finite", "reason": "x"})
    out = qc.montage([("nifti", files["nifti"]), ("ras", files["ras"])], files["mask"], tmp_path / "m.png",
                     stage_masks={"nifti": files["mask"], "ras": files["ras_mask"]})
    assert _red_pixels(out) > 0 and out.stat().st_size > 1000
