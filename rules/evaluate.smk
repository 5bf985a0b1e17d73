# Dissertation §4.6: test metrics with bootstrap intervals (scan and subject level), and the
# cross-validation summary (mean ± standard deviation over folds).


rule evaluate_test:
    input:
        f"{RESULTS}/evaluation/{{experiment}}/test_predictions.csv",
    output:
        metrics=f"{RESULTS}/evaluation/{{experiment}}/metrics.json",
        roc=report(
            f"{RESULTS}/evaluation/{{experiment}}/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "figure": "ROC"},
        ),
        confusion=report(
            f"{RESULTS}/evaluation/{{experiment}}/confusion_matrix.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "figure": "confusion matrix"},
        ),
    params:
        settings=job_json(config, "evaluate"),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    log:
        f"{RESULTS}/logs/evaluate/{{experiment}}.log",
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluation.evaluate --predictions {input:q} --out-dir {params.out_dir:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


# A fold model's predictions on its held-out fold (the cross-validation figure) or on the test set:
# the same command; its figures are written beside metrics.json but are not the fold's outputs.
use rule evaluate_test as evaluate_fold with:
    wildcard_constraints:
        subset="held_out|test",
    input:
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/{{subset}}_predictions.csv",
    output:
        metrics=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/evaluation/{{subset}}/metrics.json",
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}_evaluate_{{subset}}.log",


# Three figures, kept apart: the held-out folds (THE cross-validation figure), the inner validation
# split at the selected epoch (selection-biased, for comparison only) and the fold models on the test set.
rule cv_summary:
    input:
        held_out=fold_metrics,
        test=fold_test_metrics,
        summaries=fold_summaries,
    output:
        summary=f"{RESULTS}/cv/{{experiment}}/summary.json",
        table=f"{RESULTS}/cv/{{experiment}}/summary.md",
        page=report(
            f"{REPORT}/{{experiment}}/cv.html",
            caption="../report/cv.rst",
            category="Cross-validation",
            labels={"experiment": "{experiment}"},
        ),
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/summary.log",
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluation.cv_summary --fold-metrics {input.held_out:q} --test-metrics {input.test:q}"
        " --fold-summaries {input.summaries:q} --experiment {wildcards.experiment:q} --output {output.summary:q}"
        " --table {output.table:q} --page {output.page:q} > {log:q} 2>&1"


rule train:
    input:
        f"{RESULTS}/models/{MAIN}/summary.json",
    localrule: True


rule cv:
    input:
        f"{RESULTS}/cv/{MAIN}/summary.json",
    localrule: True


rule evaluate:
    input:
        f"{RESULTS}/evaluation/{MAIN}/metrics.json",
    localrule: True


# The comparison of every experiment with the main one on the same test scans: each metric
# with its interval, DeLong's test for AUC and McNemar's for accuracy.
rule compare:
    input:
        metrics=expand(f"{RESULTS}/evaluation/{{experiment}}/metrics.json", experiment=EXPERIMENTS),
        predictions=expand(f"{RESULTS}/evaluation/{{experiment}}/test_predictions.csv", experiment=EXPERIMENTS),
    output:
        table=f"{RESULTS}/comparison.csv",
        markdown=f"{RESULTS}/comparison.md",
        figure=report(
            f"{RESULTS}/comparison.png",
            caption="../report/comparison.rst",
            category="Comparison",
        ),
    params:
        flags=comparison_flags,
        main=MAIN,
    log:
        f"{RESULTS}/logs/compare.log",
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluation.compare --main {params.main:q} {params.flags} --csv {output.table:q}"
        " --markdown {output.markdown:q} --figure {output.figure:q} > {log:q} 2>&1"
