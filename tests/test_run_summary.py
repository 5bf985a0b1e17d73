"""The run summary: reason counts, intervals only where estimable, classes in label order."""
from __future__ import annotations

import json

import pandas as pd

from workflow_scripts.report.run_summary import summary_text


def block(accuracy: float, ci: list[float]) -> dict:
    return {"accuracy": accuracy, "balanced_accuracy": accuracy, "auc": None, "ci": {"accuracy": ci,
                                                                                     "balanced_accuracy": ci}}


def test_summary_counts_reasons_and_prints_intervals_only_where_estimable(tmp_path):
    columns = ["image_id", "subject", "reason_code", "reason"]
    pd.DataFrame([["I1", "S1"], ["I2", "S2"], ["I3", "S3"]], columns=["image_id", "subject"]).to_csv(
        tmp_path / "usable.tsv", sep="\t", index=False)
    pd.DataFrame([["I4", "S4", "truncated_pixel_data", "x"], ["I5", "S5", "truncated_pixel_data", "y"],
                  ["I6", "S6", "partial_series", "z"]], columns=columns).to_csv(tmp_path / "excluded.tsv", sep="\t",
                                                                                 index=False)
    pd.DataFrame(columns=columns).to_csv(tmp_path / "dropped.tsv", sep="\t", index=False)
    big = {"n_subjects": 12, "n_scans": 20, "subjects_per_label": {"0": 7, "1": 5}, "intervals_estimable": True,
           "subject": block(0.75, [0.5, 0.9]), "scan": block(0.7, [0.55, 0.85])}
    small = {**big, "n_subjects": 3, "n_scans": 3, "subjects_per_label": {"0": 2, "1": 1},
             "intervals_estimable": False, "subject": block(1.0, [1.0, 1.0])}
    (tmp_path / "big.json").write_text(json.dumps(big))
    (tmp_path / "small.json").write_text(json.dumps(small))
    text = summary_text(tmp_path, {"main": tmp_path / "big.json", "tiny": tmp_path / "small.json"}, ["AD", "CN"])
    assert "- used: 3\n" in text and "- dropped after ingest: 0," in text
    assert "- left out by ingest: 3 (truncated_pixel_data 2, partial_series 1)" in text
    assert "- **main**: 12 test subjects (7 CN, 5 AD), 20 scans\n" in text
    assert "subject level: accuracy 0.750 (95% CI 0.500-0.900), balanced accuracy 0.750 (95% CI 0.500-0.900), " \
           "AUC undefined" in text
    assert "- **tiny**: 3 test subjects (2 CN, 1 AD), 3 scans; fewer than 5 test subjects in a class" in text
    assert "accuracy 1.000 (interval not estimable)" in text and "1.000-1.000" not in text
    assert text.rstrip().splitlines()[-1] == ("scans: 3 used, 0 dropped after ingest (reasons in "
                                              f"{tmp_path / 'dropped.tsv'}), 3 left out by ingest (reasons in "
                                              f"{tmp_path / 'excluded.tsv'})")
