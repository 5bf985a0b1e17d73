"""Evaluate: a predictions table -> metrics with bootstrap intervals, scan- and subject-level.

The input is one row per scan (``image_id, subject, label, prob, pred``; label 1 = AD, the
positive class; prob = predicted probability of AD). Scans of one subject are correlated
(same brain, months apart), so the scan-level intervals come from a cluster bootstrap that
resamples subjects, not scans; the subject level averages each subject's scan
probabilities first (dissertation section 4.6).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from workflow_scripts.common import cli, settings
from workflow_scripts.common.figures import save_figure
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image_id", "subject", "label", "prob", "pred")
# The rates a fold is judged by, in the order tables list them; "recall" is the sensitivity.
METRIC_NAMES = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc", "kappa")
COUNT_NAMES = ("tn", "fp", "fn", "tp", "n")
CLASS_NAMES = ("CN", "AD")  # label 0, label 1
_BOOT_CELLS = 2 ** 22  # resamples x scans held in memory at once (32 MiB of float64)


# --- inputs -----------------------------------------------------------------------------

def _check_arrays(labels: Sequence, probs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 ints and probabilities as floats in [0, 1], of one length."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 1 or y.shape != p.shape or len(y) == 0:
        raise ValueError(f"labels and probs must be 1-D, non-empty and of one length, got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (CN) or 1 (AD), got {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probs must be finite probabilities in [0, 1]")
    return y.astype(int), p


def validate_predictions(predictions: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions table and return it typed (label int, prob float, pred int).

    A wrong table fails here, naming the file and the rows, instead of as a silent
    nonsense metric later.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise cli.PipelineError(f"{source}: missing column(s) {', '.join(missing)}; a predictions table "
                                f"has the columns {', '.join(PREDICTION_COLUMNS)}")
    table = predictions.copy()
    if table.empty:
        raise cli.PipelineError(f"{source}: no predictions (the table has no rows)")
    table["image_id"] = table["image_id"].astype(str)
    table["subject"] = table["subject"].astype(str)
    duplicated = table["image_id"][table["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise cli.PipelineError(f"{source}: image_id(s) listed more than once: {', '.join(duplicated[:10])}")
    for column in ("label", "pred"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table["image_id"][~values.isin((0, 1))].tolist()
        if bad:
            raise cli.PipelineError(f"{source}: column {column} must be 1 (AD) or 0 (CN); not so for "
                                    f"image(s) {', '.join(bad[:10])}")
        table[column] = values.astype(int)
    prob = pd.to_numeric(table["prob"], errors="coerce")
    bad = table["image_id"][~prob.between(0.0, 1.0)].tolist()  # NaN is not between
    if bad:
        raise cli.PipelineError(f"{source}: column prob must be a probability in [0, 1]; not so for "
                                f"image(s) {', '.join(bad[:10])}")
    table["prob"] = prob.astype(float)
    return table


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read and check a predictions CSV, naming the file if it cannot be used."""
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "subject": str})
    except Exception as err:
        raise cli.PipelineError(f"cannot read the predictions CSV {path}: {err}") from err
    return validate_predictions(table, source=str(path))


# --- metrics ----------------------------------------------------------------------------

def _number(value: float) -> float | None:
    """A plain float for JSON, or None where the metric is undefined (NaN)."""
    value = float(value)
    return None if math.isnan(value) else value


def metrics(labels: Sequence, probs: Sequence, *, threshold: float) -> dict:
    """Every metric the dissertation reports, at ``pred = prob >= threshold``.

    A metric that needs a class or a prediction that is absent (AUC, specificity,
    balanced accuracy with one class; precision with no AD predictions) is None, not a
    number that looks meaningful.
    """
    y, p = _check_arrays(labels, probs)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both_classes = 0 < y.sum() < len(y)
    nan = float("nan")
    return {
        "accuracy": _number(skm.accuracy_score(y, pred)),
        "balanced_accuracy": _number(skm.balanced_accuracy_score(y, pred)) if both_classes else None,
        "precision": _number(skm.precision_score(y, pred, zero_division=nan)),
        "recall": _number(skm.recall_score(y, pred, zero_division=nan)),
        "specificity": _number(skm.recall_score(y, pred, pos_label=0, zero_division=nan)),
        "f1": _number(skm.f1_score(y, pred, zero_division=nan)),
        "auc": _number(skm.roc_auc_score(y, p)) if both_classes else None,
        "kappa": _number(skm.cohen_kappa_score(y, pred, replace_undefined_by=nan)),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp, "n": int(len(y)),
    }


def _weighted_metrics(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict:
    """The rates of ``metrics`` for many resamples at once; row b of ``weights`` counts
    how often each scan was drawn in resample b. NaN marks an undefined metric.

    Resample-by-resample scikit-learn calls would take minutes at 2,000 resamples; the
    same formulas on weighted counts take milliseconds (the tests check they agree).
    """
    pos, hit = y.astype(bool), pred.astype(bool)
    tp, fp = weights @ (pos & hit), weights @ (~pos & hit)
    fn, tn = weights @ (pos & ~hit), weights @ (~pos & ~hit)
    total = tp + fp + fn + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        recall, specificity = tp / (tp + fn), tn / (tn + fp)
        agree, chance = (tp + tn) / total, ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / total ** 2
        kappa = np.where(chance < 1, (agree - chance) / (1 - chance), np.nan)
        out = {"accuracy": agree, "balanced_accuracy": (recall + specificity) / 2,
               "precision": tp / (tp + fp), "recall": recall, "specificity": specificity,
               "f1": 2 * tp / (2 * tp + fp + fn), "kappa": kappa}
        # AUC as the Mann-Whitney statistic: for each score, the weight of negatives below
        # it, ties counting one half.
        order = np.argsort(probs, kind="stable")
        ranked = probs[order]
        last_of_tie = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
        w_pos, w_neg = (np.diff(np.cumsum((weights * cls)[:, order], axis=1)[:, last_of_tie], axis=1, prepend=0.0)
                        for cls in (pos, ~pos))
        below = np.cumsum(w_neg, axis=1) - w_neg
        out["auc"] = (w_pos * (below + 0.5 * w_neg)).sum(axis=1) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))
    return out


def group_codes(groups: Sequence) -> np.ndarray:
    """0-based integer code of each item's group (subject id), in order of first appearance."""
    return pd.factorize(pd.Series(list(groups), dtype=object))[0]


def resample_weights(codes: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, n items) weights of ``size`` bootstrap resamples that draw whole groups with replacement:
    each item weighs as often as its group was drawn, so a subject's scans stay together."""
    n_groups = int(codes.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
    return counts[:, codes].astype(float)


def bootstrap_intervals(labels: Sequence, probs: Sequence, *, n_boot: int, seed: int, alpha: float,
                        threshold: float, groups: Sequence | None = None
                        ) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap ``1 - alpha`` intervals of each metric in ``METRIC_NAMES``.

    With ``groups`` (subject ids) whole subjects are resampled, so that correlated scans
    of one subject stay together and do not pass for independent evidence. A resample in
    which a metric is undefined (one class for AUC) is skipped for that metric; a metric
    undefined in every resample gets (None, None).
    """
    y, p = _check_arrays(labels, probs)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if groups is None:
        codes = np.arange(len(y))
    else:
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} labels")
        codes = group_codes(groups)
    rng = np.random.default_rng(seed)
    pred = (p >= threshold).astype(int)
    chunk = max(1, _BOOT_CELLS // max(len(y), int(codes.max()) + 1))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, n_boot, chunk):
        weights = resample_weights(codes, min(chunk, n_boot - start), rng)
        for name, values in _weighted_metrics(y, pred, p, weights).items():
            draws[name].append(values)
    low_q, high_q = 100 * alpha / 2, 100 * (1 - alpha / 2)
    intervals = {}
    for name in METRIC_NAMES:
        values = np.concatenate(draws[name])
        valid = values[~np.isnan(values)]
        if len(valid) < n_boot:
            LOG.info("%s: %d of %d resamples left it undefined and were skipped", name, n_boot - len(valid), n_boot)
        if len(valid) == 0:
            intervals[name] = (None, None)
        else:
            low, high = np.percentile(valid, [low_q, high_q])
            intervals[name] = (float(low), float(high))
    return intervals


# --- levels -----------------------------------------------------------------------------

def subject_level(predictions: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """One row per subject and diagnosis: the mean of its scans' probabilities, ``pred = prob >= threshold``.

    A subject has one diagnosis unless ``data.label_policy: visit_diagnosis`` labels each scan by its
    visit: a converter then gives one row per diagnosis (its CN visits and its AD visits are not averaged
    into one), and the subject-level bootstrap still resamples the person as one cluster.
    """
    missing = [c for c in ("subject", "label", "prob") if c not in predictions.columns]
    if missing:
        raise cli.PipelineError(f"predictions: missing column(s) {', '.join(missing)}")
    keys = [predictions["subject"].astype(str).rename("subject"), predictions["label"].astype(int).rename("label")]
    grouped = predictions.groupby(keys, sort=True)
    table = pd.DataFrame({"prob": grouped["prob"].mean().astype(float), "n_scans": grouped.size().astype(int)})
    table["pred"] = (table["prob"] >= threshold).astype(int)
    return table.reset_index()[["subject", "label", "prob", "pred", "n_scans"]]


def _level(labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int, alpha: float,
           threshold: float, groups: Sequence | None) -> dict:
    """Point metrics plus their intervals, as one JSON-ready block."""
    block = metrics(labels, probs, threshold=threshold)
    block["ci"] = {name: list(bounds) for name, bounds in
                   bootstrap_intervals(labels, probs, n_boot=n_boot, seed=seed, alpha=alpha, threshold=threshold,
                                       groups=groups).items()}
    return block


# Below this many subjects in a class a bootstrap interval is not estimable: with two subjects every
# resample agrees with itself, and 1.000 (1.000-1.000) would pass for certainty. Readers of metrics.json
# (report pages, the run summary, predict) print "not estimable" instead of such intervals.
MIN_SUBJECTS_PER_CLASS = 5


def evaluate_predictions(predictions: pd.DataFrame, *, n_boot: int, seed: int, alpha: float, threshold: float) -> dict:
    """Scan- and subject-level metrics with ``1 - alpha`` bootstrap intervals.

    Scan-level intervals resample subjects (cluster bootstrap); subject-level ones resample
    subjects too, each once per row.
    """
    table = validate_predictions(predictions)
    mismatched = int(((table["prob"] >= threshold).astype(int) != table["pred"]).sum())
    if mismatched:
        LOG.warning("%d scan(s) have a pred column that differs from prob >= %g; metrics use prob >= %g",
                    mismatched, threshold, threshold)
    subjects = subject_level(table, threshold=threshold)
    per_label = subjects.groupby("label")["subject"].nunique().reindex([0, 1], fill_value=0)
    return {
        "scan": _level(table["label"].to_numpy(), table["prob"].to_numpy(), n_boot, seed, alpha, threshold,
                       groups=table["subject"].tolist()),
        "subject": _level(subjects["label"].to_numpy(), subjects["prob"].to_numpy(), n_boot, seed, alpha,
                          threshold, groups=subjects["subject"].tolist()),
        "n_scans": int(len(table)),
        "n_subjects": int(subjects["subject"].nunique()),
        "subjects_per_label": {int(k): int(v) for k, v in per_label.items()},
        "intervals_estimable": bool(per_label.min() >= MIN_SUBJECTS_PER_CLASS),
        "threshold": float(threshold),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha),
                      "method": "percentile; scan level resamples subjects (cluster bootstrap)"},
    }


# --- report -----------------------------------------------------------------------------

def _ci_text(block: dict, name: str, coverage: float = 95.0, digits: int = 3) -> str:
    """' (95% CI 0.700-0.900)', or '' where the block has no interval for ``name``."""
    low, high = block.get("ci", {}).get(name, (None, None))
    return "" if low is None else f" ({coverage:g}% CI {low:.{digits}f}-{high:.{digits}f})"


def plot_roc(levels: Sequence[tuple[str, np.ndarray, np.ndarray, dict]], path: str | Path,
             coverage: float = 95.0) -> Path:
    """ROC curves, one per (name, labels, probs, metrics block), AUC and its CI in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, labels, probs, block in levels:
        if block.get("auc") is None:
            ax.plot([], [], label=f"{name} (n={len(labels)}): AUC undefined, one class only")
            continue
        fpr, tpr, _ = skm.roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (n={len(labels)}): AUC {block['auc']:.3f}"
                f"{_ci_text(block, 'auc', coverage)}")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, AD vs CN")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_confusion(block: dict, path: str | Path, title: str = "") -> Path:
    """The 2x2 confusion matrix: counts and the share of each true class (row percentages)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array([[block["tn"], block["fp"]], [block["fn"], block["tp"]]], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(rows > 0, counts / rows, np.nan)
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.imshow(np.nan_to_num(shares), cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            share = "-" if np.isnan(shares[i, j]) else f"{100 * shares[i, j]:.1f}%"
            colour = "white" if np.nan_to_num(shares[i, j]) > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}\n{share}", ha="center", va="center", fontsize=12, color=colour)
    ax.set_xticks([0, 1], [f"predicted {c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASS_NAMES])
    ax.set_title(title or f"n = {block['n']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def write_report(result: dict, predictions: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``roc.png``, ``confusion_matrix.png``, ``predictions.csv`` and
    ``subject_predictions.csv`` into ``out_dir``; returns their paths by name."""
    out_dir = Path(out_dir)
    table = validate_predictions(predictions)
    threshold = float(result["threshold"])
    coverage = 100 * (1 - float(result["bootstrap"]["alpha"]))
    subjects = subject_level(table, threshold=threshold)
    paths = {
        "metrics": write_text_atomic(json.dumps(result, indent=2) + "\n", out_dir / "metrics.json"),
        "predictions": write_text_atomic(table.to_csv(index=False), out_dir / "predictions.csv"),
        "subject_predictions": write_text_atomic(subjects.to_csv(index=False), out_dir / "subject_predictions.csv"),
    }
    paths["roc"] = plot_roc([("scan level", table["label"].to_numpy(), table["prob"].to_numpy(), result["scan"]),
                             ("subject level", subjects["label"].to_numpy(), subjects["prob"].to_numpy(),
                              result["subject"])], out_dir / "roc.png", coverage)
    scan = result["scan"]
    paths["confusion_matrix"] = plot_confusion(
        scan, out_dir / "confusion_matrix.png",
        title=f"scan level: {scan['n']} scans, {result.get('n_subjects', '?')} subjects, threshold {threshold:g}")
    return paths


def summary_lines(result: dict) -> list[str]:
    """One line per level and metric, for the log: 'scan accuracy 0.812 (95% CI ...)'."""
    coverage = 100 * (1 - float(result["bootstrap"]["alpha"]))
    lines = []
    for level in ("scan", "subject"):
        block = result[level]
        for name in METRIC_NAMES:
            value = block.get(name)
            shown = "undefined" if value is None else f"{value:.3f}{_ci_text(block, name, coverage)}"
            lines.append(f"{level} {name} {shown}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="CSV with columns " + ", ".join(PREDICTION_COLUMNS))
    p.add_argument("--out-dir", required=True, help="folder for metrics.json, roc.png, confusion_matrix.png, ...")
    settings.add_argument(p, "evaluate")
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    evaluate, = settings.read_job(args.settings, "evaluate")
    table = read_predictions(args.predictions)
    result = evaluate_predictions(table, n_boot=evaluate.n_boot, seed=evaluate.seed, alpha=evaluate.alpha,
                                  threshold=evaluate.threshold)
    result["predictions_file"] = str(args.predictions)
    write_report(result, table, args.out_dir)
    for line in summary_lines(result):
        LOG.info("%s", line)
    LOG.info("wrote %s", Path(args.out_dir) / "metrics.json")


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
