"""The report's own items (dataset, split, metrics, CV, comparison pages, training curves, provenance)
on small tables, and the one HTML report of the shared demo run opened in headless Chromium."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from conftest import chromium, run_snakemake
from workflow_scripts.common import cli
from workflow_scripts.common.settings import resolve
from workflow_scripts.report import report_tables
from workflow_scripts.evaluation.evaluate import evaluate_predictions

# The categories a reader browses, in the report's menu.
CATEGORIES = ("Dataset", "Preprocessing QC", "Split", "Training", "Evaluation", "Cross-validation", "Comparison",
              "Clinical context", "Provenance")


def scans_table() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["I1", "I2", "I3", "I4"], "subject": ["S1", "S1", "S2", "S3"],
                         "group": ["AD", "AD", "CN", "CN"], "sex": ["F", "F", "M", "F"],
                         "age": ["70", "71", "80", "75"],
                         "visit": ["sc", "m12", "sc", "sc"], "phase": ["ADNI1"] * 4,
                         "manufacturer": ["SIEMENS", "SIEMENS", "GE MEDICAL SYSTEMS", ""],
                         "dicom_dir": ["/data/adni/secret/path"] * 4})


def test_dataset_page_counts_groups_and_reasons_and_escapes_text():
    excluded = pd.DataFrame({"image_id": ["I9", "I8", "I7"], "subject": ["S9", "S8", "S8"],
                             "group": ["MCI", "CN", "CN"],
                             "reason_code": ["group_not_in_classes", "not_t1_mprage", "not_t1_mprage"],
                             "reason": ["group 'MCI' is not one of the classes", "<b>Localizer</b>", "Survey"]})
    summary = report_tables.dataset_summary(scans_table()).set_index("group")
    assert summary.loc["AD", "scans"] == 2 and summary.loc["AD", "subjects"] == 1
    assert summary.loc["all", "sex (F/M)"] == "3/1"
    assert summary.loc["CN", "age, mean ± SD [range]"] == "77.5 ± 3.5 [75-80]"
    reasons = report_tables.exclusion_summary(excluded).set_index("reason_code")
    assert reasons.loc["not_t1_mprage", "scans"] == 2
    dropped = pd.DataFrame({"image_id": ["I6"], "subject": ["S6"], "group": ["AD"], "visit": ["sc"],
                            "stage": ["stripped"], "reason_code": ["implausible_brain_mask"],
                            "reason": ["the brain mask is 12 mL"]})
    page = report_tables.dataset_html(scans_table(), excluded, dropped)
    assert "4 usable T1 MPRAGE scans of 3 subjects. 3 scans were left out by ingest and 1 dropped after it" in page
    assert "implausible_brain_mask" in page and "the brain mask is 12 mL" in page
    assert "&lt;b&gt;Localizer&lt;/b&gt;" in page and "<b>Localizer" not in page
    assert "/data/adni/secret" not in page  # local paths stay out of the report
    with pytest.raises(cli.PipelineError, match="lacks column"):
        report_tables.dataset_html(scans_table().drop(columns="group"), excluded, dropped)


def test_metrics_page_shows_both_levels_with_intervals():
    rng = np.random.default_rng(1)
    rows = [{"image_id": f"I{i}", "subject": f"S{i // 2}", "label": (i // 2) % 2,
             "prob": float(np.clip(rng.normal(0.3 + 0.4 * ((i // 2) % 2), 0.2), 0, 1)), "pred": 0} for i in range(40)]
    evaluate = resolve("evaluate")
    metrics = evaluate_predictions(pd.DataFrame(rows), n_boot=200, seed=evaluate.seed, alpha=evaluate.alpha,
                                   threshold=evaluate.threshold)
    table = report_tables.metrics_table(metrics).set_index("metric")
    auc, (low, high) = metrics["subject"]["auc"], metrics["subject"]["ci"]["auc"]
    assert table.loc["AUC", "subject level [95% CI]"] == f"{auc:.3f} [{low:.3f}, {high:.3f}]"
    assert table.loc["cases", "scan level [95% CI]"] == "40" and table.loc["cases", "subject level [95% CI]"] == "20"
    page = report_tables.metrics_html(metrics, "r3d")
    assert "Test metrics: r3d" in page and "20 subjects" in page and "200 resamples" in page


def test_split_page():
    split = {"scans": 6, "subjects": 6, "seed": 42, "ratios": {"train": 0.8, "val": 0.1, "test": 0.1},
             "partitions": {"AD": {"test": {"target_scans": 1, "scans": 1, "subjects": 1}}},
             "cv_folds": {"0": {"AD": {"scans": 2, "subjects": 2}}}}
    page = report_tables.split_html(split, {"passed": True, "subjects_in_two_partitions": []})
    assert "Leakage audit passed" in page and "train 0.8 / val 0.1 / test 0.1" in page
    leaky = report_tables.split_html(split, {"passed": False, "subjects_in_two_partitions": ["S1"]})
    assert "LEAKAGE AUDIT FAILED" in leaky and "S1" in leaky


def test_markdown_table_escapes_pipes():
    text = report_tables.markdown_table(pd.DataFrame({"a": ["x|y", None], "b": [1.5, float("nan")]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1.5 |", "| - | - |"]


def test_training_curves_need_epoch_rows(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + 0.1 * e,
                "val_accuracy": 0.5, "train_auc": None, "val_auc": 0.6} for e in (1, 2, 3)]
    (tmp_path / "h.json").write_text(json.dumps(history))
    runs = [("main", report_tables.read_history(tmp_path / "h.json")),
            ("fold 0", report_tables.read_history(tmp_path / "h.json"))]
    out = report_tables.plot_training_curves(runs, tmp_path / "curves.png", "title")
    assert out.stat().st_size > 20_000
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(cli.PipelineError, match="empty.json holds no epoch rows"):
        report_tables.read_history(tmp_path / "empty.json")


def test_provenance_records_code_scans_splits_seeds_and_config(tmp_path):
    scans = scans_table()
    scans.to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    (tmp_path / "train.csv").write_text("path,subject\n")
    (tmp_path / "summary.json").write_text(json.dumps({"code_version": "abc123", "seed": 42, "epochs_run": 3}))
    config = {"split": {"seed": 42}, "train": {"seed": 7}, "bayes": {"seed": 0}}
    record = report_tables.provenance(config, tmp_path / "scans.tsv", [tmp_path / "train.csv"],
                                      [("r3d", tmp_path / "summary.json")], "v1.0-3-gdeadbee")
    assert record["code_version"] == "v1.0-3-gdeadbee" and record["config"] == config
    assert record["seeds"]["train.seed"] == 7 and record["models"]["r3d"]["code_version"] == "abc123"
    assert record["scans"]["n_scans"] == 4 and record["packages"]["numpy"] == np.__version__
    assert record["scans"]["scan_list_sha256"] == report_tables.scan_list_hash(scans.iloc[::-1])  # order-free
    assert record["scans"]["scan_list_sha256"] != report_tables.scan_list_hash(scans.iloc[1:])
    page = report_tables.provenance_html(record)
    assert "v1.0-3-gdeadbee" in page and record["splits"]["train.csv"] in page and "train:" in page


# --- the workflow's report -------------------------------------------------------------------------

@pytest.mark.workflow
def test_workflow_builds_every_report_item(demo_run):
    results = demo_run / "results"
    experiments = pd.read_csv(results / "comparison.csv")["experiment"].tolist()
    for page in ("dataset.html", "split.html", "comparison.html", "provenance.html"):
        assert (results / "report" / page).stat().st_size > 1_000, page
    for name in experiments:
        metrics = json.loads((results / "evaluation" / name / "metrics.json").read_text())
        page = (results / "report" / name / "test_metrics.html").read_text()
        assert _value_ci(metrics["subject"], "accuracy") in page
        assert (results / "report" / name / "cv.html").is_file()
    provenance = json.loads((results / "report" / "provenance.json").read_text())
    assert provenance["scans"]["n_scans"] == len(pd.read_csv(results / "usable.tsv", sep="\t"))
    assert set(provenance["models"]) == set(experiments)
    assert (results / "report" / experiments[0] / "training_curves.png").stat().st_size > 20_000


def _value_ci(block: dict, name: str) -> str:
    low, high = block["ci"][name]
    return f"{block[name]:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")


@pytest.fixture(scope="module")
def report_file(demo_run, tmp_path_factory):
    """`snakemake --report` on the shared demo run, with the run's own config file."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    run_snakemake(demo_run, "--report", str(out), configfiles=[demo_run / "tiny.yaml"], timeout=600)
    return out


@pytest.mark.workflow
def test_report_is_one_self_contained_file(report_file):
    text = report_file.read_text(encoding="utf-8")
    assert report_file.stat().st_size > 500_000  # figures embedded as data URIs
    assert 'src="http' not in text and "src='http" not in text  # nothing fetched from the network


@pytest.mark.workflow
def test_report_opens_in_headless_chromium_with_metrics_table_and_figures(report_file, demo_run):
    """Click through the report like a reader: no console errors, every category in the menu, the
    main model's metrics table rendered with the run's own numbers, a figure shown, a real screenshot."""
    from PIL import Image
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the report's browser test drives Chromium with Playwright: pip install playwright (it uses "
                    "the system chromium, no browser download)")

    main = pd.read_csv(demo_run / "results" / "comparison.csv")["experiment"].iloc[0]
    metrics = json.loads((demo_run / "results" / "evaluation" / main / "metrics.json").read_text())
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(report_file.as_uri())
            page.get_by_role("link", name="Evaluation", exact=True).wait_for(timeout=30_000)
            for category in CATEGORIES:
                assert page.get_by_role("link", name=category, exact=True).count() == 1, category

            # the metrics table, in its iframe: its cells hold the run's numbers
            page.get_by_role("link", name="Evaluation", exact=True).click()
            row = page.locator("tr", has_text=main).filter(has_text="test metrics table")
            row.locator("a").first.click()
            frame = page.locator("iframe").element_handle(timeout=30_000).content_frame()
            frame.wait_for_selector("table")
            text = frame.inner_text("body")
            assert f"Test metrics: {main}" in text and "sensitivity (recall)" in text
            assert _value_ci(metrics["subject"], "accuracy") in text
            assert frame.locator("td").count() >= 30

            # a figure: the PPV/NPV curves of the main model
            page.get_by_role("link", name="Results", exact=True).click()
            page.get_by_role("link", name="Clinical context", exact=True).click()
            page.get_by_role("link", name="PPV and NPV by setting", exact=True).click()
            page.locator("tr", has_text=main).locator("a").first.click()
            image = page.locator("img[src^='data:image/png']")
            image.wait_for(timeout=30_000)
            width, height, complete = image.evaluate("e => [e.naturalWidth, e.naturalHeight, e.complete]")
            assert complete and width >= 800 and height >= 300

            shot = Image.open(io.BytesIO(page.screenshot()))
        finally:
            browser.close()
    assert shot.size == (1400, 900)
    pixels = np.asarray(shot.convert("L"), dtype=float)
    assert pixels.std() > 20  # not a blank page: the menu and the figure are drawn
    assert errors == []
