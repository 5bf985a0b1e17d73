"""Hippocampal volumetry: left/right hippocampal volumes per scan, and the biomarker baseline
classifier on them (logistic regression), judged like the networks.

    python -m workflow_scripts.hippocampus.volumetry volumes --scans results/scans.tsv \\
        --masks-pattern 'results/hippocampus_atlas/{subject}/{image_id}.nii.gz' \\
        --icv-pattern 'results/stripped/{subject}/{image_id}_mask.nii.gz' --output results/volumetry/atlas/volumes.tsv
    python -m workflow_scripts.hippocampus.volumetry fit --volumes results/volumetry/atlas/volumes.tsv \\
        --train results/splits/train.csv --val results/splits/val.csv --out-dir results/models/hippocampal_volumetry \\
        --settings '{"experiment": {"features": ["left_icv", "right_icv"], "C": 1.0, "masks": "atlas"}}'
    python -m workflow_scripts.hippocampus.volumetry fit ... --folds-csv results/splits/cv_folds.csv --fold 0 --out-dir ...
    python -m workflow_scripts.hippocampus.volumetry predict --model results/models/hippocampal_volumetry/model.joblib \\
        --volumes ... --manifest results/splits/test.csv \\
        --output results/evaluation/hippocampal_volumetry/test_predictions.csv

Volumes are voxel counts times the voxel volume of the mask's own header (mm^3), so masks on
any grid (the atlas labels on the 128^3 model input, U-Net masks, the native-grid brain mask)
are measured alike. The intracranial volume (ICV) is the volume of the stage-2 skull-strip
mask, a brain-mask proxy for ICV; dividing by it removes head size, as volumetric AD studies
do (Jack et al., Neurology 1992; Whitwell et al., 2001). The classifier is scikit-learn's
LogisticRegression on standardised features, class weights balanced, fitted on the same
training scans (or CV folds) the networks train on; its predictions table has the networks'
columns, so evaluation, CV summary and comparison treat it like any other experiment. Like a
network's checkpoint, its summary.json records the subjects and scans it was fitted and validated
on, and ``predict`` refuses a manifest that shares a subject with them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import load_nifti, write_atomic, write_text_atomic

LOG = logging.getLogger(__name__)

LEFT, RIGHT = 1, 2
VOLUME_COLUMNS = ("image_id", "subject", "group", "left_mm3", "right_mm3", "icv_mm3", "left_icv", "right_icv")
FEATURES = VOLUME_COLUMNS[3:]
THRESHOLD = 0.5  # AD when prob >= 0.5, as workflow_scripts.evaluation.evaluate scores it


# --- volumes ------------------------------------------------------------------------------

def voxel_volume_mm3(img: nib.Nifti1Image) -> float:
    """One voxel's volume in mm^3 from the header's voxel sizes."""
    return float(np.prod(np.asarray(img.header.get_zooms()[:3], dtype=float)))


def label_volumes(img: nib.Nifti1Image, source: str = "mask") -> tuple[float, float]:
    """(left, right) hippocampal volume in mm^3 of a label image (1 = left, 2 = right)."""
    data = np.asanyarray(img.dataobj)
    values = np.unique(data)
    if not np.isin(values, (0, LEFT, RIGHT)).all():
        odd = [v for v in values.tolist() if v not in (0, LEFT, RIGHT)][:5]
        raise cli.PipelineError(f"{source}: hippocampus labels must be 0, 1 (left) or 2 (right), found {odd}; "
                                f"is this a label image and not a probability map?")
    voxel = voxel_volume_mm3(img)
    return float(np.count_nonzero(data == LEFT) * voxel), float(np.count_nonzero(data == RIGHT) * voxel)


def mask_volume(img: nib.Nifti1Image) -> float:
    """Volume in mm^3 of the voxels > 0 of a mask."""
    return float(np.count_nonzero(np.asanyarray(img.dataobj) > 0) * voxel_volume_mm3(img))


def scan_volumes(hippocampus: str | Path, brain_mask: str | Path) -> dict[str, float]:
    """One scan's hippocampal volumes, its ICV, and the volumes divided by the ICV."""
    left, right = label_volumes(load_nifti(hippocampus), source=str(hippocampus))
    icv = mask_volume(load_nifti(brain_mask))
    if icv <= 0:
        raise cli.PipelineError(f"{brain_mask}: the brain mask is empty, so there is no ICV to normalise by; "
                                f"look at the scan's skull stripping (its QC montage)")
    return {"left_mm3": left, "right_mm3": right, "icv_mm3": icv, "left_icv": left / icv, "right_icv": right / icv}


def volumes_table(scans: pd.DataFrame, masks_pattern: str, icv_pattern: str) -> pd.DataFrame:
    """VOLUME_COLUMNS for every scan of a scans table; patterns are str.format over its columns."""
    from workflow_scripts.learning.split import scan_paths

    masks, icvs = scan_paths(scans, masks_pattern), scan_paths(scans, icv_pattern)
    missing = [p for p in masks + icvs if not Path(p).is_file()]
    if missing:
        raise cli.PipelineError(f"{len(missing)} mask file(s) missing, e.g. {', '.join(missing[:3])}; run the rule "
                                f"that writes them (hippocampus_atlas, hippocampus_unet or stripped) first")
    rows = [{"image_id": row.image_id, "subject": row.subject, "group": row.group, **scan_volumes(mask, icv)}
            for row, mask, icv in zip(scans.itertuples(index=False), masks, icvs)]
    return pd.DataFrame(rows, columns=list(VOLUME_COLUMNS))


def read_volumes(path: str | Path) -> pd.DataFrame:
    """A volumes table written by ``volumes``, its columns checked."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"image_id": str, "subject": str, "group": str})
    except Exception as err:
        raise cli.PipelineError(f"cannot read the volumes table {path}: {err}") from err
    missing = [c for c in VOLUME_COLUMNS if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"{path} lacks column(s) {', '.join(missing)}; a volumes table is written by "
                                f"python -m workflow_scripts.hippocampus.volumetry volumes (rule hippocampal_volumes)")
    return table


def plot_volumes(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Left and right hippocampal volume / ICV of every scan by group (one dot per scan)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workflow_scripts.common.figures import save_figure

    groups = sorted(table["group"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4), sharey=True)
    for ax, side in zip(axes, ("left", "right")):
        for x, group in enumerate(groups):
            values = 1000 * table.loc[table["group"] == group, f"{side}_icv"].to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.plot(x + jitter, values, "o", alpha=0.7, label=f"{group} (n={len(values)})")
            ax.hlines(values.mean(), x - 0.25, x + 0.25, color="black", linewidth=1.5)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(f"{side} hippocampus", fontsize=9)
    axes[0].set_ylabel("volume / ICV (per mille)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title or "hippocampal volume / ICV per scan (bar = group mean)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


# --- classifier ---------------------------------------------------------------------------

def with_features(manifest: pd.DataFrame, volumes: pd.DataFrame, features: Sequence[str],
                  source: str = "manifest", volumes_source: str = "volumes table") -> pd.DataFrame:
    """The manifest's scans with their feature columns; a scan without volumes is named."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise cli.PipelineError(f"features {list(features)} are not usable; choose among {', '.join(FEATURES)}")
    table = manifest.merge(volumes[["image_id", *features]], on="image_id", how="left", validate="one_to_one")
    lacking = table.loc[table[list(features)].isna().any(axis=1), "image_id"].tolist()
    if lacking:
        raise cli.PipelineError(
            f"{len(lacking)} scan(s) of {source} have no hippocampal volumes in {volumes_source}: "
            f"{', '.join(lacking[:10])}{', ...' if len(lacking) > 10 else ''}; re-run the hippocampal_volumes rule "
            f"so that it covers every scan of results/scans.tsv, or check that both files come from the same run")
    return table


def fit_classifier(train: pd.DataFrame, features: Sequence[str], *, C: float):
    """A Pipeline(StandardScaler, LogisticRegression(class_weight='balanced')) fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = train["label"].astype(int)
    if labels.nunique() < 2:
        raise cli.PipelineError(f"the training scans hold one class only (label {labels.iloc[0]}); a classifier "
                                f"needs AD and CN scans to learn from: check the split")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=1000))
    return model.fit(train[list(features)].astype(float), labels.to_numpy())


def predictions(model, table: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    """image_id, subject, label, prob (of AD, label 1) and pred, in the table's order."""
    prob = model.predict_proba(table[list(features)].astype(float))[:, list(model.classes_).index(1)]
    return pd.DataFrame({"image_id": table["image_id"].to_numpy(), "subject": table["subject"].to_numpy(),
                         "label": table["label"].astype(int).to_numpy(), "prob": prob,
                         "pred": (prob >= THRESHOLD).astype(int)})


def library_versions() -> dict[str, str]:
    import sklearn

    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "pandas": pd.__version__}


def feature_digests(table: pd.DataFrame, features: Sequence[str]) -> list[str]:
    """Per scan, the SHA-256 of its feature values (what the classifier reads, as the networks' tensors)."""
    values = table[list(features)].to_numpy(dtype=np.float64)
    return [hashlib.sha256(json.dumps(dict(zip(features, row.tolist()))).encode()).hexdigest() for row in values]


def model_summary(model, features: Sequence[str], train: pd.DataFrame, val: pd.DataFrame, config: dict) -> dict:
    """What was fitted and on what: coefficients (per standard deviation), scaler, counts, versions, and
    the data record (subjects, scans, labels, feature digests; ``train.data_record``)."""
    from workflow_scripts.common.provenance import code_version
    from workflow_scripts.learning.checkpoints import data_record
    from workflow_scripts.learning.scan_data import split_counts

    scaler, logistic = model[0], model[-1]
    return {
        "config": config, "kind": "volumetry", "features": list(features),
        "coefficients": dict(zip(features, logistic.coef_[0].tolist())),
        "intercept": float(logistic.intercept_[0]),
        "scaler": {"mean": dict(zip(features, scaler.mean_.tolist())),
                   "scale": dict(zip(features, scaler.scale_.tolist()))},
        "classifier": f"StandardScaler + LogisticRegression(C={logistic.C}, class_weight='balanced')",
        "n_per_class": {str(k): int(v) for k, v in train["label"].value_counts().sort_index().items()},
        "splits": {"train": split_counts(train), "val": split_counts(val)},
        "data": data_record({"train": train, "val": val},
                            {"train": feature_digests(train, features), "val": feature_digests(val, features)}),
        "code_version": code_version(), "versions": library_versions(),
    }


def fit_run(train: pd.DataFrame, val: pd.DataFrame, volumes: pd.DataFrame, features: Sequence[str],
            out_dir: str | Path, *, C: float, config: dict | None = None,
            sources: tuple[str, str] = ("the training scans", "the validation scans"),
            volumes_source: str = "volumes table") -> dict:
    """Fit on ``train``, predict ``val``: writes model.joblib, val_predictions.csv and summary.json."""
    import joblib

    out_dir = Path(out_dir)
    train = with_features(train, volumes, features, sources[0], volumes_source)
    val = with_features(val, volumes, features, sources[1], volumes_source)
    model = fit_classifier(train, features, C=C)
    write_atomic(out_dir / "model.joblib", lambda tmp: joblib.dump(model, tmp))
    write_text_atomic(predictions(model, val, features).to_csv(index=False), out_dir / "val_predictions.csv")
    summary = model_summary(model, features, train, val, config or {})
    from workflow_scripts.common.nifti_io import write_json_atomic

    write_json_atomic(summary, out_dir / "summary.json")
    return summary


def training_record(summary: str | Path) -> dict | None:
    """The data record of a fitted model's summary.json (None when the summary predates it)."""
    try:
        return json.loads(Path(summary).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read the volumetry model's summary {summary}: {err}; it is written beside "
                                f"model.joblib by the fit rule (re-run it), or pass --summary") from err


def load_model(path: str | Path):
    """A classifier saved by ``fit``, naming the file when it cannot be read."""
    import joblib

    try:
        return joblib.load(path)
    except Exception as err:
        raise cli.PipelineError(f"cannot load the volumetry model {path}: {err}; re-run its fit rule") from err


# --- command line -------------------------------------------------------------------------

# The keys of an experiments.<name> entry that a volumetry fit uses.
SETTING_KEYS = ("masks", "features", "C")


def command_settings(experiment: Mapping[str, Any]) -> str:
    """The --settings JSON of a volumetry fit: the experiment's volumetry keys, completed from the schema."""
    resolved = settings.resolve("experiments.*", experiment)
    return json.dumps({"experiment": {key: resolved.plain()[key] for key in SETTING_KEYS}}, sort_keys=True)


def read_settings(text: str) -> dict[str, Any]:
    """A fit's --settings: {"experiment": {...}} completed from the schema and checked; the volumetry keys."""
    given = settings.load_json(text)
    if set(given) - {"experiment"}:
        raise cli.PipelineError(f"--settings has keys {sorted(set(given) - {'experiment'})}; a volumetry fit reads "
                                "only \"experiment\" (the volumetry keys of an experiments.<name> entry)")
    resolved = settings.resolve("experiments.*", given.get("experiment"), "experiment").plain()
    return {key: resolved[key] for key in SETTING_KEYS}

def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    vol = sub.add_parser("volumes", help="the volumes table of every scan of a scans table")
    vol.add_argument("--scans", required=True, help="results/scans.tsv")
    vol.add_argument("--masks-pattern", required=True, help="hippocampus labels, str.format over the scans table")
    vol.add_argument("--icv-pattern", required=True, help="skull-strip brain masks, str.format over the scans table")
    vol.add_argument("--output", required=True, help="volumes TSV to write")
    vol.add_argument("--figure", help="PNG of volume / ICV by group to write")
    fit = sub.add_parser("fit", help="fit on training scans, predict validation scans")
    fit.add_argument("--volumes", required=True)
    fit.add_argument("--train", help="training manifest (with --val)")
    fit.add_argument("--val", help="validation manifest (with --train)")
    fit.add_argument("--folds-csv", help="cv_folds.csv (with --fold): fit on that fold's cv/fold<k>/train.csv, "
                                         "predict its inner validation split cv/fold<k>/val.csv")
    fit.add_argument("--fold", type=int)
    fit.add_argument("--out-dir", required=True)
    fit.add_argument("--settings", default="{}", help='JSON {"experiment": {"features": [...], "C": ..., "masks": ...}}: '
                     "an experiments.<name> entry's volumetry keys; keys left out take the schema's defaults")
    pred = sub.add_parser("predict", help="predict the scans of a manifest with a fitted model")
    pred.add_argument("--model", required=True)
    pred.add_argument("--volumes", required=True)
    pred.add_argument("--manifest", required=True)
    pred.add_argument("--summary", help="the model's summary.json, whose training and validation subjects the "
                                        "manifest must not share (default: the one beside --model)")
    pred.add_argument("--output", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    if args.command == "volumes":
        from workflow_scripts.learning.split import read_scans

        table = volumes_table(read_scans(args.scans), args.masks_pattern, args.icv_pattern)
        write_text_atomic(table.to_csv(sep="\t", index=False), args.output)
        if args.figure:
            plot_volumes(table, args.figure)
        LOG.info("%s: %d scans; mean left %.0f, right %.0f mm3, ICV %.0f ml", args.output, len(table),
                 table["left_mm3"].mean(), table["right_mm3"].mean(), table["icv_mm3"].mean() / 1000)
        return
    from workflow_scripts.learning.checkpoints import check_no_overlap
    from workflow_scripts.learning.scan_data import fold_manifests, read_manifest

    volumes = read_volumes(args.volumes)
    if args.command == "predict":
        manifest = read_manifest(args.manifest)
        summary = args.summary or Path(args.model).with_name("summary.json")
        check_no_overlap(manifest, training_record(summary), args.model, args.manifest)
        model = load_model(args.model)
        features = [str(f) for f in model.feature_names_in_]
        table = with_features(manifest, volumes, features, args.manifest, args.volumes)
        write_text_atomic(predictions(model, table, features).to_csv(index=False), args.output)
        LOG.info("%s: %d scans predicted", args.output, len(table))
        return
    if args.folds_csv is not None and args.fold is not None:
        (train, val), sources = fold_manifests(args.folds_csv, args.fold), (
            f"fold {args.fold}'s training scans (beside {args.folds_csv})",
            f"fold {args.fold}'s inner validation scans (beside {args.folds_csv})")
    elif args.train and args.val:
        (train, val), sources = (read_manifest(args.train), read_manifest(args.val)), (args.train, args.val)
    else:
        p.error("fit needs --train and --val, or --folds-csv and --fold")
    experiment = read_settings(args.settings)
    config = {**experiment, "fold": args.fold, "volumes": args.volumes}
    summary = fit_run(train, val, volumes, experiment["features"], args.out_dir, C=experiment["C"], config=config,
                      sources=sources, volumes_source=args.volumes)
    LOG.info("fitted on %d scans; coefficients per SD %s", summary["splits"]["train"]["scans"],
             ", ".join(f"{k} {v:+.3f}" for k, v in summary["coefficients"].items()))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
