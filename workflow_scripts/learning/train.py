"""Train one classifier (one experiment, or one cross-validation fold): dissertation section 4.5.

    python -m workflow_scripts.learning.train fit --train splits/train.csv --val splits/val.csv --out-dir runs/main \\
        --settings '{"model": {"weights": "none"}, "train": {"max_epochs": 10}}'
    python -m workflow_scripts.learning.train fit --folds-csv splits/cv_folds.csv --fold 0 --out-dir runs/fold0
    python -m workflow_scripts.learning.train predict --manifest splits/test.csv --checkpoint runs/main/best_acc.pt \\
        --predictions-out runs/main/test_predictions.csv
    python -m workflow_scripts.learning.train project runs/main/embeddings_val.npz --output embeddings.png

``--settings`` is one object, {"model": {keys of experiments.<name>}, "train": {keys of train}}, as JSON
or a JSON/YAML file; every key left out takes its default from schemas/config.schema.yaml, and the
whole object is checked against that schema (learning.recipe.training_settings).

Manifests are CSVs with columns ``path, subject, image_id, group, label``. Each scan's
tensor is found, in this order: a ``tensor_path`` column; ``--tensor-dir`` as
``<tensor-dir>/<subject>/<image_id>.npy``; ``path`` itself when it ends in .npy; else
``path`` is a NIfTI volume rescaled on every read like ``tensor_cache`` does (correct
but slow: cache the tensors). Relative paths are relative to the working directory.

A volume of shape (x, y, z) enters the video network as one channel with x as its time
axis. Training scans get RandomGamma then RandomNoise (gamma first: it sees only the
non-negative [0, 1] intensities, so it never makes NaN), then z-normalisation over the
brain voxels (> 0 in the volume *before* noise, carried as a label map, so background
noise never counts as brain; ``znorm_mask: none`` uses the whole volume). Validation and
test scans are only z-normalised.

The dissertation's recipe is the default (AdamW, cosine warm restarts, early stopping when
validation accuracy and loss both stalled, the best-accuracy checkpoint); the options of the
comparisons (optimizer, warmup and scheduler, phased unfreezing, precision and loss scaling,
gradient clipping, weighted sampling, early-stopping monitor, selection rule, deterministic
mode, embeddings export) are switches of this one module, so every model is trained by the
same loop. The 2D baseline (``arch: resnet50``) sees [0, 1] intensities, not z-scores: its
model normalises slices with ImageNet's statistics.

A run resumes from ``last.pt`` only on the very scans it started on: every checkpoint and
summary.json carry a data record (per role, the subjects and each scan's image id, subject,
label and tensor SHA-256, and one hash of them all); a changed manifest row or tensor restarts
the run (or stops it, ``on_changed_settings: error``) with the change named. Prediction refuses
a manifest that shares a subject with the model's training or validation scans.

Randomness is keyed to (seed, epoch, scan): the shuffle of epoch e comes from a generator
seeded by (seed, e), each scan's augmentation from (seed, e, index), whichever DataLoader
worker loads it. An interrupted run resumed from ``last.pt`` therefore ends exactly where
an uninterrupted one does (on CPU, with the same --threads).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from workflow_scripts.common import cli
from workflow_scripts.learning.models import (build_model, count_parameters, parameter_groups,
                                     recalibrate_batchnorm, train_mode, unfreeze_from)
from workflow_scripts.common import settings
from workflow_scripts.learning.recipe import training_settings
from workflow_scripts.common.devices import autocast_dtype, pick_device
from workflow_scripts.common.nifti_io import write_json_atomic, write_text_atomic
from workflow_scripts.common.provenance import code_version, library_versions
from workflow_scripts.learning.checkpoints import (copy_atomic, save_torch_atomic, check_no_overlap, load_checkpoint,
                                                   restore_rng_states, resume_or_restart, rng_states, training_data)
from workflow_scripts.learning.embeddings import capture_embeddings, plot_embeddings, save_embeddings
from workflow_scripts.learning.scan_data import (ScanDataset, Splits, check_shapes, input_transform, load_splits,
                                                 make_loader, read_manifest, split_counts, tensor_sources)
from workflow_scripts.learning.wandb_run import log_artifacts, start_wandb

LOG = logging.getLogger(__name__)

# The checkpoint kept for each best-model selection rule (train.selection).
CHECKPOINTS = {"accuracy": "best_acc.pt", "loss": "best_loss.pt", "hierarchy": "best_hierarchy.pt"}
# The networks classify AD against CN: two outputs (evaluation.evaluate.metrics is binary).
NUM_CLASSES = 2
# Training's metrics take the network's own decision, the argmax of its two outputs: p(AD) >= 0.5. The
# reported figures use evaluate.threshold (evaluation.evaluate).
ARGMAX_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- training pieces

def class_weights(labels: Sequence[int], num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights w_c = N / (K * n_c), so each class contributes equally to the loss."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise cli.PipelineError(f"training labels per class {counts.tolist()}: every one of the {num_classes} "
                                "classes needs at least one training scan (check the split)")
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def sample_weights(labels: Sequence[int], num_classes: int = 2) -> list[float]:
    """Per-scan drawing weights 1 / n_class, so each class is drawn equally often (``sampler: weighted``)."""
    per_class = class_weights(labels, num_classes)
    return [float(per_class[int(label)]) for label in labels]


class EarlyStopping:
    """Stop when neither validation accuracy rose nor validation loss fell for ``patience`` epochs
    (``monitor="both"``, the dissertation's rule), or when the one monitored metric did not.

    Each metric has its own counter of epochs without a strict improvement.
    """

    def __init__(self, *, patience: int, monitor: str):
        if monitor not in ("both", "accuracy", "loss"):
            raise cli.PipelineError(f"early stopping monitors 'both', 'accuracy' or 'loss', not {monitor!r}")
        self.patience, self.monitor = patience, monitor
        self.best_accuracy, self.best_loss = -math.inf, math.inf
        self.accuracy_wait = self.loss_wait = 0
        self.stopped = False

    def update(self, accuracy: float, loss: float) -> dict[str, bool]:
        """Record one epoch; says which metric improved and whether to stop."""
        better_accuracy, better_loss = accuracy > self.best_accuracy, loss < self.best_loss
        if better_accuracy:
            self.best_accuracy, self.accuracy_wait = accuracy, 0
        else:
            self.accuracy_wait += 1
        if better_loss:
            self.best_loss, self.loss_wait = loss, 0
        else:
            self.loss_wait += 1
        stalled = {"accuracy": self.accuracy_wait >= self.patience, "loss": self.loss_wait >= self.patience}
        self.stopped = all(stalled.values()) if self.monitor == "both" else stalled[self.monitor]
        return {"accuracy": better_accuracy, "loss": better_loss, "stop": self.stopped}

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> dict:
    """Weighted cross-entropy over the whole split, and the split's accuracy, balanced accuracy, kappa and AUC
    from evaluation.evaluate.metrics, the function every reported figure comes from (None where undefined)."""
    from workflow_scripts.evaluation.evaluate import metrics

    logits, labels = logits.float().cpu(), labels.cpu()
    if logits.shape[1] != 2:
        raise cli.PipelineError(f"the network has {logits.shape[1]} outputs; training and evaluation report the "
                                "binary AD-versus-CN metrics, so the model needs 2 (num_classes 2)")
    loss = F.cross_entropy(logits, labels, weight=None if weight is None else weight.cpu()).item()
    shared = metrics(labels.numpy(), torch.softmax(logits, dim=1)[:, 1].numpy(), threshold=ARGMAX_THRESHOLD)
    return {"loss": loss, **{name: shared[name] for name in ("accuracy", "balanced_accuracy", "kappa", "auc")}}


def hierarchy_key(metrics: dict) -> tuple[float, float, float]:
    """The selection hierarchy's order: balanced accuracy, then Cohen's kappa, then AUC (an undefined one last)."""
    return tuple(-math.inf if metrics.get(name) is None else metrics[name]
                 for name in ("balanced_accuracy", "kappa", "auc"))


def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, device: torch.device,
            precision: str, channels_last: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and loss of one batch under ``precision``'s autocast; channels_last_3d inputs on CUDA by
    default (the fast path). The loss is always computed in fp32."""
    dtype = autocast_dtype(precision, device)
    channels_last = device.type == "cuda" and x.dim() == 5 if channels_last is None else channels_last
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    return logits, criterion(logits.float(), y.to(device, non_blocking=True))


@dataclass
class StepOptions:
    """How one optimisation step runs: mixed precision, its loss scaler (fp16) and gradient clipping."""
    precision: str  # train.precision
    scaler: torch.amp.GradScaler | None = None
    grad_clip_norm: float | None = None


def optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   options: StepOptions) -> float:
    """Backward, optional clipping of the gradients' global norm, step; returns the norm before clipping
    (NaN when not clipped). With fp16 the scaler unscales before clipping, as clipping needs true norms."""
    optimizer.zero_grad(set_to_none=True)
    scaler = options.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    norm = float("nan")
    if options.grad_clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


# A pass over the data logs its progress after the first step and then at least this often (wall
# seconds, checked after each step): an epoch of ADNI-sized data on a CPU takes hours.
PROGRESS_SECONDS = 60.0


class Progress:
    """Logs the step, the running loss and the pass's ETA after the first step and every ``every`` s."""

    def __init__(self, what: str, steps: int, every: float = PROGRESS_SECONDS, clock=time.perf_counter):
        self.what, self.steps, self.every, self.clock = what, steps, every, clock
        self.start = self.last = clock()
        self.loss_sum = 0.0

    def step(self, step: int, loss: float) -> None:
        self.loss_sum += loss
        now = self.clock()
        if step != 1 and step != self.steps and now - self.last < self.every:
            return
        self.last = now
        per_step = (now - self.start) / step
        eta = per_step * (self.steps - step)
        LOG.info("%s: step %d/%d, running loss %.4f, %.1f s/step, ETA %d:%02d", self.what, step, self.steps,
                 self.loss_sum / step, per_step, eta // 60, eta % 60)


def run_epoch(model: nn.Module, loader: DataLoader, device: torch.device, weight: torch.Tensor | None,
              optimizer: torch.optim.Optimizer | None, epoch: int,
              options: StepOptions) -> tuple[dict, torch.Tensor, list[int]]:
    """One pass over ``loader``: trains when an optimizer is given, else evaluates.

    Returns the split's metrics (plus the share of time spent waiting for data), its
    softmax probabilities and the dataset indices in the order seen.
    """
    training = optimizer is not None
    progress = Progress(f"epoch {epoch} training" if training else f"epoch {epoch} validation" if epoch
                        else "prediction", len(loader))
    train_mode(model) if training else model.eval()
    loader.sampler.set_epoch(epoch)
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
    all_logits, all_labels, all_indices = [], [], []
    wait = 0.0
    start = tick = time.perf_counter()
    with torch.set_grad_enabled(training):
        for step, (x, y, index) in enumerate(loader, start=1):
            wait += time.perf_counter() - tick
            logits, loss = forward(model, x, y, criterion, device, options.precision)
            if not torch.isfinite(loss):
                ids = [loader.dataset.names[i] for i in index.tolist()]
                raise cli.PipelineError(
                    f"non-finite {'training' if training else 'validation'} loss ({loss.item()}) at epoch {epoch}, "
                    f"step {step} (scans {', '.join(ids)}): check these scans' tensors for NaN/inf, or lower the "
                    "learning rates")
            if training:
                optimizer_step(model, loss, optimizer, options)
            progress.step(step, loss.item())
            all_logits.append(logits.detach().float().cpu())
            all_labels.append(y)
            all_indices += index.tolist()
            tick = time.perf_counter()
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = classification_metrics(logits, labels, weight)
    metrics["data_wait_share"] = wait / max(time.perf_counter() - start, 1e-9)
    return metrics, torch.softmax(logits, dim=1), all_indices


# ----------------------------------------------------------------------------- the run

def epoch_row(epoch: int, train: dict, val: dict, lrs: dict, seconds: float) -> dict[str, Any]:
    """One flat history row (``pd.DataFrame(history)`` gives the curves)."""
    row: dict[str, Any] = {"epoch": epoch}
    for split, metrics in (("train", train), ("val", val)):
        for key, value in metrics.items():
            row[f"{split}_{key}"] = value
    row.update({f"lr_{name}": lr for name, lr in lrs.items()})
    row["seconds"] = seconds
    return row


def predictions_table(table: pd.DataFrame, probs: torch.Tensor, indices: Sequence[int]) -> pd.DataFrame:
    """image_id, subject, label, prob (of class 1, AD) and pred, in manifest order."""
    order = np.argsort(indices)
    p = probs.numpy()[order]
    rows = table.iloc[np.asarray(indices)[order]]
    return pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "subject": rows["subject"].to_numpy(),
                         "label": rows["label"].to_numpy(), "prob": p[:, 1], "pred": p.argmax(axis=1)})


class EpochScheduler:
    """The learning-rate schedule, stepped once per epoch: an optional linear warmup over
    ``warmup_epochs`` (from 1/(warmup+1) of each group's rate up to it), then cosine warm restarts
    (the dissertation's), a cosine decay to ``eta_min`` over the remaining epochs, or
    ReduceLROnPlateau on the validation loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, warmup_epochs: int, max_epochs: int, t0: int,
                 t_mult: int, eta_min: float, plateau_factor: float, plateau_patience: int):
        sched = torch.optim.lr_scheduler
        self.optimizer, self.kind, self.warmup, self.epoch = optimizer, kind, warmup_epochs, 0
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        if kind == "warm_restarts":
            self.after = sched.CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=t_mult, eta_min=eta_min)
        elif kind == "cosine":
            self.after = sched.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs - warmup_epochs), eta_min=eta_min)
        elif kind == "plateau":
            self.after = sched.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor,
                                                 patience=plateau_patience)
        else:
            raise cli.PipelineError(f"scheduler must be warm_restarts, cosine or plateau, not {kind!r}")
        self._set_warmup_lrs()

    def _set_warmup_lrs(self) -> None:
        if self.epoch < self.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * (self.epoch + 1) / (self.warmup + 1)
        elif self.epoch == self.warmup and self.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base

    def step(self, val_loss: float) -> None:
        """End of an epoch whose validation loss was ``val_loss``."""
        self.epoch += 1
        if self.epoch <= self.warmup:
            self._set_warmup_lrs()
        elif self.kind == "plateau":
            self.after.step(val_loss)
        else:
            self.after.step()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "after": self.after.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.after.load_state_dict(state["after"])


@dataclass
class TrainingState:
    """Everything a checkpoint restores: model, optimizer, scheduler, loss scaler, early stopping, history;
    and the record of the scans it is trained on (``data_record``), which it does not restore but checks."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: EpochScheduler
    stopper: EarlyStopping
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    wandb_id: str | None = None
    step_options: StepOptions = field(default_factory=StepOptions)
    data: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint dict (loadable with ``torch.load(weights_only=True)``)."""
        scaler = self.step_options.scaler
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "scaler": None if scaler is None else scaler.state_dict(),
                "metrics": self.history[-1] if self.history else None,
                "early_stopping": self.stopper.state_dict(), "history": self.history, "best": self.best,
                "rng": rng_states(), "config": config, "wandb_id": self.wandb_id, "data": self.data}

    def restore(self, saved: dict[str, Any], config: dict[str, Any]) -> None:
        """Continue from a checkpoint written by ``checkpoint``."""
        self.model.load_state_dict(saved["model"])
        apply_unfreezing(self.model, config, saved["epoch"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.step_options.scaler is not None and saved.get("scaler"):
            self.step_options.scaler.load_state_dict(saved["scaler"])
        self.stopper.load_state_dict(saved["early_stopping"])
        restore_rng_states(saved["rng"])
        self.history, self.best, self.epoch = saved["history"], saved["best"], saved["epoch"]
        self.wandb_id = saved.get("wandb_id")


def model_from_config(config: dict[str, Any], weights: str | None = None) -> nn.Module:
    """The run's network (``weights`` overrides the configured ones, e.g. 'none' before loading a checkpoint)."""
    return build_model(arch=config["arch"], weights=config["weights"] if weights is None else weights,
                       num_classes=config["num_classes"], in_channels=1, trainable_from=config["trainable_from"],
                       plane=config["plane"], n_slices=config["n_slices"], slice_spacing=config["slice_spacing"])


def apply_unfreezing(model: nn.Module, config: dict[str, Any], epoch: int) -> None:
    """Phased unfreezing: from epoch ``unfreeze_epoch`` on, ``unfreeze_from`` and later stages train."""
    if config.get("unfreeze_epoch") is not None and epoch >= config["unfreeze_epoch"]:
        if unfreeze_from(model, config["unfreeze_from"]):
            LOG.info("epoch %d: %s and later stages now train", epoch, config["unfreeze_from"])


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (errors where none exists) and no cuDNN autotuning, for bit-identical reruns."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()


def new_training_state(config: dict[str, Any], device: torch.device) -> TrainingState:
    """Seeded model, AdamW (or Adam) over the head/backbone groups, the epoch scheduler, early stopping.

    Stages that phased unfreezing will train later are in the optimizer from the start; while
    frozen they get no gradient, so the optimizer leaves them alone (weight decay included).
    """
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] % 2**32)
    random.seed(config["seed"])
    set_deterministic(config["deterministic"])
    model = model_from_config(config)
    model.to(device)
    if device.type == "cuda" and config["arch"] != "resnet50":
        model.to(memory_format=torch.channels_last_3d)
    later = unfreeze_from(model, config["unfreeze_from"]) if config["unfreeze_epoch"] is not None else []
    groups = parameter_groups(model, lr_head=config["lr_head"], lr_backbone=config["lr_backbone"])
    for param in later:
        param.requires_grad_(False)
    fused = config["fused_optimizer"] and device.type == "cuda"
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config["optimizer"]]
    optimizer = optimizer_class(groups, weight_decay=config["weight_decay"], **({"fused": True} if fused else {}))
    scheduler = EpochScheduler(optimizer, kind=config["scheduler"], warmup_epochs=config["warmup_epochs"],
                               max_epochs=config["max_epochs"], t0=config["t0"], t_mult=config["t_mult"],
                               eta_min=config["eta_min"], plateau_factor=config["plateau_factor"],
                               plateau_patience=config["plateau_patience"])
    autocast_dtype(config["precision"], device)  # fp16 off CUDA fails here, before any epoch
    scaler = torch.amp.GradScaler("cuda") if config["precision"] == "fp16" else None
    options = StepOptions(config["precision"], scaler, config["grad_clip_norm"])
    return TrainingState(model, optimizer, scheduler,
                         EarlyStopping(patience=config["patience"], monitor=config["early_stopping"]),
                         step_options=options)


def save_epoch(state: TrainingState, config: dict[str, Any], out_dir: Path, improved: dict[str, bool]) -> None:
    """last.pt every epoch; best_acc.pt / best_loss.pt / best_hierarchy.pt when that selection rule's
    validation metric improved (hard links to last.pt, so no extra disk)."""
    last = out_dir / "last.pt"
    save_torch_atomic(state.checkpoint(config), last)
    for rule, name in CHECKPOINTS.items():
        if improved[rule]:
            copy_atomic(last, out_dir / name)
    write_json_atomic(state.history, out_dir / "history.json")


def train_epoch(state: TrainingState, loaders: tuple[DataLoader, DataLoader], device: torch.device,
                weight: torch.Tensor | None, config: dict[str, Any],
                recalibration: DataLoader | None = None) -> dict[str, bool]:
    """Train and validate one epoch, step the scheduler, record the history row and the best epochs
    under each selection rule; says which rules improved."""
    state.epoch += 1
    apply_unfreezing(state.model, config, state.epoch)
    tick = time.perf_counter()
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(state.optimizer.param_groups)}
    train_metrics, _, _ = run_epoch(state.model, loaders[0], device, weight, state.optimizer, state.epoch,
                                    state.step_options)
    if recalibration is not None:  # --recalibrate-bn
        recalibrate_batchnorm(state.model, (x for x, _, _ in recalibration), device)
    val_metrics, _, _ = run_epoch(state.model, loaders[1], device, weight, None, state.epoch, state.step_options)
    state.scheduler.step(val_metrics["loss"])
    improved = state.stopper.update(val_metrics["accuracy"], val_metrics["loss"])
    best_hierarchy = state.best.get("hierarchy")
    improved["hierarchy"] = best_hierarchy is None or hierarchy_key(val_metrics) > hierarchy_key(
        {k.removeprefix("val_"): v for k, v in best_hierarchy.items() if k.startswith("val_")})
    row = epoch_row(state.epoch, train_metrics, val_metrics, lrs, time.perf_counter() - tick)
    state.history.append(row)
    for rule in CHECKPOINTS:
        if improved[rule]:
            state.best[rule] = row
    LOG.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f auc %s | %.1fs", state.epoch,
             row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"], row["val_auc"],
             row["seconds"])
    return improved


def write_results(state: TrainingState, config: dict[str, Any], splits: Splits, val_loader: DataLoader,
                  device: torch.device, weight: torch.Tensor | None, out_dir: Path) -> dict[str, Any]:
    """val_predictions.csv (and embeddings_val.npz) from the checkpoint the selection rule picked, then
    summary.json; returns the summary."""
    selected = CHECKPOINTS[config["selection"]]
    state.model.load_state_dict(load_checkpoint(out_dir / selected)["model"])
    with capture_embeddings(state.model) as captured:
        _, probs, indices = run_epoch(state.model, val_loader, device, weight, None, 0, state.step_options)
    write_text_atomic(predictions_table(splits.val, probs, indices).to_csv(index=False),
                      out_dir / "val_predictions.csv")
    if config["export_embeddings"]:
        save_embeddings(out_dir / "embeddings_val.npz", splits.val, probs, indices, captured)
    write_json_atomic(state.history, out_dir / "history.json")
    summary = {
        "config": config, "seed": config["seed"], "code_version": code_version(), "versions": library_versions(),
        "device": str(device), "input_shape": list(splits.shape),
        "splits": {"train": split_counts(splits.train), "val": split_counts(splits.val)},
        "data": state.data,
        "class_weights": None if weight is None else weight.tolist(),
        "parameters": count_parameters(state.model),
        "epochs_run": len(state.history),
        "stop_reason": "early_stopping" if state.stopper.stopped else "max_epochs",
        "selection": {"rule": config["selection"], "checkpoint": selected,
                      "epoch": state.best[config["selection"]]["epoch"]},
        "best": {rule: state.best.get(rule) for rule in CHECKPOINTS},
    }
    write_json_atomic(summary, out_dir / "summary.json")
    return summary


def fit(config: dict[str, Any]) -> dict[str, Any] | None:
    """Train (or resume from last.pt) one run; returns the summary (None if stopped by --stop-after-epoch)."""
    cli.limit_threads(config["threads"])
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config)
    weight = class_weights(splits.train["label"], config["num_classes"]) if config["class_weights"] == "inverse" \
        else None
    device = pick_device(config["device"])
    state = new_training_state(config, device)
    state.data = training_data(splits)
    resume_or_restart(state, config, out_dir)

    seed, pin = config["seed"], device.type == "cuda"
    drawing = sample_weights(splits.train["label"], config["num_classes"]) if config["sampler"] == "weighted" \
        else None
    loaders = tuple(
        make_loader(ScanDataset(sources, table["label"], input_transform(config, train), seed, table["image_id"]),
                    config["batch_size"], train, seed, config["num_workers"], pin, drawing if train else None)
        for sources, table, train in ((splits.train_sources, splits.train, True),
                                      (splits.val_sources, splits.val, False)))
    recalibration = None
    if config["recalibrate_bn"]:  # the training scans again, in order and without augmentation
        recalibration = make_loader(ScanDataset(splits.train_sources, splits.train["label"],
                                                input_transform(config, False), seed, splits.train["image_id"]),
                                    config["batch_size"], False, seed, config["num_workers"], pin)
    run = start_wandb(config, out_dir, state.wandb_id)
    state.wandb_id = None if run is None else run.id
    try:
        while state.epoch < config["max_epochs"] and not state.stopper.stopped:
            improved = train_epoch(state, loaders, device, weight, config, recalibration)
            save_epoch(state, config, out_dir, improved)
            if run is not None:
                run.log({k: v for k, v in state.history[-1].items() if v is not None}, step=state.epoch)
            if config["stop_after_epoch"] is not None and state.epoch >= config["stop_after_epoch"]:
                LOG.warning("stopping after epoch %d as asked (--stop-after-epoch); rerun to resume", state.epoch)
                return None
        summary = write_results(state, config, splits, loaders[1], device, weight, out_dir)
        if run is not None:
            chosen = state.best[config["selection"]]
            run.summary.update({"best_val_accuracy": chosen["val_accuracy"], "best_epoch": chosen["epoch"]})
            log_artifacts(run, out_dir, config["run_name"])
        return summary
    finally:
        if run is not None:
            run.finish()


def load_trained_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The network of a checkpoint written by ``fit``, in eval mode on ``device``, and the run's settings."""
    return trained_model(load_checkpoint(checkpoint), device)


def trained_model(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The network of a loaded checkpoint dict, in eval mode on ``device``, and the run's settings."""
    config = state["config"]
    model = model_from_config(config, weights="none")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


def predict(checkpoint: str | os.PathLike, manifest: str | os.PathLike, output: str | os.PathLike,
            tensor_dir: str | None = None, device: str | None = None, batch_size: int | None = None,
            num_workers: int | None = None, embeddings_out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Predictions of a saved checkpoint on a manifest (e.g. the test split), written as CSV, and
    optionally the scans' penultimate-layer embeddings (npz). A manifest sharing a subject with the
    model's training or validation scans is refused (``check_no_overlap``). Device, batch size and
    loader workers are the training run's settings unless given."""
    table = read_manifest(manifest)
    state = load_checkpoint(checkpoint)
    check_no_overlap(table, state.get("data"), checkpoint, manifest)
    trained = state["config"]
    dev = pick_device(device or trained["device"])
    batch_size = batch_size or trained["batch_size"]
    num_workers = trained["num_workers"] if num_workers is None else num_workers
    model, config = trained_model(state, dev)
    LOG.info("predicting %s with %s (%s, trained with selection rule %s); none of its %d subjects is among the "
             "model's training or validation subjects", manifest, checkpoint, config["arch"],
             config.get("selection", "accuracy"), table["subject"].nunique())
    sources = tensor_sources(table, tensor_dir)
    check_shapes(sources, list(table["image_id"]))
    loader = make_loader(ScanDataset(sources, table["label"], input_transform(config, False), config["seed"],
                                     table["image_id"]),
                         batch_size, False, config["seed"], num_workers, dev.type == "cuda")
    with capture_embeddings(model) as captured:
        _, probs, indices = run_epoch(model, loader, dev, None, None, 0, StepOptions(config.get("precision", "auto")))
    predictions = predictions_table(table, probs, indices)
    write_text_atomic(predictions.to_csv(index=False), output)
    if embeddings_out:
        save_embeddings(Path(embeddings_out), table, probs, indices, captured)
    return predictions


def build_parser() -> argparse.ArgumentParser:
    """Three subcommands; arguments carry paths, the settings come as one object (--settings)."""
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    fit_cmd = sub.add_parser("fit", help="train one run (or resume it from last.pt)")
    fit_cmd.add_argument("--settings", default="{}",
                         help='the run\'s settings, {"model": {...experiments.<name> keys}, "train": {...train keys}}, '
                              "as JSON or a JSON/YAML file; what is left out takes the schema's default")
    fit_cmd.add_argument("--train", help="training manifest CSV (path, subject, image_id, group, label)")
    fit_cmd.add_argument("--val", help="validation manifest CSV")
    fit_cmd.add_argument("--folds-csv", help="the split's cv_folds.csv; with --fold, replaces --train/--val")
    fit_cmd.add_argument("--fold", type=int, help="outer fold of a CV run (trained on cv/fold<k>/train.csv, "
                         "selected on its val.csv; the fold itself is only reported on)")
    fit_cmd.add_argument("--tensor-dir", help="cached tensors as <tensor-dir>/<subject>/<image_id>.npy")
    fit_cmd.add_argument("--out-dir", required=True,
                         help="run folder: checkpoints, history.json, summary.json, val_predictions.csv")
    fit_cmd.add_argument("--run-name", help="W&B run and artifact name (default: the out-dir's name)")
    fit_cmd.add_argument("--no-resume", dest="resume", action="store_false",
                         help="start afresh, removing an earlier run's checkpoints in --out-dir")
    fit_cmd.add_argument("--stop-after-epoch", type=int, help="debug: stop after this epoch as if interrupted")
    pred = sub.add_parser("predict", help="a checkpoint's predictions on a manifest, with the device, batch size "
                          "and loader workers of the run that wrote it")
    pred.add_argument("--manifest", required=True, help="manifest to predict (e.g. the test split)")
    pred.add_argument("--checkpoint", required=True, help="checkpoint written by a training run (e.g. best_acc.pt)")
    pred.add_argument("--tensor-dir", help="cached tensors as <tensor-dir>/<subject>/<image_id>.npy")
    pred.add_argument("--predictions-out", required=True, help="CSV to write: image_id, subject, label, prob, pred")
    pred.add_argument("--embeddings-out", help="npz of the scans' penultimate-layer embeddings")
    proj = sub.add_parser("project", help="the 2D principal-component projection of embeddings files")
    proj.add_argument("embeddings", nargs="+", metavar="NPZ", help="embeddings files (e.g. val and test)")
    proj.add_argument("--output", required=True, help="PNG to write")
    return p


def run_config(job: Mapping[str, Any], *, out_dir: str | os.PathLike, train: str | os.PathLike | None = None,
               val: str | os.PathLike | None = None, folds_csv: str | os.PathLike | None = None,
               fold: int | None = None, tensor_dir: str | os.PathLike | None = None, run_name: str | None = None,
               threads: int = 1, resume: bool = True, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """A run's settings (recipe.training_settings) and paths as one flat record of plain JSON values: what
    ``fit`` reads, and what checkpoints and summary.json keep to tell a resumption from a changed run."""
    recipe = dict(job["train"].plain() if hasattr(job["train"], "plain") else job["train"])
    augmentation, wandb_settings = recipe.pop("augmentation"), recipe.pop("wandb")
    paths = {"train": train, "val": val, "folds_csv": folds_csv, "tensor_dir": tensor_dir}
    return {
        "threads": threads, **{k: None if v is None else str(v) for k, v in paths.items()}, "fold": fold,
        "out_dir": str(out_dir), "run_name": run_name or Path(out_dir).name, "resume": resume,
        "stop_after_epoch": stop_after_epoch, "num_classes": NUM_CLASSES, **dict(job["model"]), **recipe,
        **augmentation, **{f"wandb_{k}": v for k, v in wandb_settings.items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.limit_threads(args.threads)
    if args.command == "predict":
        predict(args.checkpoint, args.manifest, args.predictions_out, args.tensor_dir,
                embeddings_out=args.embeddings_out)
    elif args.command == "project":
        plot_embeddings(args.embeddings, args.output)
    else:
        given = settings.load_json(args.settings)
        job = training_settings(given.get("train"), given.get("model"))
        fit(run_config(job, out_dir=args.out_dir, train=args.train, val=args.val, folds_csv=args.folds_csv,
                       fold=args.fold, tensor_dir=args.tensor_dir, run_name=args.run_name, threads=args.threads,
                       resume=args.resume, stop_after_epoch=args.stop_after_epoch))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
