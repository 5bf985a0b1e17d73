"""Bayes: the test confusion matrix -> what a positive or negative result means where the test is used.

The test set is balanced (about half AD), so its accuracy says little about a memory clinic or a
screening programme, where AD is more or less common. From the test counts this module gives Beta
posteriors of sensitivity and specificity (a Beta prior, uniform by default, updated with TP/FN and
TN/FP) and, by Monte Carlo over those two posteriors (seeded), the posterior of the positive and
negative predictive values (PPV, NPV) at configured prevalences, with equal-tailed credible
intervals. Sensitivity and specificity come from different people, so their posteriors are
independent; each prevalence is taken as known.

Which confusion matrix: ``subject`` (one vote per person, each subject's scan probabilities
averaged, as ``evaluate`` does) is the default, because the Beta-binomial model assumes independent
cases and scans of one person are not; ``scan`` treats every scan as a case and so gives intervals
that are too narrow when subjects have several scans. Both levels are written; the figure and the
clinician comparison use the configured one.

The clinician comparison places each model's posterior next to published performance of visual
rating of medial temporal lobe atrophy (MTA, Scheltens scale) from a literature table shipped with
the workflow: those are literature figures, not measured here.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from workflow_scripts.common import cli, settings
from workflow_scripts.evaluation.compare import read_metrics
from workflow_scripts.common.figures import save_figure
from workflow_scripts.common.nifti_io import write_text_atomic
from workflow_scripts.report.report_tables import (heading, html_page, html_table, markdown_table, paragraph, read_json,
                                            write_table)

LOG = logging.getLogger(__name__)

LEVELS = ("subject", "scan")
COUNTS = ("tp", "fn", "tn", "fp")
# The literature table bundled with the workflow (source, year, n, sensitivity, specificity, setting).
LITERATURE = Path(__file__).resolve().parent / "mta_visual_rating_literature.tsv"
LITERATURE_COLUMNS = ("study", "year", "citation", "doi", "imaging", "rater", "setting", "comparison", "n_ad",
                      "n_reference", "cutoff", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
                      "auc", "auc_ci", "quantity", "note")
LITERATURE_LABEL = "literature figure, not measured here"


# --- posteriors --------------------------------------------------------------------------

def confusion_counts(metrics: dict, level: str, source: str = "metrics.json") -> dict[str, int]:
    """TP, FN, TN, FP of one level of an evaluate ``metrics.json``, named in the error if absent."""
    block = metrics.get(level)
    if not isinstance(block, dict) or any(block.get(k) is None for k in COUNTS):
        raise cli.PipelineError(f"{source}: no '{level}' block with the counts {', '.join(COUNTS)}; expected a "
                                f"metrics.json written by workflow_scripts.evaluation.evaluate (re-run the evaluate_test job)")
    counts = {k: int(block[k]) for k in COUNTS}
    if any(v < 0 for v in counts.values()):
        raise cli.PipelineError(f"{source}: negative count in the '{level}' block: {counts}")
    return counts


def beta_posterior(successes: int, failures: int, prior: Sequence[float]):
    """Beta(a + successes, b + failures): the conjugate update of a Beta(a, b) prior."""
    a, b = (float(v) for v in prior)
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta prior parameters must be positive, got a={a}, b={b}")
    return stats.beta(a + successes, b + failures)


def predictive_values(sensitivity, specificity, prevalence) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV by Bayes' rule, element-wise over arrays of sensitivity and specificity."""
    se, sp, p = np.asarray(sensitivity, float), np.asarray(specificity, float), float(prevalence)
    if not 0 < p < 1:
        raise ValueError(f"prevalence must lie strictly between 0 and 1, got {p}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ppv = se * p / (se * p + (1 - sp) * (1 - p))
        npv = sp * (1 - p) / (sp * (1 - p) + (1 - se) * p)
    return ppv, npv


def summary(values: np.ndarray, credible: float) -> dict[str, float]:
    """Posterior mean, median and the equal-tailed credible interval of Monte Carlo draws."""
    tail = (1 - credible) / 2
    low, median, high = np.quantile(values, [tail, 0.5, 1 - tail])
    return {"mean": float(np.mean(values)), "median": float(median), "low": float(low), "high": float(high)}


def exact_summary(dist, credible: float) -> dict[str, float]:
    """The same summary from a scipy distribution, exactly."""
    low, high = dist.interval(credible)
    return {"mean": float(dist.mean()), "median": float(dist.median()), "low": float(low), "high": float(high)}


def draw_rates(counts: dict[str, int], prior_sensitivity: Sequence[float], prior_specificity: Sequence[float],
               n_draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo draws of sensitivity and specificity from their independent posteriors."""
    rng = np.random.default_rng(seed)
    se = beta_posterior(counts["tp"], counts["fn"], prior_sensitivity).rvs(n_draws, random_state=rng)
    sp = beta_posterior(counts["tn"], counts["fp"], prior_specificity).rvs(n_draws, random_state=rng)
    return se, sp


def analyse_level(counts: dict[str, int], prevalences: Sequence[dict], *, prior_sensitivity: Sequence[float],
                  prior_specificity: Sequence[float], credible: float, n_draws: int, seed: int) -> dict:
    """Posteriors of sensitivity, specificity, likelihood ratios, and PPV/NPV at each prevalence."""
    if not 0 < credible < 1:
        raise ValueError(f"credible must lie in (0, 1), got {credible}")
    se_post = beta_posterior(counts["tp"], counts["fn"], prior_sensitivity)
    sp_post = beta_posterior(counts["tn"], counts["fp"], prior_specificity)
    se, sp = draw_rates(counts, prior_sensitivity, prior_specificity, n_draws, seed)
    n_ad, n_cn = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    block = {
        "counts": dict(counts),
        "sensitivity": {"posterior": [float(v) for v in se_post.args], **exact_summary(se_post, credible),
                        "observed": counts["tp"] / n_ad if n_ad else None},
        "specificity": {"posterior": [float(v) for v in sp_post.args], **exact_summary(sp_post, credible),
                        "observed": counts["tn"] / n_cn if n_cn else None},
        "lr_positive": summary(se / (1 - sp), credible),
        "lr_negative": summary((1 - se) / sp, credible),
        "prevalences": [],
        "warnings": [],
    }
    if n_ad == 0:
        block["warnings"].append("no AD cases in the test set: the sensitivity posterior is the prior")
    if n_cn == 0:
        block["warnings"].append("no CN cases in the test set: the specificity posterior is the prior")
    for entry in prevalences:
        ppv, npv = predictive_values(se, sp, entry["value"])
        block["prevalences"].append({**entry, "ppv": summary(ppv, credible), "npv": summary(npv, credible)})
    return block


def prevalence_curve(se: np.ndarray, sp: np.ndarray, grid: np.ndarray, credible: float) -> dict[str, np.ndarray]:
    """Posterior median and credible band of PPV and NPV at every prevalence of ``grid``."""
    tail = (1 - credible) / 2
    out = {k: np.empty((3, len(grid))) for k in ("ppv", "npv")}
    for i, p in enumerate(grid):
        ppv, npv = predictive_values(se, sp, p)
        out["ppv"][:, i] = np.quantile(ppv, [tail, 0.5, 1 - tail])
        out["npv"][:, i] = np.quantile(npv, [tail, 0.5, 1 - tail])
    return out


# --- outputs ---------------------------------------------------------------------------

def _interval(entry: dict, digits: int = 3, percent: bool = True) -> str:
    """'0.812 [0.701, 0.903]' (or in percent)."""
    if percent:
        return f"{100 * entry['median']:.1f}% [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"
    return f"{entry['median']:.{digits}g} [{entry['low']:.{digits}g}, {entry['high']:.{digits}g}]"


def level_table(block: dict) -> pd.DataFrame:
    """One row per prevalence: PPV and NPV, posterior median with credible interval."""
    rows = [{"setting": e["name"], "prevalence": f"{100 * e['value']:g}%", "PPV": _interval(e["ppv"]),
             "NPV": _interval(e["npv"]), "source of the prevalence": e.get("source", "")}
            for e in block["prevalences"]]
    return pd.DataFrame(rows)


def rates_table(block: dict) -> pd.DataFrame:
    """Sensitivity, specificity and likelihood ratios with their posteriors and the counts behind them."""
    c = block["counts"]
    se, sp = block["sensitivity"], block["specificity"]
    return pd.DataFrame([
        {"quantity": "sensitivity", "posterior median [credible interval]": _interval(se),
         "posterior": "Beta({:g}, {:g})".format(*se["posterior"]), "counts": f"TP {c['tp']}, FN {c['fn']}"},
        {"quantity": "specificity", "posterior median [credible interval]": _interval(sp),
         "posterior": "Beta({:g}, {:g})".format(*sp["posterior"]), "counts": f"TN {c['tn']}, FP {c['fp']}"},
        {"quantity": "positive likelihood ratio", "posterior median [credible interval]":
            _interval(block["lr_positive"], percent=False), "posterior": "Monte Carlo", "counts": ""},
        {"quantity": "negative likelihood ratio", "posterior median [credible interval]":
            _interval(block["lr_negative"], percent=False), "posterior": "Monte Carlo", "counts": ""},
    ])


def markdown(result: dict) -> str:
    """Both levels as Markdown tables, the configured level first."""
    coverage = f"{100 * result['credible']:g}%"
    lines = [f"# {result['experiment']}: sensitivity, specificity, PPV and NPV ({coverage} credible intervals)", ""]
    for level in result["levels"]:
        block = result["levels"][level]
        lines += [f"## {level} level", ""]
        lines += [markdown_table(rates_table(block)), markdown_table(level_table(block))]
        lines += [f"Warning: {w}" for w in block["warnings"]]
    return "\n".join(lines).rstrip() + "\n"


def html(result: dict) -> str:
    """A self-contained page for the report: both levels, with what the numbers assume."""
    coverage = f"{100 * result['credible']:g}%"
    (a_se, b_se), (a_sp, b_sp) = result["prior"]["sensitivity"], result["prior"]["specificity"]
    intro = (f"Posterior medians and equal-tailed {coverage} credible intervals. Priors: sensitivity "
             f"Beta({a_se:g}, {b_se:g}), specificity Beta({a_sp:g}, {b_sp:g}) (Beta(1, 1) is uniform), updated "
             f"with the test counts; PPV and NPV by Monte Carlo ({result['n_draws']:,} draws, seed "
             f"{result['seed']}) at each prevalence, taken as known. The subject level counts each person once "
             f"(scan probabilities averaged), as the Beta-binomial model assumes independent cases; the scan "
             f"level counts every scan and its intervals are too narrow when people have several scans.")
    parts = [paragraph(intro)]
    for level, block in result["levels"].items():
        parts += [heading(f"{level} level: sensitivity, specificity, likelihood ratios"),
                  html_table(rates_table(block)),
                  heading(f"{level} level: predictive values by setting"), html_table(level_table(block))]
        parts += [paragraph(f"Warning: {warning}") for warning in block["warnings"]]
    return html_page(f"{result['experiment']}: predictive values where the test would be used", parts)


def plot_curves(result: dict, se: np.ndarray, sp: np.ndarray, path: str | Path) -> Path:
    """PPV and NPV against prevalence (logit axis) with credible bands; the configured prevalences marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level, credible = result["figure_level"], result["credible"]
    grid = 1 / (1 + np.exp(-np.linspace(math.log(0.002 / 0.998), math.log(0.998 / 0.002), 121)))
    curves = prevalence_curve(se, sp, grid, credible)
    counts = result["levels"][level]["counts"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, key, colour in zip(axes, ("ppv", "npv"), ("tab:red", "tab:blue")):
        low, median, high = curves[key]
        ax.fill_between(grid, low, high, color=colour, alpha=0.2, label=f"{100 * credible:g}% credible band")
        ax.plot(grid, median, color=colour, linewidth=2, label="posterior median")
        for i, entry in enumerate(result["levels"][level]["prevalences"]):
            value = entry[key]["median"]
            ax.axvline(entry["value"], color="grey", linestyle=":", linewidth=1)
            ax.plot([entry["value"]], [value], "o", color="black", markersize=4)
            # labels alternate below and above their point so that close prevalences stay legible, and stay
            # inside the axes near 0 and 1
            below = value > 0.85 or (value >= 0.15 and i % 2 == 0)
            ax.annotate(f"{entry['name']} at {100 * entry['value']:g}%: {100 * value:.0f}%", (entry["value"], value),
                        xytext=(6, -14 if below else 8), textcoords="offset points", fontsize=7.5,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_xscale("logit")
        ax.set_xlim(grid[0], grid[-1])
        ticks = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]
        ax.set_xticks(ticks, [f"{100 * t:g}%" for t in ticks], fontsize=7.5)
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.set_xlabel("prevalence of AD among the people tested")
        ax.set_title({"ppv": "PPV: P(AD | model says AD)", "npv": "NPV: P(not AD | model says CN)"}[key], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if key == "ppv" else "lower left", fontsize=8)
    axes[0].set_ylabel("predictive value")
    fig.suptitle(f"{result['experiment']}, {level} level: TP {counts['tp']}, FN {counts['fn']}, TN {counts['tn']}, "
                 f"FP {counts['fp']}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def analyse(metrics: dict, prevalences: Sequence[dict], experiment: str, *, figure_level: str,
            prior_sensitivity: Sequence[float], prior_specificity: Sequence[float], credible: float, n_draws: int,
            seed: int, source: str = "metrics.json") -> dict:
    """Both levels' posteriors (the figure's level first) in one JSON-ready dict."""
    if figure_level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {figure_level!r}")
    if n_draws < 1000:
        raise ValueError(f"n_draws must be at least 1000 for stable tail quantiles, got {n_draws}")
    order = [figure_level] + [lv for lv in LEVELS if lv != figure_level]
    return {
        "experiment": experiment, "metrics_file": source, "figure_level": figure_level, "credible": credible,
        "prior": {"sensitivity": [float(v) for v in prior_sensitivity],
                  "specificity": [float(v) for v in prior_specificity]},
        "n_draws": int(n_draws), "seed": int(seed), "threshold": metrics.get("threshold"),
        "levels": {level: analyse_level(confusion_counts(metrics, level, source), prevalences,
                                        prior_sensitivity=prior_sensitivity, prior_specificity=prior_specificity,
                                        credible=credible, n_draws=n_draws, seed=seed) for level in order},
    }


# --- the clinician comparison ------------------------------------------------------------

def read_literature(path: str | Path = LITERATURE) -> pd.DataFrame:
    """The literature table (TSV); every figure in it must come with its citation."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#", quoting=csv.QUOTE_NONE)
    except (OSError, pd.errors.ParserError) as err:
        raise cli.PipelineError(f"cannot read the literature table {path}: {err}") from err
    missing = [c for c in LITERATURE_COLUMNS if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"{path}: missing column(s) {', '.join(missing)}; the literature table needs "
                                f"{', '.join(LITERATURE_COLUMNS)}")
    for column in ("sensitivity", "specificity", "auc"):
        values = pd.to_numeric(table[column].replace("", np.nan), errors="coerce")
        bad = table["study"][table[column].ne("") & ~values.between(0, 1)].tolist()
        if bad:
            raise cli.PipelineError(f"{path}: column {column} must be a share in [0, 1] or empty; not so for "
                                    f"{', '.join(bad)}")
    if (table["citation"].str.strip() == "").any():
        raise cli.PipelineError(f"{path}: every row needs a citation")
    return table


def _share(text: str) -> float | None:
    return float(text) if str(text).strip() else None


def _percent(value: float | None, ci: str = "") -> str:
    if value is None:
        return "not reported"
    return f"{100 * value:.1f}%" + (f" [{ci}]" if ci else "")


def clinician_rows(results: Sequence[dict], metrics: Sequence[dict], literature: pd.DataFrame,
                   level: str) -> pd.DataFrame:
    """Each model (measured here) and each literature row, with PPV/NPV at every configured prevalence.

    For literature rows PPV and NPV are computed here from the published point sensitivity and
    specificity; for the models they are posterior medians with credible intervals.
    """
    rows = []
    prevalences = results[0]["levels"][level]["prevalences"] if results else []
    for result, metric in zip(results, metrics):
        block = result["levels"][level]
        c = block["counts"]
        auc, (auc_low, auc_high) = metric[level].get("auc"), metric[level].get("ci", {}).get("auc", (None, None))
        row = {"what": f"model {result['experiment']}", "figures": f"measured here (test set, {level} level)",
               "imaging": "T1 MRI (this workflow)", "setting / comparison": "held-out test set, AD vs CN",
               "n AD / n reference": f"{c['tp'] + c['fn']} / {c['tn'] + c['fp']}",
               "sensitivity": _interval(block["sensitivity"]), "specificity": _interval(block["specificity"]),
               "AUC": "undefined" if auc is None else (f"{auc:.3f}" + ("" if auc_low is None else
                                                                       f" [{auc_low:.3f}, {auc_high:.3f}]"))}
        for entry in block["prevalences"]:
            row[f"PPV at {100 * entry['value']:g}%"] = _interval(entry["ppv"])
            row[f"NPV at {100 * entry['value']:g}%"] = _interval(entry["npv"])
        row["source"] = f"this workflow, {result['metrics_file']}"
        rows.append(row)
    for _, lit in literature.iterrows():
        se, sp, auc = _share(lit["sensitivity"]), _share(lit["specificity"]), _share(lit["auc"])
        row = {"what": f"{lit['study']} ({lit['year']})", "figures": LITERATURE_LABEL, "imaging": lit["imaging"],
               "setting / comparison": f"{lit['setting']}; {lit['comparison']}",
               "n AD / n reference": f"{lit['n_ad'] or '?'} / {lit['n_reference'] or '?'}",
               "sensitivity": _percent(se, lit["sensitivity_ci"]), "specificity": _percent(sp, lit["specificity_ci"]),
               "AUC": "not reported" if auc is None else
               f"{auc:.2f}" + (f" [{lit['auc_ci']}]" if lit["auc_ci"] else "")}
        for entry in prevalences:
            known = se is not None and sp is not None
            ppv, npv = predictive_values(se, sp, entry["value"]) if known else (None, None)
            for key, value in (("PPV", ppv), ("NPV", npv)):
                shown = f"{100 * float(value):.1f}% (computed here)" if known else "-"
                row[f"{key} at {100 * entry['value']:g}%"] = shown
        row["source"] = (f"{lit['citation']}" + (f" doi:{lit['doi']}" if lit["doi"] else "")
                         + f". Quantity: {lit['quantity']}" + (f". Note: {lit['note']}" if lit["note"] else ""))
        rows.append(row)
    return pd.DataFrame(rows)


def clinician_html(table: pd.DataFrame, level: str, credible: float) -> str:
    """The comparison page, with the literature rows marked as not measured here."""
    intro = (f"Each model's sensitivity and specificity on this workflow's held-out test set ({level} level; "
             f"posterior median and {100 * credible:g}% credible interval, AUC with its bootstrap interval) next "
             f"to published performance of visual rating of medial temporal lobe atrophy (Scheltens MTA scale) "
             f"by radiologists or clinicians. Rows marked '{LITERATURE_LABEL}' are quoted from the cited "
             f"papers, not measured here, on other people, scanners and reference standards; where a paper's "
             f"abstract gave no figure the cell says 'not reported'. Their PPV and NPV are computed here from "
             f"the published point sensitivity and specificity, without an interval. Compare with care: the "
             f"demo test set is tiny and synthetic.")
    return html_page("Model versus visual MTA rating: literature figures, not measured here",
                     [paragraph(intro), html_table(table)])


# --- command line ------------------------------------------------------------------------

def _pair(values: Sequence[float], what: str) -> tuple[float, float]:
    a, b = (float(v) for v in values)
    if a <= 0 or b <= 0:
        raise cli.PipelineError(f"{what}: Beta prior parameters must be positive, got {a} and {b}")
    return a, b


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    one = sub.add_parser("posterior", help="one experiment's posteriors, table and figure")
    one.add_argument("--metrics", required=True, help="metrics.json written by workflow_scripts.evaluation.evaluate")
    one.add_argument("--experiment", required=True)
    settings.add_argument(one, "bayes")
    one.add_argument("--json", required=True)
    one.add_argument("--markdown", required=True)
    one.add_argument("--html", required=True)
    one.add_argument("--figure", required=True)
    comp = sub.add_parser("clinicians", help="every model next to the literature on visual MTA rating")
    comp.add_argument("--posterior", nargs="+", required=True, help="posterior.json of each experiment")
    comp.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each experiment, same order")
    comp.add_argument("--literature", default=str(LITERATURE))
    settings.add_argument(comp, "bayes")
    comp.add_argument("--csv", required=True)
    comp.add_argument("--markdown", required=True)
    comp.add_argument("--html", required=True)
    args = p.parse_args(argv)
    if args.command not in ("posterior", "clinicians"):
        p.error("choose a command: posterior or clinicians")
    bayes, = settings.read_job(args.settings, "bayes")
    if args.command == "posterior":
        prevalences = [entry.plain() for entry in bayes.prevalences]
        metrics = read_metrics(args.metrics)
        result = analyse(metrics, prevalences, args.experiment, figure_level=bayes.level,
                         prior_sensitivity=_pair(bayes.prior_sensitivity, "bayes.prior_sensitivity"),
                         prior_specificity=_pair(bayes.prior_specificity, "bayes.prior_specificity"),
                         credible=bayes.credible, n_draws=bayes.n_draws, seed=bayes.seed, source=args.metrics)
        write_text_atomic(json.dumps(result, indent=2) + "\n", args.json)
        write_text_atomic(markdown(result), args.markdown)
        write_text_atomic(html(result), args.html)
        se, sp = draw_rates(result["levels"][bayes.level]["counts"], result["prior"]["sensitivity"],
                            result["prior"]["specificity"], bayes.n_draws, bayes.seed)
        plot_curves(result, se, sp, args.figure)
        for level, block in result["levels"].items():
            LOG.info("%s level: sensitivity %s, specificity %s", level, _interval(block["sensitivity"]),
                     _interval(block["specificity"]))
            for entry in block["prevalences"]:
                LOG.info("%s level, %s (%g): PPV %s, NPV %s", level, entry["name"], entry["value"],
                         _interval(entry["ppv"]), _interval(entry["npv"]))
    elif args.command == "clinicians":
        if len(args.posterior) != len(args.metrics):
            raise cli.PipelineError(f"{len(args.posterior)} --posterior files but {len(args.metrics)} --metrics")
        results = [read_json(path, "posterior") for path in args.posterior]
        metrics = [read_metrics(path) for path in args.metrics]
        table = clinician_rows(results, metrics, read_literature(args.literature), bayes.level)
        write_table(table, args.csv, args.markdown)
        credible = results[0]["credible"] if results else bayes.credible
        write_text_atomic(clinician_html(table, bayes.level, credible), args.html)
        LOG.info("wrote %s (%d models, %d literature rows)", args.html, len(results), len(table) - len(results))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
