"""Split: scans table -> class-balanced, subject-level train/val/test manifests, CV folds, leakage audit.

Dissertation section 4.3. Every scan of a subject lands in one partition and, inside
train+val, in one cross-validation fold, so no person's brain is learnt in training and
seen again in evaluation (scans of one person are far more alike than scans of two).

Rules, in order:

1. Class balance (``split.balance``): every scan of the smaller class is kept; subjects of
   the larger class are taken whole, in a seeded pseudo-random order, while the chosen scans
   are fewer than the smaller class's; the subject that reaches or first exceeds that count
   is the last one taken (so the larger class ends at most one subject's scans above).
   The order is a hash of (seed, subject id): adding subjects never reorders the others.
2. Partitions, per class: subjects sorted by ascending scan count (ties by subject id) are
   dealt in turn to test, val, train, test, ... skipping a partition whose scans already
   reached its target (target = ratio x class scans, rounded half up); once all targets are
   reached the rest go to train. test and val therefore overshoot their targets by less
   than one subject's scans, and train absorbs the difference.
3. CV folds over train+val (test held out), per class: subjects, most scans first, each go
   to the fold holding the fewest subjects of their class so far (ties: fewest scans of the
   class, then lowest fold), so the folds of a class differ by at most one subject (when the
   subjects kept from the ledger did) and their scan counts stay close.
4. Stable growth (``split.stable``): ``subject_assignments.tsv`` in the output folder records
   each subject's group, partition and fold. A subject in it keeps its partition and fold
   (and a subject chosen by balancing stays chosen) when scans, subjects or phases are
   added; new subjects are dealt by the same rules, the cycle starting at the partition
   furthest below its target (relative to the target) and skipping partitions at target.
5. Audit: no subject in two partitions or two folds, no test subject in a fold, no scan
   twice, the folds cover exactly train+val; a failure names the subjects.
6. Per-fold manifests (config cv.inner_val_share): for each CV fold k,
   ``cv/fold<k>/held_out.csv`` is fold k (reported on, never selected on); the other folds'
   subjects are split per class into ``val.csv`` (the inner validation split: early stopping
   and checkpoint choice) and ``train.csv``, by a seeded hash of the subject id. The audit
   checks that the three are subject-disjoint and that held_out.csv is fold k.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.data import labels
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")
DEAL_ORDER = ("test", "val", "train")  # the round-robin's order: small subjects go to test first
UNSELECTED = "unselected"  # ledger partition of a subject left out by class balancing
MANIFEST_COLUMNS = ("path", "subject", "image_id", "group", "label")
CV_COLUMNS = MANIFEST_COLUMNS + ("fold",)
LEDGER_COLUMNS = ("subject", "group", "partition", "fold", "n_folds")
LEDGER_NAME = "subject_assignments.tsv"

PathOf = str | Callable[[Mapping[str, str]], str]
# The config sections the split command reads (its --settings).
SETTING_SECTIONS = ("split", "cv", "data.classes", "data.label_policy")


@dataclass
class Split:
    """Everything one split run produces: manifests, CV folds, the new ledger and a summary."""
    manifests: dict[str, pd.DataFrame]  # "train"/"val"/"test" -> MANIFEST_COLUMNS
    cv_folds: pd.DataFrame  # train+val scans with CV_COLUMNS
    ledger: pd.DataFrame  # LEDGER_COLUMNS, one row per subject ever assigned
    summary: dict


# ---------------------------------------------------------------- inputs

def read_scans(path: str | Path) -> pd.DataFrame:
    """Read scans.tsv as text, failing with the missing columns if it is not one."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the scans table {path}: {err}") from err
    missing = [c for c in ("image_id", "subject", "group") if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"{path} is not a scans table: missing column(s) {', '.join(missing)}; "
                                f"it is written by the ingest step (results/scans.tsv)")
    return table


def scan_paths(scans: pd.DataFrame, path_of: PathOf) -> list[str]:
    """Each scan's image path: ``path_of`` is a str.format pattern over the row's columns, or a function."""
    rows = scans.astype(str).to_dict("records")
    if callable(path_of):
        return [str(path_of(row)) for row in rows]
    try:
        return [path_of.format(**row) for row in rows]
    except KeyError as err:
        raise cli.PipelineError(f"path pattern {path_of!r} names {{{err.args[0]}}}, which is not a column of "
                                f"the scans table (columns: {', '.join(scans.columns)})") from err
    except (IndexError, ValueError) as err:
        raise cli.PipelineError(f"path pattern {path_of!r} is not a valid pattern: {err}; use named fields "
                                f"such as 'results/ras/{{subject}}/{{image_id}}.nii.gz'") from err


def check_settings(classes: Sequence[str], ratios: Sequence[float], folds: int) -> dict[str, float]:
    """Validate the split settings up front; return the ratios by partition name."""
    if len(classes) != 2 or classes[0] == classes[1]:
        raise cli.PipelineError(f"split needs exactly two different classes (positive first), got {list(classes)}")
    if len(ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise cli.PipelineError(f"split.ratios must be three non-negative numbers (train, val, test) summing "
                                f"to 1, got {list(ratios)}")
    if int(folds) < 2:
        raise cli.PipelineError(f"split.folds must be at least 2, got {folds}")
    return dict(zip(PARTITIONS, map(float, ratios)))


def first_scans(table: pd.DataFrame) -> pd.DataFrame:
    """Each subject's first scan (earliest acq_date, then visit code, then image id), indexed by subject."""
    table = table.reset_index(drop=True)
    order = pd.DataFrame({
        "subject": table["subject"], "image_id": table["image_id"],
        "date": pd.to_datetime(table["acq_date"], errors="coerce") if "acq_date" in table else pd.NaT,
        "month": table["visit"].map(labels.visit_month) if "visit" in table else 0.0}, index=table.index)
    order = order.sort_values(["subject", "date", "month", "image_id"], na_position="last", kind="stable")
    return table.loc[order.drop_duplicates("subject").index].set_index("subject")


def prepare_scans(scans: pd.DataFrame, classes: Sequence[str], path_of: PathOf,
                  label_policy: str) -> tuple[pd.DataFrame, dict]:
    """The scans of the two classes with path, each scan's own label, and its subject's ``stratum``.

    Under ``visit_diagnosis`` a subject may have scans of both classes (a converter): each scan keeps
    its label, and the subject is balanced, dealt and folded as one, by its first visit's label
    (``stratum``; see first_scans). Under the other policies ingest excludes such subjects, so one
    reaching the split is an error naming them, never a silent drop.
    """
    table = scans[scans["group"].isin(classes)].copy()
    ignored = scans.loc[~scans["group"].isin(classes), "group"].value_counts().to_dict()
    n_groups = table.groupby("subject")["group"].nunique()
    mixed = sorted(n_groups.index[n_groups > 1])
    if mixed and label_policy != "visit_diagnosis":
        raise cli.PipelineError(
            f"subject(s) {', '.join(mixed[:20])} have scans of both classes ({classes[0]} and {classes[1]}) in the "
            f"scans table, but data.label_policy is {label_policy}, under which ingest excludes such subjects "
            f"(reason codes converter / unstable_diagnosis). Re-run ingest (the scans table may predate the policy), "
            f"or set data.label_policy: visit_diagnosis to keep each scan under its own visit's diagnosis")
    if mixed:
        LOG.info("%d subject(s) with scans of both classes, each kept in one partition: %s", len(mixed),
                 ", ".join(mixed))
    table["stratum"] = table["subject"].map(first_scans(table)["group"])
    table["path"] = scan_paths(table, path_of)
    table["label"] = (table["group"] == classes[0]).astype(int)
    table = table.sort_values(["subject", "image_id"], kind="stable").reset_index(drop=True)
    return table, {"ignored_groups": {str(k): int(v) for k, v in ignored.items()}, "mixed_class_subjects": mixed,
                   "label_policy": label_policy}


def subject_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: its group (the stratum, its first visit's label) and scan count, indexed by subject id."""
    column = "stratum" if "stratum" in table.columns else "group"
    return table.groupby("subject").agg(group=(column, "first"), n_scans=("image_id", "size"))


# ---------------------------------------------------------------- ledger

def read_ledger(path: str | Path) -> pd.DataFrame | None:
    """The subject assignments of earlier runs (None if there is no ledger yet)."""
    path = Path(path)
    if not path.exists():
        return None
    what_to_do = f"fix or delete {path} (deleting it re-splits every subject from scratch)"
    try:
        ledger = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as err:
        raise cli.PipelineError(f"cannot read the split ledger {path}: {err}; {what_to_do}") from err
    missing = [c for c in ("subject", "group", "partition", "fold") if c not in ledger.columns]
    if missing:
        raise cli.PipelineError(f"split ledger {path} lacks column(s) {', '.join(missing)}; {what_to_do}")
    if "n_folds" not in ledger.columns:
        ledger["n_folds"] = ""
    bad = sorted(set(ledger["partition"]) - set(PARTITIONS) - {UNSELECTED})
    if bad:
        raise cli.PipelineError(f"split ledger {path} has unknown partition(s) {bad}; {what_to_do}")
    twice = sorted(ledger.loc[ledger["subject"].duplicated(), "subject"].unique())
    if twice:
        raise cli.PipelineError(f"split ledger {path} lists subject(s) {', '.join(twice)} more than once; "
                                f"{what_to_do}")
    for column in ("fold", "n_folds"):
        text = ledger[column].str.strip()
        if not (text.eq("") | text.str.fullmatch(r"\d+")).all():
            raise cli.PipelineError(f"split ledger {path} has a non-integer {column}; {what_to_do}")
        ledger[column] = pd.to_numeric(text.replace("", None)).astype("Int64")
    return ledger[list(LEDGER_COLUMNS)].reset_index(drop=True)


def ledger_text(ledger: pd.DataFrame) -> str:
    """The ledger as TSV: empty fold for test and unselected subjects."""
    return ledger[list(LEDGER_COLUMNS)].to_csv(sep="\t", index=False)


# ---------------------------------------------------------------- the three steps

def subject_rank(subject: str, seed: int) -> str:
    """A seeded pseudo-random rank that does not move when other subjects are added."""
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def choose_balanced(subjects: pd.DataFrame, classes: Sequence[str], seed: int,
                    chosen_before: frozenset[str] | set[str] = frozenset()) -> tuple[set[str], dict]:
    """Subjects kept by class balancing (all of the smaller class, whole subjects of the larger).

    ``chosen_before`` (larger-class subjects already placed) are kept first, so a subject once
    chosen stays chosen; then subjects in seeded order until the scan counts match.
    """
    per_class = {c: int(subjects.loc[subjects["group"] == c, "n_scans"].sum()) for c in classes}
    smaller, larger = sorted(classes, key=lambda c: (per_class[c], list(classes).index(c)))
    keep = set(subjects.index[subjects["group"] == smaller])
    big = subjects[subjects["group"] == larger]
    if per_class[smaller] == per_class[larger]:
        keep.update(big.index)
    else:
        before = [s for s in big.index if s in chosen_before]
        keep.update(before)
        total = int(big.loc[before, "n_scans"].sum())
        for subject in sorted(set(big.index) - set(before), key=lambda s: subject_rank(s, seed)):
            if total >= per_class[smaller]:
                break
            keep.add(subject)
            total += int(big.at[subject, "n_scans"])
    left_out = sorted(set(subjects.index) - keep)
    after = {c: int(subjects.loc[subjects.index.isin(keep) & (subjects["group"] == c), "n_scans"].sum())
             for c in classes}
    info = {"smaller_class": smaller, "larger_class": larger, "scans_before": per_class, "scans_after": after,
            "subjects_left_out": left_out,
            "scans_left_out": int(subjects.loc[left_out, "n_scans"].sum())}
    return keep, info


def round_half_up(value: float) -> int:
    """Round .5 up (Python's round() goes to even, which surprises in a table of targets)."""
    return int(math.floor(value + 0.5 + 1e-9))


def partition_targets(n_scans: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Target scan count of each partition for a class of ``n_scans`` scans."""
    return {p: round_half_up(ratios[p] * n_scans) for p in PARTITIONS}


def _cycle_start(actual: Mapping[str, int], targets: Mapping[str, int]) -> int:
    """Index in DEAL_ORDER of the partition furthest below its target (relative); ties go to test first."""
    def deficit(p: str) -> float:
        return (targets[p] - actual[p]) / targets[p] if targets[p] > 0 else -math.inf
    return max(range(len(DEAL_ORDER)), key=lambda i: (deficit(DEAL_ORDER[i]), -i))


def deal_partitions(n_scans: pd.Series, targets: Mapping[str, int],
                    placed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Deal one class's subjects round-robin test -> val -> train, fewest scans first.

    ``n_scans`` maps subject -> scans; ``placed`` subjects keep their partition and count
    towards its target. A partition at or above its target is skipped; when all are, train.
    """
    placed = placed or {}
    assignment = {s: placed[s] for s in n_scans.index if s in placed}
    actual = {p: 0 for p in PARTITIONS}
    for subject, partition in assignment.items():
        actual[partition] += int(n_scans[subject])
    pointer = _cycle_start(actual, targets)
    for subject in sorted((s for s in n_scans.index if s not in assignment), key=lambda s: (n_scans[s], s)):
        choice = "train"
        for step in range(len(DEAL_ORDER)):
            candidate = DEAL_ORDER[(pointer + step) % len(DEAL_ORDER)]
            if actual[candidate] < targets[candidate]:
                choice = candidate
                break
        assignment[subject] = choice
        actual[choice] += int(n_scans[subject])
        pointer = (DEAL_ORDER.index(choice) + 1) % len(DEAL_ORDER)
    return assignment


def assign_folds(subjects: pd.DataFrame, folds: int, placed: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per class, each subject not yet placed (most scans first) joins the fold with fewest subjects of its class.

    Ties go to the fold with fewest scans of the class, then the lowest fold; so a class's folds differ
    by at most one subject when the ``placed`` ones (which keep their fold) did. ``subjects`` has
    columns group and n_scans (train+val subjects only).
    """
    placed = placed or {}
    result = {s: int(placed[s]) for s in subjects.index if s in placed}
    for group in sorted(subjects["group"].unique()):
        members = subjects[subjects["group"] == group]
        count, load = [0] * folds, [0] * folds
        for subject in members.index:
            if subject in result:
                count[result[subject]] += 1
                load[result[subject]] += int(members.at[subject, "n_scans"])
        new = sorted((s for s in members.index if s not in result), key=lambda s: (-members.at[s, "n_scans"], s))
        for subject in new:
            fold = min(range(folds), key=lambda f: (count[f], load[f], f))
            result[subject] = fold
            count[fold] += 1
            load[fold] += int(members.at[subject, "n_scans"])
    return result


# ---------------------------------------------------------------- the whole split

def _ledger_state(ledger: pd.DataFrame | None, subjects: pd.DataFrame, folds: int
                  ) -> tuple[dict[str, str], dict[str, int], dict]:
    """Partitions and folds to keep from the ledger, and what changed since it was written."""
    if ledger is None:
        return {}, {}, {"used": False}
    present = ledger[ledger["subject"].isin(subjects.index)]
    vanished = sorted(set(ledger["subject"]) - set(subjects.index))
    now = subjects.loc[present["subject"], "group"].to_numpy()
    changed = present[present["group"].to_numpy() != now]
    placed_changed = changed[changed["partition"].isin(PARTITIONS)]
    if not placed_changed.empty:
        names = ", ".join(f"{s} ({old} in the ledger, now {subjects.at[s, 'group']})"
                          for s, old in zip(placed_changed["subject"], placed_changed["group"]))
        raise cli.PipelineError(
            f"subject(s) changed class since the split ledger was written: {names}. A model may already have "
            f"learnt them under the old label; correct the groups in the scans table, or delete the ledger "
            f"(or set split.stable: false) to re-split from scratch")
    keep = present[present["partition"].isin(PARTITIONS)]
    partitions = dict(zip(keep["subject"], keep["partition"]))
    kept_folds = {}  # a fold is kept only if it was dealt for the same number of folds
    for subject, partition, fold, n_folds in keep[["subject", "partition", "fold", "n_folds"]].itertuples(index=False):
        if partition != "test" and not pd.isna(fold) and fold < folds and (pd.isna(n_folds) or n_folds == folds):
            kept_folds[subject] = int(fold)
    refolded = sorted(set(keep.loc[keep["partition"].isin(("train", "val")), "subject"]) - set(kept_folds))
    info = {"used": True, "subjects_kept": len(partitions), "vanished_subjects": vanished,
            "unselected_group_changed": sorted(changed["subject"]), "fold_reassigned_subjects": refolded}
    return partitions, kept_folds, info


def split_options(split: Mapping[str, Any], cv: Mapping[str, Any], classes: Sequence[str],
                  label_policy: str) -> dict:
    """make_split's settings from the resolved config sections split and cv, data.classes and
    data.label_policy."""
    return dict(classes=list(classes), ratios=list(split["ratios"]), folds=cv["folds"], seed=split["seed"],
                balance=split["balance"], label_policy=label_policy)


def make_split(scans: pd.DataFrame, *, classes: Sequence[str], path_of: PathOf, ratios: Sequence[float],
               folds: int, seed: int, balance: bool, label_policy: str, ledger: pd.DataFrame | None = None,
               excluded: pd.DataFrame | None = None) -> Split:
    """Balance the classes, deal subjects into partitions and CV folds, keeping what ``ledger`` fixed.
    The settings are those of ``split_options``; ``path_of`` gives each scan's image path.

    ``excluded`` (ingest's excluded.tsv) lets the summary count the subjects the label policy dropped,
    under the partition the ledger had them in.
    """
    classes = list(classes)
    ratio_of = check_settings(classes, ratios, folds)
    table, input_info = prepare_scans(scans, classes, path_of, label_policy)
    subjects = subject_table(table)
    for group in classes:
        if not (subjects["group"] == group).any():
            raise cli.PipelineError(f"no scans of class {group} in the scans table; both classes {classes} are "
                                    f"needed (check data.classes and the ingest's excluded table)")
    placed_before, folds_before, ledger_info = _ledger_state(ledger, subjects, folds)

    balance_info: dict = {"enabled": bool(balance)}
    kept = set(subjects.index)
    if balance:
        kept, info = choose_balanced(subjects, classes, seed, chosen_before=set(placed_before))
        balance_info.update(info)
    chosen = subjects.loc[sorted(kept)]

    partition_of: dict[str, str] = {}
    targets: dict[str, dict[str, int]] = {}
    for group in classes:
        members = chosen[chosen["group"] == group]
        targets[group] = partition_targets(int(members["n_scans"].sum()), ratio_of)
        partition_of.update(deal_partitions(members["n_scans"], targets[group], placed_before))
    chosen = chosen.assign(partition=pd.Series(partition_of))
    trainval = chosen[chosen["partition"].isin(("train", "val"))]
    fold_of = assign_folds(trainval, folds, folds_before)

    table = table[table["subject"].isin(kept)].copy()
    table["partition"] = table["subject"].map(partition_of)
    manifests = {p: table.loc[table["partition"] == p, list(MANIFEST_COLUMNS)].reset_index(drop=True)
                 for p in PARTITIONS}
    cv = table[table["partition"].isin(("train", "val"))].copy()
    cv["fold"] = cv["subject"].map(fold_of).astype(int)
    cv = cv[list(CV_COLUMNS)].reset_index(drop=True)

    new_ledger = pd.DataFrame({"subject": subjects.index, "group": subjects["group"].to_numpy()})
    new_ledger["partition"] = new_ledger["subject"].map(partition_of).fillna(UNSELECTED)
    new_ledger["fold"] = new_ledger["subject"].map(fold_of).astype("Int64")
    new_ledger["n_folds"] = new_ledger["fold"].notna().map({True: folds, False: pd.NA}).astype("Int64")
    if ledger is not None:  # a vanished subject keeps its row: if it comes back, it goes back where it was
        gone = ledger[ledger["subject"].isin(ledger_info["vanished_subjects"])]
        new_ledger = pd.concat([new_ledger, gone[list(LEDGER_COLUMNS)]], ignore_index=True)
    new_ledger = new_ledger.sort_values("subject", kind="stable").reset_index(drop=True)

    if ledger is not None:
        ledger_info["new_subjects"] = sorted(set(partition_of) - set(placed_before))
    had = {} if ledger is None else dict(zip(ledger["subject"], ledger["partition"]))
    label_info = {"policy": label_policy,
                  "dropped": labels.dropped_by_partition(excluded, had | partition_of, set(subjects.index))}
    summary = build_summary(table, chosen, targets, fold_of, classes=classes, ratios=ratio_of, folds=folds,
                            seed=seed, balance_info=balance_info, input_info=input_info, ledger_info=ledger_info,
                            label_info=label_info)
    return Split(manifests=manifests, cv_folds=cv, ledger=new_ledger, summary=summary)


# ---------------------------------------------------------------- summary

MIN_AGES_PER_GROUP = 2  # Kruskal-Wallis needs at least two ages in each group compared
MIN_EXPECTED_COUNT = 5  # Cochran's rule: below it the chi-square approximation does not hold


def age_test(ages: Mapping[str, pd.Series]) -> dict:
    """Kruskal-Wallis test of equal age distributions across groups; 'not testable' says why."""
    from scipy import stats

    result = {"test": "Kruskal-Wallis", "p": None}
    small = [name for name, values in ages.items() if len(values) < MIN_AGES_PER_GROUP]
    if len(ages) < 2 or small:
        return result | {"note": "not testable: fewer than 2 subjects with an age in " + ", ".join(small or ages)}
    try:
        result["p"] = round(float(stats.kruskal(*[v.to_numpy(float) for v in ages.values()]).pvalue), 4)
    except ValueError:  # every age identical
        return result | {"note": "not testable: every age is the same"}
    return result


def sex_test(counts: Mapping[str, tuple[int, int]]) -> dict:
    """Fisher exact (2 groups) or chi-square (more) test of equal sex ratios; 'not testable' says why."""
    import numpy as np
    from scipy import stats

    observed = np.array([list(c) for c in counts.values()], dtype=int).reshape(-1, 2)
    test = "Fisher exact" if len(observed) == 2 else "chi-square"
    empty = [name for name, c in counts.items() if sum(c) == 0]
    if len(observed) < 2 or empty:
        return {"test": test, "p": None, "note": "not testable: no subject with a sex in " + ", ".join(empty or counts)}
    if (observed.sum(axis=0) == 0).any():
        return {"test": test, "p": None, "note": "not testable: every subject has the same sex"}
    if test == "Fisher exact":
        return {"test": test, "p": round(float(stats.fisher_exact(observed).pvalue), 4)}
    chi = stats.chi2_contingency(observed)
    if chi.expected_freq.min() < MIN_EXPECTED_COUNT:
        return {"test": test, "p": None,
                "note": f"not testable: an expected count is below {MIN_EXPECTED_COUNT} ({chi.expected_freq.min():.1f})"}
    return {"test": test, "p": round(float(chi.pvalue), 4)}


def demographics(table: pd.DataFrame, chosen: pd.DataFrame, classes: Sequence[str],
                 ratios: Mapping[str, float]) -> dict:
    """Age and sex per class and partition (each subject at its first scan), and their balance tests.

    Between partitions within a class, and between the classes within a partition, as ClinicaDL's
    split checks age (t-test) and sex (chi-square); partitions with a zero ratio are left out.
    """
    if not {"age", "sex"} <= set(table.columns):
        return {"available": False, "note": "the scans table has no age and sex columns"}
    first = first_scans(table)
    age = pd.to_numeric(first["age"], errors="coerce")
    sex = first["sex"].astype(str).str.strip().str.upper().str[:1]
    used = [p for p in PARTITIONS if ratios[p] > 0]
    cells: dict = {}
    ages: dict = {}
    sexes: dict = {}
    for group in classes:
        cells[group] = {}
        for p in PARTITIONS:
            who = chosen.index[(chosen["group"] == group) & (chosen["partition"] == p)]
            a = age.reindex(who).dropna()
            f, m = int((sex.reindex(who) == "F").sum()), int((sex.reindex(who) == "M").sum())
            ages[group, p], sexes[group, p] = a, (f, m)
            cells[group][p] = {"subjects": int(len(who)), "age_n": int(len(a)),
                               "age_mean": round(float(a.mean()), 1) if len(a) else None,
                               "age_sd": round(float(a.std(ddof=1)), 1) if len(a) > 1 else None,
                               "sex_n": f + m, "female_pct": round(100 * f / (f + m), 1) if f + m else None}
    between_partitions = {g: {"age": age_test({p: ages[g, p] for p in used}),
                              "sex": sex_test({p: sexes[g, p] for p in used})} for g in classes}
    between_classes = {p: {"age": age_test({g: ages[g, p] for g in classes}),
                           "sex": sex_test({g: sexes[g, p] for g in classes})} for p in used}
    return {"available": True, "per_class": cells, "between_partitions": between_partitions,
            "between_classes": between_classes,
            "method": "each subject at its first scan; age: Kruskal-Wallis; sex: Fisher exact for two groups, "
                      f"chi-square for more (not testable when an expected count is below {MIN_EXPECTED_COUNT})"}


def build_summary(table: pd.DataFrame, chosen: pd.DataFrame, targets: Mapping[str, Mapping[str, int]],
                  fold_of: Mapping[str, int], *, classes: Sequence[str], ratios: Mapping[str, float],
                  folds: int, seed: int, balance_info: dict, input_info: dict, ledger_info: dict,
                  label_info: dict | None = None) -> dict:
    """Per class and partition: target and actual scans, subjects, age and sex; per fold: scans and subjects
    per class; what the label policy dropped, per partition the ledger had the subject in."""
    partitions: dict = {}
    warnings: list[str] = []
    for group in classes:
        partitions[group] = {}
        for p in PARTITIONS:
            members = chosen[(chosen["group"] == group) & (chosen["partition"] == p)]
            partitions[group][p] = {"target_scans": int(targets[group][p]), "scans": int(members["n_scans"].sum()),
                                    "subjects": int(len(members))}
            if members.empty and targets[group][p] > 0:
                warnings.append(f"{group} {p} has no subjects (too few {group} subjects for the ratios)")
    fold_table: dict = {}
    for fold in range(folds):
        fold_table[str(fold)] = {}
        for group in classes:
            members = chosen[chosen.index.isin([s for s, f in fold_of.items() if f == fold])
                             & (chosen["group"] == group)]
            fold_table[str(fold)][group] = {"scans": int(members["n_scans"].sum()), "subjects": int(len(members))}
            if members.empty:
                warnings.append(f"CV fold {fold} has no {group} subject in its held-out scans")
    scan_labels = {p: {g: int(((table["subject"].map(chosen["partition"]) == p) & (table["group"] == g)).sum())
                       for g in classes} for p in PARTITIONS}
    return {
        "classes": list(classes), "positive_class": classes[0], "labels": {classes[0]: 1, classes[1]: 0},
        "ratios": dict(ratios), "folds": int(folds), "seed": int(seed),
        "scans": int(len(table)), "subjects": int(table["subject"].nunique()),
        "balance": balance_info, "partitions": partitions, "scan_labels": scan_labels, "cv_folds": fold_table,
        "demographics": demographics(table, chosen, classes, ratios),
        "label_policy": label_info or {"policy": input_info["label_policy"],
                                       "dropped": labels.dropped_by_partition(None, {}, set())},
        "ledger": ledger_info, "input": input_info, "warnings": warnings,
    }


def summary_text(summary: dict) -> str:
    """The summary as the dissertation prints it: 'AD train: target 409 scans, actual 412 scans from 120 subjects'."""
    classes, ratios = summary["classes"], summary["ratios"]
    lines = [f"Subject-level split of {summary['scans']} scans from {summary['subjects']} subjects (after class "
             f"balancing); "
             f"classes {classes[0]} (label 1) and {classes[1]} (label 0); ratios "
             f"train {ratios['train']:g} / val {ratios['val']:g} / test {ratios['test']:g}; seed {summary['seed']}"]
    bal = summary["balance"]
    if bal.get("enabled") and "smaller_class" in bal:
        small, large = bal["smaller_class"], bal["larger_class"]
        lines.append(f"Class balance: {small} {bal['scans_before'][small]} scans (all kept); {large} "
                     f"{bal['scans_before'][large]} -> {bal['scans_after'][large]} scans, "
                     f"{len(bal['subjects_left_out'])} subjects ({bal['scans_left_out']} scans) left out")
        if bal["subjects_left_out"]:
            lines.append("  left out: " + ", ".join(bal["subjects_left_out"]))
    else:
        lines.append("Class balance: off (all scans used)")
    for group in classes:
        for p in PARTITIONS:
            row = summary["partitions"][group][p]
            lines.append(f"{group} {p}: target {row['target_scans']} scans, actual {row['scans']} scans "
                         f"from {row['subjects']} subjects")
    lines += label_policy_lines(summary) + demographics_lines(summary)
    lines.append(f"Cross-validation: {summary['folds']} folds over train+val (test held out); validation sets:")
    for fold, per_class in summary["cv_folds"].items():
        lines.append(f"fold {fold}: " + ", ".join(f"{g} {v['scans']} scans from {v['subjects']} subjects"
                                                  for g, v in per_class.items()))
    led = summary["ledger"]
    if led.get("used"):
        lines.append(f"Ledger: {led['subjects_kept']} subjects kept their partition, {len(led['new_subjects'])} new "
                     f"subjects placed, {len(led['vanished_subjects'])} vanished"
                     + (f" ({', '.join(led['vanished_subjects'])})" if led["vanished_subjects"] else ""))
        if led["fold_reassigned_subjects"]:
            n_refolded = len(led["fold_reassigned_subjects"])
            lines.append(f"  folds reassigned (the fold count changed): {n_refolded} subjects")
    else:
        lines.append("Ledger: not used (first run or split.stable off); every subject dealt afresh")
    info = summary["input"]
    if info["mixed_class_subjects"]:
        lines.append("Subjects with scans of both classes (converters; each in one partition, counted above under "
                     "its first visit's label): " + ", ".join(info["mixed_class_subjects"]))
    if info["ignored_groups"]:
        ignored = ", ".join(f"{g} {n}" for g, n in info["ignored_groups"].items())
        lines.append(f"Scans of other groups ignored: {ignored}")
    lines += [f"WARNING: {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


def label_policy_lines(summary: dict) -> list[str]:
    """The label policy, the scans per label, and what the policy dropped per partition the subject had."""
    policy = summary.get("label_policy", {})
    lines = [f"Label policy: {policy.get('policy', settings.resolve('data.label_policy'))}; scans per label: "
             + "; ".join(f"{p} " + ", ".join(f"{g} {n}" for g, n in per.items())
                         for p, per in summary["scan_labels"].items())]
    dropped = policy.get("dropped", {})
    if not dropped.get("counted"):
        lines.append("Dropped by the label policy: not counted (no excluded table given)")
        return lines
    by_code = ", ".join(f"{code} {sum(c['scans'] + c['scans_of_kept_subjects'] for c in per.values())} scans"
                        for code, per in dropped["by_code"].items()) or "none"
    lines.append(f"Dropped by the label policy (reason codes: {by_code}), under the partition the ledger had:")
    lines.append("  " + "; ".join(f"{p} {c['subjects']} subjects ({c['scans']} scans)"
                                  + (f" + {c['scans_of_kept_subjects']} scans of kept subjects"
                                     if c["scans_of_kept_subjects"] else "")
                                  for p, c in dropped["by_partition"].items()))
    for p, subjects in dropped["placed_subjects_dropped"].items():
        if subjects:
            lines.append(f"  dropped from {p}: " + ", ".join(subjects))
    return lines


def _p_text(result: dict) -> str:
    return (f"p={result['p']:.3g} ({result['test']})" if result["p"] is not None
            else f"{result['note']} ({result['test']})")


def demographics_lines(summary: dict) -> list[str]:
    """Age and sex per class and partition, and the balance tests, one line each."""
    demo = summary.get("demographics", {})
    if not demo.get("available"):
        return [f"Demographics: {demo.get('note', 'not available')}"]
    lines = ["Demographics, each subject at its first scan (n, age mean +- sd, % female):"]
    for group, per in demo["per_class"].items():
        for p, c in per.items():
            age = ("age n/a" if c["age_mean"] is None else f"age {c['age_mean']:.1f}"
                   + (f" +- {c['age_sd']:.1f}" if c["age_sd"] is not None else ""))
            female = "sex n/a" if c["female_pct"] is None else f"{c['female_pct']:.1f}% female"
            lines.append(f"  {group} {p}: n {c['subjects']}, {age}, {female}")
    for group, tests in demo["between_partitions"].items():
        lines.append(f"  {group}, between partitions: age {_p_text(tests['age'])}; sex {_p_text(tests['sex'])}")
    for p, tests in demo["between_classes"].items():
        lines.append(f"  {p}, between classes: age {_p_text(tests['age'])}; sex {_p_text(tests['sex'])}")
    return lines


# ---------------------------------------------------------------- audit

def audit_split(manifests: Mapping[str, pd.DataFrame], cv_folds: pd.DataFrame) -> dict:
    """Check for leakage between partitions and folds; ``passed`` is False with the offending subjects named."""
    subject_sets = {p: set(manifests[p]["subject"]) for p in PARTITIONS}
    everyone = set().union(*subject_sets.values())
    in_two = sorted(s for s in everyone if sum(s in subject_sets[p] for p in PARTITIONS) > 1)
    n_folds = cv_folds.groupby("subject")["fold"].nunique()
    in_two_folds = sorted(n_folds.index[n_folds > 1])
    test_in_cv = sorted(subject_sets["test"] & set(cv_folds["subject"]))
    rows = pd.concat([manifests[p] for p in PARTITIONS], ignore_index=True)
    duplicated = pd.concat([rows[rows[c].duplicated(keep=False)] for c in ("image_id", "path")]
                           + [cv_folds[cv_folds[c].duplicated(keep=False)] for c in ("image_id", "path")])
    trainval = pd.concat([manifests["train"], manifests["val"]])
    mismatch = pd.concat([trainval[~trainval["image_id"].isin(cv_folds["image_id"])],
                          cv_folds[~cv_folds["image_id"].isin(trainval["image_id"])]])
    offending = sorted(set(in_two) | set(in_two_folds) | set(test_in_cv) | set(duplicated["subject"])
                       | set(mismatch["subject"]))
    return {
        "passed": not offending,
        "scans": {p: int(len(manifests[p])) for p in PARTITIONS} | {"cv": int(len(cv_folds))},
        "subjects": {p: len(subject_sets[p]) for p in PARTITIONS} | {"cv": int(cv_folds["subject"].nunique())},
        "subjects_in_two_partitions": in_two,
        "subjects_in_two_folds": in_two_folds,
        "test_subjects_in_cv_folds": test_in_cv,
        "duplicate_scans": sorted(set(duplicated["image_id"])),
        "cv_scans_not_matching_train_val": sorted(set(mismatch["image_id"])),
        "offending_subjects": offending,
    }


# ---------------------------------------------------------------- per-fold manifests (inner validation)

# Per outer CV fold k, under OUT_DIR/cv/fold<k>/: the scans it trains on, the inner validation split
# that early-stops it and picks its checkpoint, and the held-out fold k that it is reported on (only).
FOLD_ROLES = ("train", "val", "held_out")


def fold_manifest_path(out_dir: str | Path, fold: int, role: str) -> Path:
    """Where one CV fold's manifest lives, beside cv_folds.csv: OUT_DIR/cv/fold<k>/<role>.csv."""
    return Path(out_dir) / "cv" / f"fold{fold}" / f"{role}.csv"


def inner_validation_subjects(candidates: pd.DataFrame, share: float, seed: int, fold: int) -> set[str]:
    """The subjects of one fold's training folds that validate it, so selection never sees the reported fold.

    ``candidates`` has a row per scan (subject, group). Per class: ``share`` x its subjects rounded half up,
    at least one and never all, first in the order of a seeded hash of (fold, subject id); a subject added
    later therefore displaces at most one chosen subject of its class.
    """
    subjects = candidates.groupby("subject")["group"].first()
    chosen: set[str] = set()
    for group in sorted(subjects.unique()):
        members = sorted(subjects.index[subjects == group], key=lambda s: subject_rank(f"fold{fold}:{s}", seed))
        if len(members) < 2:
            raise cli.PipelineError(
                f"CV fold {fold}: the other folds hold {len(members)} {group} subject(s), but the inner validation "
                f"split needs one {group} subject and training at least one more; add subjects, or lower cv.folds")
        chosen.update(members[:min(len(members) - 1, max(1, round_half_up(share * len(members))))])
    return chosen


def cv_fold_manifests(cv_folds: pd.DataFrame, folds: int, share: float,
                      seed: int) -> tuple[dict[int, dict[str, pd.DataFrame]], dict[int, str]]:
    """Per outer fold k: train (the other folds less the inner validation subjects), val (those subjects)
    and held_out (fold k), each with MANIFEST_COLUMNS in cv_folds' row order; and, per fold that cannot
    be trained (too few subjects), the reason. Such a fold gets empty train and val manifests, so that
    the split (and the main model) still go on and only that fold's training stops."""
    if not 0 < share < 1:
        raise cli.PipelineError(f"cv.inner_val_share must lie strictly between 0 and 1, got {share}")
    fold_of_scan = cv_folds["fold"].astype(int)
    result, reasons = {}, {}
    for fold in range(int(folds)):
        held, rest = cv_folds[fold_of_scan == fold], cv_folds[fold_of_scan != fold]
        try:
            if held.empty:
                raise cli.PipelineError(f"CV fold {fold} holds no scans ({cv_folds['subject'].nunique()} train+val "
                                        f"subjects for cv.folds={folds}); lower cv.folds or add subjects")
            is_val = rest["subject"].isin(inner_validation_subjects(rest, share, seed, fold))
        except cli.PipelineError as err:
            reasons[fold], rest, is_val = str(err), rest.iloc[:0], pd.Series(dtype=bool)
        result[fold] = {role: part[list(MANIFEST_COLUMNS)].reset_index(drop=True)
                        for role, part in zip(FOLD_ROLES, (rest[~is_val], rest[is_val], held))}
    return result, reasons


def audit_fold_manifests(fold_manifests: Mapping[int, Mapping[str, pd.DataFrame]], cv_folds: pd.DataFrame,
                         reasons: Mapping[int, str] | None = None) -> dict:
    """Per fold: train, val and held_out subject-disjoint, held_out exactly fold k of cv_folds, train+val exactly
    the other folds, both classes in train and val (except in a fold ``reasons`` names as untrainable, whose
    train and val are empty); ``passed`` is False with the offending subjects named."""
    reasons = reasons or {}
    per_fold, offending = {}, set()
    fold_of_scan = cv_folds["fold"].astype(int)
    subject_of = dict(zip(cv_folds["image_id"], cv_folds["subject"]))
    for fold, parts in fold_manifests.items():
        subjects = {role: set(parts[role]["subject"]) for role in FOLD_ROLES}
        shared = sorted((subjects["train"] & subjects["val"]) | (subjects["train"] & subjects["held_out"])
                        | (subjects["val"] & subjects["held_out"]))
        held_ids, fold_ids = set(parts["held_out"]["image_id"]), set(cv_folds.loc[fold_of_scan == fold, "image_id"])
        trained = set(parts["train"]["image_id"]) | set(parts["val"]["image_id"])
        rest_ids = set() if fold in reasons else set(cv_folds.loc[fold_of_scan != fold, "image_id"])
        mismatched = sorted((held_ids ^ fold_ids) | (trained ^ rest_ids))
        missing = {role: [] if fold in reasons else sorted({0, 1} - set(parts[role]["label"].astype(int)))
                   for role in ("train", "val")}
        offending |= set(shared) | {subject_of.get(i, i) for i in mismatched}
        per_fold[str(fold)] = {
            "scans": {role: int(len(parts[role])) for role in FOLD_ROLES},
            "subjects": {role: len(subjects[role]) for role in FOLD_ROLES},
            "subjects_in_two_roles": shared, "scans_not_matching_cv_folds": mismatched,
            "held_out_is_fold": held_ids == fold_ids, "labels_missing": missing,
            "untrainable": reasons.get(fold),
        }
    passed = not offending and all(not m for f in per_fold.values() for m in f["labels_missing"].values())
    return {"passed": passed, "folds": per_fold, "offending_subjects": sorted(offending)}


def with_fold_audit(audit: dict, fold_audit: dict) -> dict:
    """The split's audit with the per-fold manifests' one folded in (``passed`` only if both passed)."""
    offending = sorted(set(audit["offending_subjects"]) | set(fold_audit["offending_subjects"]))
    return audit | {"passed": audit["passed"] and fold_audit["passed"], "cv_fold_manifests": fold_audit,
                    "offending_subjects": offending}


def write_fold_manifests(fold_manifests: Mapping[int, Mapping[str, pd.DataFrame]], out_dir: str | Path) -> None:
    """OUT_DIR/cv/fold<k>/train.csv, val.csv and held_out.csv for every fold."""
    for fold, parts in fold_manifests.items():
        for role in FOLD_ROLES:
            write_text_atomic(parts[role].to_csv(index=False), fold_manifest_path(out_dir, fold, role))


# ---------------------------------------------------------------- files and command line

def write_split(split: Split, out_dir: str | Path) -> None:
    """Write the manifests, CV folds and summaries (the ledger is written separately, last)."""
    out = Path(out_dir)
    for p in PARTITIONS:
        write_text_atomic(split.manifests[p].to_csv(index=False), out / f"{p}.csv")
    write_text_atomic(split.cv_folds.to_csv(index=False), out / "cv_folds.csv")
    write_text_atomic(json.dumps(split.summary, indent=2) + "\n", out / "summary.json")
    write_text_atomic(summary_text(split.summary), out / "summary.txt")


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--scans", required=True, help="scans.tsv from the ingest step")
    p.add_argument("--path-pattern", required=True,
                   help="each scan's image path, formatted with the scans table's columns, e.g. "
                        "results/ras/{subject}/{image_id}.nii.gz")
    settings.add_argument(p, *SETTING_SECTIONS)
    p.add_argument("--ledger", help=f"the persistent subject ledger (default OUT_DIR/{LEDGER_NAME})")
    p.add_argument("--excluded", help="ingest's excluded.tsv: the summary counts the subjects the label policy dropped")
    p.add_argument("--out-dir", required=True, help="the manifests, CV folds (with each fold's cv/fold<k>/"
                   "{train,val,held_out}.csv), summaries, audit and ledger")
    args = p.parse_args(argv)
    split_settings, cv, classes, label_policy = settings.read_job(args.settings, *SETTING_SECTIONS)
    options = split_options(split_settings, cv, classes, label_policy)

    out = Path(args.out_dir)
    ledger_path = Path(args.ledger) if args.ledger else out / LEDGER_NAME
    ledger = read_ledger(ledger_path) if split_settings.stable else None
    split = make_split(read_scans(args.scans), path_of=args.path_pattern, ledger=ledger,
                       excluded=labels.read_excluded(args.excluded) if args.excluded else None, **options)
    audit = audit_split(split.manifests, split.cv_folds)
    per_fold, untrainable = cv_fold_manifests(split.cv_folds, cv.folds, cv.inner_val_share, split_settings.seed)
    audit = with_fold_audit(audit, audit_fold_manifests(per_fold, split.cv_folds, untrainable))
    split.summary["warnings"] += [f"{reason}; its cv/fold{fold}/train.csv and val.csv are empty, so that fold's "
                                  f"training stops" for fold, reason in untrainable.items()]
    write_text_atomic(json.dumps(audit, indent=2) + "\n", out / "audit.json")
    if not audit["passed"]:
        raise cli.PipelineError(
            f"leakage audit failed for subject(s) {', '.join(audit['offending_subjects'])} (details in "
            f"{out / 'audit.json'}); look in {args.scans} for a scan listed twice or under two subjects")
    write_split(split, out)
    write_fold_manifests(per_fold, out)
    write_text_atomic(ledger_text(split.ledger), ledger_path)
    LOG.info("split %d scans: %s", split.summary["scans"],
             ", ".join(f"{p} {len(split.manifests[p])}" for p in PARTITIONS))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
