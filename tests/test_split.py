"""Split: class balance, subject-level partitions and CV folds, leakage audit, stable growth."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import RAS_PATTERN, REPO, split_options
from workflow_scripts.common import cli
from workflow_scripts.learning import split

CLASSES = ["AD", "CN"]


def synthetic_scans(n_subjects: int = 60, seed: int = 0, first_rid: int = 1, ad_every: int = 5,
                    phase: str = "ADNI1") -> pd.DataFrame:
    """A scans table: 2 of every ``ad_every`` subjects AD, the rest CN, 1-5 scans each (no files)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        rid = first_rid + i
        subject, group = f"{(rid % 90) + 10:03d}_S_{rid:04d}", "AD" if i % ad_every < 2 else "CN"
        for visit in range(int(rng.integers(1, 6))):
            rows.append({"image_id": f"I{rid * 10 + visit}", "subject": subject, "group": group, "sex": "F",
                         "age": "74", "visit": f"m{visit * 12:02d}", "phase": phase})
    return pd.DataFrame(rows)


def add_scans(scans: pd.DataFrame, subjects: list[str], n: int = 2) -> pd.DataFrame:
    """New visits (image ids 9xxxxx) for existing subjects."""
    rows = []
    for subject in subjects:
        group = scans.loc[scans["subject"] == subject, "group"].iloc[0]
        rid = int(subject[-4:])
        rows += [{"image_id": f"I9{rid:04d}{v}", "subject": subject, "group": group, "sex": "F", "age": "75",
                  "visit": f"m{96 + v * 12}", "phase": "ADNI2"} for v in range(n)]
    return pd.concat([scans, pd.DataFrame(rows)], ignore_index=True)


def partition_of(result: split.Split) -> dict[str, str]:
    return {s: p for p in split.PARTITIONS for s in result.manifests[p]["subject"]}


def fold_of(result: split.Split) -> dict[str, int]:
    return dict(zip(result.cv_folds["subject"], result.cv_folds["fold"]))


def scans_per(frame: pd.DataFrame, group: str) -> int:
    return int((frame["group"] == group).sum())


def test_subjects_never_cross_partitions_or_folds_and_the_audit_passes():
    result = split.make_split(synthetic_scans(), **split_options())
    seen = [set(result.manifests[p]["subject"]) for p in split.PARTITIONS]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert result.cv_folds.groupby("subject")["fold"].nunique().max() == 1
    assert not set(result.manifests["test"]["subject"]) & set(result.cv_folds["subject"])
    trainval = pd.concat([result.manifests["train"], result.manifests["val"]])
    assert sorted(result.cv_folds["image_id"]) == sorted(trainval["image_id"])
    audit = split.audit_split(result.manifests, result.cv_folds)
    assert audit["passed"] and audit["offending_subjects"] == []
    assert audit["scans"]["cv"] == len(trainval)


def test_labels_paths_and_columns():
    scans = synthetic_scans()
    result = split.make_split(scans, **split_options(classes=["CN", "AD"],
                                                     path_of="ras/{group}/{subject}/{image_id}.nii.gz"))
    rows = pd.concat(result.manifests.values())
    assert list(result.manifests["train"].columns) == list(split.MANIFEST_COLUMNS)
    assert list(result.cv_folds.columns) == list(split.CV_COLUMNS)
    assert set(rows.loc[rows["group"] == "CN", "label"]) == {1}  # the first class is the positive one
    assert set(rows.loc[rows["group"] == "AD", "label"]) == {0}
    one = rows.iloc[0]
    assert one["path"] == f"ras/{one['group']}/{one['subject']}/{one['image_id']}.nii.gz"
    with pytest.raises(cli.PipelineError, match=r"\{site\}.*not a column"):
        split.make_split(scans, **split_options(path_of="ras/{site}/{image_id}.nii.gz"))


def test_balance_keeps_every_smaller_class_scan_and_stops_at_the_subject_that_reaches_it():
    scans = synthetic_scans()
    scans = pd.concat([scans, pd.DataFrame([{"image_id": "I1", "subject": "999_S_9999", "group": "MCI"}])])
    result = split.make_split(scans, **split_options())
    rows = pd.concat(result.manifests.values())
    n_ad, n_cn = scans_per(scans, "AD"), scans_per(scans, "CN")
    assert n_ad < n_cn  # the synthetic table is uneven
    assert scans_per(rows, "AD") == n_ad
    bal = result.summary["balance"]
    left_out = bal["subjects_left_out"]
    assert left_out and not set(left_out) & set(rows["subject"])
    # whole subjects, in seeded order, until reaching the AD count: at most one subject's scans (<=5) above
    assert n_ad <= scans_per(rows, "CN") < n_ad + 5
    chosen_cn = set(rows.loc[rows["group"] == "CN", "subject"])
    per_subject = scans[scans["group"] == "CN"].groupby("subject").size()
    order = sorted(per_subject.index, key=lambda s: split.subject_rank(s, 42))
    assert chosen_cn == set(order[:len(chosen_cn)])
    assert per_subject[order[:len(chosen_cn) - 1]].sum() < n_ad  # the last one taken was needed
    assert result.summary["input"]["ignored_groups"] == {"MCI": 1}
    unbalanced = split.make_split(scans, **split_options(balance=False))
    assert sum(len(m) for m in unbalanced.manifests.values()) == n_ad + n_cn


def test_partition_targets_are_met_within_one_subjects_scans():
    scans = synthetic_scans()
    result = split.make_split(scans, **split_options(balance=False))
    for group in CLASSES:
        n = scans_per(scans, group)
        biggest = scans[scans["group"] == group].groupby("subject").size().max()
        for p, ratio in zip(split.PARTITIONS, split_options()["ratios"]):
            row = result.summary["partitions"][group][p]
            assert row["target_scans"] == split.round_half_up(ratio * n)
            assert row["scans"] == scans_per(result.manifests[p], group)
            if p == "train":  # train absorbs the overshoot of test and val
                assert row["target_scans"] - 2 * biggest < row["scans"] <= row["target_scans"]
            else:
                assert row["target_scans"] <= row["scans"] < row["target_scans"] + biggest


def test_round_robin_deals_the_fewest_scan_subjects_to_test_then_val_then_train():
    scans = synthetic_scans()
    result = split.make_split(scans, **split_options(balance=False))
    where = partition_of(result)
    for group in CLASSES:
        counts = scans[scans["group"] == group].groupby("subject").size()
        order = sorted(counts.index, key=lambda s: (counts[s], s))
        assert [where[s] for s in order[:3]] == ["test", "val", "train"]
    # a partition at target is skipped: 1 scan each, targets test 1, val 1 -> test, val, then train only
    n = pd.Series([1] * 6, index=list("abcdef"))
    dealt = split.deal_partitions(n, {"train": 4, "val": 1, "test": 1})
    assert dealt == {"a": "test", "b": "val", "c": "train", "d": "train", "e": "train", "f": "train"}


def test_the_same_seed_gives_the_same_split_and_another_seed_another_balance():
    scans = synthetic_scans()
    one = split.make_split(scans, **split_options(seed=7))
    two = split.make_split(scans.sample(frac=1, random_state=3), **split_options(seed=7))
    for p in split.PARTITIONS:
        pd.testing.assert_frame_equal(one.manifests[p], two.manifests[p])
    pd.testing.assert_frame_equal(one.cv_folds, two.cv_folds)
    other = split.make_split(scans, **split_options(seed=8))
    assert other.summary["balance"]["subjects_left_out"] != one.summary["balance"]["subjects_left_out"]


def test_folds_are_stratified_and_hold_out_the_test_subjects():
    result = split.make_split(synthetic_scans(), **split_options(folds=3))
    cv = result.cv_folds
    assert sorted(cv["fold"].unique()) == [0, 1, 2]
    for fold in range(3):
        assert set(cv.loc[cv["fold"] == fold, "group"]) == set(CLASSES)
    for group in CLASSES:  # balanced in subjects: fold sizes differ by at most one subject per class
        sizes = cv[cv["group"] == group].groupby("fold")["subject"].nunique()
        assert sizes.max() - sizes.min() <= 1
    assert not set(result.manifests["test"]["subject"]) & set(cv["subject"])


def test_the_audit_names_planted_leaks():
    result = split.make_split(synthetic_scans(), **split_options())
    victim = result.manifests["test"].iloc[[0]]
    leaked = dict(result.manifests, train=pd.concat([result.manifests["train"], victim], ignore_index=True))
    audit = split.audit_split(leaked, result.cv_folds)
    subject = victim["subject"].iloc[0]
    assert not audit["passed"]
    assert audit["subjects_in_two_partitions"] == [subject] and audit["offending_subjects"] == [subject]
    assert victim["image_id"].iloc[0] in audit["duplicate_scans"]
    cv = result.cv_folds.copy()
    moved = cv["subject"].iloc[0]
    cv.loc[cv.index[0], "fold"] = (cv["fold"].iloc[0] + 1) % 3
    first = cv["subject"].eq(moved)
    if first.sum() == 1:  # a one-scan subject cannot sit in two folds; give it a second scan
        cv = pd.concat([cv, cv[first].assign(image_id="Iextra", path="extra", fold=cv.loc[first, "fold"] + 1)])
    audit = split.audit_split(result.manifests, cv)
    assert not audit["passed"] and moved in audit["subjects_in_two_folds"]


def test_the_cli_fails_on_a_leak_naming_the_subject_after_writing_the_audit(tmp_path):
    scans = synthetic_scans(30)
    duplicated = scans.iloc[[4]]  # the same scan listed twice
    pd.concat([scans, duplicated]).to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    out = tmp_path / "splits"
    run = subprocess.run([sys.executable, "-m", "workflow_scripts.learning.split", "--scans", str(tmp_path / "scans.tsv"),
                          "--path-pattern", RAS_PATTERN, "--out-dir", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    subject = duplicated["subject"].iloc[0]
    assert run.returncode == 1
    assert "leakage audit failed" in run.stderr and subject in run.stderr
    audit = json.loads((out / "audit.json").read_text())
    assert audit["passed"] is False and audit["offending_subjects"] == [subject]
    assert not (out / split.LEDGER_NAME).exists()  # a leaky split is never remembered


def run_cli(tmp_path, scans: pd.DataFrame, *flags: str) -> None:
    scans.to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    argv = ["--scans", str(tmp_path / "scans.tsv"), "--path-pattern", RAS_PATTERN, "--out-dir",
            str(tmp_path / "splits"), *flags]
    assert cli.run(split.main, argv) == 0


def read_outputs(tmp_path) -> dict:
    out = tmp_path / "splits"
    return {"manifests": {p: pd.read_csv(out / f"{p}.csv") for p in split.PARTITIONS},
            "cv": pd.read_csv(out / "cv_folds.csv"),
            "ledger": pd.read_csv(out / split.LEDGER_NAME, sep="\t", dtype=str, keep_default_na=False)}


def test_cli_round_trip_writes_every_file_with_its_columns(tmp_path):
    run_cli(tmp_path, synthetic_scans(), "--settings", json.dumps({
        "data.classes": ["AD", "CN"], "split": {"ratios": [0.8, 0.1, 0.1], "seed": 42}, "cv": {"folds": 3}}))
    out = tmp_path / "splits"
    files = read_outputs(tmp_path)
    for p in split.PARTITIONS:
        assert list(files["manifests"][p].columns) == ["path", "subject", "image_id", "group", "label"]
    assert list(files["cv"].columns) == ["path", "subject", "image_id", "group", "label", "fold"]
    assert list(files["ledger"].columns) == list(split.LEDGER_COLUMNS)
    assert set(files["ledger"]["partition"]) == {"train", "val", "test", "unselected"}
    assert files["ledger"].loc[files["ledger"]["partition"] == "test", "fold"].eq("").all()
    summary = json.loads((out / "summary.json").read_text())
    text = (out / "summary.txt").read_text()
    ad_train = summary["partitions"]["AD"]["train"]
    assert (f"AD train: target {ad_train['target_scans']} scans, actual {ad_train['scans']} scans from "
            f"{ad_train['subjects']} subjects") in text
    assert summary["balance"]["subjects_left_out"][0] in text
    assert json.loads((out / "audit.json").read_text())["passed"] is True
    assert files["manifests"]["train"]["path"].iloc[0].startswith("results/ras/")


def test_growth_with_the_ledger_moves_no_existing_subject(tmp_path):
    first = synthetic_scans(60)
    run_cli(tmp_path, first)
    before = read_outputs(tmp_path)
    old_ledger = before["ledger"].set_index("subject")
    # a new phase (40 subjects, mostly CN, so balancing has new CN candidates) and new visits of old subjects
    old_subjects = sorted(first["subject"].unique())
    grown = add_scans(pd.concat([first, synthetic_scans(40, seed=1, first_rid=4001, ad_every=4, phase="ADNI2")]),
                      old_subjects[::7])
    run_cli(tmp_path, grown)
    after = read_outputs(tmp_path)
    ledger = after["ledger"].set_index("subject")
    placed = old_ledger[old_ledger["partition"] != "unselected"]
    assert (ledger.loc[placed.index, "partition"] == placed["partition"]).all()
    assert (ledger.loc[placed.index, "fold"] == placed["fold"]).all()
    new_subjects = set(grown["subject"]) - set(first["subject"])
    assert new_subjects & set(ledger.index[ledger["partition"].isin(split.PARTITIONS)])
    rows = pd.concat(after["manifests"].values())
    new_visits = grown[grown["image_id"].str.startswith("I9")]
    kept_visits = new_visits[new_visits["subject"].isin(placed.index)]
    assert set(kept_visits["image_id"]) <= set(rows["image_id"])  # a chosen subject's new scans follow it
    for image_id, subject in zip(kept_visits["image_id"], kept_visits["subject"]):
        assert rows.loc[rows["image_id"] == image_id, "subject"].iloc[0] == subject
        part = placed.at[subject, "partition"]
        assert image_id in set(after["manifests"][part]["image_id"])
    assert split.audit_split(after["manifests"], after["cv"])["passed"]
    # the new subjects go where the targets need them: every partition still within reach of its target
    summary = json.loads((tmp_path / "splits" / "summary.json").read_text())
    assert summary["ledger"]["used"] and set(summary["ledger"]["new_subjects"]) <= new_subjects | set(old_ledger.index)
    for group in CLASSES:
        for p in ("val", "test"):
            row = summary["partitions"][group][p]
            assert abs(row["scans"] - row["target_scans"]) <= 10
    # without the ledger the grown table is split afresh, and some old subject does move
    run_cli(tmp_path, grown, "--settings", json.dumps({"split": {"stable": False}}))
    fresh = read_outputs(tmp_path)["ledger"].set_index("subject")
    assert (fresh.loc[placed.index, ["partition", "fold"]] != placed[["partition", "fold"]]).any(axis=None)


def test_a_subject_chosen_by_balancing_stays_chosen():
    first = synthetic_scans(60)
    base = split.make_split(first, **split_options())
    more_cn = pd.concat([first, synthetic_scans(40, seed=2, first_rid=5001, ad_every=1000)])
    stable = split.make_split(more_cn, **split_options(ledger=base.ledger))
    fresh = split.make_split(more_cn, **split_options())
    chosen = set(base.ledger.loc[base.ledger["partition"] != "unselected", "subject"])
    assert chosen <= set(stable.ledger.loc[stable.ledger["partition"] != "unselected", "subject"])
    assert not chosen <= set(fresh.ledger.loc[fresh.ledger["partition"] != "unselected", "subject"])


def test_vanished_subjects_are_reported_and_a_changed_class_stops_the_split():
    first = synthetic_scans(60)
    base = split.make_split(first, **split_options())
    gone = base.manifests["train"]["subject"].iloc[0]
    result = split.make_split(first[first["subject"] != gone], **split_options(ledger=base.ledger))
    assert result.summary["ledger"]["vanished_subjects"] == [gone]
    assert gone in set(result.ledger["subject"])  # remembered, in case it comes back
    assert gone not in set(pd.concat(result.manifests.values())["subject"])
    relabelled = first.copy()
    victim = base.manifests["test"]["subject"].iloc[0]
    old = relabelled.loc[relabelled["subject"] == victim, "group"].iloc[0]
    relabelled.loc[relabelled["subject"] == victim, "group"] = "CN" if old == "AD" else "AD"
    with pytest.raises(cli.PipelineError, match=victim):
        split.make_split(relabelled, **split_options(ledger=base.ledger))


def test_a_changed_fold_count_reassigns_folds_but_keeps_partitions(tmp_path):
    scans = synthetic_scans(60)
    base = split.make_split(scans, **split_options(folds=3))
    path = tmp_path / split.LEDGER_NAME
    path.write_text(split.ledger_text(base.ledger))
    ledger = split.read_ledger(path)
    pd.testing.assert_frame_equal(ledger, base.ledger, check_dtype=False)
    result = split.make_split(scans, **split_options(folds=5, ledger=ledger))
    assert partition_of(result) == partition_of(base)
    assert sorted(result.cv_folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert result.summary["ledger"]["fold_reassigned_subjects"]


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["AD"]}, "exactly two"),
    ({"ratios": [0.8, 0.1, 0.2]}, "summing to 1"),
    ({"folds": 1}, "at least 2"),
    ({"classes": ["AD", "MCI"]}, "no scans of class MCI"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(cli.PipelineError, match=message):
        split.make_split(synthetic_scans(20), **split_options(**kwargs))


# ---------------------------------------------------------------- folds by subjects, demographics

def test_new_subjects_fill_the_folds_with_fewest_subjects_even_beside_a_heavy_kept_one():
    # a kept subject with 10 scans in fold 0: balancing scans would send every new subject to fold 1
    subjects = pd.DataFrame({"group": ["AD"] * 5 + ["CN"] * 7, "n_scans": [10, 1, 1, 1, 1] + [3, 1, 2, 5, 1, 1, 4]},
                            index=[f"s{i}" for i in range(12)])
    folds = split.assign_folds(subjects, 2, placed={"s0": 0})
    assert folds["s0"] == 0
    for group in ("AD", "CN"):
        counts = pd.Series(folds)[subjects.index[subjects["group"] == group]].value_counts()
        assert counts.reindex([0, 1], fill_value=0).max() - counts.reindex([0, 1], fill_value=0).min() <= 1
    for seed in range(5):  # and on uneven synthetic tables, over 3 and 4 folds
        for n_folds in (3, 4):
            cv = split.make_split(synthetic_scans(50, seed=seed), **split_options(folds=n_folds)).cv_folds
            per = cv.groupby(["group", "fold"])["subject"].nunique().unstack(fill_value=0)
            assert ((per.max(axis=1) - per.min(axis=1)) <= 1).all(), per


def demographic_scans(n_subjects: int = 60, seed: int = 0) -> pd.DataFrame:
    """Two scans per subject, the later one with the lower image id and an older age (first-scan check)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        subject, group = f"{10 + i % 80:03d}_S_{i + 1:04d}", "AD" if i % 2 else "CN"
        age, sex = int(rng.integers(60, 90)), str(rng.choice(["F", "M"]))
        rows += [{"image_id": f"I{2000 + i}", "subject": subject, "group": group, "sex": sex, "age": str(age),
                  "visit": "bl", "acq_date": "2006-05-01"},
                 {"image_id": f"I{1000 + i}", "subject": subject, "group": group, "sex": sex, "age": str(age + 2),
                  "visit": "m24", "acq_date": "2008-05-01"}]
    return pd.DataFrame(rows)


def test_the_summary_reports_age_and_sex_per_class_and_partition_with_balance_tests():
    from scipy import stats

    scans = demographic_scans()
    result = split.make_split(scans, **split_options(balance=False))
    demo = result.summary["demographics"]
    first = scans[scans["visit"] == "bl"].set_index("subject")
    where = partition_of(result)
    ages, sexes = {}, {}
    for group in CLASSES:
        for p in split.PARTITIONS:
            who = [s for s, q in where.items() if q == p and first.at[s, "group"] == group]
            age = first.loc[who, "age"].astype(float)
            ages[group, p], sexes[group, p] = age, first.loc[who, "sex"]
            cell = demo["per_class"][group][p]
            assert cell["subjects"] == len(who)
            assert cell["age_mean"] == pytest.approx(age.mean(), abs=0.05)  # the first scan's age, not the later one
            assert cell["age_sd"] == pytest.approx(age.std(ddof=1), abs=0.05)
            assert cell["female_pct"] == pytest.approx(100 * (sexes[group, p] == "F").mean(), abs=0.05)
    for group in CLASSES:
        kw = stats.kruskal(*[ages[group, p] for p in split.PARTITIONS]).pvalue
        assert demo["between_partitions"][group]["age"]["p"] == pytest.approx(kw, abs=1e-4)
    train = [[int((sexes[g, "train"] == x).sum()) for x in "FM"] for g in CLASSES]
    assert demo["between_classes"]["train"]["sex"] == {"test": "Fisher exact",
                                                        "p": pytest.approx(stats.fisher_exact(train).pvalue, abs=1e-4)}
    # val and test hold a few subjects each: the 3 x 2 chi-square has expected counts below 5
    assert demo["between_partitions"]["AD"]["sex"]["p"] is None
    assert demo["between_partitions"]["AD"]["sex"]["note"].startswith("not testable: an expected count is below 5")
    text = split.summary_text(result.summary)
    cell = demo["per_class"]["AD"]["train"]
    assert (f"AD train: n {cell['subjects']}, age {cell['age_mean']:.1f} +- {cell['age_sd']:.1f}, "
            f"{cell['female_pct']:.1f}% female") in text
    assert "AD, between partitions: age p=" in text and "not testable" in text


def test_a_planted_sex_imbalance_shows_and_tiny_cells_are_not_testable():
    scans = demographic_scans(40)
    scans["sex"] = np.where(scans["group"] == "AD", "F", "M")  # every AD subject female, every CN male
    demo = split.make_split(scans, **split_options(balance=False)).summary["demographics"]
    assert demo["per_class"]["AD"]["train"]["female_pct"] == 100.0
    assert demo["per_class"]["CN"]["train"]["female_pct"] == 0.0
    assert demo["between_classes"]["train"]["sex"]["p"] < 1e-6
    assert demo["between_partitions"]["AD"]["sex"]["note"] == "not testable: every subject has the same sex"
    one_each = split.demographics(scans, pd.DataFrame({"group": ["AD", "CN"], "partition": ["test", "test"]},
                                                      index=sorted(scans["subject"].unique())[:2]),
                                  CLASSES, dict(zip(split.PARTITIONS, split_options()["ratios"])))
    assert one_each["between_classes"]["test"]["age"]["note"].startswith("not testable: fewer than 2 subjects")
