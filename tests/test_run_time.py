"""The whole-run timing benchmark (benchmarks/run_time.py): it reads Snakemake's own log, sums jobs by the
rule file that defines them, and a family's wall time counts overlapping jobs once."""
from __future__ import annotations

import pytest

from conftest import load_benchmark, run_snakemake


bench = load_benchmark("run_time")

# Lines as Snakemake 9 writes them to .snakemake/log/*.snakemake.log (two nifti jobs side by side, one
# stripped job after them, a checkpoint, and a job that never finished).
LOG = """\
[Mon Dec  7 15:53:06 2026]
localcheckpoint ingest:
    input: demo_data/collection.csv
    jobid: 1
[Mon Dec  7 15:53:11 2026]
Finished jobid: 1 (Rule: ingest)
[Mon Dec  7 15:53:11 2026]
localrule nifti:
    jobid: 85
[Mon Dec  7 15:53:12 2026]
localrule nifti:
    jobid: 121
[Mon Dec  7 15:53:13 2026]
Finished jobid: 85 (Rule: nifti)
[Mon Dec  7 15:53:15 2026]
Finished jobid: 121 (Rule: nifti)
[Mon Dec  7 15:53:20 2026]
localrule stripped:
    jobid: 86
[Mon Dec  7 15:53:30 2026]
Finished jobid: 86 (Rule: stripped)
[Mon Dec  7 15:53:30 2026]
localrule train_model:
    jobid: 7
"""


def test_jobs_are_timed_from_start_to_finished_line_and_unfinished_jobs_are_left_out():
    jobs = bench.job_times(LOG.splitlines())
    assert list(jobs["rule"]) == ["ingest", "nifti", "nifti", "stripped"]
    assert list(jobs["seconds"]) == [5.0, 2.0, 3.0, 10.0]
    rules = bench.rule_table(jobs).set_index("rule")
    assert rules.loc["nifti", "jobs"] == 2 and rules.loc["nifti", "job_seconds"] == 5.0
    assert rules.loc["nifti", "longest_job_s"] == 3.0


def test_a_family_sums_its_jobs_and_counts_overlapping_jobs_once_in_its_wall_time():
    jobs = bench.job_times(LOG.splitlines())
    families = bench.family_table(jobs, bench.rule_families()).set_index("family")
    assert list(families.index) == ["data", "preprocess"]  # in the order the families started
    # nifti 15:53:11-13 and 15:53:12-15 overlap (4 s busy, 5 job-s); stripped 15:53:20-30 adds 10 s
    assert families.loc["preprocess", "job_seconds"] == 15.0
    assert families.loc["preprocess", "wall_seconds"] == 14.0
    assert families.loc["data", "wall_seconds"] == 5.0


def test_a_rule_outside_the_workflow_files_is_refused():
    jobs = bench.job_times(LOG.splitlines())
    families = {"ingest": "data", "nifti": "preprocess"}  # no family for stripped
    with pytest.raises(SystemExit, match="stripped"):
        bench.family_table(jobs, families)


def test_every_rule_of_the_workflow_has_a_family(tmp_path):
    """Rules defined inside `if` blocks and `use rule ... as` twins included."""
    listed = run_snakemake(tmp_path, "--list-rules").stdout.split()
    families = bench.rule_families()
    assert {"stripped", "train_fold", "evaluate_fold", "ingest", "all"} <= set(listed)
    assert set(listed) <= set(families), sorted(set(listed) - set(families))
    assert families["train_fold"] == "train" and families["ingest"] == "data" and families["all"] == "all"
    assert families["predict_stripped"] == "predict"


RESUMED = """\
[Mon Dec  7 19:09:33 2026]
localrule train_model:
    jobid: 7
[Mon Dec  7 19:10:03 2026]
Finished jobid: 7 (Rule: train_model)
"""


def test_an_interrupted_run_is_timed_from_all_its_logs_without_the_gap_between_them():
    """The first log's train_model never finished (killed); its re-run in the resumed log is the one counted."""
    logs_jobs = [bench.job_times(LOG.splitlines()), bench.job_times(RESUMED.splitlines())]
    # 15:53:06-15:53:30 (24 s) + 19:09:33-19:10:03 (30 s); not the 3 h 17 min from first start to last end
    assert bench.logs_wall_seconds(logs_jobs) == 54.0
    assert list(logs_jobs[1]["rule"]) == ["train_model"]
