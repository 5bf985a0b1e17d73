"""Evaluation metrics, bootstrap intervals and subject-level averaging, on tables small enough to
check by hand (the CV summary's tests are in test_cv.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.evaluation.evaluate import (METRIC_NAMES, _weighted_metrics, bootstrap_intervals, evaluate_predictions,
                                       group_codes, metrics, read_predictions, resample_weights, subject_level,
                                       validate_predictions)
from conftest import REPO

EVALUATE = resolve("evaluate")  # the schema's evaluate settings (defaults)


def evaluation(**given) -> dict:
    """The bootstrap and threshold keywords: those ``given`` here, the schema's defaults for the rest."""
    return {key: given.get(key, EVALUATE[key]) for key in ("n_boot", "seed", "alpha", "threshold")}

# tp=3 (0.9, 0.8, 0.7), fn=2 (0.4, 0.3), fp=1 (0.6), tn=4 (0.45, 0.35, 0.2, 0.1)
HAND_LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
HAND_PROBS = [0.9, 0.8, 0.7, 0.4, 0.3, 0.6, 0.45, 0.35, 0.2, 0.1]


def synthetic(n: int, seed: int, separation: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Labels and noisy probabilities whose AD scans score higher on average."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(rng.normal(0.5 + separation * (2 * labels - 1) / 2, 0.2), 0, 1)
    return labels, probs


def prediction_table(n_subjects: int = 30, scans_per_subject: int = 3, seed: int = 0) -> pd.DataFrame:
    """A predictions table in the training module's format: subjects with several scans each."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        label = s % 2
        centre = rng.normal(0.35 + 0.3 * label, 0.15)
        for k in range(scans_per_subject):
            prob = float(np.clip(centre + rng.normal(0, 0.08), 0, 1))
            rows.append({"image_id": f"I{1000 + s * 10 + k}", "subject": f"{s:03d}_S_{s:04d}", "label": label,
                         "prob": prob, "pred": int(prob >= 0.5)})
    return pd.DataFrame(rows)


# --- metrics ----------------------------------------------------------------------------

def test_metrics_match_a_hand_computed_confusion_matrix():
    m = metrics(HAND_LABELS, HAND_PROBS, threshold=EVALUATE.threshold)
    assert (m["tn"], m["fp"], m["fn"], m["tp"], m["n"]) == (4, 1, 2, 3, 10)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["recall"] == pytest.approx(0.6)
    assert m["specificity"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.7)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # observed agreement 0.7; chance agreement (4*5 + 6*5) / 100 = 0.5; kappa (0.7-0.5)/(1-0.5)
    assert m["kappa"] == pytest.approx(0.4)
    # AD above CN in 5+5+5+3+2 of the 25 pairs
    assert m["auc"] == pytest.approx(20 / 25)


def test_threshold_moves_the_cut():
    m = metrics(HAND_LABELS, HAND_PROBS, threshold=0.35)  # 0.4 and 0.6, 0.45, 0.35 now AD
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 1, 3, 2)
    assert m["auc"] == pytest.approx(0.8)  # AUC does not depend on the threshold


def test_perfect_and_inverted_predictions():
    labels = [0, 0, 0, 1, 1, 1]
    perfect = metrics(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], threshold=EVALUATE.threshold)
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["kappa"] == pytest.approx(1.0)
    inverted = metrics(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], threshold=EVALUATE.threshold)
    assert inverted["auc"] == 0.0 and inverted["accuracy"] == 0.0 and inverted["kappa"] == pytest.approx(-1.0)
    assert inverted["recall"] == 0.0 and inverted["specificity"] == 0.0


def test_one_class_leaves_class_dependent_metrics_undefined_and_json_ready():
    m = metrics([1, 1, 1], [0.9, 0.2, 0.7], threshold=EVALUATE.threshold)
    assert m["auc"] is None and m["specificity"] is None and m["balanced_accuracy"] is None
    assert m["recall"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    no_ad_predicted = metrics([0, 1, 0], [0.1, 0.2, 0.3], threshold=EVALUATE.threshold)
    assert no_ad_predicted["precision"] is None
    json.dumps(m), json.dumps(no_ad_predicted)  # no NaN or numpy types that json rejects
    assert all(type(m[k]) in (float, type(None)) for k in METRIC_NAMES)


def test_metrics_reject_labels_that_are_not_0_or_1():
    with pytest.raises(ValueError, match="0 \\(CN\\) or 1 \\(AD\\)"):
        metrics([0, 2], [0.1, 0.9], threshold=EVALUATE.threshold)


def test_fast_bootstrap_metrics_equal_sklearn_on_the_replicated_data():
    labels, probs = synthetic(80, seed=3)
    probs = probs.round(1)  # many ties, the hard case for AUC
    rng = np.random.default_rng(5)
    weights = rng.integers(0, 4, (6, len(labels))).astype(float)
    fast = _weighted_metrics(labels, (probs >= EVALUATE.threshold).astype(int), probs, weights)
    for b in range(len(weights)):
        idx = np.repeat(np.arange(len(labels)), weights[b].astype(int))
        slow = metrics(labels[idx], probs[idx], threshold=EVALUATE.threshold)
        for name in METRIC_NAMES:
            assert fast[name][b] == pytest.approx(slow[name], abs=1e-12), name


# --- bootstrap --------------------------------------------------------------------------

def test_intervals_contain_the_estimate_and_narrow_as_n_grows():
    widths = {}
    for n in (60, 600):
        labels, probs = synthetic(n, seed=n)
        point = metrics(labels, probs, threshold=EVALUATE.threshold)
        ci = bootstrap_intervals(labels, probs, **evaluation(n_boot=1000, seed=1))
        for name in METRIC_NAMES:
            low, high = ci[name]
            assert low <= point[name] <= high, (n, name)
        widths[n] = {name: ci[name][1] - ci[name][0] for name in ("accuracy", "auc", "recall")}
    for name, wide in widths[60].items():
        assert widths[600][name] < 0.6 * wide, name  # ~1/sqrt(10) expected


def test_bootstrap_is_reproducible_by_seed():
    labels, probs = synthetic(50, seed=2)
    assert bootstrap_intervals(labels, probs, **evaluation(n_boot=300, seed=4)) == \
        bootstrap_intervals(labels, probs, **evaluation(n_boot=300, seed=4))
    assert bootstrap_intervals(labels, probs, **evaluation(n_boot=300, seed=4)) != \
        bootstrap_intervals(labels, probs, **evaluation(n_boot=300, seed=5))


def test_cluster_bootstrap_keeps_a_subjects_scans_together():
    labels, probs = synthetic(40, seed=9)
    subjects = np.arange(40)
    copies = 10
    dup_labels, dup_probs, dup_subjects = (np.repeat(a, copies) for a in (labels, probs, subjects))

    def width(ci):
        return ci["accuracy"][1] - ci["accuracy"][0], ci["auc"][1] - ci["auc"][0]

    one_scan_each = width(bootstrap_intervals(labels, probs, **evaluation(n_boot=1000, seed=0)))
    scans_as_independent = width(bootstrap_intervals(dup_labels, dup_probs, **evaluation(n_boot=1000, seed=0)))
    by_subject = width(bootstrap_intervals(dup_labels, dup_probs, **evaluation(n_boot=1000, seed=0),
                                           groups=dup_subjects))
    for base, naive, cluster in zip(one_scan_each, scans_as_independent, by_subject):
        assert naive < 0.5 * base  # ten copies pass for ten times the evidence
        assert cluster == pytest.approx(base, rel=0.05)  # copies of one subject add nothing


def test_resample_weights_draw_whole_subjects_as_often_as_there_are_subjects():
    subjects = ["b", "a", "b", "c", "a", "b"]  # 3 subjects, 6 scans
    codes = group_codes(subjects)
    assert codes.tolist() == [0, 1, 0, 2, 1, 0]
    weights = resample_weights(codes, 2000, np.random.default_rng(0))
    assert weights.shape == (2000, 6)
    draws = weights[:, [0, 1, 3]]  # one scan of each subject: how often that subject was drawn
    assert (draws.sum(axis=1) == 3).all()
    for scans in ([0, 2, 5], [1, 4]):  # a subject's scans are drawn together
        assert (weights[:, scans] == weights[:, scans[:1]]).all()
    assert draws.mean(axis=0) == pytest.approx([1, 1, 1], abs=0.05)


def test_resamples_with_one_class_are_skipped_for_auc():
    labels, probs = [0, 1, 0, 1], [0.2, 0.9, 0.6, 0.4]
    ci = bootstrap_intervals(labels, probs, **evaluation(n_boot=500, seed=0))
    low, high = ci["auc"]
    assert 0.0 <= low <= high <= 1.0
    ci_one_class = bootstrap_intervals([1, 1, 1], [0.2, 0.6, 0.9], **evaluation(n_boot=50))
    assert ci_one_class["auc"] == (None, None)


# --- subject level and the predictions table --------------------------------------------

def test_subject_level_averages_scan_probabilities():
    table = pd.DataFrame({"image_id": ["I1", "I2", "I3", "I4", "I5", "I6"],
                          "subject": ["B", "A", "A", "B", "C", "B"],
                          "label": [0, 1, 1, 0, 1, 0],
                          "prob": [0.9, 0.2, 0.6, 0.5, 0.5, 0.4],
                          "pred": [1, 0, 1, 1, 1, 0]})
    subjects = subject_level(table, threshold=EVALUATE.threshold).set_index("subject")
    assert list(subjects.index) == ["A", "B", "C"]
    assert subjects["prob"].tolist() == pytest.approx([0.4, 0.6, 0.5])
    assert subjects["pred"].tolist() == [0, 1, 1]  # 0.5 counts as AD
    assert subjects["label"].tolist() == [1, 0, 1]
    assert subjects["n_scans"].tolist() == [2, 3, 1]


def test_a_converter_labelled_per_visit_counts_once_per_diagnosis_and_is_resampled_as_one_person():
    table = pd.DataFrame({"image_id": ["I1", "I2", "I3", "I4"],
                          "subject": ["002_S_0295", "002_S_0295", "002_S_0295", "011_S_0002"],
                          "label": [0, 1, 1, 0], "prob": [0.3, 0.8, 0.6, 0.1], "pred": [0, 1, 1, 0]})
    subjects = subject_level(table, threshold=EVALUATE.threshold)
    assert subjects[["subject", "label", "n_scans"]].values.tolist() == [["002_S_0295", 0, 1], ["002_S_0295", 1, 2],
                                                                         ["011_S_0002", 0, 1]]
    assert subjects["prob"].tolist() == pytest.approx([0.3, 0.7, 0.1])  # the CN and AD visits are not averaged
    result = evaluate_predictions(table, **evaluation(n_boot=300))
    assert result["n_subjects"] == 2 and result["subject"]["n"] == 3 and result["subject"]["accuracy"] == 1.0


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="prob"), "missing column.*prob"),
    (lambda t: t.assign(label=["AD"] + ["CN"] * (len(t) - 1)), "label must be 1 \\(AD\\) or 0 \\(CN\\).*I1000"),
    (lambda t: t.assign(prob=[1.5] + [0.5] * (len(t) - 1)), "prob must be a probability.*I1000"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "more than once: I1000"),
])
def test_a_broken_predictions_table_is_named(change, message):
    with pytest.raises(cli.PipelineError, match=message):
        validate_predictions(change(prediction_table(4, 2)), source="val_predictions.csv")


def test_evaluate_predictions_reports_both_levels():
    table = prediction_table(30, 3)
    result = evaluate_predictions(table, **evaluation(n_boot=300, seed=0))
    assert result["n_scans"] == 90 and result["n_subjects"] == 30
    assert result["scan"]["n"] == 90 and result["subject"]["n"] == 30
    expected = metrics(table["label"], table["prob"], threshold=EVALUATE.threshold)
    for name in METRIC_NAMES:
        assert result["scan"][name] == pytest.approx(expected[name])
        low, high = result["scan"]["ci"][name]
        assert low <= result["scan"][name] <= high
    means = table.groupby("subject")["prob"].mean()
    labels = table.groupby("subject")["label"].first()
    assert result["subject"]["auc"] == pytest.approx(metrics(labels, means, threshold=EVALUATE.threshold)["auc"])


# --- command lines ----------------------------------------------------------------------

def test_evaluate_cli_writes_metrics_and_figures(tmp_path):
    table = prediction_table(20, 2, seed=1)
    csv = tmp_path / "test_predictions.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "results" / "evaluation" / "r3d18"
    run = subprocess.run([sys.executable, "-m", "workflow_scripts.evaluation.evaluate", "--predictions", str(csv),
                          "--out-dir", str(out), "--settings", '{"evaluate": {"n_boot": 200, "seed": 3}}'],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert result["n_scans"] == 40 and result["n_subjects"] == 20
    for level in ("scan", "subject"):
        assert set(METRIC_NAMES) <= set(result[level]) and set(METRIC_NAMES) == set(result[level]["ci"])
    assert result["bootstrap"]["n_boot"] == 200 and result["bootstrap"]["seed"] == 3
    for png in ("roc.png", "confusion_matrix.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    written = read_predictions(out / "predictions.csv")
    assert written["image_id"].tolist() == table["image_id"].tolist()
    assert written["prob"].to_numpy() == pytest.approx(table["prob"].to_numpy())
    assert len(pd.read_csv(out / "subject_predictions.csv")) == 20
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_evaluate_cli_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "val_predictions.csv"
    prediction_table(3, 1).drop(columns="subject").to_csv(bad, index=False)
    from workflow_scripts.evaluation.evaluate import main
    assert cli.run(main, ["--predictions", str(bad), "--out-dir", str(tmp_path / "out")]) == 1
    assert "val_predictions.csv" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_intervals_from_fewer_than_five_subjects_of_a_class_are_flagged_not_estimable():
    def table(n_per_class: int) -> pd.DataFrame:
        labels = [0] * n_per_class + [1] * n_per_class
        probs = np.linspace(0.1, 0.9, 2 * n_per_class)
        return pd.DataFrame({"image_id": [f"I{i}" for i in range(len(labels))],
                             "subject": [f"S{i}" for i in range(len(labels))], "label": labels, "prob": probs,
                             "pred": (probs >= 0.5).astype(int)})

    few = evaluate_predictions(table(2), **evaluation(n_boot=200))
    assert few["subjects_per_label"] == {0: 2, 1: 2} and few["intervals_estimable"] is False
    assert few["subject"]["auc"] == 1.0 and few["subject"]["ci"]["auc"] == [1.0, 1.0]  # what would pass for certain
    enough = evaluate_predictions(table(5), **evaluation(n_boot=200))
    assert enough["subjects_per_label"] == {0: 5, 1: 5} and enough["intervals_estimable"] is True
