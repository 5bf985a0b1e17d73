"""CV summary: each fold's metrics and training summary -> three figures, kept apart.

1. The cross-validation figure: fold k's model on its held-out fold k
   (results/splits/cv/fold<k>/held_out.csv), which took no part in training, early stopping or
   the checkpoint choice; mean and sample standard deviation (ddof=1) over folds, at the scan
   and at the subject level.
2. The inner validation split at the selected epoch (each fold's summary.json: the selection
   rule, its epoch and that epoch's history row): the scans that chose the checkpoint, so the
   figure is selection-biased and shown only for comparison (scan level; volumetry selects
   nothing on it).
3. The fold models on the held-out test set: mean and sample standard deviation over folds.

The dissertation reports cross-validation as "accuracy 77.26% ± 2.34": mean and sample standard
deviation in percent over 3 folds, each fold early-stopped and its checkpoint chosen on the very
fold it reports, i.e. figure 2's protocol applied to the reported scans.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from workflow_scripts.common import cli
from workflow_scripts.evaluation.evaluate import METRIC_NAMES
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

# Rates shown in percent; AUC, kappa and loss stay on their own scale, as usually printed.
PERCENT_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1")
LABELS = {"balanced_accuracy": "balanced accuracy", "recall": "recall (sensitivity)", "auc": "AUC",
          "loss": "loss (weighted cross-entropy)"}
# What a training run's history records of its validation scans at each epoch (train.classification_metrics).
INNER_METRICS = ("accuracy", "balanced_accuracy", "auc", "kappa", "loss")
DISSERTATION = "77.26% ± 2.34"
FIGURES = {
    "cross_validation": "Cross-validation (the figure to report): each fold's model on its held-out fold, which "
                        "took no part in training, early stopping or the checkpoint choice",
    "inner_validation": "Inner validation split at the selected epoch (selection-biased, for comparison only): the "
                        "scans that early-stopped each fold and chose its checkpoint",
    "test": "Fold models on the held-out test set: each fold's selected checkpoint on results/splits/test.csv "
            "(the same scans for every fold)",
}


def _block(fold: dict, level: str) -> dict:
    """The metrics block of one fold: ``fold[level]`` for an evaluate metrics.json, else the dict itself."""
    return fold[level] if isinstance(fold.get(level), dict) else fold


def summarise_folds(fold_metrics: list[dict], level: str = "scan", names: Sequence[str] = METRIC_NAMES) -> dict:
    """Per metric: ``{"mean", "std", "folds"}`` over the folds, std the sample one (ddof=1).

    A fold where a metric is undefined (None) keeps None in ``folds`` and is left out of the
    mean and std; with fewer than two defined folds the std is None.
    """
    if not fold_metrics:
        raise ValueError("no folds to summarise")
    blocks = [_block(fold, level) for fold in fold_metrics]
    summary = {}
    for name in names:
        folds = [None if block.get(name) is None else float(block[name]) for block in blocks]
        defined = np.array([v for v in folds if v is not None], dtype=float)
        summary[name] = {
            "mean": float(np.mean(defined)) if len(defined) else None,
            "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
            "folds": folds,
        }
    return summary


def format_metric(name: str, entry: dict) -> str:
    """'accuracy 77.26% ± 2.34' (percent metrics; std in percentage points) or 'auc 0.8123 ± 0.0234'."""
    mean, std = entry["mean"], entry["std"]
    if mean is None:
        return f"{name} undefined"
    if name in PERCENT_METRICS:
        text = f"{name} {100 * mean:.2f}%"
        return text if std is None else f"{text} ± {100 * std:.2f}"
    text = f"{name} {mean:.4f}"
    return text if std is None else f"{text} ± {std:.4f}"


def figure_table(summary: dict, fold_names: Sequence[str]) -> pd.DataFrame:
    """One row per metric: mean ± std over folds, then each fold's value (percent for the rates)."""
    rows = []
    for name, entry in summary.items():
        scale, digits = (100, 2) if name in PERCENT_METRICS else (1, 4)
        row = {"metric": LABELS.get(name, name), "mean ± std": format_metric(name, entry).split(" ", 1)[1]}
        row.update({fold: "-" if v is None else f"{scale * v:.{digits}f}"
                    for fold, v in zip(fold_names, entry["folds"])})
        rows.append(row)
    return pd.DataFrame(rows)


# --- inputs ------------------------------------------------------------------------------

def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``, naming the file and what writes it when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(data, dict):
        raise cli.PipelineError(f"{path} is not {what} (a JSON object expected)")
    return data


def read_fold_metrics(path: str | Path) -> dict:
    """Read one fold's metrics.json, naming the file if it is not one evaluate wrote."""
    fold = read_json(path, "fold metrics")
    for block in ("scan", "subject"):
        if not isinstance(fold.get(block), dict):
            raise cli.PipelineError(f"{path} has no '{block}' block; expected a metrics.json written by "
                                    f"workflow_scripts.evaluation.evaluate (re-run that fold's evaluation)")
        missing = [name for name in METRIC_NAMES if name not in fold[block]]
        if missing:
            raise cli.PipelineError(f"{path}: the '{block}' block lacks {', '.join(missing)}; re-run that fold's "
                                    f"evaluation with the current workflow_scripts.evaluation.evaluate")
    return fold


def fold_names(paths: Sequence[str | Path]) -> list[str]:
    """'fold 0', 'fold 1', ... from the fold<k> folder in each path, else numbered in order."""
    found = [re.search(r"(?:^|/)fold(\d+)(?:/|$)", Path(p).as_posix()) for p in paths]
    names = [f"fold {m.group(1)}" if m else f"fold {i}" for i, m in enumerate(found)]
    return names if len(set(names)) == len(names) else [f"fold {i}" for i in range(len(paths))]


# --- the three figures ---------------------------------------------------------------------

def class_counts(fold: dict) -> dict[str, int]:
    """Scans of each class in one evaluated fold, from its confusion counts (AD = label 1)."""
    block = fold["scan"]
    return {"AD": int(block["tp"] + block["fn"]), "CN": int(block["tn"] + block["fp"])}


def one_class_notes(folds: Sequence[dict], names: Sequence[str], what: str) -> list[str]:
    """A sentence for each fold whose scans are of one class: which metrics are undefined, no interval."""
    notes = []
    for name, fold in zip(names, folds):
        counts = class_counts(fold)
        absent = [c for c, n in counts.items() if n == 0]
        if absent:
            undefined = [LABELS.get(m, m) for m in METRIC_NAMES if fold["scan"].get(m) is None]
            held = ", ".join(f"{n} {c}" for c, n in counts.items())
            notes.append(f"{name}: the {what} holds no {absent[0]} scan ({held} scans), so these metrics are "
                         f"undefined there, left out of the mean, and their intervals are not estimable: "
                         f"{', '.join(undefined) or 'none'}.")
    return notes


def sd_notes(levels: dict) -> list[str]:
    """A sentence for each level where a metric's SD over folds is not estimable (defined in < 2 folds)."""
    notes = []
    for level, entries in levels.items():
        short = [LABELS.get(m, m) for m, e in entries.items() if e["mean"] is not None and e["std"] is None]
        if short:
            notes.append(f"{level} level: the SD of {', '.join(short)} is not estimable (defined in fewer than two "
                         f"folds).")
    return notes


def per_fold_records(folds: Sequence[dict], names: Sequence[str], paths: Sequence[str | Path]) -> list[dict]:
    """What each fold's figure rests on: file, scans and subjects per class, its bootstrap intervals."""
    return [{"fold": name, "metrics_file": str(path), "predictions_file": fold.get("predictions_file"),
             "n_scans": fold.get("n_scans"), "n_subjects": fold.get("n_subjects"),
             "scans_per_class": class_counts(fold),
             "ci": {level: fold[level].get("ci", {}) for level in ("scan", "subject")}}
            for name, fold, path in zip(names, folds, paths)]


def evaluated_figure(paths: Sequence[str | Path], what: str) -> dict:
    """Mean ± SD over folds at the scan and subject level, per-fold records and estimability notes."""
    folds = [read_fold_metrics(path) for path in paths]
    names = fold_names(paths)
    levels = {level: summarise_folds(folds, level) for level in ("scan", "subject")}
    return {**levels, "fold_names": names, "per_fold": per_fold_records(folds, names, paths),
            "notes": one_class_notes(folds, names, what) + sd_notes(levels)}


def selected_epoch(summary: dict, path: str | Path) -> dict | None:
    """The selection rule, its epoch and checkpoint, and the inner validation metrics at that epoch
    (None for a model that selects nothing, such as volumetry)."""
    if summary.get("kind") == "volumetry" or "selection" not in summary:
        return None
    rule = summary["selection"].get("rule")
    row = (summary.get("best") or {}).get(rule)
    if not isinstance(row, dict):
        raise cli.PipelineError(f"{path} names selection rule {rule!r} but records no best epoch for it; it is not a "
                                f"summary.json written by workflow_scripts.learning.train (re-run that fold's training)")
    return {"rule": rule, "checkpoint": summary["selection"].get("checkpoint"), "epoch": row.get("epoch"),
            "epochs_run": summary.get("epochs_run"), "validation_manifest": (summary.get("config") or {}).get("val"),
            "metrics": {name: row.get(f"val_{name}") for name in INNER_METRICS}}


def inner_figure(paths: Sequence[str | Path], names: Sequence[str]) -> dict:
    """The selection-biased figure: each fold's inner validation metrics at its selected epoch (scan level)."""
    selections = [selected_epoch(read_json(path, "a training summary"), path) for path in paths]
    if any(s is None for s in selections):
        return {"selection": None, "scan": None, "fold_names": list(names),
                "notes": ["No figure: this model selects nothing on the inner validation split (fixed settings), "
                          "so there is no selection bias to show."]}
    scan = summarise_folds([s["metrics"] for s in selections], "scan", INNER_METRICS)
    return {"selection": [{"fold": n, **s} for n, s in zip(names, selections)], "scan": scan,
            "fold_names": list(names), "notes": sd_notes({"scan": scan})}


def summarise_cv(held_out: Sequence[str | Path], test: Sequence[str | Path] = (),
                 summaries: Sequence[str | Path] = ()) -> dict:
    """The three figures of one experiment's cross-validation (see the module docstring)."""
    for name, given in (("test metrics", test), ("fold summaries", summaries)):
        if given and len(given) != len(held_out):
            raise cli.PipelineError(f"{len(given)} {name} for {len(held_out)} folds' held-out metrics; give one per "
                                    f"fold, in the same fold order")
    cv = evaluated_figure(held_out, "held-out fold")
    result = {"folds": len(held_out), "cross_validation": {"what": FIGURES["cross_validation"], **cv}}
    if summaries:
        result["inner_validation"] = {"what": FIGURES["inner_validation"], "selection_biased": True,
                                      **inner_figure(summaries, cv["fold_names"])}
    if test:
        result["test"] = {"what": FIGURES["test"], **evaluated_figure(test, "test set")}
    result["dissertation"] = {"accuracy": DISSERTATION, "protocol": "each fold early-stopped and its checkpoint "
                              "chosen on the fold it reports: comparable in kind with the inner validation figure, "
                              "not with the cross-validation figure"}
    return result


# --- output --------------------------------------------------------------------------------

def headline(figure: dict, level: str = "scan", metric: str = "accuracy") -> str:
    """'accuracy 77.26% ± 2.34 over 3 folds' of one figure at one level."""
    entry = figure[level][metric]
    return f"{format_metric(metric, entry)} over {sum(v is not None for v in entry['folds'])} folds"


def summary_sentences(summary: dict) -> list[str]:
    """In words: which figure is which, at which level, and how the dissertation's figure compares."""
    cv = summary["cross_validation"]
    lines = [f"Cross-validation figure (report this one): {headline(cv, 'scan')} at the scan level, "
             f"{headline(cv, 'subject')} at the subject level (mean ± sample SD; each fold's model on its held-out "
             f"fold, never used for training, early stopping or the checkpoint choice)."]
    test = summary.get("test")
    if test:
        lines.append(f"Fold models on the test set: {headline(test, 'scan')} at the scan level, "
                     f"{headline(test, 'subject')} at the subject level (mean ± sample SD over the folds' models).")
    inner = summary.get("inner_validation")
    if inner and inner["scan"] is not None:
        epochs = ", ".join(f"{s['fold']} epoch {s['epoch']} ({s['rule']})" for s in inner["selection"])
        lines.append(f"Inner validation split at the selected epoch, selection-biased and shown only for comparison: "
                     f"{headline(inner, 'scan')} at the scan level (selected: {epochs}).")
    elif inner:
        lines.append("Inner validation split: " + inner["notes"][0])
    lines.append(f"The dissertation's {DISSERTATION} (3 folds on ADNI, scan level) was early-stopped and "
                 f"checkpoint-selected on the very fold it reports, so it is comparable in kind with the "
                 f"selection-biased inner validation figure, not with the cross-validation figure above.")
    return lines


def figure_sections(summary: dict) -> list[tuple[str, list[tuple[str, pd.DataFrame]], list[str]]]:
    """(title, [(level, table)], notes) for each figure present, in the order they should be read."""
    sections = []
    for key in ("cross_validation", "test", "inner_validation"):
        figure = summary.get(key)
        if not figure:
            continue
        tables = [(level, figure_table(figure[level], figure["fold_names"]))
                  for level in ("scan", "subject") if figure.get(level) is not None]
        sections.append((figure["what"], tables, figure["notes"]))
    return sections


def summary_markdown(summary: dict) -> str:
    """summary.md: the sentences, then one table per figure and level, then the notes."""
    from workflow_scripts.report.report_tables import markdown_table as frame_markdown

    parts = [line + "\n" for line in summary_sentences(summary)]
    for title, tables, notes in figure_sections(summary):
        parts += [f"## {title}", ""]
        for level, table in tables:
            parts += [f"{level.capitalize()} level:", "", frame_markdown(table)]
        parts += [f"- {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(parts).rstrip("\n") + "\n"


def summary_page(summary: dict, experiment: str) -> str:
    """The report's cross-validation page: the same sentences, tables and notes as summary.md."""
    from workflow_scripts.report.report_tables import heading, html_page, html_table, paragraph

    parts = [paragraph(line) for line in summary_sentences(summary)]
    for title, tables, notes in figure_sections(summary):
        parts.append(heading(title))
        for level, table in tables:
            parts += [paragraph(f"{level.capitalize()} level:", note=True), html_table(table)]
        parts += [paragraph(note, note=True) for note in notes]
    return html_page(f"Cross-validation: {experiment}", parts)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--fold-metrics", nargs="+", required=True,
                   help="each fold's metrics.json on its held-out fold, in fold order")
    p.add_argument("--test-metrics", nargs="+", default=[], help="each fold model's metrics.json on the test set")
    p.add_argument("--fold-summaries", nargs="+", default=[],
                   help="each fold's training summary.json (selection rule, epoch and inner validation metrics)")
    p.add_argument("--experiment", default="", help="the experiment's name, for the page title")
    p.add_argument("--output", required=True, help="summary.json to write")
    p.add_argument("--table", help="also write summary.md (sentences and tables) here")
    p.add_argument("--page", help="also write the report's HTML page here")
    args = p.parse_args(argv)
    summary = summarise_cv(args.fold_metrics, args.test_metrics, args.fold_summaries)
    write_text_atomic(json.dumps(summary, indent=2) + "\n", args.output)
    if args.table:
        write_text_atomic(summary_markdown(summary), args.table)
    if args.page:
        write_text_atomic(summary_page(summary, args.experiment or Path(args.output).parent.name), args.page)
    for line in summary_sentences(summary):
        print(line)
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
