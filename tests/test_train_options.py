"""Training-loop options (issue: comparisons, part 5) and the comparison models: schedules with
warmup, precision and loss scaling, clipping, class balancing by sampler, early-stopping monitors,
the selection hierarchy, deterministic reruns, phased unfreezing, embeddings, MViT and the 2D
ResNet-50 on slices."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import run_snakemake, write_config
from test_train import SIDE, TRAIN, _config, tiny  # noqa: F401  (the tiny tensors and manifests fixture)
from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.learning.models import (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, SliceResNet, _pretrained_enum,
                                     build_model, count_parameters, parameter_groups, stage_of)
from workflow_scripts.learning.recipe import check_recipe, merge_recipe
from workflow_scripts.common.devices import autocast_dtype
from workflow_scripts.learning.checkpoints import load_checkpoint
from workflow_scripts.learning.scan_data import EpochSampler
from workflow_scripts.learning.train import (EarlyStopping, EpochScheduler, StepOptions, fit, forward, hierarchy_key,
                                             main, new_training_state, optimizer_step)

TIMING = {"seconds", "train_data_wait_share", "val_data_wait_share"}
EXPERIMENT = resolve("experiments.*", {})  # an experiment's settings as the schema's defaults make them
TRAIN = resolve("train")  # the schema's training recipe
SCHEDULE_KEYS = ("warmup_epochs", "max_epochs", "t0", "t_mult", "eta_min", "plateau_factor", "plateau_patience")


def _model(arch: str, weights: str, **given) -> nn.Module:
    """``build_model`` with the schema's experiment settings for what the test does not give."""
    settings = {key: EXPERIMENT[key] for key in ("trainable_from", "plane", "n_slices", "slice_spacing")}
    return build_model(arch=arch, weights=weights, **{**settings, **given})


def _scheduler(optimizer: torch.optim.Optimizer, kind: str, **given) -> EpochScheduler:
    """``EpochScheduler`` with the schema's training settings for what the test does not give."""
    return EpochScheduler(optimizer, kind=kind, **{**{key: TRAIN[key] for key in SCHEDULE_KEYS}, **given})


def _lrs(kind: str, epochs: int, val_losses=None, **kwargs) -> list[float]:
    """The learning rate in force during each of ``epochs`` epochs."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _scheduler(optimizer, kind, **kwargs)
    seen = []
    for epoch in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1.0 if val_losses is None else val_losses[epoch])
    return seen


def test_linear_warmup_then_cosine_decay():
    lrs = _lrs("cosine", 7, warmup_epochs=3, max_epochs=7)
    np.testing.assert_allclose(lrs[:3], [0.25, 0.5, 0.75])
    assert lrs[3] == 1.0  # the full rate after warmup, then a cosine over the remaining 4 epochs
    np.testing.assert_allclose(lrs[4:], [(1 + np.cos(np.pi * k / 4)) / 2 for k in (1, 2, 3)])


def test_warmup_then_warm_restarts_restarts_every_t0_epochs():
    lrs = _lrs("warm_restarts", 8, warmup_epochs=2, t0=3)
    np.testing.assert_allclose(lrs[:2], [1 / 3, 2 / 3])
    cosine = [1.0, (1 + np.cos(np.pi / 3)) / 2, (1 + np.cos(2 * np.pi / 3)) / 2]
    np.testing.assert_allclose(lrs[2:], cosine + cosine)


def test_plateau_halves_the_rate_after_patience_epochs_without_a_lower_val_loss():
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
    lrs = _lrs("plateau", 8, val_losses=losses, plateau_factor=0.5, plateau_patience=2)
    # best 0.9 after epoch 2; epochs 3, 4, 5 do not improve: more than 2 bad epochs -> halved after epoch 5
    assert lrs[:5] == [1.0] * 5 and lrs[5] == 0.5


def test_scheduler_state_round_trip_continues_the_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    first = _scheduler(optimizer, "cosine", warmup_epochs=2, max_epochs=6)
    for _ in range(3):
        first.step(1.0)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    second = _scheduler(other, "cosine", warmup_epochs=2, max_epochs=6)
    other.load_state_dict(optimizer.state_dict())
    second.load_state_dict(first.state_dict())
    first.step(1.0)
    second.step(1.0)
    assert optimizer.param_groups[0]["lr"] < 1.0
    assert other.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_precision_autocast_dtypes_and_fp16_needs_cuda():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(cli.PipelineError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    model, x, y = nn.Linear(4, 2), torch.randn(3, 4), torch.tensor([0, 1, 0])
    logits, loss = forward(model, x, y, nn.CrossEntropyLoss(), cpu, "bf16")
    assert logits.dtype is torch.bfloat16 and loss.dtype is torch.float32
    assert forward(model, x, y, nn.CrossEntropyLoss(), cpu, "fp32")[0].dtype is torch.float32


def _big_gradient_step(options: StepOptions) -> tuple[float, torch.Tensor, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = (model(torch.full((4, 8), 10.0)) ** 2).sum()
    norm = optimizer_step(model, loss, optimizer, options)
    return norm, before, model


def test_gradient_clipping_bounds_the_update_and_reports_the_norm_before():
    norm, before, model = _big_gradient_step(StepOptions(TRAIN.precision, grad_clip_norm=0.1))
    assert norm > 10  # the true global norm, before clipping
    update = torch.cat([(model.weight - before).flatten()])
    assert float(update.norm()) <= 0.1 + 1e-5  # SGD lr 1: the update is the clipped gradient
    unclipped, before, model = _big_gradient_step(StepOptions(TRAIN.precision))
    assert np.isnan(unclipped) and float((model.weight - before).norm()) > 10


def test_loss_scaler_is_unscaled_before_clipping():
    """fp16's GradScaler multiplies the loss by 2^k; clipping must see the true gradients."""
    plain, _, _ = _big_gradient_step(StepOptions(TRAIN.precision, grad_clip_norm=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, before, model = _big_gradient_step(StepOptions(TRAIN.precision, scaler=scaler, grad_clip_norm=0.1))
    assert scaled == pytest.approx(plain, rel=1e-4)
    assert float((model.weight - before).norm()) <= 0.1 + 1e-5


def test_weighted_sampler_draws_classes_equally_and_is_keyed_to_seed_and_epoch():
    labels = [0] * 8 + [1] * 2
    weights = [1 / 8] * 8 + [1 / 2] * 2
    sampler = EpochSampler(len(labels), True, seed=3, weights=weights)
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += [labels[i] for _, i in sampler]
    assert 0.45 < np.mean(drawn) < 0.55  # unweighted it would be 0.2
    sampler.set_epoch(7)
    again = EpochSampler(len(labels), True, seed=3, weights=weights)
    again.set_epoch(7)
    assert list(sampler) == list(again)


def test_both_class_balancing_methods_at_once_are_rejected():
    with pytest.raises(cli.PipelineError, match="choose one"):
        check_recipe({"class_weights": "inverse", "sampler": "weighted"})
    check_recipe({"class_weights": "none", "sampler": "weighted"})  # either alone is fine
    with pytest.raises(cli.PipelineError, match="experiments.x.train.lr is not a key"):
        merge_recipe({"lr_head": 1e-3}, {"lr": 1e-4}, "x")
    merged = merge_recipe({"lr_head": 1e-3, "augmentation": {"gamma_p": 0.3, "noise_p": 0.3}},
                          {"augmentation": {"noise_p": 0.0}}, "x")
    assert merged["augmentation"] == {"gamma_p": 0.3, "noise_p": 0.0}


def test_the_workflow_rejects_a_recipe_with_both_balancing_methods(tmp_path):
    config = write_config(tmp_path / "both.yaml", {"train": {"class_weights": "inverse", "sampler": "weighted"}})
    result = run_snakemake(tmp_path, "-n", configfiles=[config], check=False, timeout=120)
    assert result.returncode != 0 and "choose one" in result.stdout + result.stderr


def test_early_stopping_on_loss_alone_ignores_accuracy():
    stopper = EarlyStopping(patience=2, monitor="loss")
    stopper.update(0.5, 1.0)
    stopper.update(0.9, 1.1)  # accuracy improves, loss does not
    assert not stopper.stopped
    stopper.update(1.0, 1.2)
    assert stopper.stopped  # 'both' would go on: accuracy kept improving
    with pytest.raises(cli.PipelineError, match="monitors"):
        EarlyStopping(patience=TRAIN.patience, monitor="auc")


def test_selection_hierarchy_orders_balanced_accuracy_then_kappa_then_auc():
    a = {"balanced_accuracy": 0.8, "kappa": 0.5, "auc": 0.6}
    assert hierarchy_key(a) > hierarchy_key({"balanced_accuracy": 0.7, "kappa": 0.9, "auc": 1.0})
    assert hierarchy_key(a) < hierarchy_key({"balanced_accuracy": 0.8, "kappa": 0.6, "auc": 0.1})
    assert hierarchy_key(a) > hierarchy_key({"balanced_accuracy": 0.8, "kappa": 0.5, "auc": None})


def test_fused_optimizer_is_only_used_on_cuda_and_adam_is_selectable(tiny, tmp_path):
    config = _config(tiny, tmp_path, fused_optimizer=True, optimizer="adam")
    state = new_training_state(config, torch.device("cpu"))
    assert type(state.optimizer) is torch.optim.Adam and not state.optimizer.defaults.get("fused")


def test_deterministic_runs_with_one_seed_give_identical_histories(tiny, tmp_path):
    """Two CPU runs (augmentation on, a loader worker, deterministic algorithms) end identical."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        fit(_config(tiny, out, deterministic=True, num_workers=1, max_epochs=2,
                    augmentation={"gamma_p": 1, "noise_p": 1}))
        runs.append(out)
    torch.use_deterministic_algorithms(False)
    histories = [[{k: v for k, v in row.items() if k not in TIMING}
                  for row in json.loads((out / "history.json").read_text())] for out in runs]
    assert histories[0] == histories[1] and len(histories[0]) == 2
    first, second = (load_checkpoint(out / "last.pt")["model"] for out in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_selection_rule_picks_the_checkpoint_and_embeddings_are_exported(tiny, tmp_path):
    out = tmp_path / "run"
    summary = fit(_config(tiny, out, max_epochs=3, selection="hierarchy", early_stopping="loss"))
    assert summary["selection"]["checkpoint"] == "best_hierarchy.pt"
    history = json.loads((out / "history.json").read_text())
    best = max(history, key=lambda r: hierarchy_key({k.removeprefix("val_"): v for k, v in r.items()}))
    assert summary["selection"]["epoch"] == best["epoch"] == load_checkpoint(out / "best_hierarchy.pt")["epoch"]
    embeddings = np.load(out / "embeddings_val.npz")
    val = pd.read_csv(tiny["val"], dtype={"image_id": str})
    assert list(embeddings["image_id"]) == list(val["image_id"]) and embeddings["embedding"].shape == (4, 512)
    # the stored embedding is the input of the final linear layer: the head reproduces the probabilities
    model = _model("r3d_18", "none")
    model.load_state_dict(load_checkpoint(out / "best_hierarchy.pt")["model"])
    logits = model.fc(torch.from_numpy(embeddings["embedding"]))
    np.testing.assert_allclose(torch.softmax(logits, 1)[:, 1].detach().numpy(), embeddings["prob"], rtol=1e-4,
                               atol=1e-6)
    predictions = pd.read_csv(out / "val_predictions.csv", dtype={"image_id": str})
    np.testing.assert_allclose(predictions["prob"], embeddings["prob"], rtol=1e-5)

    # the same tensors as scans of people the model never saw (it refuses to score its own validation subjects)
    unseen = tmp_path / "unseen.csv"
    val.assign(subject=val["subject"].str.replace("va_", "te_", regex=False)).to_csv(unseen, index=False)
    test_npz, figure = tmp_path / "embeddings_test.npz", tmp_path / "embeddings.png"
    main(["predict", "--manifest", str(unseen), "--checkpoint", str(out / "best_hierarchy.pt"), "--predictions-out",
          str(tmp_path / "p.csv"), "--embeddings-out", str(test_npz)])
    main(["project", str(out / "embeddings_val.npz"), str(test_npz), "--output", str(figure)])
    np.testing.assert_allclose(np.load(test_npz)["embedding"], embeddings["embedding"], rtol=1e-4, atol=1e-5)
    assert figure.stat().st_size > 10_000


# ----------------------------------------------------------------------------- the comparison models

def test_slice_resnet_prediction_is_the_mean_of_its_slices():
    torch.manual_seed(0)
    model = _model("resnet50", "none", trainable_from="fc", plane="coronal", n_slices=3, slice_spacing=2).eval()
    assert model.slice_indices(16) == [6, 8, 10]
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].in_features == 2048 and model.fc[0].out_features == 512 and model.fc[2].p == 0.5
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        out = model(x)
        per_slice = []
        for j in (6, 8, 10):  # coronal: slices across RAS y, the volume's second axis
            image = (x[:, :, :, j, :] - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD
            h = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(image)))))
            per_slice.append(torch.softmax(model.fc(torch.flatten(model.pool(h), 1)), 1))
    torch.testing.assert_close(out.exp(), torch.stack(per_slice).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))


def test_slice_resnet_freezing_and_one_channel_stem():
    from torchvision.models import resnet50

    torch.manual_seed(1)
    rgb = resnet50(weights=None)
    model = SliceResNet(rgb, 2, plane=EXPERIMENT.plane, n_slices=EXPERIMENT.n_slices, spacing=EXPERIMENT.slice_spacing)
    torch.testing.assert_close(model.stem[0].weight, rgb.conv1.weight.sum(1, keepdim=True))
    model = _model("resnet50", "none", trainable_from="fc")
    counts = count_parameters(model)
    assert counts["trainable"] == 2048 * 512 + 512 + 512 * 2 + 2
    assert [g["name"] for g in parameter_groups(model, lr_head=TRAIN.lr_head,
                                                 lr_backbone=TRAIN.lr_backbone)] == ["head"]
    with pytest.raises(cli.PipelineError, match="plane"):
        _model("resnet50", "none", plane="oblique")


def test_mvit_takes_a_volume_and_trains_only_its_last_stage():
    torch.manual_seed(0)
    model = _model("mvit_v2_s", "none", trainable_from="layer4")
    assert model.net.conv_proj.in_channels == 1
    stages = {stage_of(model, name) for name, p in model.named_parameters() if p.requires_grad}
    assert stages == {"layer4", "fc"}
    trained_blocks = {name.split(".")[2] for name, p in model.named_parameters()
                      if p.requires_grad and name.startswith("net.blocks.")}
    assert trained_blocks == {"15"}  # the one block of width 768; blocks 0-14 frozen
    assert all(p.requires_grad for p in model.net.norm.parameters())
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 24, 20, 28))  # resampled to 16x224x224 inside
    assert out.shape == (1, 2)


def test_pretrained_weights_per_architecture():
    assert _pretrained_enum("mvit_v2_s", "kinetics400").url.endswith("mvit_v2_s-ae3be167.pth")
    assert _pretrained_enum("resnet50", "imagenet").url.endswith("resnet50-0676ba61.pth")
    with pytest.raises(cli.PipelineError, match="resnet50 has no kinetics400 weights"):
        _pretrained_enum("resnet50", "kinetics400")


def test_phased_unfreezing_trains_layer4_from_the_named_epoch_and_survives_a_resume(tiny, tmp_path):
    """The 2D recipe: only the head in epoch 1, layer4 too from epoch 2; interrupted after epoch 1
    and resumed, the run still unfreezes on time; layer3 never moves."""
    out = tmp_path / "phased"
    recipe = {"model": {"arch": "resnet50", "trainable_from": "fc", "n_slices": 2}, "unfreeze_epoch": 2,
              "optimizer": "adam", "lr_backbone": 1e-3, "class_weights": "none", "sampler": "weighted", "max_epochs": 2}
    initial = new_training_state(_config(tiny, out, **recipe), torch.device("cpu")).model.state_dict()
    assert fit(_config(tiny, out, **recipe, run={"stop_after_epoch": 1})) is None
    after_one = load_checkpoint(out / "last.pt")["model"]
    fit(_config(tiny, out, **recipe))
    after_two = load_checkpoint(out / "last.pt")["model"]

    def moved(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and a[k].is_floating_point())
    assert moved(initial, after_one, "fc.") and not moved(initial, after_one, "layer4.")
    assert moved(after_one, after_two, "layer4.") and not moved(initial, after_two, "layer3.")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["trainable"] > 2048 * 512  # layer4 counts as trained at the end


def test_progress_is_logged_after_the_first_step_then_every_interval_and_at_the_end(caplog):
    """A CPU epoch of ADNI-sized data takes hours: its log shows step, running loss and ETA."""
    from workflow_scripts.learning.train import Progress

    now = [0.0]
    progress = Progress("epoch 3 training", 100, every=60, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="workflow_scripts.learning.train"):
        for step in range(1, 101):
            now[0] = 10.0 * step
            progress.step(step, float(step))
    lines = [r.getMessage() for r in caplog.records]
    # step 1 (10 s), then the first step 60 s after the last line (7, 13, ...), and the last step
    assert [int(line.split("step ")[1].split("/")[0]) for line in lines] == [1, 7, 13, 19, 25, 31, 37, 43, 49,
                                                                             55, 61, 67, 73, 79, 85, 91, 97, 100]
    assert lines[0] == "epoch 3 training: step 1/100, running loss 1.0000, 10.0 s/step, ETA 16:30"
    assert lines[1] == "epoch 3 training: step 7/100, running loss 4.0000, 10.0 s/step, ETA 15:30"
    assert lines[-1].endswith("step 100/100, running loss 50.5000, 10.0 s/step, ETA 0:00")
