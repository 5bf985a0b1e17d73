"""CV summary: per-fold metrics.json files -> mean and standard deviation across folds.

The dissertation reports cross-validation as "accuracy 77.26% ± 2.34": the mean over folds
and the sample standard deviation (ddof=1), both in percent, so the spread says how much
a result depends on which subjects were held out.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from workflow_scripts import cli
from workflow_scripts.evaluate import METRIC_NAMES
from workflow_scripts.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

# Rates shown in percent; AUC and kappa stay on their own scale, as usually printed.
PERCENT_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1")
LABELS = {"balanced_accuracy": "balanced accuracy", "recall": "recall (sensitivity)", "auc": "AUC"}


def _block(fold: dict, level: str) -> dict:
    """The metrics block of one fold: ``fold[level]`` for an evaluate metrics.json, else the dict itself."""
    return fold[level] if isinstance(fold.get(level), dict) else fold


def summarise_folds(fold_metrics: list[dict], level: str = "scan") -> dict:
    """Per metric: ``{"mean", "std", "folds"}`` over the folds, std the sample one (ddof=1).

    A fold where a metric is undefined (None) keeps None in ``folds`` and is left out of the
    mean and std; with fewer than two defined folds the std is None.
    """
    if not fold_metrics:
        raise ValueError("no folds to summarise")
    blocks = [_block(fold, level) for fold in fold_metrics]
    summary = {}
    for name in METRIC_NAMES:
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


def markdown_table(summary: dict, fold_names: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per metric, mean ± std, then each fold's value."""
    n_folds = len(next(iter(summary.values()))["folds"])
    fold_names = list(fold_names or [f"fold {i}" for i in range(n_folds)])
    lines = ["| metric | mean ± std | " + " | ".join(fold_names) + " |",
             "|---|---|" + "---|" * n_folds]
    for name, entry in summary.items():
        scale, digits = (100, 2) if name in PERCENT_METRICS else (1, 4)
        cells = ["-" if v is None else f"{scale * v:.{digits}f}" for v in entry["folds"]]
        mean = format_metric(name, entry).split(" ", 1)[1]
        lines.append(f"| {LABELS.get(name, name)} | {mean} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_fold_metrics(path: str | Path, level: str = "scan") -> dict:
    """Read one fold's metrics.json, naming the file if it is not one evaluate wrote."""
    try:
        fold = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read fold metrics {path}: {err}") from err
    if not isinstance(fold, dict) or not isinstance(fold.get(level), dict):
        raise cli.PipelineError(f"{path} has no '{level}' block; expected a metrics.json written by "
                                f"workflow_scripts.evaluate (re-run that fold's evaluation)")
    missing = [name for name in METRIC_NAMES if name not in fold[level]]
    if missing:
        raise cli.PipelineError(f"{path}: the '{level}' block lacks {', '.join(missing)}; re-run that fold's "
                                f"evaluation with the current workflow_scripts.evaluate")
    return fold


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--fold-metrics", nargs="+", required=True, help="each fold's metrics.json, in fold order")
    p.add_argument("--output", required=True, help="summary.json to write")
    p.add_argument("--table", help="also write a Markdown table here")
    p.add_argument("--level", choices=("scan", "subject"), default="scan",
                   help="which block of metrics.json to summarise (default scan)")
    args = p.parse_args(argv)
    folds = [read_fold_metrics(path, args.level) for path in args.fold_metrics]
    summary = summarise_folds(folds, args.level)
    write_text_atomic(json.dumps(summary, indent=2) + "\n", args.output)
    if args.table:
        names = [Path(path).parent.name or Path(path).stem for path in args.fold_metrics]
        if len(set(names)) < len(names):
            names = None  # folders do not tell the folds apart: number them
        write_text_atomic(markdown_table(summary, names), args.table)
    print(f"{args.level} level, {len(folds)} folds (mean ± sample std):")
    for name, entry in summary.items():
        print(format_metric(name, entry))
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
