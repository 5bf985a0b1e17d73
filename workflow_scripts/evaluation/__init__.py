"""rules/evaluate.smk and rules/bayes.smk: test metrics with bootstrap intervals (evaluate), the
cross-validation summary, the comparison of experiments, and the clinical context (bayes)."""
