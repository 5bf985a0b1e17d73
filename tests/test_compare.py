"""Paired comparison of experiments: DeLong against a brute-force reference, exact McNemar
against a hand count, the scan-by-scan join, the comparison table and its command line."""
from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.evaluation.compare import (PAIRED_COLUMNS, SUBJECT_PAIRED_COLUMNS, _p_text, comparison_table, delong_test,
                                      main as compare_main, markdown_table, mcnemar_test, paired_predictions)
from workflow_scripts.evaluation.evaluate import METRIC_NAMES, evaluate_predictions
from conftest import REPO

EVALUATE = resolve("evaluate")  # the schema's evaluate settings (defaults)


def psi(x: float, y: float) -> float:
    """DeLong's kernel: 1 if the AD case scores higher, 1/2 on a tie, 0 otherwise."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def mann_whitney_auc(labels, scores) -> float:
    """AUC as the share of (AD, CN) pairs ranked right, ties one half, by counting every pair."""
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    return sum(psi(x, y) for x, y in itertools.product(pos, neg)) / (len(pos) * len(neg))


def brute_force_delong(labels, a, b) -> tuple[float, float, float]:
    """DeLong (1988) written out: structural components V10/V01 by O(m*n) loops, their
    covariance matrices, the variance of the AUC difference; returns (diff, se, p)."""
    pos = [i for i, l in enumerate(labels) if l == 1]
    neg = [j for j, l in enumerate(labels) if l == 0]
    m, n = len(pos), len(neg)
    v10 = np.array([[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in (a, b)])
    v01 = np.array([[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in (a, b)])
    aucs = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = math.sqrt(var)
    diff = aucs[0] - aucs[1]
    return diff, se, math.erfc(abs(diff / se) / math.sqrt(2))


def predictions(n_subjects: int = 24, scans_per_subject: int = 2, noise: float = 0.15, seed: int = 0,
                shift: float = 0.3) -> pd.DataFrame:
    """A test predictions table: subjects alternate CN/AD, several scans each; smaller noise
    or larger shift gives a better model."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        label = s % 2
        for k in range(scans_per_subject):
            prob = float(np.clip(0.5 + shift * (label - 0.5) * 2 + rng.normal(0, noise), 0, 1))
            rows.append({"image_id": f"I{2000 + 10 * s + k}", "subject": f"{s:03d}_S_{s:04d}", "label": label,
                         "prob": prob, "pred": int(prob >= 0.5)})
    return pd.DataFrame(rows)


# --- DeLong -----------------------------------------------------------------------------

def test_delong_matches_a_brute_force_computation_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    labels[:2] = (0, 1)
    # rounded to one decimal, so both models have many tied scores, within and across classes
    a = np.round(np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.2, 40), 0, 1), 1)
    b = np.round(np.clip(0.5 + 0.1 * (2 * labels - 1) + rng.normal(0, 0.25, 40), 0, 1), 1)
    assert len(np.unique(a)) < 15
    result = delong_test(labels, a, b)
    diff, se, p = brute_force_delong(labels.tolist(), a.tolist(), b.tolist())
    assert result["auc_a"] == pytest.approx(mann_whitney_auc(labels, a), abs=1e-12)
    assert result["auc_b"] == pytest.approx(mann_whitney_auc(labels, b), abs=1e-12)
    assert result["auc_diff"] == pytest.approx(diff, abs=1e-12)
    assert result["se"] == pytest.approx(se, rel=1e-9)
    assert result["p"] == pytest.approx(p, rel=1e-9)
    assert result["z"] == pytest.approx(diff / se, rel=1e-9)
    assert (result["n_positive"], result["n_negative"]) == (int(labels.sum()), int(len(labels) - labels.sum()))
    swapped = delong_test(labels, b, a)  # the test is symmetric up to the sign
    assert swapped["auc_diff"] == pytest.approx(-diff) and swapped["p"] == pytest.approx(result["p"])


def test_delong_of_identical_scores_is_p_one_without_dividing_by_zero():
    labels = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.4, 0.2]
    with np.errstate(all="raise"):
        result = delong_test(labels, scores, scores)
    assert result["auc_diff"] == 0 and result["se"] == 0 and result["z"] == 0 and result["p"] == 1.0
    assert result["auc_a"] == pytest.approx(mann_whitney_auc(labels, scores))


def test_delong_finds_a_clearly_better_model():
    rng = np.random.default_rng(11)
    labels = rng.permutation(np.repeat([0, 1], 100))
    good = labels + rng.normal(0, 0.5, 200)
    poor = labels + rng.normal(0, 2.0, 200)
    result = delong_test(labels, good, poor)
    assert result["p"] < 0.01
    assert result["auc_diff"] > 0.1 and result["z"] > 0
    assert result["auc_a"] == pytest.approx(mann_whitney_auc(labels, good))
    assert result["auc_b"] == pytest.approx(mann_whitney_auc(labels, poor))
    assert delong_test(labels, poor, good)["auc_diff"] < -0.1


def test_delong_with_one_positive_and_one_negative_case_is_finite():
    result = delong_test([1, 0, 0], [0.9, 0.2, 0.3], [0.4, 0.5, 0.1])
    assert result["auc_a"] == 1.0 and result["auc_b"] == 0.5
    assert np.isfinite(result["se"]) and 0 <= result["p"] <= 1


@pytest.mark.parametrize("labels, a, b, message", [
    ([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], "both classes"),
    ([0, 1, 1], [0.1, 0.2], [0.3, 0.2, 0.1], "3 labels but 2 and 3 scores"),
    ([0, 1, 2], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], "0 (CN) or 1 (AD)"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], [0.3, 0.2, 0.1], "finite"),
])
def test_delong_names_bad_input(labels, a, b, message):
    with pytest.raises(cli.PipelineError, match=re.escape(message)):
        delong_test(labels, a, b)


# --- McNemar ----------------------------------------------------------------------------

def test_mcnemar_exact_p_matches_the_binomial_formula():
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0]
    pred_a = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1]  # right on scans 0-3, 5-8
    pred_b = [0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1]  # right on scans 2, 7, 9, 10
    # A right, B wrong: scans 0, 1, 3, 5, 6, 8 -> b = 6; A wrong, B right: 9, 10 -> c = 2
    result = mcnemar_test(labels, pred_a, pred_b)
    assert (result["b"], result["c"], result["n_discordant"], result["n"]) == (6, 2, 8, 12)
    exact = 2 * sum(math.comb(8, k) for k in range(0, 3)) / 2 ** 8  # two-sided: 2 P(X <= 2), X ~ Bin(8, 1/2)
    assert result["p"] == pytest.approx(exact) == pytest.approx(74 / 256)
    assert "exact" in result["method"]
    reverse = mcnemar_test(labels, pred_b, pred_a)
    assert (reverse["b"], reverse["c"]) == (2, 6) and reverse["p"] == pytest.approx(exact)


def test_mcnemar_without_discordant_pairs_or_with_balanced_ones_gives_p_one():
    labels = [0, 1, 1, 0]
    assert mcnemar_test(labels, [0, 1, 0, 0], [0, 1, 0, 0])["p"] == 1.0
    balanced = mcnemar_test(labels, [0, 1, 0, 0], [0, 0, 1, 0])
    assert (balanced["b"], balanced["c"], balanced["p"]) == (1, 1, 1.0)


def test_mcnemar_one_sided_extreme():
    labels = [1] * 7 + [0] * 3
    result = mcnemar_test(labels, labels, [1 - v for v in labels])
    assert (result["b"], result["c"]) == (10, 0)
    assert result["p"] == pytest.approx(2 / 2 ** 10)


def test_mcnemar_rejects_unequal_lengths():
    with pytest.raises(cli.PipelineError, match="each case needs a label and both predictions"):
        mcnemar_test([0, 1, 1], [0, 1, 1], [0, 1])


# --- pairing ----------------------------------------------------------------------------

def test_paired_predictions_joins_on_image_id_whatever_the_row_order():
    main = predictions(seed=0)
    other = predictions(seed=1).sample(frac=1.0, random_state=0)
    pairs = paired_predictions(main, other, "main_model", "other_model")
    assert pairs["image_id"].tolist() == main["image_id"].tolist()
    expected = other.set_index("image_id").loc[pairs["image_id"], "prob"].to_numpy()
    np.testing.assert_allclose(pairs["prob_other"], expected)
    np.testing.assert_allclose(pairs["prob_main"], main["prob"])


def test_paired_predictions_names_scans_that_are_not_shared():
    main = predictions()
    other = predictions().iloc[2:].copy()
    other.loc[len(main)] = {"image_id": "I9999", "subject": "099_S_0099", "label": 1, "prob": 0.7, "pred": 1}
    with pytest.raises(cli.PipelineError) as err:
        paired_predictions(main, other, "r3d_main", "scratch")
    message = str(err.value)
    assert "r3d_main" in message and "scratch" in message
    assert "only in r3d_main: I2000, I2001" in message
    assert "only in scratch: I9999" in message


def test_paired_predictions_names_scans_whose_labels_disagree():
    main = predictions()
    other = predictions(seed=5)
    other.loc[other["image_id"] == "I2031", "label"] = 1 - other.loc[other["image_id"] == "I2031", "label"]
    with pytest.raises(cli.PipelineError, match=r"r3d_main and frozen disagree on the labels of scan\(s\) I2031"):
        paired_predictions(main, other, "r3d_main", "frozen")


# --- subject level ----------------------------------------------------------------------------

def planted_pair(scans_per_subject: int = 4) -> dict[str, pd.DataFrame]:
    """12 subjects (alternately CN, AD) with ``scans_per_subject`` near-identical scans each: the main
    model is wrong on subjects 0-3 and 8, the other model on subject 8 only. On scans that is 4x the
    evidence of the subjects, which are the independent cases."""
    rng = np.random.default_rng(7)
    tables = {"main_model": [], "better": []}
    for s in range(12):
        label = s % 2
        for k in range(scans_per_subject):
            image_id, subject = f"I{3000 + 10 * s + k}", f"{s:03d}_S_{s:04d}"
            for name, wrong in (("main_model", s in (0, 1, 2, 3, 8)), ("better", s == 8)):
                centre = (0.3 + 0.04 * s / 12) if (label == 1) == wrong else (0.7 + 0.04 * s / 12)
                prob = float(centre + rng.uniform(-0.02, 0.02))
                tables[name].append({"image_id": image_id, "subject": subject, "label": label, "prob": prob,
                                     "pred": int(prob >= 0.5)})
    return {name: pd.DataFrame(rows) for name, rows in tables.items()}


def test_subject_level_paired_tests_count_each_subject_once(tmp_path):
    tables = planted_pair()
    experiments = {name: (evaluate_predictions(table, n_boot=100, seed=0, alpha=EVALUATE.alpha,
                                                threshold=EVALUATE.threshold), table) for name, table in tables.items()}
    row = comparison_table(experiments, "main_model").iloc[1]
    # independently: each subject's mean probability, thresholded at 0.5
    subjects = {name: table.groupby("subject").agg(label=("label", "first"), prob=("prob", "mean"))
                for name, table in tables.items()}
    labels = subjects["main_model"]["label"].to_numpy()
    right = {name: (part["prob"].to_numpy() >= 0.5).astype(int) == labels for name, part in subjects.items()}
    b, c = int((right["better"] & ~right["main_model"]).sum()), int((~right["better"] & right["main_model"]).sum())
    assert (b, c) == (4, 0) and (row["subject_mcnemar_b"], row["subject_mcnemar_c"]) == (b, c)
    assert row["subject_mcnemar_p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    diff, se, p = brute_force_delong(labels.tolist(), subjects["better"]["prob"].tolist(),
                                     subjects["main_model"]["prob"].tolist())
    assert row["subject_delong_auc_diff"] == pytest.approx(diff) and row["subject_delong_p"] == pytest.approx(p)
    # the same evidence counted once per scan: four times the discordant pairs, far smaller p-values
    assert (row["mcnemar_b"], row["mcnemar_c"]) == (16, 0)
    assert row["mcnemar_p"] == pytest.approx(stats.binomtest(16, 16, 0.5).pvalue)
    assert row["mcnemar_p"] < 0.001 < 0.05 < row["subject_mcnemar_p"]
    assert row["delong_p"] < row["subject_delong_p"] / 5
    assert row["delong_auc_diff"] == pytest.approx(row["subject_delong_auc_diff"], abs=0.05)  # same effect
    markdown = markdown_table(comparison_table(experiments, "main_model"))
    assert "McNemar p (scans)" in markdown and "McNemar p (subjects)" in markdown
    assert "| 16/0 | p<0.001 |" in markdown and f"| 4/0 | {_p_text(row['subject_mcnemar_p'])} |" in markdown


# --- table and command line ---------------------------------------------------------------

@pytest.fixture(scope="module")
def three_experiments() -> dict[str, tuple[dict, pd.DataFrame]]:
    tables = {"main_model": predictions(noise=0.15, seed=0), "weaker": predictions(noise=0.35, seed=1),
              "same_as_main": predictions(noise=0.15, seed=0)}
    return {name: (evaluate_predictions(table, n_boot=200, seed=0, alpha=EVALUATE.alpha,
                                         threshold=EVALUATE.threshold), table) for name, table in tables.items()}


def test_comparison_table_lists_main_first_and_copies_the_metrics(three_experiments):
    reordered = {name: three_experiments[name] for name in ("weaker", "same_as_main", "main_model")}
    table = comparison_table(reordered, "main_model")
    assert table["experiment"].tolist() == ["main_model", "weaker", "same_as_main"]
    assert table["main"].tolist() == [True, False, False]
    assert table.loc[0, list(PAIRED_COLUMNS + SUBJECT_PAIRED_COLUMNS)].isna().all()
    for i, name in enumerate(table["experiment"]):
        result = reordered[name][0]
        for metric in METRIC_NAMES:
            assert table.loc[i, metric] == pytest.approx(result["scan"][metric])
            assert table.loc[i, f"{metric}_lo"] == pytest.approx(result["scan"]["ci"][metric][0])
            assert table.loc[i, f"{metric}_hi"] == pytest.approx(result["scan"]["ci"][metric][1])
        for metric in ("accuracy", "auc"):
            assert table.loc[i, f"subject_{metric}"] == pytest.approx(result["subject"][metric])
            assert table.loc[i, f"subject_{metric}_lo"] == pytest.approx(result["subject"]["ci"][metric][0])
        assert (table.loc[i, "n_scans"], table.loc[i, "n_subjects"]) == (48, 24)
    # a copy of the main model: no difference at all
    same = table.iloc[2]
    assert (same["delong_auc_diff"], same["delong_p"], same["mcnemar_b"], same["mcnemar_c"], same["mcnemar_p"]) \
        == (0.0, 1.0, 0, 0, 1.0)
    assert tuple(same[list(SUBJECT_PAIRED_COLUMNS)]) == (0.0, 1.0, 0, 0, 1.0)
    # the weaker model, against the main one: the row's experiment is A
    weaker, main = reordered["weaker"][1], reordered["main_model"][1]
    labels = main["label"].to_numpy()
    delong = delong_test(labels, weaker["prob"], main["prob"])
    assert table.loc[1, "delong_auc_diff"] == pytest.approx(delong["auc_diff"])
    assert table.loc[1, "delong_auc_diff"] == pytest.approx(table.loc[1, "auc"] - table.loc[0, "auc"])
    assert table.loc[1, "delong_auc_diff"] < 0
    assert table.loc[1, "delong_p"] == pytest.approx(delong["p"])
    right_weaker, right_main = weaker["pred"].to_numpy() == labels, main["pred"].to_numpy() == labels
    assert table.loc[1, "mcnemar_b"] == int((right_weaker & ~right_main).sum())
    assert table.loc[1, "mcnemar_c"] == int((~right_weaker & right_main).sum())
    assert table.loc[1, "mcnemar_c"] > table.loc[1, "mcnemar_b"]
    markdown = markdown_table(table)
    assert markdown.count("\n") == 5 and "**main_model** (main)" in markdown


def test_comparison_table_names_a_missing_main_and_stale_metrics(three_experiments):
    with pytest.raises(cli.PipelineError, match="'nonexistent' is not among"):
        comparison_table(three_experiments, "nonexistent")
    result, table = three_experiments["weaker"]
    with pytest.raises(cli.PipelineError, match="metrics.json counts 48 scans but its predictions hold 40"):
        comparison_table({"main_model": three_experiments["main_model"], "weaker": (result, table.iloc[:40])},
                         "main_model")


def _write_experiment(tmp_path, name: str, result: dict, table: pd.DataFrame) -> list[str]:
    folder = tmp_path / "evaluation" / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(result))
    table.to_csv(folder / "test_predictions.csv", index=False)
    return ["--experiment", name, str(folder / "metrics.json"), str(folder / "test_predictions.csv")]


def test_cli_writes_a_table_that_round_trips_and_a_figure(tmp_path, three_experiments):
    args = []
    for name in ("weaker", "main_model", "same_as_main"):
        args += _write_experiment(tmp_path, name, *three_experiments[name])
    out_csv, figure, markdown = tmp_path / "results" / "comparison.csv", tmp_path / "comparison.png", \
        tmp_path / "comparison.md"
    run = subprocess.run([sys.executable, "-m", "workflow_scripts.evaluation.compare", "--main", "main_model", *args,
                          "--csv", str(out_csv), "--figure", str(figure), "--markdown", str(markdown)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    written = pd.read_csv(out_csv)
    expected = comparison_table({name: three_experiments[name] for name in ("weaker", "main_model", "same_as_main")},
                                "main_model")
    assert written["experiment"].tolist() == ["main_model", "weaker", "same_as_main"]
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert "weaker" in markdown.read_text()
    assert not list(tmp_path.rglob(".*.tmp")) and not list(tmp_path.rglob(".*.png"))


def test_cli_with_only_the_main_experiment_writes_one_row(tmp_path, three_experiments):
    args = _write_experiment(tmp_path, "main_model", *three_experiments["main_model"])
    out_csv, figure = tmp_path / "comparison.csv", tmp_path / "comparison.png"
    compare_main(["--main", "main_model", *args, "--csv", str(out_csv), "--figure", str(figure)])
    written = pd.read_csv(out_csv)
    assert len(written) == 1 and written.loc[0, "experiment"] == "main_model"
    assert written.loc[0, list(PAIRED_COLUMNS)].isna().all()
    assert figure.stat().st_size > 5000


def test_cli_names_a_main_that_was_not_given_and_a_bad_metrics_file(tmp_path, three_experiments, capsys):
    args = _write_experiment(tmp_path, "main_model", *three_experiments["main_model"])
    out = ["--csv", str(tmp_path / "c.csv"), "--figure", str(tmp_path / "c.png")]
    assert cli.run(compare_main, ["--main", "other", *args, *out]) == 1
    assert "--main other is not among the --experiment names (main_model)" in capsys.readouterr().err
    (tmp_path / "evaluation" / "main_model" / "metrics.json").write_text('{"accuracy": 0.8}')
    assert cli.run(compare_main, ["--main", "main_model", *args, *out]) == 1
    assert "no 'scan' and 'subject' blocks" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()
