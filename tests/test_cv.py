"""Cross-validation: the inner validation split that selects each fold's checkpoint, the per-fold
manifests the split writes, and the CV summary's three figures (held-out folds, inner validation
at the selected epoch, fold models on the test set)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import RAS_PATTERN, split_options
from workflow_scripts.common import cli
from workflow_scripts.learning import split
from workflow_scripts.evaluation.cv_summary import format_metric, main as cv_main, summarise_cv, summarise_folds
from workflow_scripts.evaluation.evaluate import METRIC_NAMES
from workflow_scripts.learning.scan_data import fold_manifests


def scans_table(n_ad: int = 9, n_cn: int = 12, visits: int = 2) -> pd.DataFrame:
    """A scans table (no files): ``visits`` scans per subject."""
    rows = []
    for i in range(n_ad + n_cn):
        subject, group = f"{10 + i % 80:03d}_S_{i + 1:04d}", "AD" if i < n_ad else "CN"
        rows += [{"image_id": f"I{(i + 1) * 10 + v}", "subject": subject, "group": group} for v in range(visits)]
    return pd.DataFrame(rows)


def cv_folds_of(scans: pd.DataFrame, folds: int = 3) -> pd.DataFrame:
    return split.make_split(scans, **split_options(ratios=(0.8, 0.1, 0.1), folds=folds, balance=False)).cv_folds


# ----------------------------------------------------------------------------- the inner validation split

def test_inner_split_is_subject_level_stratified_and_deterministic():
    cv = cv_folds_of(scans_table())
    rest = cv[cv["fold"] != 0]
    chosen = split.inner_validation_subjects(rest, 0.25, seed=42, fold=0)
    assert chosen == split.inner_validation_subjects(rest.sample(frac=1, random_state=1), 0.25, seed=42, fold=0)
    groups = rest.groupby("subject")["group"].first()
    for group in ("AD", "CN"):
        members = groups.index[groups == group]
        assert len(chosen & set(members)) == split.round_half_up(0.25 * len(members)) >= 1
    assert chosen <= set(rest["subject"]) and not chosen & set(cv.loc[cv["fold"] == 0, "subject"])
    assert chosen != split.inner_validation_subjects(rest, 0.25, seed=7, fold=0)  # the seed matters


def test_inner_split_keeps_one_subject_per_class_on_each_side_and_refuses_a_class_of_one():
    two_each = pd.DataFrame({"subject": ["a1", "a2", "c1", "c2"], "group": ["AD", "AD", "CN", "CN"]})
    assert sorted(split.inner_validation_subjects(two_each, 0.9, 42, 0)) in (
        [a, c] for a in ("a1", "a2") for c in ("c1", "c2"))  # never all of a class
    assert len(split.inner_validation_subjects(two_each, 0.01, 42, 0)) == 2  # at least one per class
    with pytest.raises(cli.PipelineError, match=r"CV fold 2: the other folds hold 1 AD subject"):
        split.inner_validation_subjects(two_each.iloc[1:], 0.5, 42, 2)


def test_an_added_subject_displaces_at_most_one_inner_validation_subject():
    scans = scans_table(n_ad=20, n_cn=20, visits=1)
    rest = scans.assign(fold=1)
    before = split.inner_validation_subjects(rest, 0.2, 42, 0)
    for i in range(15):  # new subjects, one at a time: each may join, and then displace at most one
        new = pd.DataFrame([{"image_id": f"I9{i:03d}", "subject": f"200_S_{i:04d}", "group": "AD", "fold": 1}])
        after = split.inner_validation_subjects(pd.concat([rest, new]), 0.2, 42, 0)
        lost = before - after
        assert len(lost) <= 1 and (not lost or new["subject"].iloc[0] in after)
    cn_before = {s for s in before if s in set(scans.loc[scans["group"] == "CN", "subject"])}
    assert cn_before <= after  # an AD subject added never moves a CN one


def test_fold_manifests_cover_the_other_folds_and_hold_out_fold_k():
    cv = cv_folds_of(scans_table())
    manifests, untrainable = split.cv_fold_manifests(cv, 3, 0.2, seed=42)
    assert untrainable == {}
    for fold, parts in manifests.items():
        assert sorted(parts["held_out"]["image_id"]) == sorted(cv.loc[cv["fold"] == fold, "image_id"])
        trained = pd.concat([parts["train"], parts["val"]])
        assert sorted(trained["image_id"]) == sorted(cv.loc[cv["fold"] != fold, "image_id"])
        assert not set(parts["train"]["subject"]) & set(parts["val"]["subject"])
        assert set(parts["val"]["label"]) == set(parts["train"]["label"]) == {0, 1}
        assert list(parts["val"].columns) == list(split.MANIFEST_COLUMNS)
    audit = split.audit_fold_manifests(manifests, cv)
    assert audit["passed"] and audit["folds"]["1"]["held_out_is_fold"] is True
    with pytest.raises(cli.PipelineError, match="strictly between 0 and 1"):
        split.cv_fold_manifests(cv, 3, 1.0, seed=42)


def test_a_fold_too_small_to_split_gets_empty_manifests_and_its_reason_while_the_others_go_on():
    cv = cv_folds_of(scans_table(n_ad=6, n_cn=6, visits=1))
    few = cv[~((cv["group"] == "AD") & (cv["fold"] != 0))]  # AD: 2 subjects in fold 0, and 1 in fold 1
    few = pd.concat([few, cv[(cv["group"] == "AD") & (cv["fold"] == 1)].iloc[:1]])
    manifests, untrainable = split.cv_fold_manifests(few, 3, 0.2, seed=42)
    assert list(untrainable) == [0] and "the other folds hold 1 AD subject(s)" in untrainable[0]
    assert manifests[0]["train"].empty and manifests[0]["val"].empty and len(manifests[0]["held_out"]) == 4
    assert set(manifests[1]["val"]["label"]) == {0, 1}  # the other folds are split as usual
    audit = split.audit_fold_manifests(manifests, few, untrainable)
    assert audit["passed"] is True and audit["folds"]["0"]["untrainable"] == untrainable[0]
    assert audit["folds"]["1"]["untrainable"] is None
    _, untrainable = split.cv_fold_manifests(cv, 4, 0.2, seed=42)  # 3 folds dealt, 4 asked for
    assert list(untrainable) == [3] and "CV fold 3 holds no scans" in untrainable[3]


def test_the_audit_names_a_subject_in_two_roles_and_a_held_out_fold_that_is_not_fold_k():
    cv = cv_folds_of(scans_table())
    manifests, _ = split.cv_fold_manifests(cv, 3, 0.2, seed=42)
    leaked = manifests[0]["held_out"].iloc[[0]]
    manifests[0]["val"] = pd.concat([manifests[0]["val"], leaked.assign(image_id="I_copy")])
    manifests[1]["held_out"] = manifests[1]["held_out"].iloc[1:]
    audit = split.audit_fold_manifests(manifests, cv)
    assert audit["passed"] is False
    assert leaked["subject"].iloc[0] in audit["folds"]["0"]["subjects_in_two_roles"]
    assert audit["folds"]["1"]["held_out_is_fold"] is False and audit["folds"]["2"]["subjects_in_two_roles"] == []


def test_split_cli_writes_the_per_fold_manifests_and_audits_them(tmp_path):
    scans_table().to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    out = tmp_path / "splits"
    assert cli.run(split.main, ["--scans", str(tmp_path / "scans.tsv"), "--path-pattern", RAS_PATTERN,
                                "--out-dir", str(out),
                                "--settings", json.dumps({"cv": {"folds": 3, "inner_val_share": 0.2}})]) == 0
    cv = pd.read_csv(out / "cv_folds.csv", dtype={"subject": str, "image_id": str})
    audit = json.loads((out / "audit.json").read_text())
    assert audit["passed"] is True and set(audit["cv_fold_manifests"]["folds"]) == {"0", "1", "2"}
    for fold in range(3):
        parts = {role: pd.read_csv(out / "cv" / f"fold{fold}" / f"{role}.csv", dtype={"subject": str, "image_id": str})
                 for role in split.FOLD_ROLES}
        assert all(list(t.columns) == list(split.MANIFEST_COLUMNS) for t in parts.values())
        assert sorted(parts["held_out"]["image_id"]) == sorted(cv.loc[cv["fold"] == fold, "image_id"])
        subjects = [set(t["subject"]) for t in parts.values()]
        assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
        train, val = fold_manifests(out / "cv_folds.csv", fold)  # what train --folds-csv --fold k trains on
        assert train["image_id"].tolist() == parts["train"]["image_id"].tolist()
        assert val["image_id"].tolist() == parts["val"]["image_id"].tolist()


def test_training_on_a_fold_without_its_manifests_says_how_to_write_them(tmp_path):
    cv_folds_of(scans_table()).to_csv(tmp_path / "cv_folds.csv", index=False)
    with pytest.raises(cli.PipelineError, match=r"re-run the split \(snakemake split\), which writes the per-fold manifests"):
        fold_manifests(tmp_path / "cv_folds.csv", 1)
    with pytest.raises(cli.PipelineError, match="fold 5"):
        fold_manifests(tmp_path / "cv_folds.csv", 5)


# ----------------------------------------------------------------------------- the CV summary

def metrics_block(accuracy: float, auc: float | None = 0.8, ad: int = 2, cn: int = 2) -> dict:
    block = {name: 0.5 for name in METRIC_NAMES}
    block.update(accuracy=accuracy, auc=auc, tp=ad, fn=0, tn=cn, fp=0, n=ad + cn, ci={"auc": [None, None]})
    return {"scan": block, "subject": dict(block, accuracy=min(1.0, accuracy + 0.1)), "n_scans": ad + cn}


def training_summary(curve: list[float]) -> dict:
    """A fold's train summary.json whose accuracy selection picked the best epoch of ``curve``."""
    best = int(np.argmax(curve))
    row = {"epoch": best + 1, "val_accuracy": curve[best], "val_balanced_accuracy": curve[best], "val_auc": 0.9,
           "val_kappa": 0.4, "val_loss": 0.6}
    return {"selection": {"rule": "accuracy", "checkpoint": "best_acc.pt", "epoch": best + 1},
            "best": {"accuracy": row}, "epochs_run": len(curve), "config": {"val": "cv/fold0/val.csv"}}


def write_fold(tmp_path, fold: int, name: str, content: dict) -> str:
    path = tmp_path / f"fold{fold}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


def test_cv_summary_mean_and_sample_std():
    accuracies = [0.75, 0.80, 0.765]
    summary = summarise_folds([metrics_block(a) for a in accuracies])
    assert summary["accuracy"]["mean"] == np.mean(accuracies)
    assert summary["accuracy"]["std"] == pytest.approx(0.0256580, abs=1e-7)  # by hand
    assert summary["accuracy"]["folds"] == accuracies
    assert summarise_folds([metrics_block(a) for a in accuracies], level="subject")["accuracy"]["mean"] == \
        pytest.approx(np.mean(accuracies) + 0.1)
    assert format_metric("accuracy", summary["accuracy"]) == "accuracy 77.17% ± 2.57"
    single = summarise_folds([metrics_block(0.7)])
    assert single["accuracy"] == {"mean": 0.7, "std": None, "folds": [0.7]}


def test_the_reported_figure_is_the_held_out_fold_not_the_curve_that_chose_the_checkpoint(tmp_path):
    """The defect's fold: inner curve 0.75, 0.50, 0.25 picks epoch 1 at 0.75; the held-out fold scores 0.5."""
    held = [write_fold(tmp_path, k, "held_out.json", metrics_block(a)) for k, a in enumerate([0.5, 0.6, 0.7])]
    test = [write_fold(tmp_path, k, "test.json", metrics_block(a)) for k, a in enumerate([0.55, 0.65, 0.6])]
    fits = [write_fold(tmp_path, k, "summary.json", training_summary(c))
            for k, c in enumerate([[0.75, 0.5, 0.25], [0.5, 1.0], [0.8]])]
    summary = summarise_cv(held, test, fits)
    assert summary["cross_validation"]["scan"]["accuracy"]["folds"] == [0.5, 0.6, 0.7]
    assert summary["cross_validation"]["subject"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["test"]["scan"]["accuracy"]["mean"] == pytest.approx(0.6)
    inner = summary["inner_validation"]
    assert inner["selection_biased"] is True and inner["scan"]["accuracy"]["folds"] == [0.75, 1.0, 0.8]
    assert [s["epoch"] for s in inner["selection"]] == [1, 2, 1]
    assert summary["cross_validation"]["fold_names"] == ["fold 0", "fold 1", "fold 2"]


def test_cv_summary_cli_writes_the_three_figures_in_words_and_names_a_one_class_fold(tmp_path, capsys):
    held = [write_fold(tmp_path, 0, "held_out.json", metrics_block(0.5)),
            write_fold(tmp_path, 1, "held_out.json", metrics_block(1.0, auc=None, ad=0, cn=3))]
    test = [write_fold(tmp_path, k, "test.json", metrics_block(0.6)) for k in range(2)]
    fits = [write_fold(tmp_path, k, "summary.json", training_summary([0.9])) for k in range(2)]
    out = tmp_path / "cv"
    cv_main(["--fold-metrics", *held, "--test-metrics", *test, "--fold-summaries", *fits, "--output",
             str(out / "summary.json"), "--table", str(out / "summary.md"), "--page", str(out / "cv.html"),
             "--experiment", "r3d"])
    printed = capsys.readouterr().out
    assert "Cross-validation figure (report this one): accuracy 75.00% ± 35.36 over 2 folds at the scan level" \
        in printed
    assert "selection-biased and shown only for comparison: accuracy 90.00% ± 0.00 over 2 folds" in printed
    markdown = (out / "summary.md").read_text()
    assert "77.26% ± 2.34" in markdown and "not with the cross-validation figure" in markdown
    assert ("fold 1: the held-out fold holds no AD scan (0 AD, 3 CN scans), so these metrics are undefined there, "
            "left out of the mean, and their intervals are not estimable: AUC.") in markdown
    assert "| accuracy | 75.00% ± 35.36 | 50.00 | 100.00 |" in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cross_validation"]["scan"]["auc"] == {"mean": 0.8, "std": None, "folds": [0.8, None]}
    page = (out / "cv.html").read_text()
    assert "<title>Cross-validation: r3d</title>" in page and "selection-biased" in page


def test_a_model_that_selects_nothing_has_no_inner_validation_figure(tmp_path):
    held = [write_fold(tmp_path, k, "held_out.json", metrics_block(0.7)) for k in range(2)]
    fits = [write_fold(tmp_path, k, "summary.json", {"kind": "volumetry", "features": ["left_icv"]}) for k in range(2)]
    inner = summarise_cv(held, summaries=fits)["inner_validation"]
    assert inner["scan"] is None and "selects nothing" in inner["notes"][0]


def test_cv_summary_names_a_file_that_is_not_fold_metrics_and_a_missing_fold(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"accuracy": 0.7}))
    with pytest.raises(cli.PipelineError, match="metrics.json has no 'scan' block"):
        cv_main(["--fold-metrics", str(path), "--output", str(tmp_path / "summary.json")])
    held = [write_fold(tmp_path, k, "held_out.json", metrics_block(0.7)) for k in range(2)]
    with pytest.raises(cli.PipelineError, match="1 test metrics for 2 folds"):
        summarise_cv(held, held[:1])


def test_the_split_goes_on_when_cv_cannot_be_split_and_says_why(tmp_path):
    """3 subjects per class: train+val hold 2 per class, too few for an inner split in any of 3 folds."""
    scans_table(n_ad=3, n_cn=3, visits=1).to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    out = tmp_path / "splits"
    assert cli.run(split.main, ["--scans", str(tmp_path / "scans.tsv"), "--path-pattern", RAS_PATTERN,
                                "--out-dir", str(out), "--settings", json.dumps(
                                    {"split": {"ratios": [0.34, 0.33, 0.33]}, "cv": {"inner_val_share": 0.111}})]) == 0
    assert len(pd.read_csv(out / "train.csv")) and len(pd.read_csv(out / "cv" / "fold0" / "held_out.csv"))
    assert pd.read_csv(out / "cv" / "fold0" / "val.csv").empty
    text = (out / "summary.txt").read_text()
    assert "WARNING: CV fold 0: the other folds hold 1 AD subject(s)" in text and "training stops" in text
    assert json.loads((out / "audit.json").read_text())["cv_fold_manifests"]["folds"]["0"]["untrainable"]
