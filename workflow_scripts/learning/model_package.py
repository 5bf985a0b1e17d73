"""A trained model as a portable package: what a colleague needs to apply it elsewhere.

Every network experiment's selected checkpoint becomes ``results/models/<experiment>/package/``:

- ``model.pt``: the plain state dict of the torchvision network (no optimizer state);
- ``model.ts``: a TorchScript module that takes the cached tensor (float32, shape (N, 1, x, y, z),
  RAS, intensities in [0, 1]) and returns the class probabilities (CN, AD); it holds the
  z-normalisation over the brain (voxels > 0) the workflow applies before the network, so
  ``torch.jit.load`` is all a user needs;
- ``model_card.json``: architecture, weights origin, input shape and intensity normalisation, the
  preprocessing settings and method versions, the training data by class and phase, the selection
  rule, validation and test metrics, the decision threshold, library and code versions, and the
  SHA-256 of every training and validation subject id, series UID and tensor (the leakage guard of
  ``predict``; the ids themselves do not leave the study).

    python -m workflow_scripts.learning.model_package --summary results/models/M/summary.json \
        --checkpoint results/models/M/best_acc.pt --test-metrics results/evaluation/M/metrics.json \
        --scans results/scans.tsv --settings config.yaml --out-dir results/models/M/package

``--settings``: the config sections preprocess and data.classes (a JSON object, or a config file).
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import write_atomic, write_text_atomic

LOG = logging.getLogger(__name__)

CARD_VERSION = 1
CARD_FILE, STATE_FILE, SCRIPT_FILE = "model_card.json", "model.pt", "model.ts"
# Predictions are the argmax of the two-class softmax; no threshold is tuned on any scans.
DECISION_THRESHOLD = 0.5
INTENSITY_NORMALISATION = (
    "per scan: clip at the 0.5 and 99.5 percentiles of the voxels > 0 and map to [0, 1] (the workflow's tensor "
    "cache, stored as float16: workflow_scripts/learning/tensor_cache.py); then z-normalise with the mean and standard "
    "deviation of the voxels > 0 (TorchIO ZNormalization, masked; model.ts does this step itself)")
NORMALISED_IN_SCRIPT = ("r3d_18", "mc3_18", "r2plus1d_18", "mvit_v2_s")  # resnet50 normalises slices itself


def identifier_digest(kind: str, value: str) -> str:
    """SHA-256 of an identifier (kind: subject or series_uid), so a package can refuse known scans
    without carrying the study's ids."""
    return hashlib.sha256(f"{kind}:{str(value).strip()}".encode()).hexdigest()


class PackagedClassifier(nn.Module):
    """The network behind the workflow's input transform: [0, 1] tensor in, class probabilities out."""

    def __init__(self, network: nn.Module, z_normalise: bool):
        super().__init__()
        self.network = network
        self.z_normalise = z_normalise

    def normalise(self, volume: torch.Tensor) -> torch.Tensor:
        """The network's input: TorchIO's masked ZNormalization (statistics of the voxels > 0, unbiased std)."""
        x = volume.float()
        if not self.z_normalise:
            return x
        mask = (x > 0).to(x.dtype)
        count = mask.sum(dim=(1, 2, 3, 4), keepdim=True)
        mean = (x * mask).sum(dim=(1, 2, 3, 4), keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(dim=(1, 2, 3, 4), keepdim=True) / (count - 1)
        return (x - mean) / var.sqrt()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(self.normalise(volume)).float(), dim=1)


def _phase_of(image_ids: Sequence[str], scans: pd.DataFrame) -> list[str]:
    phases = dict(zip(scans["image_id"].astype(str), scans.get("phase", pd.Series(dtype=str)).astype(str)))
    return [phases.get(str(i), "unknown") for i in image_ids]


def classes_by_label(classes: Sequence[str]) -> list[str]:
    """The class names in label order (label 0 first): data.classes lists the positive (label 1) class first."""
    return [classes[1], classes[0]]


def training_data_summary(record: dict[str, Any], scans: pd.DataFrame, *, classes: Sequence[str]) -> dict[str, Any]:
    """Scans and subjects per role (train, val), by class and by ADNI phase."""
    names = classes_by_label(classes)
    summary = {}
    for role in ("train", "val"):
        table = pd.DataFrame(record[role]["scans"])
        table["class"] = [names[int(v)] if 0 <= int(v) < len(names) else str(v) for v in table["label"]]
        table["phase"] = _phase_of(table["image_id"], scans)
        summary[role] = {
            "scans": int(len(table)), "subjects": int(table["subject"].nunique()),
            "by_class": {c: {"scans": int(len(t)), "subjects": int(t["subject"].nunique())}
                         for c, t in table.groupby("class")},
            "by_phase": {p: int(len(t)) for p, t in table.groupby("phase")},
        }
    return summary


def known_identifiers(record: dict[str, Any], scans: pd.DataFrame) -> dict[str, list[str]]:
    """Digests of the training and validation subjects, DICOM series and tensors (``predict``'s guard)."""
    image_ids = {str(s["image_id"]) for role in ("train", "val") for s in record[role]["scans"]}
    subjects = {str(s["subject"]) for role in ("train", "val") for s in record[role]["scans"]}
    uids = scans.loc[scans["image_id"].astype(str).isin(image_ids), "series_uid"] \
        if "series_uid" in scans.columns else pd.Series(dtype=str)
    return {
        "subject_sha256": sorted(identifier_digest("subject", s) for s in subjects),
        "series_uid_sha256": sorted(identifier_digest("series_uid", u) for u in uids.dropna().astype(str) if u),
        "tensor_sha256": sorted({str(s["sha256"]) for role in ("train", "val") for s in record[role]["scans"]}),
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def model_card(summary: dict[str, Any], checkpoint: str, test_metrics: dict[str, Any] | None,
               scans: pd.DataFrame, preprocess: dict[str, Any], experiment: str, *,
               classes: Sequence[str]) -> dict[str, Any]:
    """The model card: everything a receiver needs to use the model as it was trained, and judge it."""
    from workflow_scripts.report.report_tables import package_versions

    config = summary["config"]
    selection = summary["selection"]
    chosen = (summary.get("best") or {}).get(selection["rule"]) or {}
    validation = {k.removeprefix("val_"): _float(v) for k, v in chosen.items() if k.startswith("val_")}
    test = None
    if test_metrics:
        test = {level: test_metrics[level] for level in ("scan", "subject") if level in test_metrics}
        test.update({k: test_metrics.get(k) for k in ("n_scans", "n_subjects", "subjects_per_label",
                                                      "intervals_estimable", "bootstrap")})
    return {
        "card_version": CARD_VERSION,
        "experiment": experiment,
        "task": f"{classes[0]} (label 1) versus {classes[1]} (label 0) from one T1-weighted MRI",
        "classes": classes_by_label(classes),
        "classes_note": "in label order: the network's output column i is the probability of classes[i]",
        "architecture": {"arch": config["arch"], "num_classes": config["num_classes"], "in_channels": 1,
                         "trainable_from": config.get("trainable_from"),
                         "torchvision_adaptation": "stem[0] is a 1-channel Conv3d (the RGB kernels summed), fc is "
                                                   f"Linear(512, {config['num_classes']}) (workflow_scripts/learning/models.py)",
                         "slices": {k: config.get(k) for k in ("plane", "n_slices", "slice_spacing")}
                         if config["arch"] == "resnet50" else None},
        "weights_origin": config.get("weights"),
        "input": {"shape": [1, *summary["input_shape"]], "dtype": "float32", "orientation": "RAS (x, y, z)",
                  "intensity_normalisation": INTENSITY_NORMALISATION,
                  "model_ts_input": "the cached tensor ((N, 1, x, y, z), [0, 1]); output: the softmax over "
                                    "classes (label order)"},
        "preprocessing": {"stages": ["nifti (dicom2nifti)", "stripped", "resampled", "cropped128", "n4", "ras"],
                          "settings": preprocess},
        "decision_threshold": DECISION_THRESHOLD,
        "decision_rule": f"{classes[0]} when p({classes[0]}) >= decision_threshold (the argmax of the two-class softmax; not tuned on "
                         "any scans)",
        "selection": {"rule": selection["rule"] if Path(checkpoint).name == selection["checkpoint"]
                      else f"evaluate.checkpoint: {Path(checkpoint).stem}",
                      "epoch": selection["epoch"] if Path(checkpoint).name == selection["checkpoint"] else None,
                      "checkpoint": Path(checkpoint).name,
                      "chosen_on": "the validation split (val.csv)", "stop_reason": summary.get("stop_reason"),
                      "epochs_run": summary.get("epochs_run")},
        "training_data": training_data_summary(summary["data"], scans, classes=classes),
        "data_hash": summary["data"].get("hash"),
        "known_identifiers": known_identifiers(summary["data"], scans),
        "metrics": {"validation_at_selected_epoch": validation,
                    "validation_note": "the selection rule chose this epoch on these scans: optimistic",
                    "test": test, "test_note": "held-out test split, never used for a choice; scan and subject "
                                               "level, 95% bootstrap intervals in 'ci'"},
        "versions": package_versions(),
        "code_version": summary.get("code_version"),
        "seed": summary.get("seed"),
    }


def packaged_module(network: nn.Module, arch: str) -> PackagedClassifier:
    return PackagedClassifier(network, z_normalise=arch in NORMALISED_IN_SCRIPT).eval()


def script_module(module: PackagedClassifier, input_shape: Sequence[int]) -> torch.jit.ScriptModule:
    """TorchScript of the packaged module, traced on a brain-like input and checked against eager mode."""
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((1, 1, *input_shape), generator=generator)
    example[..., : max(1, input_shape[-1] // 8)] = 0  # some background, as in a real scan
    with torch.no_grad(), warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        difference = (traced(example) - module(example)).abs().max().item()
    if difference > 1e-5:
        raise cli.PipelineError(f"the TorchScript export differs from the network by {difference:g}")
    return traced


def write_package(summary_path: str | Path, checkpoint: str | Path, out_dir: str | Path, *, scans_path: str | Path,
                  preprocess: dict[str, Any], classes: Sequence[str], test_metrics_path: str | Path | None = None,
                  experiment: str | None = None) -> dict[str, Any]:
    """Write model.pt, model.ts (where the architecture can be traced) and model_card.json; returns the card."""
    from workflow_scripts.report.report_tables import read_json, read_tsv
    from workflow_scripts.learning.train import load_trained_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = read_json(summary_path, "training summary")
    scans = read_tsv(scans_path, "scans table")
    test_metrics = read_json(test_metrics_path, "test metrics") if test_metrics_path else None
    experiment = experiment or Path(summary_path).parent.name
    network, config = load_trained_model(checkpoint, "cpu")
    card = model_card(summary, str(checkpoint), test_metrics, scans, preprocess, experiment, classes=classes)
    write_atomic(out_dir / STATE_FILE, lambda tmp: torch.save(network.state_dict(), tmp))
    try:
        traced = script_module(packaged_module(network, config["arch"]), summary["input_shape"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            write_atomic(out_dir / SCRIPT_FILE, lambda tmp: torch.jit.save(traced, tmp))
        card["torchscript"] = {"file": SCRIPT_FILE, "note": INTENSITY_NORMALISATION.split("; then ")[1]}
    except Exception as err:  # an architecture the tracer cannot follow: the state dict still serves
        LOG.warning("%s: no TorchScript export (%s: %s); the package holds the state dict only", experiment,
                    type(err).__name__, err)
        (out_dir / SCRIPT_FILE).unlink(missing_ok=True)
        card["torchscript"] = None
    card["files"] = {name: {"bytes": (out_dir / name).stat().st_size}
                     for name in (STATE_FILE, SCRIPT_FILE) if (out_dir / name).exists()}
    write_text_atomic(json.dumps(card, indent=2, default=str) + "\n", out_dir / CARD_FILE)
    LOG.info("package of %s (%s, selected on %s at epoch %s) written to %s", experiment, config["arch"],
             card["selection"]["rule"], card["selection"]["epoch"], out_dir)
    return card


def read_card(package: str | Path) -> dict[str, Any]:
    """The model card of a package folder, with an error that says what a package is."""
    path = Path(package) / CARD_FILE
    if not path.is_file():
        raise cli.PipelineError(f"{package} is not a model package: it has no {CARD_FILE}; point predict.model at "
                                "results/models/<experiment>/package of a finished training run")
    card = json.loads(path.read_text(encoding="utf-8"))
    if card.get("card_version") != CARD_VERSION:
        raise cli.PipelineError(f"{path} is a model card of version {card.get('card_version')}; this workflow reads "
                                f"version {CARD_VERSION}: rebuild the package (rule model_package)")
    return card


def load_package(package: str | Path, device: str | torch.device = "cpu",
                 script: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The packaged model (tensor in, class probabilities out) and its card: the TorchScript file when
    there is one and ``script``, else the state dict in the workflow's network (which explanations need:
    hooks on its layers)."""
    card = read_card(package)
    script_file = Path(package) / SCRIPT_FILE
    if script and card.get("torchscript") and script_file.is_file():
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the file still loads
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(script_file), map_location=device).eval(), card
    from workflow_scripts.learning.models import build_model

    arch = card["architecture"]
    # The card's model keys; what it leaves out (the slices of a 3D network) takes the schema's defaults.
    given = {"arch": arch["arch"], "trainable_from": arch.get("trainable_from"), **(arch.get("slices") or {})}
    model = settings.resolve("experiments.*", {k: v for k, v in given.items() if v is not None})
    network = build_model(arch=model.arch, weights="none", num_classes=arch["num_classes"], in_channels=1,
                          trainable_from=model.trainable_from, plane=model.plane, n_slices=model.n_slices,
                          slice_spacing=model.slice_spacing)
    network.load_state_dict(torch.load(Path(package) / STATE_FILE, map_location="cpu", weights_only=True))
    return packaged_module(network, arch["arch"]).to(device), card


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--summary", required=True, help="the training run's summary.json")
    p.add_argument("--checkpoint", required=True, help="the selected checkpoint (best_acc.pt, best_loss.pt, ...)")
    p.add_argument("--scans", required=True, help="results/scans.tsv (phases and series UIDs)")
    settings.add_argument(p, "preprocess", "data.classes")
    p.add_argument("--test-metrics", help="the experiment's evaluation/metrics.json")
    p.add_argument("--experiment", help="experiment name (default: the summary's folder)")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    preprocess, classes = settings.read_job(args.settings, "preprocess", "data.classes")
    write_package(args.summary, args.checkpoint, args.out_dir, scans_path=args.scans, preprocess=preprocess.plain(),
                  test_metrics_path=args.test_metrics, experiment=args.experiment, classes=classes)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
