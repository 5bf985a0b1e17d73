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
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
        alpha=config["evaluate"]["alpha"],
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
        "python -m workflow_scripts.evaluate --predictions {input:q} --out-dir {params.out_dir:q}"
        " --n-boot {params.n_boot} --seed {params.seed} --alpha {params.alpha} > {log:q} 2>&1"


rule evaluate_fold:
    input:
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/val_predictions.csv",
    output:
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/evaluation/metrics.json",
    params:
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
        alpha=config["evaluate"]["alpha"],
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}_evaluate.log",
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluate --predictions {input:q} --out-dir {params.out_dir:q}"
        " --n-boot {params.n_boot} --seed {params.seed} --alpha {params.alpha} > {log:q} 2>&1"


rule cv_summary:
    input:
        fold_metrics,
    output:
        summary=f"{RESULTS}/cv/{{experiment}}/summary.json",
        table=f"{RESULTS}/cv/{{experiment}}/summary.md",  # shown in the report as results/report/<exp>/cv.html
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/summary.log",
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.cv_summary --fold-metrics {input:q} --output {output.summary:q}"
        " --table {output.table:q} > {log:q} 2>&1"


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
        "python -m workflow_scripts.compare --main {params.main:q} {params.flags} --csv {output.table:q}"
        " --markdown {output.markdown:q} --figure {output.figure:q} > {log:q} 2>&1"
