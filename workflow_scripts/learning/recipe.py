"""An experiment's training settings: its model keys and its recipe (config ``train`` with the experiment's
own overrides), completed with the schema's defaults and checked.

Kept free of torch so the Snakefile can call it at parse time: a contradictory recipe stops
the run before any job starts, with the same message the training command gives.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from workflow_scripts.common import cli, settings

# The keys of experiments.<name> that training, prediction and the model package use.
MODEL_KEYS = ("arch", "weights", "trainable_from", "plane", "n_slices", "slice_spacing")

# Options that only make sense on CUDA are accepted everywhere and ignored (with a log line) on
# other devices, except fp16, which needs a GradScaler and CUDA's half-precision kernels.


def merge_recipe(train: Mapping[str, Any], overrides: Mapping[str, Any] | None, experiment: str = "") -> dict:
    """``train`` with ``overrides`` applied (nested sections merged key by key); unknown keys are named."""
    merged = copy.deepcopy(dict(train))
    for key, value in (overrides or {}).items():
        if key not in merged:
            raise cli.PipelineError(f"experiments.{experiment}.train.{key} is not a key of `train`; the keys are "
                                    f"{', '.join(sorted(train))}")
        if isinstance(merged[key], dict) and isinstance(value, Mapping):
            unknown = set(value) - set(merged[key])
            if unknown:
                raise cli.PipelineError(f"experiments.{experiment}.train.{key} has unknown keys {sorted(unknown)}")
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    check_recipe(merged, f"experiments.{experiment}.train" if experiment else "train")
    return merged


def check_recipe(recipe: Mapping[str, Any], where: str = "train") -> None:
    """Reject settings that contradict each other (each alone is checked by the schema or argparse)."""
    if recipe.get("class_weights") == "inverse" and recipe.get("sampler") == "weighted":
        raise cli.PipelineError(
            f"{where}: class_weights 'inverse' and sampler 'weighted' both balance the classes, and together "
            "they over-correct (the minority class would count twice over); choose one: class_weights: none "
            "with sampler: weighted, or sampler: none with class_weights: inverse")
    if recipe.get("unfreeze_epoch") is not None and recipe["unfreeze_epoch"] < 2:
        raise cli.PipelineError(f"{where}: unfreeze_epoch must be 2 or later (epoch 1 is the first), got "
                                f"{recipe['unfreeze_epoch']}; to train those layers from the start set trainable_from")
    if recipe.get("warmup_epochs", 0) and recipe.get("warmup_epochs", 0) >= recipe.get("max_epochs", 1 << 30):
        raise cli.PipelineError(f"{where}: warmup_epochs ({recipe['warmup_epochs']}) must be fewer than max_epochs "
                                f"({recipe['max_epochs']})")


def training_settings(train: Mapping[str, Any] | None, experiment: Mapping[str, Any] | None = None,
                      name: str = "") -> settings.Settings:
    """The one settings object of an experiment's training jobs: ``{"model": <MODEL_KEYS>, "train": <recipe>}``.

    ``train`` is config ``train`` (or part of it) and ``experiment`` the entry experiments.<name> (or part of
    it, e.g. ``{"weights": "none"}``); what they leave out comes from the schema's defaults.
    """
    experiment = dict(experiment or {})
    where = f"experiments.{name}" if name else "model"
    model = settings.resolve("experiments.*", {k: v for k, v in experiment.items() if k != "train"}, where)
    recipe = merge_recipe(settings.resolve("train", train).plain(), experiment.get("train"), name)
    recipe = settings.resolve("train", recipe, f"{where}.train" if name else "train")
    return settings.Settings({"model": {key: model[key] for key in MODEL_KEYS}, "train": recipe.plain()})
