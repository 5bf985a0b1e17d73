"""Beta posteriors of sensitivity and specificity, PPV and NPV at chosen prevalences, and the
clinician comparison: against hand-computed values, exact integrals and the workflow's outputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from workflow_scripts.evaluation import bayes
from workflow_scripts.common import cli, settings
from workflow_scripts.evaluation.evaluate import evaluate_predictions

PREVALENCES = [{"name": "balanced", "value": 0.5, "source": "test set"},
               {"name": "memory clinic", "value": 0.46, "source": "clinic"},
               {"name": "screening", "value": 0.045, "source": "population"}]
COUNTS = {"tp": 40, "fn": 10, "tn": 45, "fp": 5}
BAYES = settings.resolve("bayes")  # the schema's bayes settings (defaults)
EVALUATE = settings.resolve("evaluate")


def posterior(**given) -> dict:
    """The prior and Monte Carlo keywords: those ``given`` here, the schema's defaults for the rest."""
    return {key: given.get(key, BAYES[key])
            for key in ("prior_sensitivity", "prior_specificity", "credible", "n_draws", "seed")}


def metrics_json(counts: dict, subject_counts: dict | None = None) -> dict:
    """The part of an evaluate metrics.json that the Bayes step reads."""
    return {"scan": dict(counts), "subject": dict(subject_counts or counts), "threshold": 0.5}


def exact_ppv_cdf(t: float, counts: dict, prevalence: float, prior=(1, 1)) -> float:
    """P(PPV <= t) by one-dimensional integration: PPV <= t exactly when 1 - Sp >= c * Se with
    c = p (1 - t) / (t (1 - p)), and Se, Sp are independent Betas."""
    se = stats.beta(prior[0] + counts["tp"], prior[1] + counts["fn"])
    sp = stats.beta(prior[0] + counts["tn"], prior[1] + counts["fp"])
    c = prevalence * (1 - t) / (t * (1 - prevalence))
    value, _ = integrate.quad(lambda s: se.pdf(s) * sp.cdf(1 - c * s), 0, 1, limit=200)
    return value


def test_conjugate_update_gives_the_textbook_beta():
    post = bayes.beta_posterior(40, 10, (1, 1))
    assert post.args == (41, 11)
    assert post.mean() == pytest.approx(41 / 52)
    block = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=20_000))
    assert block["sensitivity"]["posterior"] == [41.0, 11.0]
    assert block["specificity"]["posterior"] == [46.0, 6.0]
    low, high = stats.beta(41, 11).ppf([0.025, 0.975])
    assert block["sensitivity"]["low"] == pytest.approx(low) and block["sensitivity"]["high"] == pytest.approx(high)
    assert block["sensitivity"]["observed"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="positive"):
        bayes.beta_posterior(1, 1, (0, 1))


def test_predictive_values_follow_bayes_rule_by_hand():
    ppv, npv = bayes.predictive_values(0.9, 0.8, 0.1)
    assert float(ppv) == pytest.approx(0.09 / (0.09 + 0.18))  # 1/3: two false alarms per true case
    assert float(npv) == pytest.approx(0.72 / (0.72 + 0.01))
    ppv, npv = bayes.predictive_values(0.9, 0.8, 0.5)
    assert float(ppv) == pytest.approx(0.45 / (0.45 + 0.1)) and float(npv) == pytest.approx(0.4 / 0.45)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        bayes.predictive_values(0.9, 0.8, 1.0)


def test_monte_carlo_ppv_interval_matches_the_exact_posterior():
    block = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=200_000, seed=3))
    for entry in block["prevalences"]:
        ppv = entry["ppv"]
        assert exact_ppv_cdf(ppv["low"], COUNTS, entry["value"]) == pytest.approx(0.025, abs=0.003)
        assert exact_ppv_cdf(ppv["median"], COUNTS, entry["value"]) == pytest.approx(0.5, abs=0.005)
        assert exact_ppv_cdf(ppv["high"], COUNTS, entry["value"]) == pytest.approx(0.975, abs=0.003)


def test_ppv_falls_and_npv_rises_as_ad_becomes_rare():
    block = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=50_000))
    by_name = {e["name"]: e for e in block["prevalences"]}
    assert by_name["balanced"]["ppv"]["median"] > by_name["memory clinic"]["ppv"]["median"] > \
        by_name["screening"]["ppv"]["median"]
    assert by_name["balanced"]["npv"]["median"] < by_name["memory clinic"]["npv"]["median"] < \
        by_name["screening"]["npv"]["median"]
    # 80% sensitive, 90% specific: at 4.5% prevalence most positive calls are false alarms
    assert by_name["screening"]["ppv"]["median"] < 0.5 < by_name["balanced"]["ppv"]["median"]
    for entry in block["prevalences"]:
        for key in ("ppv", "npv"):
            assert entry[key]["low"] < entry[key]["median"] < entry[key]["high"]
        assert entry["source"]


def test_intervals_narrow_with_more_cases_and_the_prior_pulls_small_samples():
    small = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=50_000))
    large = bayes.analyse_level({k: 10 * v for k, v in COUNTS.items()}, PREVALENCES, **posterior(n_draws=50_000))
    width = {name: b["sensitivity"]["high"] - b["sensitivity"]["low"] for name, b in (("s", small), ("l", large))}
    assert width["l"] == pytest.approx(width["s"] / np.sqrt(10), rel=0.15)
    ppv_width = [b["prevalences"][2]["ppv"]["high"] - b["prevalences"][2]["ppv"]["low"] for b in (small, large)]
    assert ppv_width[1] < 0.5 * ppv_width[0]
    few = {"tp": 3, "fn": 0, "tn": 3, "fp": 0}
    flat = bayes.analyse_level(few, PREVALENCES, **posterior(n_draws=20_000))
    sceptical = bayes.analyse_level(few, PREVALENCES, **posterior(prior_sensitivity=(10, 10),
                                                                  prior_specificity=(10, 10), n_draws=20_000))
    assert sceptical["sensitivity"]["median"] < flat["sensitivity"]["median"]
    assert sceptical["sensitivity"]["median"] == pytest.approx(stats.beta(13, 10).median())


def test_draws_are_reproducible_by_seed():
    one = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=20_000, seed=5))
    assert one == bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=20_000, seed=5))
    other = bayes.analyse_level(COUNTS, PREVALENCES, **posterior(n_draws=20_000, seed=6))
    assert other["prevalences"][2]["ppv"] != one["prevalences"][2]["ppv"]
    assert other["prevalences"][2]["ppv"]["median"] == pytest.approx(one["prevalences"][2]["ppv"]["median"], abs=0.01)


def test_a_test_set_without_ad_cases_leaves_the_prior_and_says_so():
    block = bayes.analyse_level({"tp": 0, "fn": 0, "tn": 4, "fp": 1}, PREVALENCES, **posterior(n_draws=20_000))
    assert block["sensitivity"]["posterior"] == [1.0, 1.0]
    assert block["sensitivity"]["median"] == pytest.approx(0.5)
    assert block["sensitivity"]["observed"] is None
    assert any("no AD cases" in w for w in block["warnings"])


def test_missing_counts_and_bad_prevalences_are_named():
    with pytest.raises(cli.PipelineError, match="m.json: no 'subject' block"):
        bayes.confusion_counts({"scan": COUNTS}, "subject", "m.json")
    with pytest.raises(cli.PipelineError, match=r"bayes\.prevalences\.0\.value = 46: 46 is greater than or equal to"):
        settings.read_job('{"bayes": {"prevalences": [{"name": "clinic", "value": 46}]}}', "bayes")
    bayes_settings, = settings.read_job('{"bayes": {"prevalences": [{"name": "a = b", "value": 0.2}]}}', "bayes")
    assert bayes_settings.prevalences[0].plain() == {"name": "a = b", "value": 0.2, "source": ""}


def test_both_levels_are_analysed_with_the_figure_level_first():
    scan = {"tp": 8, "fn": 2, "tn": 9, "fp": 1}
    subject = {"tp": 4, "fn": 1, "tn": 5, "fp": 0}
    result = bayes.analyse(metrics_json(scan, subject), PREVALENCES, "exp", figure_level="subject",
                           **posterior(n_draws=10_000))
    assert list(result["levels"]) == ["subject", "scan"]
    assert result["levels"]["scan"]["counts"] == scan and result["levels"]["subject"]["counts"] == subject
    assert list(bayes.analyse(metrics_json(scan, subject), PREVALENCES, "exp", figure_level="scan",
                            **posterior(n_draws=10_000))["levels"]) \
        == ["scan", "subject"]
    json.dumps(result)  # JSON-ready: no numpy types


def test_command_line_writes_json_tables_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(40):
        label = s % 2
        for k in range(2):
            prob = float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2), 0, 1))
            rows.append({"image_id": f"I{s}{k}", "subject": f"S{s:03d}", "label": label, "prob": prob,
                         "pred": int(prob >= 0.5)})
    metrics = evaluate_predictions(pd.DataFrame(rows), n_boot=200, seed=EVALUATE.seed, alpha=EVALUATE.alpha,
                                   threshold=EVALUATE.threshold)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = {k: tmp_path / name for k, name in (("json", "posterior.json"), ("markdown", "t.md"), ("html", "t.html"),
                                               ("figure", "f.png"))}
    bayes.main(["posterior", "--metrics", str(tmp_path / "metrics.json"), "--experiment", "demo",
                "--settings", json.dumps({"bayes": {"n_draws": 20000, "prevalences": [
                    {"name": "memory clinic", "value": 0.46, "source": "a clinic"},
                    {"name": "screening", "value": 0.045, "source": "a population"}]}})]
               + [a for k, path in out.items() for a in (f"--{k}", str(path))])
    result = json.loads(out["json"].read_text())
    subject = metrics["subject"]
    assert result["levels"]["subject"]["counts"] == {k: subject[k] for k in ("tp", "fn", "tn", "fp")}
    assert [e["name"] for e in result["levels"]["scan"]["prevalences"]] == ["memory clinic", "screening"]
    page = out["html"].read_text()
    assert "memory clinic" in page and "a population" in page and "Beta(1, 1)" in page
    assert "| screening | 4.5% |" in out["markdown"].read_text()
    assert out["figure"].stat().st_size > 20_000


# --- the literature and the clinician comparison ------------------------------------------------

def test_the_shipped_literature_table_cites_every_figure_it_gives():
    table = bayes.read_literature()
    assert len(table) >= 5
    assert table["citation"].str.len().min() > 40
    with_figures = table[(table["sensitivity"] != "") | (table["specificity"] != "") | (table["auc"] != "")]
    assert len(with_figures) >= 4
    assert (with_figures["quantity"].str.len() > 10).all()  # the exact quantity is stated
    without = table[(table["sensitivity"] == "") & (table["specificity"] == "") & (table["auc"] == "")]
    assert (without["note"].str.len() > 10).all()  # and a row without figures says why
    meta = table[table["study"].str.contains("meta-analysis")].iloc[0]
    assert (float(meta["sensitivity"]), float(meta["specificity"])) == (0.74, 0.88)


def test_a_literature_figure_out_of_range_is_named(tmp_path):
    table = bayes.read_literature()
    table.loc[0, "sensitivity"] = "81"  # a percentage where a share belongs
    path = tmp_path / "lit.tsv"
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(cli.PipelineError, match="sensitivity must be a share.*Scheltens"):
        bayes.read_literature(path)


def test_clinician_table_marks_literature_rows_and_computes_their_predictive_values():
    result = bayes.analyse(metrics_json(COUNTS), PREVALENCES, "r3d", figure_level=BAYES.level,
                           **posterior(n_draws=10_000))
    metrics = metrics_json(COUNTS)
    metrics["subject"].update({"auc": 0.9, "ci": {"auc": [0.8, 0.97]}})
    literature = bayes.read_literature()
    table = bayes.clinician_rows([result], [metrics], literature, "subject")
    assert len(table) == 1 + len(literature)
    assert table.iloc[0]["figures"].startswith("measured here") and "0.900 [0.800, 0.970]" in table.iloc[0]["AUC"]
    assert (table.iloc[1:]["figures"] == bayes.LITERATURE_LABEL).all()
    meta = table[table["what"].str.contains("meta-analysis")].iloc[0]
    ppv, _ = bayes.predictive_values(0.74, 0.88, 0.045)
    assert meta["PPV at 4.5%"] == f"{100 * float(ppv):.1f}% (computed here)"
    assert table[table["what"].str.startswith("Scheltens")].iloc[0]["sensitivity"] == "not reported"
    page = bayes.clinician_html(table, "subject", 0.95)
    assert "literature figures, not measured here" in page and "10.1007/s00330-021-08227-8" in page


# --- the workflow's outputs -----------------------------------------------------------------------

@pytest.mark.workflow
def test_workflow_writes_posteriors_for_every_experiment_and_the_comparison(demo_run):
    results = demo_run / "results"
    experiments = pd.read_csv(results / "comparison.csv")["experiment"].tolist()
    for name in experiments:
        posterior = json.loads((results / "bayes" / name / "posterior.json").read_text())
        metrics = json.loads((results / "evaluation" / name / "metrics.json").read_text())
        for level in ("subject", "scan"):
            assert posterior["levels"][level]["counts"] == {k: metrics[level][k] for k in ("tp", "fn", "tn", "fp")}
        assert [e["value"] for e in posterior["levels"]["subject"]["prevalences"]] == [0.5, 0.46, 0.045]
        assert (results / "bayes" / name / "ppv_npv.png").stat().st_size > 20_000
    clinicians = pd.read_csv(results / "clinicians.csv")
    assert clinicians["what"].tolist()[:len(experiments)] == [f"model {n}" for n in experiments]
    assert (clinicians["figures"].iloc[len(experiments):] == bayes.LITERATURE_LABEL).all()
    assert "not measured here" in (results / "clinicians.html").read_text()
