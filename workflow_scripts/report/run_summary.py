"""The summary of a whole `all` run, written to results/run_summary.md and printed at its end: scans
used and dropped with their reasons, each experiment's test metrics with intervals (subject and scan
level, "not estimable" where a class has too few test subjects), and where the report is."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.evaluation.evaluate import MIN_SUBJECTS_PER_CLASS
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

# The metrics shown per level, in this order
SHOWN_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"))


def reason_counts(path: str | Path) -> str:
    """'3 (truncated_pixel_data 2, partial_series 1)' from a dropped or excluded table."""
    table = pd.read_csv(path, sep="\t", dtype=str)
    if table.empty:
        return "0"
    counts = table["reason_code"].value_counts()
    return f"{len(table)} (" + ", ".join(f"{code} {n}" for code, n in counts.items()) + ")"


def metric_text(block: dict, name: str, estimable: bool) -> str:
    """'0.750 (95% CI 0.500-1.000)', '0.750 (interval not estimable)' or 'undefined'."""
    value = block.get(name)
    if value is None:
        return "undefined"
    low, high = (block.get("ci") or {}).get(name) or (None, None)
    if not estimable or low is None:
        return f"{value:.3f} (interval not estimable)"
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f})"


def experiment_lines(name: str, metrics: dict, classes: Sequence[str]) -> list[str]:
    """One experiment's test metrics at subject and scan level (``classes``: data.classes, label 1 first)."""
    from workflow_scripts.learning.model_package import classes_by_label

    estimable = bool(metrics.get("intervals_estimable"))
    per_label = {int(k): n for k, n in (metrics.get("subjects_per_label") or {}).items()}
    counts = ", ".join(f"{per_label.get(k, 0)} {c}" for k, c in enumerate(classes_by_label(classes)))
    lines = [f"- **{name}**: {metrics['n_subjects']} test subjects ({counts}), {metrics['n_scans']} scans"
             + ("" if estimable else f"; fewer than {MIN_SUBJECTS_PER_CLASS} test subjects in a class, so no "
                                     "interval is estimable")]
    for level in ("subject", "scan"):
        shown = ", ".join(f"{label} {metric_text(metrics[level], key, estimable)}" for key, label in SHOWN_METRICS)
        lines.append(f"  - {level} level: {shown}")
    return lines


def summary_text(results: str | Path, metrics_files: dict[str, str | Path], classes: Sequence[str]) -> str:
    """The run summary as Markdown."""
    from workflow_scripts.preprocess.usable_scans import outcome_line

    results = Path(results)
    used = len(pd.read_csv(results / "usable.tsv", sep="\t"))
    lines = ["# Run summary", "", "## Scans", "", f"- used: {used}",
             f"- dropped after ingest: {reason_counts(results / 'dropped.tsv')}, see {results / 'dropped.tsv'}",
             f"- left out by ingest: {reason_counts(results / 'excluded.tsv')}, see {results / 'excluded.tsv'}",
             "", "## Test metrics (the held-out test split; 95% bootstrap intervals resample subjects)", ""]
    for name, path in metrics_files.items():
        lines += experiment_lines(name, json.loads(Path(path).read_text()), classes)
    lines += ["", "Cross-validation: results/cv/<experiment>/summary.md; comparison: results/comparison.md.",
              "", "## Report", "",
              "The HTML report with every figure: `snakemake --report report.html`, with this run's "
              "--configfile or --profile options (the quick profile builds it after the run).", "",
              outcome_line(results)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="the results folder (usable.tsv, dropped.tsv, excluded.tsv)")
    p.add_argument("--metrics", nargs="+", required=True, metavar="NAME=PATH",
                   help="each experiment's evaluation/metrics.json")
    settings.add_argument(p, "data.classes")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    (classes,) = settings.read_job(args.settings, "data.classes")
    metrics = dict(item.split("=", 1) for item in args.metrics)
    text = summary_text(args.results, metrics, classes)
    write_text_atomic(text, args.output)
    LOG.info("run summary written to %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
