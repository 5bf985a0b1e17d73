"""The classifier: parameter counts, the pretrained-weights path, the 1-channel stem, freezing, groups."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torchvision.models.video import R3D_18_Weights, r3d_18

from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.learning.models import (build_model, count_parameters, fetch_pretrained_weights, parameter_groups,
                                     recalibrate_batchnorm, train_mode)

EXPERIMENT = resolve("experiments.*", {})  # an experiment's settings as the schema's defaults make them
TRAIN = resolve("train")


def _model(arch: str, weights: str, **given) -> nn.Module:
    """``build_model`` with the schema's experiment settings for what the test does not give."""
    settings = {key: EXPERIMENT[key] for key in ("trainable_from", "plane", "n_slices", "slice_spacing")}
    return build_model(arch=arch, weights=weights, **{**settings, **given})


def _no_download(*args, **kwargs):
    raise OSError("network disabled in tests")


@pytest.fixture()
def planted_kinetics(tmp_path, monkeypatch) -> dict:
    """A Kinetics-400 r3d_18 state dict with known values where torchvision's cache expects it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    torch.manual_seed(123)
    state = r3d_18(weights=None).state_dict()
    # Kernels that differ per colour channel, so the sum over colour is a real check.
    state["stem.0.weight"] = torch.randn_like(state["stem.0.weight"])
    state["layer1.0.conv1.1.running_mean"] = torch.full_like(state["layer1.0.conv1.1.running_mean"], 0.25)
    target = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(R3D_18_Weights.KINETICS400_V1.url)
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


def test_parameter_counts_match_the_dissertation():
    counts = count_parameters(_model("r3d_18", "none", num_classes=2, in_channels=1))
    assert counts == {"total": 33_148_482, "trainable": 24_909_826, "frozen": 8_238_656}


def test_kinetics_weights_load_from_the_torch_cache_with_summed_rgb_stem(planted_kinetics):
    model = _model("r3d_18", "kinetics400")
    stem = model.stem[0]
    assert stem.in_channels == 1
    torch.testing.assert_close(stem.weight, planted_kinetics["stem.0.weight"].sum(dim=1, keepdim=True))
    for key in ("layer4.1.conv2.0.weight", "layer2.0.downsample.0.weight", "layer1.0.conv1.1.running_mean"):
        torch.testing.assert_close(model.state_dict()[key], planted_kinetics[key])
    assert model.fc.weight.shape == (2, 512)
    assert not torch.equal(model.fc.weight, planted_kinetics["fc.weight"][:2])


def test_one_channel_stem_answers_a_grey_clip_like_the_rgb_stem(planted_kinetics):
    rgb = r3d_18(weights=None)
    rgb.load_state_dict(planted_kinetics)
    grey = _model("r3d_18", "kinetics400")
    x = torch.rand(1, 1, 4, 16, 16)
    torch.testing.assert_close(grey.stem[0](x), rgb.stem[0](x.repeat(1, 3, 1, 1, 1)), rtol=1e-4, atol=1e-4)


def test_missing_cached_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(cli.PipelineError, match=r"hub/checkpoints/r3d_18-b3b3357e\.pth"):
        _model("r3d_18", "kinetics400")


def test_weights_from_a_local_state_dict_file(tmp_path, planted_kinetics):
    path = tmp_path / "my_r3d.pth"
    torch.save(planted_kinetics, path)
    model = _model("r3d_18", str(path))
    torch.testing.assert_close(model.stem[0].weight, planted_kinetics["stem.0.weight"].sum(dim=1, keepdim=True))
    bad = tmp_path / "bad.pth"
    torch.save({"stem.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(cli.PipelineError, match="bad.pth"):
        _model("r3d_18", str(bad))


@pytest.mark.parametrize("arch", ["mc3_18", "r2plus1d_18"])
def test_other_video_resnets_share_the_code_path(arch):
    model = _model(arch, "none", num_classes=3)
    assert model.stem[0].in_channels == 1
    assert model.eval()(torch.rand(1, 1, 16, 16, 16)).shape == (1, 3)
    assert not any(p.requires_grad for p in model.layer3.parameters())


def test_frozen_blocks_get_no_gradient_and_trained_blocks_do():
    model = train_mode(_model("r3d_18", "none"))
    loss = nn.functional.cross_entropy(model(torch.rand(2, 1, 16, 16, 16)), torch.tensor([0, 1]))
    loss.backward()
    for name in ("stem", "layer1", "layer2", "layer3"):
        assert all(p.grad is None for p in getattr(model, name).parameters()), name
    for name in ("layer4", "fc"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name


def test_train_mode_keeps_frozen_batchnorm_statistics():
    model = train_mode(_model("r3d_18", "none"))
    assert model.training and not model.stem[1].training and not model.layer3[1].conv2[1].training
    assert model.layer4[0].conv1[1].training
    frozen_before = model.layer1[0].conv1[1].running_mean.clone()
    trained_before = model.layer4[0].conv1[1].running_mean.clone()
    with torch.no_grad():
        model(torch.rand(2, 1, 16, 16, 16) * 5)
    assert torch.equal(model.layer1[0].conv1[1].running_mean, frozen_before)
    assert not torch.equal(model.layer4[0].conv1[1].running_mean, trained_before)


def test_parameter_groups_give_head_and_backbone_their_rates():
    model = _model("r3d_18", "none")
    groups = parameter_groups(model, lr_head=1e-3, lr_backbone=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("backbone", 1e-4)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.fc.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.layer4.parameters()}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    head_only = parameter_groups(_model("r3d_18", "none", trainable_from="fc"), lr_head=TRAIN.lr_head,
                                 lr_backbone=TRAIN.lr_backbone)
    assert [g["name"] for g in head_only] == ["head"]


def test_unknown_architecture_and_block_are_named():
    with pytest.raises(cli.PipelineError, match="resnet18"):
        _model("resnet18", "none")
    with pytest.raises(cli.PipelineError, match="layer9"):
        _model("r3d_18", "none", trainable_from="layer9")


def test_fetch_records_the_cached_weights_file(planted_kinetics, tmp_path):
    from workflow_scripts.learning.models import main

    record_path = tmp_path / "results" / "weights" / "r3d_18_kinetics400.json"
    main(["fetch", "--arch", "r3d_18", "--weights", EXPERIMENT.weights, "--record", str(record_path)])
    import json
    record = json.loads(record_path.read_text())
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth"
    assert record["path"] == str(cached) and record["bytes"] == cached.stat().st_size
    assert record["tensors"] == len(planted_kinetics) and record["url"].endswith("r3d_18-b3b3357e.pth")


def test_fetch_without_network_names_the_file_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(cli.PipelineError, match=r"hub/checkpoints/r3d_18-b3b3357e\.pth.*local\s+state-dict file"):
        fetch_pretrained_weights("r3d_18", weights=EXPERIMENT.weights)


def test_batchnorm_recalibration_averages_the_trained_layers_and_spares_the_frozen_ones():
    torch.manual_seed(0)
    model = _model("r3d_18", "none")  # stem..layer3 frozen
    train_mode(model)
    frozen_bn, trained_bn = model.layer3[1].conv2[1], model.layer4[1].conv2[1]
    frozen_before = frozen_bn.running_mean.clone()
    trained_bn.running_mean.fill_(123.0)
    seen = []
    trained_bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    batches = [torch.randn(2, 1, 8, 16, 16) for _ in range(3)]
    assert recalibrate_batchnorm(model, batches, torch.device("cpu")) == 5  # layer4: 2 blocks x 2 + downsample
    inputs = torch.cat(seen)
    torch.testing.assert_close(trained_bn.running_mean, inputs.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frozen_bn.running_mean, frozen_before)
    assert trained_bn.momentum == 0.1 and trained_bn.training and not frozen_bn.training
