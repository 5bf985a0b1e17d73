"""A training run's checkpoints and the data record that decides whether one is resumed.

Every checkpoint and summary.json carries a data record (per role, the subjects and each scan's image id,
subject, label and tensor SHA-256, and one hash of them all): a run resumes from ``last.pt`` only on the
very scans and settings it started with, and prediction refuses scans of the model's own subjects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import torch

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import partial_prefix, remove_stale_partials, write_atomic

LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from workflow_scripts.learning.scan_data import Splits
    from workflow_scripts.learning.train import TrainingState


# Everything a training run writes in its folder (glob patterns), removed before a fresh start.
RUN_FILES = ("*.pt", "history.json", "summary.json", "*predictions*.csv", "embeddings_*.npz")


# Settings that may differ between an interrupted run and its resumption: they change how
# or how long the run goes on, not what one epoch computes.
RESUMABLE_KEYS = {"max_epochs", "stop_after_epoch", "num_workers", "device", "threads", "wandb_mode",
                  "wandb_project", "wandb_entity", "resume", "on_changed_settings", "out_dir", "run_name",
                  "export_embeddings"}


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` atomically: no half-written checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def copy_atomic(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to (or, failing that, a copy of) ``source``, atomically.

    ``last.pt`` is replaced by a new file each epoch, so the link keeps the old contents.
    """
    import shutil

    remove_stale_partials(target)
    tmp = target.with_name(f"{partial_prefix(target)}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    states = {"torch": torch.get_rng_state(),
              "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                        "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                        "gauss": float(np_state["gauss"])},
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the RNG states saved by ``rng_states``."""
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by this module, read safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise cli.PipelineError(f"cannot read checkpoint {path}: {err}; delete it to start the run afresh") from err


def changed_settings(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Settings that differ from those of a saved run, other than the ones a resumption may change."""
    return [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(saved) | set(config))
            if k not in RESUMABLE_KEYS and saved.get(k) != config.get(k)]


def clear_run(out_dir: Path) -> None:
    """Remove a previous run's checkpoints, history, summary, predictions and embeddings, so nothing
    of it is resumed or mistaken for the new run's."""
    for pattern in RUN_FILES:
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)


def resume_or_restart(state: TrainingState, config: dict[str, Any], out_dir: Path) -> None:
    """Continue from out_dir/last.pt only when it was written on this run's scans (``state.data``:
    the same manifest rows and tensor contents) with this run's settings.

    Otherwise ``on_changed_settings`` decides: "error" stops, naming what changed; "restart"
    clears the old run's files and starts afresh. --no-resume always starts afresh, and so does
    a folder without last.pt (clearing any files an older run left there).
    """
    last = out_dir / "last.pt"
    if not config["resume"] or not last.is_file():
        clear_run(out_dir)
        return
    saved = load_checkpoint(last)
    changed = changed_settings(saved["config"], config) + data_changes(saved.get("data"), state.data, config)
    if changed and config["on_changed_settings"] == "restart":
        LOG.warning("settings or training data changed since %s was written (%s): starting afresh", last,
                    "; ".join(changed))
        clear_run(out_dir)
        return
    if changed:
        raise cli.PipelineError(f"{last} was written with other settings or training data ({'; '.join(changed)}); "
                                f"delete the checkpoints in {out_dir}, pass --no-resume, or set train.on_changed_settings: "
                                "restart")
    state.restore(saved, config)
    LOG.info("resuming %s after epoch %d (same settings; same scans, data hash %s)", out_dir, state.epoch,
             state.data["hash"][:12])


def scan_digests(sources: Sequence[Path]) -> list[str]:
    """SHA-256 of each file a scan is read from: new contents under an old name are new data."""
    from workflow_scripts.preprocess.skullstrip import sha256_of

    return [sha256_of(path) for path in sources]


def data_record(tables: dict[str, pd.DataFrame], digests: dict[str, Sequence[str]]) -> dict[str, Any]:
    """What a model learnt from, per role (train, val): its subjects and, in manifest order, each
    scan's image id, subject, label and content digest; ``hash`` is the SHA-256 of all of it.

    Saved in every checkpoint and summary.json, so resuming and prediction can check a model's
    scans and subjects without its manifests.
    """
    record: dict[str, Any] = {}
    rows = []
    for role, table in tables.items():
        scans = [{"image_id": str(i), "subject": str(s), "label": int(v), "sha256": str(d)}
                 for i, s, v, d in zip(table["image_id"], table["subject"], table["label"], digests[role], strict=True)]
        record[role] = {"subjects": sorted({scan["subject"] for scan in scans}), "scans": scans}
        rows += [[role, scan["image_id"], scan["subject"], scan["label"], scan["sha256"]] for scan in scans]
    record["hash"] = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return record


def training_data(splits: Splits) -> dict[str, Any]:
    """The run's data record: the manifests' rows and the SHA-256 of every scan's tensor."""
    return data_record({"train": splits.train, "val": splits.val},
                       {"train": scan_digests(splits.train_sources), "val": scan_digests(splits.val_sources)})


def _ids(ids: Sequence[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def data_changes(saved: dict[str, Any] | None, current: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """How the scans of a saved run differ from this run's, per manifest: scans added or removed (by
    image id), labels or subjects changed, tensor contents changed, or the same scans reordered."""
    if not saved or "hash" not in saved:
        return ["the checkpoint records no training data (written before data records were kept), so its "
                "scans cannot be checked"]
    if saved["hash"] == current["hash"]:
        return []
    changes = []
    for role, what in (("train", "training"), ("val", "validation")):
        source = config.get(role) or (f"{config['folds_csv']} fold {config['fold']}" if config.get("folds_csv") else "")
        name = f"{what} manifest{f' {source}' if source else ''}"
        old = {scan["image_id"]: scan for scan in saved.get(role, {}).get("scans", [])}
        new = {scan["image_id"]: scan for scan in current[role]["scans"]}
        added, removed = [i for i in new if i not in old], [i for i in old if i not in new]
        both = [i for i in new if i in old]
        parts = [f"{len(added)} scan(s) added ({_ids(added)})"] if added else []
        parts += [f"{len(removed)} scan(s) removed ({_ids(removed)})"] if removed else []
        for key, label in (("label", "labels"), ("subject", "subjects")):
            differ = [f"{i} {old[i][key]} -> {new[i][key]}" for i in both if old[i][key] != new[i][key]]
            parts += [f"{label} changed ({_ids(differ)})"] if differ else []
        altered = [i for i in both if old[i]["sha256"] != new[i]["sha256"]]
        parts += [f"tensor contents changed ({_ids(altered)})"] if altered else []
        if not parts and list(old) != list(new):
            parts.append("the same scans in another order")
        changes += [f"{name}: {', '.join(parts)}"] if parts else []
    return changes or [f"data hash {saved['hash'][:12]} -> {current['hash'][:12]}"]


def check_no_overlap(table: pd.DataFrame, record: dict[str, Any] | None, model: str | os.PathLike,
                     manifest: str | os.PathLike) -> None:
    """Refuse to score subjects a model was trained or selected on: its figures on them would be optimistic
    (the leakage a re-split with a reused model causes)."""
    if not record or not all(role in record for role in ("train", "val")):
        raise cli.PipelineError(f"model {model} records no training and validation subjects (written before "
                                f"data records were kept), so {manifest} cannot be checked for overlap with them; "
                                "re-train the model")
    subjects = set(table["subject"].astype(str))
    for role, what in (("train", "training"), ("val", "validation")):
        shared = sorted(subjects & set(record[role]["subjects"]))
        if shared:
            raise cli.PipelineError(
                f"{manifest} holds {len(shared)} subject(s) that model {model} used as {what} data: {_ids(shared)}; "
                "a model must not be scored on subjects it was trained or selected on: predict a manifest of other "
                "subjects, or re-train the model on a split that holds these out")
