"""Compare: several experiments' test metrics and predictions -> one table, a figure, paired tests.

Every experiment is evaluated on the same test scans, so the fair question is not whether two
intervals overlap but whether the two models differ on those very scans: DeLong's test for the
AUCs and McNemar's test for the accuracies, each experiment against the main model. Each test is
run twice: on scans, which treats a subject's scans as independent cases, so with several scans
per subject its p-value is optimistic; and on subjects (each subject's mean probability,
thresholded as evaluate does: ``evaluate.subject_level``), where the cases are independent people.
The subject-level columns carry the prefix ``subject_``, like the subject-level metrics.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from workflow_scripts.common import cli
from workflow_scripts.common.figures import save_figure
from workflow_scripts.evaluation.evaluate import METRIC_NAMES, read_predictions, subject_level, validate_predictions
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

SUBJECT_METRICS = ("accuracy", "auc")  # subject-level columns of the table, prefixed "subject_"
PAIRED_COLUMNS = ("delong_auc_diff", "delong_p", "mcnemar_b", "mcnemar_c", "mcnemar_p")  # on scans
SUBJECT_PAIRED_COLUMNS = tuple(f"subject_{column}" for column in PAIRED_COLUMNS)  # on subjects
# Panels of the figure, and which paired p-value each one shows (None: no paired test).
PLOT_METRICS = (("accuracy", "mcnemar_p"), ("balanced_accuracy", None), ("auc", "delong_p"),
                ("recall", None), ("specificity", None), ("subject_accuracy", "subject_mcnemar_p"),
                ("subject_auc", "subject_delong_p"))
CHANCE_METRICS = ("accuracy", "balanced_accuracy", "auc", "subject_accuracy", "subject_auc")
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "AUC",
          "recall": "sensitivity (recall)", "specificity": "specificity", "subject_accuracy": "subject accuracy",
          "subject_auc": "subject AUC"}
P_TITLES = {"mcnemar_p": "\n(McNemar vs main, scans)", "delong_p": "\n(DeLong vs main, scans)",
            "subject_mcnemar_p": "\n(McNemar vs main, subjects)", "subject_delong_p": "\n(DeLong vs main, subjects)"}


# --- paired tests -----------------------------------------------------------------------

def _binary_labels(labels: Sequence, what: str) -> np.ndarray:
    """0/1 labels as ints, or a PipelineError that names what was wrong."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise cli.PipelineError(f"{what}: labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise cli.PipelineError(f"{what}: labels must be 0 (CN) or 1 (AD), got "
                                f"{sorted(set(y.tolist()) - {0, 1}, key=str)[:5]}")
    return y.astype(int)


def delong_test(labels: Sequence, probs_a: Sequence, probs_b: Sequence) -> dict:
    """DeLong et al. (1988) test of two correlated ROC AUCs computed on the same cases.

    The two AUCs share their cases, so their difference has a smaller variance than two
    independent AUCs would; DeLong's structural components estimate it without resampling.
    Computed with the midrank algorithm of Sun & Xu (2014), O(n log n); ties count one half.
    Returns ``auc_a``, ``auc_b``, ``auc_diff`` (a - b), ``se`` (of the difference), ``z``,
    ``p`` (two-sided), ``n_positive``, ``n_negative`` and ``method``.
    """
    y = _binary_labels(labels, "DeLong test")
    a, b = np.asarray(probs_a, dtype=float).ravel(), np.asarray(probs_b, dtype=float).ravel()
    if not len(y) == len(a) == len(b):
        raise cli.PipelineError(f"DeLong test: {len(y)} labels but {len(a)} and {len(b)} scores; "
                                f"each case needs a label and both scores")
    scores = np.vstack([a, b])
    if not np.isfinite(scores).all():
        raise cli.PipelineError("DeLong test: scores must be finite numbers (found NaN or infinity)")
    m, n = int(y.sum()), int(len(y) - y.sum())
    if m == 0 or n == 0:
        raise cli.PipelineError(f"DeLong test: the cases hold {m} AD and {n} CN; an AUC needs both classes, "
                                f"so the test set must contain at least one scan of each")
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    rank_x = stats.rankdata(positives, axis=1)  # midranks ("average") within each class ...
    rank_y = stats.rankdata(negatives, axis=1)
    rank_z = stats.rankdata(np.hstack([positives, negatives]), axis=1)  # ... and over all cases
    aucs = (rank_z[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (rank_z[:, :m] - rank_x) / n  # per AD case: share of CN cases it outranks
    v01 = 1.0 - (rank_z[:, m:] - rank_y) / m  # per CN case: share of AD cases that outrank it
    # Variance of the difference from the differences of the components: exactly 0 for
    # identical scores, where S_aa + S_bb - 2 S_ab could round to a tiny nonzero number.
    var_x = float(np.var(v10[0] - v10[1], ddof=1)) / m if m > 1 else 0.0
    var_y = float(np.var(v01[0] - v01[1], ddof=1)) / n if n > 1 else 0.0
    diff, se = float(aucs[0] - aucs[1]), math.sqrt(max(var_x + var_y, 0.0))
    if se > 0:
        z = diff / se
        p = float(min(1.0, 2 * stats.norm.sf(abs(z))))
    elif diff == 0:
        z, p = 0.0, 1.0
    else:  # no variability left in the components, yet the AUCs differ (e.g. perfect vs constant)
        z, p = math.copysign(math.inf, diff), 0.0
        LOG.warning("DeLong test: AUCs %.4f and %.4f differ with zero estimated variance; p set to 0",
                    aucs[0], aucs[1])
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "auc_diff": diff, "se": se, "z": float(z),
            "p": p, "n_positive": m, "n_negative": n, "method": "DeLong (1988), Sun & Xu (2014) midranks"}


def mcnemar_test(labels: Sequence, pred_a: Sequence, pred_b: Sequence) -> dict:
    """McNemar's test of two classifiers' accuracies on the same cases, exact form.

    Only the discordant cases carry information: ``b`` (A right, B wrong) and ``c`` (A wrong,
    B right). Under equal accuracy b ~ Binomial(b + c, 1/2); the exact two-sided binomial
    p-value is used because a test set of tens of scans gives few discordant pairs, where the
    chi-square approximation is poor. With no discordant case p = 1.
    """
    y = _binary_labels(labels, "McNemar test")
    a = _binary_labels(pred_a, "McNemar test (predictions A)")
    b_pred = _binary_labels(pred_b, "McNemar test (predictions B)")
    if not len(y) == len(a) == len(b_pred):
        raise cli.PipelineError(f"McNemar test: {len(y)} labels but {len(a)} and {len(b_pred)} predictions; "
                                f"each case needs a label and both predictions")
    right_a, right_b = a == y, b_pred == y
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "n_discordant": b + c, "n": int(len(y)), "p": min(1.0, p),
            "method": "McNemar, exact two-sided binomial"}


def paired_predictions(main_df: pd.DataFrame, other_df: pd.DataFrame, main_name: str,
                       other_name: str) -> pd.DataFrame:
    """Join two experiments' predictions scan by scan (columns ``image_id, subject, label,
    prob_main, pred_main, prob_other, pred_other``, in the main table's order).

    A paired test is only valid on the very same scans with the same labels; anything else
    means the experiments did not share the split, and is named here rather than averaged over.
    """
    main = validate_predictions(main_df, source=f"experiment {main_name}")
    other = validate_predictions(other_df, source=f"experiment {other_name}")
    main_ids, other_ids = set(main["image_id"]), set(other["image_id"])
    if main_ids != other_ids:
        only_main = [i for i in main["image_id"] if i not in other_ids]
        only_other = [i for i in other["image_id"] if i not in main_ids]
        parts = []
        if only_main:
            parts.append(f"{len(only_main)} scan(s) only in {main_name}: {', '.join(only_main[:10])}")
        if only_other:
            parts.append(f"{len(only_other)} scan(s) only in {other_name}: {', '.join(only_other[:10])}")
        raise cli.PipelineError(
            f"experiments {main_name} and {other_name} were tested on different scans ({'; '.join(parts)}); "
            f"a paired comparison needs one split for all experiments (re-run them on the same split)")
    joined = main[["image_id", "subject", "label", "prob", "pred"]].merge(
        other[["image_id", "subject", "label", "prob", "pred"]], on="image_id", suffixes=("_main", "_other"),
        how="left", validate="one_to_one")
    for column, what in (("label", "labels"), ("subject", "subjects")):
        differs = joined["image_id"][joined[f"{column}_main"] != joined[f"{column}_other"]].tolist()
        if differs:
            raise cli.PipelineError(
                f"experiments {main_name} and {other_name} disagree on the {what} of scan(s) "
                f"{', '.join(differs[:10])}; both must be tested against the same scans table")
    return joined.rename(columns={"label_main": "label", "subject_main": "subject"})[
        ["image_id", "subject", "label", "prob_main", "pred_main", "prob_other", "pred_other"]]


# --- table ------------------------------------------------------------------------------

def _value(value) -> float:
    """A metric as a float, NaN where metrics.json has None (undefined)."""
    return math.nan if value is None else float(value)


def _interval(block: dict, name: str) -> tuple[float, float]:
    """The (lo, hi) interval of ``name`` in a metrics block, NaN where absent or undefined."""
    bounds = block.get("ci", {}).get(name) or (None, None)
    return _value(bounds[0]), _value(bounds[1])


def _threshold_preds(probs: pd.Series, threshold: float) -> np.ndarray:
    """Predictions as evaluate scores them (prob >= threshold), so McNemar tests the reported accuracy."""
    return (probs.to_numpy(dtype=float) >= threshold).astype(int)


def paired_tests(labels: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, pred_a: np.ndarray,
                 pred_b: np.ndarray, what: str) -> dict:
    """PAIRED_COLUMNS of A against B on one set of paired cases (scans or subjects); no DeLong test
    (NaN) when the cases hold one class only."""
    row = dict.fromkeys(PAIRED_COLUMNS, math.nan)
    if 0 < labels.sum() < len(labels):
        delong = delong_test(labels, prob_a, prob_b)
        row["delong_auc_diff"], row["delong_p"] = delong["auc_diff"], delong["p"]
    else:
        LOG.warning("%s: the cases hold one class only; no DeLong test", what)
    mcnemar = mcnemar_test(labels, pred_a, pred_b)
    row["mcnemar_b"], row["mcnemar_c"], row["mcnemar_p"] = mcnemar["b"], mcnemar["c"], mcnemar["p"]
    return row


def subject_pairs(pairs: pd.DataFrame, threshold_other: float, threshold_main: float) -> pd.DataFrame:
    """The paired scans as paired subjects (``evaluate.subject_level`` of each side at its own threshold):
    columns ``subject, label, prob_main, pred_main, prob_other, pred_other``."""
    sides = [subject_level(pairs.rename(columns={f"prob_{side}": "prob"})[["subject", "label", "prob"]],
                           threshold=threshold)
             .rename(columns={"prob": f"prob_{side}", "pred": f"pred_{side}"})
             for side, threshold in (("main", threshold_main), ("other", threshold_other))]
    return sides[0][["subject", "label", "prob_main", "pred_main"]].merge(
        sides[1][["subject", "label", "prob_other", "pred_other"]], on=["subject", "label"], validate="one_to_one")


def comparison_table(experiments: dict[str, tuple[dict, pd.DataFrame]], main: str) -> pd.DataFrame:
    """One row per experiment, main first: every scan-level metric with its interval
    (``accuracy``, ``accuracy_lo``, ``accuracy_hi``, ...), subject-level accuracy and AUC with
    intervals, ``n_scans``, ``n_subjects``, and the paired tests against the main model, on scans
    (PAIRED_COLUMNS) and on subjects (SUBJECT_PAIRED_COLUMNS, each subject's mean probability).

    In the paired columns the row's experiment is A and the main model B: ``delong_auc_diff``
    > 0 and ``mcnemar_b`` > ``mcnemar_c`` both mean the row's experiment did better. They are
    empty for the main row. ``experiments`` maps a name to (metrics.json dict, predictions).
    """
    if main not in experiments:
        raise cli.PipelineError(f"the main experiment {main!r} is not among the compared ones "
                                f"({', '.join(experiments) or 'none'})")
    order = [main] + [name for name in experiments if name != main]
    main_metrics, main_predictions = experiments[main]
    rows = []
    for name in order:
        result, predictions = experiments[name]
        for level in ("scan", "subject"):
            if not isinstance(result.get(level), dict):
                raise cli.PipelineError(f"experiment {name}: its metrics have no '{level}' block; expected the "
                                        f"metrics.json written by workflow_scripts.evaluation.evaluate")
        table = validate_predictions(predictions, source=f"experiment {name}")
        if result.get("n_scans") is not None and int(result["n_scans"]) != len(table):
            raise cli.PipelineError(f"experiment {name}: metrics.json counts {result['n_scans']} scans but its "
                                    f"predictions hold {len(table)}; the metrics are stale (re-run its evaluation)")
        row: dict = {"experiment": name, "main": name == main, "n_scans": len(table),
                     "n_subjects": int(result.get("n_subjects", table["subject"].nunique()))}
        for metric in METRIC_NAMES:
            row[metric] = _value(result["scan"].get(metric))
            row[f"{metric}_lo"], row[f"{metric}_hi"] = _interval(result["scan"], metric)
        for metric in SUBJECT_METRICS:
            row[f"subject_{metric}"] = _value(result["subject"].get(metric))
            row[f"subject_{metric}_lo"], row[f"subject_{metric}_hi"] = _interval(result["subject"], metric)
        row.update(dict.fromkeys(PAIRED_COLUMNS + SUBJECT_PAIRED_COLUMNS, math.nan))
        if name != main:
            pairs = paired_predictions(main_predictions, table, main, name)
            t_other, t_main = float(result.get("threshold", 0.5)), float(main_metrics.get("threshold", 0.5))
            row.update(paired_tests(pairs["label"].to_numpy(), pairs["prob_other"].to_numpy(),
                                    pairs["prob_main"].to_numpy(), _threshold_preds(pairs["prob_other"], t_other),
                                    _threshold_preds(pairs["prob_main"], t_main), f"{name} vs {main}, scans"))
            subjects = subject_pairs(pairs, t_other, t_main)
            tests = paired_tests(subjects["label"].to_numpy(), subjects["prob_other"].to_numpy(),
                                 subjects["prob_main"].to_numpy(), subjects["pred_other"].to_numpy(),
                                 subjects["pred_main"].to_numpy(), f"{name} vs {main}, subjects")
            row.update({f"subject_{key}": value for key, value in tests.items()})
        rows.append(row)
    out = pd.DataFrame(rows)
    for column in ("mcnemar_b", "mcnemar_c", "subject_mcnemar_b", "subject_mcnemar_c"):
        out[column] = out[column].astype("Int64")  # counts, empty for the main row
    return out


# --- outputs ----------------------------------------------------------------------------

def _p_text(p: float) -> str:
    """'p=0.032', 'p<0.001', or '' where there is no test."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def plot_comparison(table: pd.DataFrame, path: str | Path, coverage: float = 95.0) -> Path:
    """Forest plot: one panel per key metric, one line per experiment (main first, highlighted),
    point and interval; McNemar's p on accuracy and DeLong's p on AUC, each against the main model,
    on scans in the scan-level panels and on subjects in the subject-level ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(2.8 * len(PLOT_METRICS), 1.6 + 0.55 * n),
                             sharey=True, squeeze=False)
    y = np.arange(n)[::-1]  # the first row (main) on top
    is_main = table["main"].astype(bool).to_numpy() if "main" in table else np.arange(n) == 0
    for ax, (metric, p_column) in zip(axes[0], PLOT_METRICS):
        values = table[metric].to_numpy(dtype=float)
        lo, hi = table[f"{metric}_lo"].to_numpy(dtype=float), table[f"{metric}_hi"].to_numpy(dtype=float)
        if metric in CHANCE_METRICS:
            ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        for i in range(n):
            colour = "C3" if is_main[i] else "C0"
            if math.isnan(values[i]):
                ax.text(0.5, y[i], "undefined", ha="center", va="center", fontsize=8, color="grey")
                continue
            if not (math.isnan(lo[i]) or math.isnan(hi[i])):
                ax.plot([lo[i], hi[i]], [y[i], y[i]], color=colour, linewidth=2.5 if is_main[i] else 1.8)
            ax.plot(values[i], y[i], "o", color=colour, markersize=7 if is_main[i] else 6)
            if p_column and not is_main[i]:
                ax.annotate(_p_text(float(table[p_column].iloc[i])), (values[i], y[i]), xytext=(0, 6),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xlim(min(0.4, np.nanmin(np.r_[lo, values, 1.0]) - 0.05), 1.02)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_title(LABELS.get(metric, metric) + P_TITLES.get(p_column, "\n"), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, [f"{name} (main)" if main else str(name)
                              for name, main in zip(table["experiment"], is_main)])
    for label, main in zip(axes[0][0].get_yticklabels(), is_main):
        if main:
            label.set_fontweight("bold")
            label.set_color("C3")
    fig.suptitle(f"Test set: point estimate and {coverage:g}% bootstrap interval (subjects resampled); paired "
                 "p-values on scans (optimistic: a subject's scans are not independent) and on subjects",
                 fontsize=11)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def _cell(row: pd.Series, metric: str) -> str:
    """'0.812 (0.700-0.900)' or '-' where undefined."""
    value = row[metric]
    if pd.isna(value):
        return "-"
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    return f"{value:.3f}" + ("" if pd.isna(lo) or pd.isna(hi) else f" ({lo:.3f}-{hi:.3f})")


def _paired_cells(row: pd.Series, prefix: str = "") -> list[str]:
    """AUC difference, DeLong p, McNemar b/c and p of one level (``prefix`` "" for scans, "subject_")."""
    if pd.isna(row[f"{prefix}mcnemar_p"]):
        return ["-"] * 4
    diff = row[f"{prefix}delong_auc_diff"]
    return ["-" if pd.isna(diff) else f"{diff:+.3f}", _p_text(row[f"{prefix}delong_p"]) or "-",
            f"{row[f'{prefix}mcnemar_b']}/{row[f'{prefix}mcnemar_c']}", _p_text(row[f"{prefix}mcnemar_p"])]


def markdown_table(table: pd.DataFrame, coverage: float = 95.0) -> str:
    """A Markdown table for the report: key metrics with intervals and the paired tests, on scans and on
    subjects (each subject's mean probability)."""
    lines = [f"| experiment | scans | subjects | accuracy ({coverage:g}% CI) | balanced accuracy | AUC | "
             "subject accuracy | subject AUC | AUC diff vs main (scans) | DeLong p (scans) | McNemar b/c (scans) | "
             "McNemar p (scans) | AUC diff vs main (subjects) | DeLong p (subjects) | McNemar b/c (subjects) | "
             "McNemar p (subjects) |",
             "|" + "---|" * 16]
    for _, row in table.iterrows():
        name = f"**{row['experiment']}** (main)" if row["main"] else str(row["experiment"])
        cells = [name, str(row["n_scans"]), str(row["n_subjects"])] + [
            _cell(row, m) for m in ("accuracy", "balanced_accuracy", "auc", "subject_accuracy", "subject_auc")]
        lines.append("| " + " | ".join(cells + _paired_cells(row) + _paired_cells(row, "subject_")) + " |")
    return "\n".join(lines) + "\n"


def read_metrics(path: str | Path) -> dict:
    """Read an experiment's metrics.json, naming the file if evaluate did not write it."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read the metrics file {path}: {err}") from err
    if not isinstance(result, dict) or not all(isinstance(result.get(level), dict) for level in ("scan", "subject")):
        raise cli.PipelineError(f"{path} has no 'scan' and 'subject' blocks; expected a metrics.json written by "
                                f"workflow_scripts.evaluation.evaluate (re-run that experiment's evaluation)")
    missing = [name for name in METRIC_NAMES if name not in result["scan"]]
    if missing:
        raise cli.PipelineError(f"{path}: the 'scan' block lacks {', '.join(missing)}; re-run that experiment's "
                                f"evaluation with the current workflow_scripts.evaluation.evaluate")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--main", required=True, help="name of the main experiment, which the others are tested against")
    p.add_argument("--experiment", nargs=3, action="append", required=True,
                   metavar=("NAME", "METRICS_JSON", "PREDICTIONS_CSV"),
                   help="one experiment: its name, metrics.json and test predictions CSV (repeat per experiment)")
    p.add_argument("--csv", required=True, help="comparison table to write")
    p.add_argument("--figure", required=True, help="forest plot (PNG) to write")
    p.add_argument("--markdown", help="also write a Markdown table here")
    args = p.parse_args(argv)
    names = [name for name, _, _ in args.experiment]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise cli.PipelineError(f"experiment(s) {', '.join(repeated)} given more than once")
    if args.main not in names:
        raise cli.PipelineError(f"--main {args.main} is not among the --experiment names ({', '.join(names)})")
    experiments = {name: (read_metrics(metrics_path), read_predictions(predictions_path))
                   for name, metrics_path, predictions_path in args.experiment}
    table = comparison_table(experiments, args.main)
    coverage = 100 * (1 - float(experiments[args.main][0].get("bootstrap", {}).get("alpha", 0.05)))
    write_text_atomic(table.to_csv(index=False), args.csv)
    plot_comparison(table, args.figure, coverage)
    if args.markdown:
        write_text_atomic(markdown_table(table, coverage), args.markdown)
    for _, row in table.iterrows():
        if row["main"]:
            LOG.info("%s (main): accuracy %.3f, AUC %.3f", row["experiment"], row["accuracy"], row["auc"])
        else:
            LOG.info("%s: accuracy %.3f (McNemar b=%s c=%s, %s; on subjects b=%s c=%s, %s), AUC %.3f (diff %+.3f, "
                     "DeLong %s; on subjects diff %+.3f, %s)", row["experiment"], row["accuracy"], row["mcnemar_b"],
                     row["mcnemar_c"], _p_text(row["mcnemar_p"]), row["subject_mcnemar_b"], row["subject_mcnemar_c"],
                     _p_text(row["subject_mcnemar_p"]), row["auc"], row["delong_auc_diff"], _p_text(row["delong_p"]),
                     row["subject_delong_auc_diff"], _p_text(row["subject_delong_p"]))
    LOG.info("wrote %s and %s", args.csv, args.figure)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
