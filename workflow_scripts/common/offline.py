"""`offline: true`: no job downloads anything. Where a download would happen, the file already on
this machine is used, or else what needs none, and the run's log says which (see README, Run)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

DOWNLOADED_WEIGHTS = ("kinetics400", "imagenet")


def offline_config(config: dict[str, Any]) -> list[str]:
    """Resolve every download of ``config`` (validated, defaults filled) without network, in place;
    returns one sentence per download point saying what is used instead."""
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.learning.models import pretrained_cache_path
    from workflow_scripts.preprocess.skullstrip import SYNTHSTRIP_FILENAME

    notes = []
    skullstrip = config["preprocess"]["skullstrip"]
    if skullstrip["method"] == "synthstrip" and not skullstrip.get("synthstrip_weights"):
        cached = Path(skullstrip["synthstrip_cache"]) / SYNTHSTRIP_FILENAME
        if cached.is_file():
            notes.append(f"offline: SynthStrip weights are not downloaded; the copy at {cached} is used")
        else:
            skullstrip["method"] = "deepbet"
            notes.append(f"offline: SynthStrip's weights would be downloaded (none at {cached}, no "
                         "preprocess.skullstrip.synthstrip_weights): skull stripping uses deepbet instead, whose "
                         "weights ship in its wheel; copy synthstrip.1.pt there to use SynthStrip")
    for name, experiment in config["experiments"].items():
        entry = resolve("experiments.*", experiment, f"experiments.{name}")  # the schema's defaults filled in
        weights = entry.weights
        if entry.kind == "volumetry" or weights not in DOWNLOADED_WEIGHTS or not entry.enabled:
            continue
        cached = pretrained_cache_path(entry.arch, weights=weights)
        if cached.is_file():
            notes.append(f"offline: {name}'s {weights} weights are not downloaded; torchvision's cached copy "
                         f"{cached} is used")
        else:
            experiment["weights"] = "none"
            notes.append(f"offline: {name}'s {weights} weights would be downloaded (none at {cached}): {name} "
                         "starts from random weights instead (weights: none, recorded in its summary and model "
                         "card); copy the file there (TORCH_HOME chooses the folder) for the pretrained start")
    return notes
