"""A trained model on new scans: listing, the leakage guard, import, scoring, explanations and a page.

`snakemake predict` (rules/predict.smk) runs a model package (workflow_scripts/learning/model_package.py)
on a cohort of new scans, a folder of DICOM series, a folder of NIfTI files or an IDA collection
CSV with its tree, through the preprocessing recorded in the package. Everything goes under
``results/predict/<cohort>/``, never into the study's own folders.

    python -m workflow_scripts.predict.predict scans --settings '{...}' --package P --output scans.tsv
    python -m workflow_scripts.predict.predict import --scans scans.tsv --image-id X --output nifti/S/X.nii.gz
    python -m workflow_scripts.predict.predict score --scans scans.tsv --package P ... --out-dir results/predict/C
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

SOURCES = ("dicom", "nifti", "ida")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SCAN_COLUMNS = ("image_id", "subject", "group", "label", "kind", "input", "series_uid", "check", "reason",
                "in_training_data")
# The preprocessing keys the package fixes; where files are found (weights, caches, GPU) stays the machine's own.
MACHINE_KEYS = ("synthstrip_weights", "synthstrip_cache", "synthstrip_urls", "gpu")


# --- which scans ----------------------------------------------------------------------------

def scan_id(text: str) -> str:
    """An image id the workflow's file names accept (no '/', '_' or '.'): other characters become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")
    if not cleaned:
        raise cli.PipelineError(f"cannot make a scan id from {text!r}: rename the file or folder")
    return cleaned


def subject_id(text: str) -> str:
    return re.sub(r"[/\s]+", "-", str(text).strip()) or "unknown"


def dicom_series_dirs(root: Path) -> list[Path]:
    """Every folder under ``root`` that holds files directly (one DICOM series each)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(not f.startswith(".") for f in files):
            found.append(Path(folder))
    return sorted(found)


def patient_id(folder: Path) -> str:
    """The PatientID of the first readable file of a series ('' when none names one)."""
    import pydicom

    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
        except Exception:  # an unreadable file: the series check names it
            continue
        if str(getattr(ds, "PatientID", "")).strip():
            return str(ds.PatientID).strip()
    return ""


def read_labels(path: str | Path | None) -> pd.DataFrame | None:
    """The optional table of known groups (and subjects) of new scans: image_id (or file), group[, subject]."""
    if not path:
        return None
    path = Path(path)
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise cli.PipelineError(f"cannot read predict.labels {path}: {err}") from err
    table.columns = [c.strip() for c in table.columns]
    key = next((c for c in ("image_id", "file", "folder") if c in table.columns), None)
    if key is None or "group" not in table.columns:
        raise cli.PipelineError(f"predict.labels {path} needs a column image_id (or file, folder) and a column group "
                                f"(AD, CN, ...); it has {', '.join(table.columns)}")
    table["image_id"] = [scan_id(Path(v).name.removesuffix(".gz").removesuffix(".nii")) if key != "image_id"
                         else scan_id(v) for v in table[key]]
    return table


def list_new_scans(settings: dict[str, Any]) -> pd.DataFrame:
    """The cohort's scans (image_id, subject, group, kind, input) from config ``predict`` (cheap: the
    workflow calls this when it builds its plan)."""
    source, root = settings["source"], Path(str(settings["input"])).expanduser()
    if source not in SOURCES:
        raise cli.PipelineError(f"predict.source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source == "ida":
        from workflow_scripts.data.ingest import find_image_dir, normalise_description, read_collection_csv

        csv = settings.get("collection_csv")
        if not csv:
            raise cli.PipelineError("predict.source ida needs predict.collection_csv (the IDA collection CSV)")
        collection = read_collection_csv(csv)
        # the series ingest would accept: T1 MPRAGE descriptions (data.descriptions), raw types (data.types)
        accepted = {normalise_description(d) for d in settings.get("descriptions") or []}
        if accepted:
            collection = collection[collection["Description"].map(normalise_description).isin(accepted)]
        if settings.get("types"):
            types = {t.lower() for t in settings["types"]}
            collection = collection[collection["Type"].str.lower().isin(types) | collection["Type"].eq("")]
        rows = []
        for _, row in collection.iterrows():
            folder = find_image_dir(root, row["Subject"], row["Image Data ID"])
            if folder is None:
                LOG.warning("image %s of %s is not under %s/ADNI; left out", row["Image Data ID"], csv, root)
                continue
            rows.append({"image_id": scan_id(row["Image Data ID"]), "subject": subject_id(row["Subject"]),
                         "group": row["Group"], "kind": "dicom", "input": str(folder)})
    elif not root.is_dir():
        raise cli.PipelineError(f"predict.input {root} is not a folder; point it at the folder of new scans")
    elif source == "dicom":
        rows = []
        for folder in dicom_series_dirs(root):
            relative = folder.relative_to(root).as_posix()
            name = relative if relative != "." else folder.name
            rows.append({"image_id": scan_id(name), "subject": subject_id(patient_id(folder) or name),
                         "group": "", "kind": "dicom", "input": str(folder)})
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        rows = []
        for path in files:
            stem = path.name.removesuffix(".gz").removesuffix(".nii")
            rows.append({"image_id": scan_id(stem), "subject": subject_id(stem), "group": "", "kind": "nifti",
                         "input": str(path)})
    table = pd.DataFrame(rows, columns=["image_id", "subject", "group", "kind", "input"])
    if table.empty:
        raise cli.PipelineError(f"no {source} scans found under {root}: a DICOM folder holds one folder per series, "
                                "a NIfTI folder .nii or .nii.gz files")
    labels = read_labels(settings.get("labels"))
    if labels is not None:
        known = labels.set_index("image_id")
        table["group"] = [known["group"].get(i, g) for i, g in zip(table["image_id"], table["group"])]
        if "subject" in known.columns:
            table["subject"] = [subject_id(known["subject"].get(i, s)) for i, s in zip(table["image_id"],
                                                                                       table["subject"])]
    twice = table.loc[table["image_id"].duplicated(keep=False), "input"].tolist()
    if twice:
        raise cli.PipelineError(f"these inputs give the same scan id: {', '.join(twice[:6])}; rename one of each")
    return table.reset_index(drop=True)


def preprocessing_settings(card: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The preprocessing to run new scans through: the package's, with this machine's file locations;
    and each setting where the current config differs (reported, never mixed in)."""
    trained = json.loads(json.dumps(card["preprocessing"]["settings"]))
    for key in MACHINE_KEYS:
        if key in current.get("skullstrip", {}):
            trained.setdefault("skullstrip", {})[key] = current["skullstrip"][key]
    differences = []

    def compare(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in MACHINE_KEYS:
                    compare(a.get(key), b.get(key), f"{where}.{key}")
        elif a != b:
            differences.append(f"{where}: model {json.dumps(a)}, current config {json.dumps(b)}")

    compare(trained, current, "preprocess")
    return trained, differences


# --- the guard ------------------------------------------------------------------------------

def class_label(group: str, classes: Sequence[str]) -> int | None:
    """The label of a group as the model's card orders its classes (None for any other group, or none);
    groups match after trimming and case folding, as ingest matches them."""
    from workflow_scripts.data.ingest import canonical_group

    name = canonical_group(str(group or ""), classes)
    return classes.index(name) if name in classes else None


def check_new_scans(table: pd.DataFrame, card: dict[str, Any], allow_training_scans: bool) -> pd.DataFrame:
    """Read every DICOM series completely (ingest's checks) and refuse scans the model learnt from.

    A broken series is kept with its reason (its import writes a failure record, the rest go on). A scan
    whose subject or series UID the model was trained or validated on stops the run, naming it, unless
    ``allow_training_scans`` (then it is scored and marked).
    """
    from workflow_scripts.data.ingest import check_series
    from workflow_scripts.learning.model_package import identifier_digest

    known = card["known_identifiers"]
    subjects, series = set(known["subject_sha256"]), set(known["series_uid_sha256"])
    rows, seen_series = [], {}
    for _, scan in table.iterrows():
        row = {**scan.to_dict(), "series_uid": "", "check": "ok", "reason": ""}
        if scan["kind"] == "dicom":
            check = check_series(Path(scan["input"]))
            row["series_uid"] = check.series_uid
            if not check.ok:
                row.update(check=check.code, reason=check.reason)
            elif check.series_uid in seen_series:
                row.update(check="duplicate_series", reason=f"duplicate: same DICOM series (SeriesInstanceUID) as "
                                                            f"scan {seen_series[check.series_uid]}")
            elif check.series_uid:
                seen_series[check.series_uid] = scan["image_id"]
        why = []
        if identifier_digest("subject", scan["subject"]) in subjects:
            why.append(f"subject {scan['subject']}")
        if row["series_uid"] and identifier_digest("series_uid", row["series_uid"]) in series:
            why.append(f"series {row['series_uid']}")
        row["in_training_data"] = "; ".join(why)
        label = class_label(scan["group"], card["classes"])
        row["label"] = "" if label is None else str(label)
        rows.append(row)
    checked = pd.DataFrame(rows, columns=list(SCAN_COLUMNS))
    known_scans = checked[checked["in_training_data"].ne("")]
    if len(known_scans) and not allow_training_scans:
        listed = "; ".join(f"{i} ({w})" for i, w in zip(known_scans["image_id"], known_scans["in_training_data"]))
        raise cli.PipelineError(
            f"{len(known_scans)} new scan(s) come from the model's training or validation data: {listed}. A model "
            f"scored on what it learnt from looks better than it is: remove them from the cohort, or set "
            f"predict.allow_training_scans: true for a deliberate re-scoring (the results then say so)")
    for image_id, why in zip(known_scans["image_id"], known_scans["in_training_data"]):
        LOG.warning("scan %s is in the model's training or validation data (%s): scored because "
                    "predict.allow_training_scans is true, and marked", image_id, why)
    for _, bad in checked[checked["check"].ne("ok")].iterrows():
        LOG.warning("scan %s (%s) is broken and will be dropped: %s", bad["image_id"], bad["input"], bad["reason"])
    return checked


def read_scans(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# --- import -----------------------------------------------------------------------------

def import_scan(scans: pd.DataFrame, image_id: str, output: str | Path) -> None:
    """The scan's stage-nifti image: a DICOM series converted by dicom2nifti, or a NIfTI file read and
    written clean (geometry and provenance only); a broken scan becomes its failure record."""
    from workflow_scripts.preprocess.convert import convert_series
    from workflow_scripts.common.nifti_io import clean_image, load_nifti, save_nifti_atomic
    from workflow_scripts.common.scan_failure import ScanDataError, run_stage

    row = scans[scans["image_id"] == image_id]
    if row.empty:
        raise cli.PipelineError(f"scan {image_id} is not in the cohort's scans table")
    scan = row.iloc[0]

    def work() -> None:
        if scan["check"] != "ok":
            raise ScanDataError(scan["check"], scan["reason"])
        if scan["kind"] == "dicom":
            img = convert_series(scan["input"])
        else:
            try:
                source = load_nifti(scan["input"])
                data = np.asanyarray(source.dataobj)
            except Exception as err:
                raise ScanDataError("unreadable_nifti", f"{scan['input']} cannot be read as NIfTI: {err}") from err
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3 or min(data.shape) < 8:
                raise ScanDataError("not_a_volume", f"{scan['input']} has shape {data.shape}: not a 3D head volume")
            img = clean_image(data.astype(np.float32), source.affine, f"nifti:{Path(scan['input']).name}")
        save_nifti_atomic(img, output)

    run_stage("nifti", [], [output], work)


# --- scoring ------------------------------------------------------------------------------

def _pattern(pattern: str, scan: pd.Series) -> str:
    return pattern.format(subject=scan["subject"], image_id=scan["image_id"])


def prepared_scans(scans: pd.DataFrame, ras_pattern: str, qc_pattern: str, qc_settings: dict[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(scans to score, scans dropped with stage and reason, the QC table) after preprocessing and QC."""
    from workflow_scripts.preprocess.qc_metrics import apply_qc, read_records
    from workflow_scripts.common.scan_failure import read_failure

    dropped = []
    for _, scan in scans.iterrows():
        failure = read_failure(_pattern(ras_pattern, scan))
        if failure is not None:
            dropped.append({"image_id": scan["image_id"], "subject": scan["subject"], "stage": failure["stage"],
                            "reason_code": failure["reason_code"], "reason": failure["reason"]})
    records = read_records([_pattern(qc_pattern, s) for _, s in scans.iterrows()])
    qc_table, qc_drops = apply_qc(records, qc_settings) if records else (pd.DataFrame(), pd.DataFrame())
    for _, drop in qc_drops.iterrows():
        dropped.append({"image_id": drop["image_id"], "subject": drop["subject"], "stage": "qc",
                        "reason_code": drop["reason_code"], "reason": drop["reason"]})
    dropped = pd.DataFrame(dropped, columns=["image_id", "subject", "stage", "reason_code", "reason"])
    kept = scans[~scans["image_id"].isin(dropped["image_id"])].reset_index(drop=True)
    return kept, dropped, qc_table


def _image_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def cohort_page(cohort: str, card: dict[str, Any], predictions: pd.DataFrame, dropped: pd.DataFrame,
                metrics: dict[str, Any] | None, figures: dict[str, dict[str, str]], notes: Sequence[str]) -> str:
    """One self-contained HTML page: every scan with p(AD), its class, QC flags and its figures (embedded)."""
    from workflow_scripts.evaluation.evaluate import MIN_SUBJECTS_PER_CLASS
    from workflow_scripts.report.report_tables import heading, html_page, html_table, metrics_table, paragraph

    parts = [paragraph(f"Model {card['experiment']} ({card['architecture']['arch']}, code {card.get('code_version')}); "
                       f"AD when p(AD) >= {card['decision_threshold']:g}. Test-set figures of the model "
                       f"(its own study): " + _test_summary(card))]
    parts += [paragraph(note, note=True) for note in notes]
    shown = predictions.copy()
    shown.insert(0, "scan", [f'<a href="#scan-{html.escape(i)}">{html.escape(i)}</a>' for i in shown["image_id"]])
    table = shown.drop(columns=["image_id"]).to_html(index=False, escape=False, border=0, na_rep="-",
                                                     float_format=lambda v: f"{v:.3f}",
                                                     formatters={c: (lambda v: html.escape(str(v)))
                                                                 for c in shown.columns if c != "scan"})
    parts += [heading(f"Scans scored ({len(predictions)})"), table]
    if metrics:
        counts = ", ".join(f"{n} {c}" for c, n in metrics["subjects_per_class"].items())
        shown_metrics = metrics_table(metrics)
        if metrics["intervals_estimable"]:
            note = f"{metrics['n_scans']} scans of {metrics['n_subjects']} subjects ({counts}); 95% bootstrap " \
                   "intervals resampling subjects."
        else:
            note = f"{metrics['n_scans']} scans of {metrics['n_subjects']} subjects ({counts}): intervals are not " \
                   f"estimable from fewer than {MIN_SUBJECTS_PER_CLASS} subjects of a class, so none is shown; " \
                   "the point values describe these scans only."
            for column in ("scan level [95% CI]", "subject level [95% CI]"):
                shown_metrics[column] = shown_metrics[column].str.replace(r" \[.*\]$", " [not estimable]", regex=True)
        parts += [heading("Metrics on the labelled scans"), paragraph(note), html_table(shown_metrics)]
    if len(dropped):
        parts += [heading(f"Scans dropped ({len(dropped)})"), html_table(dropped)]
    for image_id, files in figures.items():
        parts.append(f'<h3 id="scan-{html.escape(image_id)}">{html.escape(image_id)}</h3>')
        for what, path in files.items():
            parts.append(f'<figure><img alt="{html.escape(what)} of {html.escape(image_id)}" '
                         f'src="{_image_uri(path)}" style="max-width:100%"><figcaption>{html.escape(what)}'
                         f'</figcaption></figure>')
    return html_page(f"Predictions: {cohort}", parts)


def _test_summary(card: dict[str, Any]) -> str:
    test = (card.get("metrics") or {}).get("test") or {}
    subject = test.get("subject") or {}
    if not subject:
        return "none recorded."
    ci = (subject.get("ci") or {}).get("accuracy") or [None, None]
    estimable = test.get("intervals_estimable", True) and None not in ci  # cards written before the flag: shown
    interval = f" ({ci[0]:.3f}-{ci[1]:.3f})" if estimable else " (interval not estimable)"
    return f"subject-level accuracy {subject.get('accuracy', float('nan')):.3f}{interval}, AUC {subject.get('auc')}."


def score_cohort(scans_path: str | Path, package: str | Path, out_dir: str | Path, *, cohort: str,
                 ras_pattern: str, mask_pattern: str, qc_pattern: str, montage_pattern: str,
                 hippocampus_pattern: str, qc_settings: dict[str, Any], explain_settings: dict[str, Any],
                 methods: Sequence[str], evaluate_settings: dict[str, Any], allow_training_scans: bool,
                 setting_differences: Sequence[str], device: str) -> dict[str, Any]:
    """Predictions, metrics where labels are known, a map and the hippocampal share per scan, and the page."""
    import torch

    from workflow_scripts.evaluation.evaluate import evaluate_predictions, write_report
    from workflow_scripts.explain.explain import attribution_map, hippocampal_share, methods_for, plot_scan, read_mask
    from workflow_scripts.learning.model_package import load_package
    from workflow_scripts.preprocess.skullstrip import sha256_of
    from workflow_scripts.learning.tensor_cache import normalised_volume, save_npy_atomic
    from workflow_scripts.common.devices import pick_device

    out_dir = Path(out_dir)
    dev = pick_device(device)
    scans = read_scans(scans_path)
    kept, dropped, qc_table = prepared_scans(scans, ras_pattern, qc_pattern, qc_settings)
    if kept.empty:
        raise cli.PipelineError(f"none of the {len(scans)} new scans passed preprocessing and QC; reasons in "
                                f"{out_dir / 'dropped.tsv'}")
    scripted, card = load_package(package, dev)
    tensors = {}
    known_tensors = set(card["known_identifiers"]["tensor_sha256"])
    for _, scan in kept.iterrows():
        array = normalised_volume(_pattern(ras_pattern, scan))
        if tuple(array.shape) != tuple(card["input"]["shape"][1:]):
            raise cli.PipelineError(f"scan {scan['image_id']} has shape {array.shape} after preprocessing; the model "
                                    f"takes {card['input']['shape'][1:]}: the preprocessing settings differ")
        tensor_file = save_npy_atomic(array, out_dir / "tensors" / f"{scan['image_id']}.npy")
        if sha256_of(tensor_file) in known_tensors and not scan["in_training_data"]:
            if not allow_training_scans:
                raise cli.PipelineError(f"scan {scan['image_id']} ({scan['input']}) is, voxel for voxel, a training or "
                                        "validation scan of the model; remove it, or set predict.allow_training_scans")
            kept.loc[kept["image_id"] == scan["image_id"], "in_training_data"] = "tensor identical to a training scan"
        tensors[scan["image_id"]] = array
    with torch.no_grad():
        probs = [float(scripted(torch.from_numpy(tensors[i].astype(np.float32))[None, None].to(dev))[0, 1])
                 for i in kept["image_id"]]
    threshold = float(card["decision_threshold"])
    predictions = pd.DataFrame({
        "image_id": kept["image_id"], "subject": kept["subject"], "group": kept["group"],
        "prob_ad": np.round(probs, 6), "predicted": [card["classes"][int(p >= threshold)] for p in probs],
        "in_training_data": kept["in_training_data"]})
    flags = dict(zip(qc_table.get("image_id", []), qc_table.get("outliers", []))) if len(qc_table) else {}
    predictions["qc_flags"] = [flags.get(i, "") or "" for i in predictions["image_id"]]

    # explanations: the state-dict network (hooks need its layers), input as the package normalises it
    kept_methods, skipped = methods_for(card["architecture"]["arch"], methods) if methods else ([], {})
    module = load_package(package, dev, script=False)[0] if kept_methods else None
    for method, why in skipped.items():
        LOG.warning("no %s maps: %s", method, why)
    figures, shares = {}, []
    for _, scan in kept.iterrows():
        image_id = scan["image_id"]
        files = {"QC montage (every stage, brain mask outlined)": _pattern(montage_pattern, scan)}
        maps, share = {}, {}
        if kept_methods:
            volume = tensors[image_id].astype(np.float32)
            brain = read_mask(_pattern(mask_pattern, scan), volume.shape, "brain mask") > 0
            hippocampus = read_mask(_pattern(hippocampus_pattern, scan), volume.shape, "hippocampus labels")
            x = module.normalise(torch.from_numpy(volume)[None, None].to(dev))
            for method in kept_methods:
                maps[method] = attribution_map(method, module.network, x, 1, explain_settings)
            share = {m: hippocampal_share(a, hippocampus > 0, brain) for m, a in maps.items()}
        shares.append(share)
        if maps:
            figure = plot_scan(volume, maps, hippocampus, brain, out_dir / "figures" / f"{image_id}.png",
                               f"{image_id}: evidence for AD (p(AD) = "
                               f"{predictions.loc[predictions['image_id'] == image_id, 'prob_ad'].iloc[0]:.3f})")
            files = {"evidence for AD (" + ", ".join(maps) + "), hippocampi in cyan": str(figure), **files}
        figures[image_id] = files
    for method in kept_methods:
        predictions[f"hippocampal_share_{method}"] = [round(s[method], 3) for s in shares]

    labelled = predictions.assign(label=pd.to_numeric(kept["label"], errors="coerce"))
    labelled = labelled[labelled["label"].notna()]
    metrics = None
    if len(labelled):
        table = pd.DataFrame({"image_id": labelled["image_id"], "subject": labelled["subject"],
                              "label": labelled["label"].astype(int), "prob": labelled["prob_ad"],
                              "pred": (labelled["prob_ad"] >= threshold).astype(int)})
        metrics = evaluate_predictions(table, n_boot=evaluate_settings["n_boot"], seed=evaluate_settings["seed"],
                                       alpha=evaluate_settings["alpha"], threshold=threshold)
        metrics["subjects_per_class"] = {card["classes"][k]: n for k, n in metrics["subjects_per_label"].items()}
        write_report(metrics, table, out_dir / "evaluation")
    notes = [f"The preprocessing is the model's; the current config differs at {d} (the model's was used)"
             for d in setting_differences]
    if predictions["in_training_data"].ne("").any():
        notes.append("Scans marked in_training_data come from the model's training or validation data "
                     "(predict.allow_training_scans): their probabilities are optimistic, not a test.")
    notes += [f"{m}: {why}" for m, why in skipped.items()]
    summary = {"cohort": cohort, "package": str(package), "experiment": card["experiment"],
               "code_version": card.get("code_version"), "scans": int(len(scans)), "scored": int(len(predictions)),
               "dropped": dropped.to_dict(orient="records"), "decision_threshold": threshold,
               "labelled_scans": int(len(labelled)), "metrics": metrics,
               "level": "p(AD) per scan; metrics at scan and subject level",
               "setting_differences": list(setting_differences),
               "in_training_data": predictions.loc[predictions["in_training_data"].ne(""), "image_id"].tolist()}
    write_text_atomic(predictions.to_csv(index=False), out_dir / "predictions.csv")
    write_text_atomic(dropped.to_csv(sep="\t", index=False), out_dir / "dropped.tsv")
    write_text_atomic(json.dumps(summary, indent=2, default=str) + "\n", out_dir / "summary.json")
    write_text_atomic(cohort_page(cohort, card, predictions, dropped, metrics, figures, notes),
                      out_dir / "predictions.html")
    LOG.info("cohort %s: %d scans scored, %d dropped, %d labelled", cohort, len(predictions), len(dropped),
             len(labelled))
    return summary


def outcome_line(out_dir: str | Path) -> str | None:
    """The last line of a predict run: scans scored and dropped, and where the page is."""
    summary_file = Path(out_dir) / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    dropped = len(summary["dropped"])
    return (f"predict {summary['cohort']}: {summary['scored']} of {summary['scans']} new scans scored with "
            f"{summary['experiment']}, {dropped} dropped" + (f" (reasons in {Path(out_dir) / 'dropped.tsv'})"
                                                              if dropped else "")
            + f"; page {Path(out_dir) / 'predictions.html'}")


# The config sections each subcommand reads (its --settings).
SCANS_SECTIONS = ("predict", "data.descriptions", "data.types")
SCORE_SECTIONS = ("predict", "qc", "explain", "evaluate", "preprocess", "train.device")


def listing_settings(predict: Mapping[str, Any], descriptions: Sequence[str], types: Sequence[str]) -> dict[str, Any]:
    """What list_new_scans reads: config predict with the series ingest accepts (data.descriptions, data.types)."""
    return {**predict, "descriptions": list(descriptions), "types": list(types)}


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    scans = sub.add_parser("scans", help="list and check the cohort's scans; the leakage guard")
    settings.add_argument(scans, *SCANS_SECTIONS)
    scans.add_argument("--package", required=True)
    scans.add_argument("--output", required=True)
    imp = sub.add_parser("import", help="one scan's stage-nifti image")
    imp.add_argument("--scans", required=True)
    imp.add_argument("--image-id", required=True)
    imp.add_argument("--output", required=True)
    score = sub.add_parser("score", help="predictions, explanations and the page of the cohort")
    score.add_argument("--scans", required=True)
    score.add_argument("--package", required=True)
    score.add_argument("--out-dir", required=True)
    score.add_argument("--cohort", required=True)
    settings.add_argument(score, *SCORE_SECTIONS)
    for name in ("ras", "mask", "qc", "montage", "hippocampus"):
        score.add_argument(f"--{name}-pattern", required=True, help="path with {subject} and {image_id}")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    from workflow_scripts.learning.model_package import read_card

    if args.command == "scans":
        predict, descriptions, types = settings.read_job(args.settings, *SCANS_SECTIONS)
        table = check_new_scans(list_new_scans(listing_settings(predict.plain(), descriptions, types)),
                                read_card(args.package), predict.allow_training_scans)
        write_text_atomic(table.to_csv(sep="\t", index=False), args.output)
        LOG.info("%d new scans listed (%d broken)", len(table), int(table["check"].ne("ok").sum()))
    elif args.command == "import":
        import_scan(read_scans(args.scans), args.image_id, args.output)
    else:
        predict, qc, explain, evaluate, preprocess, device = settings.read_job(args.settings, *SCORE_SECTIONS)
        _, differences = preprocessing_settings(read_card(args.package), preprocess.plain())
        score_cohort(args.scans, args.package, args.out_dir, cohort=args.cohort, ras_pattern=args.ras_pattern,
                     mask_pattern=args.mask_pattern, qc_pattern=args.qc_pattern, montage_pattern=args.montage_pattern,
                     hippocampus_pattern=args.hippocampus_pattern, qc_settings=qc.plain(),
                     explain_settings=explain.plain(), methods=list(predict.explain),
                     evaluate_settings=evaluate.plain(), allow_training_scans=predict.allow_training_scans,
                     setting_differences=differences, device=device)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
