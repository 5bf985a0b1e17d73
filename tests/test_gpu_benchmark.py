"""The GPU training benchmark (benchmarks/gpu_train_speed.py), on CPU at 16^3: the frozen-backbone
check, its device augmentation against VolumeTransform, the settings plan, and a smoke run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from workflow_scripts.common.settings import resolve
from workflow_scripts.learning.scan_data import VolumeTransform

bench = load_benchmark("gpu_train_speed")


def test_frozen_stem_to_layer3_get_no_backward_pass():
    result = bench.frozen_backbone_check(size=16, batch_size=2, device="cpu", steps=1)
    frozen, full = result["layer4"], result["stem"]
    assert frozen["frozen_params"] > 0 and full["frozen_params"] == 0
    assert frozen["frozen_with_grad"] == [] and frozen["trainable_without_grad"] == []
    assert full["trainable_without_grad"] == []
    # One convolution_backward per convolution with a trainable weight: layer4 of r3d_18 has two
    # blocks of two convolutions plus one downsampling convolution; the whole network 20.
    assert frozen["conv_backward_calls"] == frozen["trainable_convs"] == 5
    assert full["conv_backward_calls"] == full["trainable_convs"] == 20
    assert frozen["autograd_nodes"] < full["autograd_nodes"]


def _draw_statistics(outputs: torch.Tensor, volume: torch.Tensor) -> dict[str, float]:
    """How often noise and gamma were applied and how strongly, read off augmented volumes."""
    brain = volume > 0
    plain = (volume - volume[brain].mean()) / volume[brain].std()
    background_std = torch.stack([o[~brain].std() for o in outputs])
    noisy = background_std > 1e-6
    gamma_shift = torch.stack([(o[brain] - plain[brain]).abs().mean() for o in outputs])
    gamma = gamma_shift[~noisy] > 1e-4
    return {"noise_share": noisy.float().mean().item(), "noise_level": background_std[noisy].mean().item(),
            "gamma_share": gamma.float().mean().item(), "gamma_level": gamma_shift[~noisy][gamma].mean().item()}


def test_device_augmentation_matches_the_training_recipe_statistically():
    n, side = 400, 12
    rng = np.random.default_rng(0)
    grid = np.indices((side,) * 3) - (side - 1) / 2
    volume = torch.from_numpy(np.where((grid ** 2).sum(0) < (0.42 * side) ** 2,
                                       rng.uniform(0.1, 1.0, (side,) * 3), 0).astype(np.float32))[None]
    torch.manual_seed(0)
    recipe = resolve("train")  # the training recipe as the schema's defaults make it
    transform = VolumeTransform(train=True, **recipe.augmentation, znorm_mask=recipe.znorm_mask)
    reference = _draw_statistics(torch.stack([transform(volume) for _ in range(n)]), volume)
    torch.manual_seed(1)
    ours = _draw_statistics(bench.augment_on_device(volume.expand(n, *volume.shape)), volume)
    assert abs(ours["noise_share"] - 0.3) < 0.1 and abs(reference["noise_share"] - 0.3) < 0.1
    assert abs(ours["gamma_share"] - reference["gamma_share"]) < 0.12
    assert ours["noise_level"] == pytest.approx(reference["noise_level"], rel=0.25)
    assert ours["gamma_level"] == pytest.approx(reference["gamma_level"], rel=0.3)


def test_augmented_brain_is_z_normalised_and_background_kept_out():
    volume = torch.zeros(3, 1, 8, 8, 8)
    volume[:, :, 2:6, 2:6, 2:6] = torch.rand(3, 1, 4, 4, 4) * 0.9 + 0.1
    out = bench.augment_on_device(volume, gamma_p=0.0, noise_p=0.0)
    brain = out[volume > 0].view(3, -1)
    assert torch.allclose(brain.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(brain.std(1), torch.ones(3), atol=1e-5)
    assert (out[volume == 0] < 0).all()  # background sits below the brain mean, not at 0


def test_sweep_changes_one_axis_at_a_time_and_compiles_last():
    axes = {"precision": ["bf16", "fp32"], "channels_last": ["on"], "data": ["gpu-resident", "loader"],
            "compile": ["off", "on"]}
    settings = bench.plan_settings([2, 32], axes)
    combos = [(s.precision, s.channels_last, s.data, s.compile) for s in settings[::2]]
    assert combos == [("bf16", "on", "gpu-resident", "off"), ("fp32", "on", "gpu-resident", "off"),
                      ("bf16", "on", "loader", "off"), ("bf16", "on", "gpu-resident", "on")]
    assert [s.batch_size for s in settings] == [2, 32] * 4
    assert len(bench.plan_settings([2], axes, full=True)) == 8


def test_cpu_drops_bf16_and_compile_with_a_note():
    axes, notes = bench.usable_axes({"precision": ["bf16", "fp32"], "compile": ["off", "on"]}, torch.device("cpu"))
    assert axes == {"precision": ["fp32"], "compile": ["off"]} and len(notes) == 2
    with pytest.raises(SystemExit, match="precision"):
        bench.usable_axes({"precision": ["bf16"]}, torch.device("cpu"))


def test_cpu_smoke_run_writes_a_row_per_setting(tmp_path):
    out = tmp_path / "bench.json"
    status = bench.main(["--device", "cpu", "--size", "16", "--batch-sizes", "2", "--steps", "1", "--warmup", "1",
                         "--scans", "4", "--epoch", "8", "--workers", "0", "--check", "off", "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0
    assert [(r["precision"], r["channels_last"], r["data"], r["compile"]) for r in report["rows"]] == [
        ("fp32", "on", "gpu-resident", "off"), ("fp32", "off", "gpu-resident", "off"), ("fp32", "on", "loader", "off")]
    assert all(r["status"] == "ok" and r["volumes_per_s"] > 0 for r in report["rows"])
    assert report["rows"][0]["aug_ms"] > 0 and report["rows"][2]["aug_ms"] is None
