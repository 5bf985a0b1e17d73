"""Skull stripping: deepbet against the demo's true brain masks, the SynthStrip code path with a
planted checkpoint in the official format, and the weights download/cache/remedy logic."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to

from workflow_scripts.preprocess import skullstrip
from workflow_scripts.common.cli import PipelineError
from workflow_scripts.common.settings import resolve
from workflow_scripts.preprocess.convert import convert_series

STRIP = resolve("preprocess.skullstrip")  # the schema's skull-strip settings (defaults)


def strip_gpu() -> bool:
    """Whether the network runs on a GPU under the schema's preprocess.skullstrip.gpu, as the stage decides."""
    return skullstrip.use_gpu(skullstrip.GPU_DEVICES[STRIP.gpu])


def plant_synthstrip_checkpoint(path: Path, bias: float = -5.0) -> Path:
    """A file in synthstrip.1.pt's format: {'model_state_dict': ...} of nipreps' StripModel.

    The last layer is zeroed and biased so the predicted distance is ``bias`` everywhere: the
    mask is then the whole field of view, which proves the weights were loaded and used.
    """
    from nipreps.synthstrip.model import StripModel

    model = StripModel()
    state = model.state_dict()
    state["remaining.2.conv.weight"].zero_()
    state["remaining.2.conv.bias"].fill_(bias)
    torch.save({"epoch": 0, "model_state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def demo_scan(tiny_demo):
    """The first usable demo scan converted to NIfTI, with its true brain mask."""
    row = tiny_demo["mprage"].iloc[0]
    img = convert_series(row["dicom_dir"])
    truth = nib.load(tiny_demo["root"] / "truth" / row["Subject"] / f"{row['Image Data ID']}_brainmask.nii.gz")
    return img, truth


def test_deepbet_mask_matches_the_true_brain_mask(demo_scan):
    img, truth = demo_scan
    mask = skullstrip.deepbet_mask(img, threshold=STRIP.deepbet_threshold, n_dilate=STRIP.deepbet_dilate,
                                   gpu=strip_gpu())
    truth_on_img = np.asanyarray(resample_from_to(truth, img, order=0).dataobj) > 0
    assert skullstrip.dice(mask, truth_on_img) > 0.85


def test_synthstrip_path_runs_the_network_with_planted_weights(demo_scan, tmp_path):
    img, _ = demo_scan
    src = tmp_path / "nifti.nii.gz"
    nib.save(img, src)
    weights = plant_synthstrip_checkpoint(tmp_path / "synthstrip.1.pt")
    out = {k: tmp_path / f"{k}.nii.gz" for k in ("brain", "mask")}
    sidecar = tmp_path / "stripped.json"
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.preprocess.skullstrip", "--threads", "2",
                             "--settings", '{"preprocess.skullstrip": {"method": "synthstrip"}}',
                             "--synthstrip-weights", str(weights), "--input", str(src),
                             "--output", str(out["brain"]), "--mask", str(out["mask"]),
                             "--sidecar", str(sidecar)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    mask = np.asanyarray(nib.load(out["mask"]).dataobj)
    assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 1}
    assert mask.mean() > 0.99  # constant negative distance -> everything is "brain"
    record = json.loads(sidecar.read_text())
    assert record["method"] == "synthstrip" and record["official_weights"] is False
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "not the official" in result.stderr
    assert nib.load(out["brain"]).header["descrip"].tobytes().rstrip(b"\x00") == b"dicom2nifti>synthstrip"



def test_synthstrip_grid_and_resampling_are_nipreps_conform(demo_scan):
    # the job runs SynthStrip's steps itself (faster resampling, one process): the network's input grid must be
    # nipreps' own, and the conformed voxels its values but for float32 rounding of its coordinates (1 unit)
    from nipreps.synthstrip.cli import conform

    img, _ = demo_scan
    upstream = conform(img)
    shape, affine = skullstrip.synthstrip_grid(img)
    assert shape == upstream.shape
    np.testing.assert_allclose(affine, upstream.affine, rtol=0, atol=1e-9)
    data = np.asanyarray(img.dataobj)
    ours = skullstrip.resample_spline(data, img.affine, shape, affine, threads=2)
    theirs = np.asanyarray(upstream.dataobj)
    assert ours.dtype == theirs.dtype
    differ = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    assert differ.max() <= 1 and np.count_nonzero(differ) < 1e-3 * differ.size


def test_synthstrip_distance_goes_back_like_nipreps_resample_like(demo_scan):
    from nipreps.synthstrip.cli import resample_like
    from scipy import ndimage

    img, _ = demo_scan
    shape, affine = skullstrip.synthstrip_grid(img)
    rng = np.random.default_rng(0)
    distance = (ndimage.gaussian_filter(rng.normal(size=shape), 3) * 200).astype(np.float32)
    theirs = np.asanyarray(resample_like(nib.Nifti1Image(distance, affine, None), img, output_dtype="int16",
                                         cval=100).dataobj).astype("int16")
    ours = skullstrip.resample_spline(distance, affine, img.shape, img.affine, cval=100, threads=2).astype(np.int16)
    differ = np.abs(ours.astype(np.int64) - theirs)
    assert differ.max() <= 1 and np.count_nonzero(differ) < 1e-4 * differ.size

def test_synthstrip_mask_follows_the_network_output(demo_scan, tmp_path):
    img, _ = demo_scan
    img = img.slicer[:24, :24, :24]  # a 72 mm block: the network runs on 64^3 instead of a whole head
    weights = plant_synthstrip_checkpoint(tmp_path / "positive.pt", bias=+5.0)
    with pytest.raises(PipelineError, match="SynthStrip found no brain"):
        # a positive distance everywhere means no brain: upstream finds no component
        mask = skullstrip.synthstrip_mask(img, weights, threads=2, border=STRIP.synthstrip_border, gpu=strip_gpu())
        skullstrip.strip(img, mask, "synthstrip")


def test_missing_weights_fail_at_once_naming_both_remedies(tmp_path):
    src = tmp_path / "never-read.nii.gz"  # does not exist: the weights are checked first
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.preprocess.skullstrip",
                             "--settings", '{"preprocess.skullstrip": {"method": "synthstrip"}}', "--synthstrip-weights", str(tmp_path / "none.pt"), "--input", str(src),
                             "--output", str(tmp_path / "o.nii.gz"), "--mask", str(tmp_path / "m.nii.gz"),
                             "--sidecar", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "synthstrip_weights" in result.stderr and "method: deepbet" in result.stderr
    assert "cannot read NIfTI" not in result.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_fetch_checks_the_checksum_and_keeps_only_a_good_file(tmp_path):
    source = tmp_path / "served.pt"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(PipelineError, match="SHA-256.*differs.*Two remedies"):
        skullstrip.fetch_synthstrip_weights(cache, [source.as_uri()], sha256="0" * 64)
    assert not any(cache.iterdir())  # nothing half-good left behind
    got = skullstrip.fetch_synthstrip_weights(cache, [source.as_uri()], sha256=digest)
    assert got == cache / "synthstrip.1.pt" and got.read_bytes() == source.read_bytes()
    # second call: already cached, no download (the URL is gone now)
    source.unlink()
    assert skullstrip.fetch_synthstrip_weights(cache, [source.as_uri()], sha256=digest) == got


def test_fetch_without_network_names_both_remedies(tmp_path):
    with pytest.raises(PipelineError) as err:
        skullstrip.fetch_synthstrip_weights(tmp_path, ["http://127.0.0.1:9/synthstrip.1.pt"], timeout=5)
    message = str(err.value)
    assert "preprocess.skullstrip.synthstrip_weights" in message
    assert "preprocess.skullstrip.method: deepbet" in message
    assert skullstrip.SYNTHSTRIP_SHA256 in message


def test_a_corrupt_cached_file_is_refused(tmp_path):
    (tmp_path / "synthstrip.1.pt").write_bytes(b"truncated")
    with pytest.raises(PipelineError, match="not the official synthstrip.1.pt"):
        skullstrip.fetch_synthstrip_weights(tmp_path, ["http://127.0.0.1:9/x"])


def test_gpu_setting_auto_falls_back_to_the_cpu_and_true_stops_without_a_gpu(monkeypatch):
    # preprocess.skullstrip.gpu: false / auto / true reach the job as --device cpu / auto / gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert skullstrip.use_gpu("cpu") is False and skullstrip.use_gpu("auto") is False
    with pytest.raises(PipelineError, match="torch sees no CUDA GPU on .*set it to auto"):
        skullstrip.use_gpu("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert skullstrip.use_gpu("auto") is True and skullstrip.use_gpu("gpu") is True
    assert skullstrip.use_gpu("cpu") is False
