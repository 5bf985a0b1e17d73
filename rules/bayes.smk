# Clinical context: Beta posteriors of sensitivity and specificity from each experiment's test
# confusion matrix, PPV and NPV at the prevalences where the test would be used (config bayes),
# and every model next to published visual rating of medial temporal lobe atrophy.


rule bayes:
    input:
        f"{RESULTS}/evaluation/{{experiment}}/metrics.json",
    output:
        posterior=f"{RESULTS}/bayes/{{experiment}}/posterior.json",
        markdown=f"{RESULTS}/bayes/{{experiment}}/ppv_npv.md",
        table=report(
            f"{RESULTS}/bayes/{{experiment}}/ppv_npv.html",
            caption="../report/bayes_table.rst",
            category="Clinical context",
            subcategory="PPV and NPV by setting",
            labels={"experiment": "{experiment}", "item": "table"},
        ),
        figure=report(
            f"{RESULTS}/bayes/{{experiment}}/ppv_npv.png",
            caption="../report/bayes_figure.rst",
            category="Clinical context",
            subcategory="PPV and NPV by setting",
            labels={"experiment": "{experiment}", "item": "figure"},
        ),
    params:
        settings=bayes_settings(),
    log:
        f"{RESULTS}/logs/bayes/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/bayes/{{experiment}}.tsv"
    threads: res("bayes", "threads")
    resources:
        mem_mb=res("bayes", "mem_mb"),
        runtime=res("bayes", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluation.bayes posterior --metrics {input:q} --experiment {wildcards.experiment:q}"
        " --settings {params.settings:q} --json {output.posterior:q} --markdown {output.markdown:q} --html {output.table:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"


rule clinicians:
    input:
        posterior=expand(f"{RESULTS}/bayes/{{experiment}}/posterior.json", experiment=EXPERIMENTS),
        metrics=expand(f"{RESULTS}/evaluation/{{experiment}}/metrics.json", experiment=EXPERIMENTS),
        literature=LITERATURE_TABLE,
    output:
        csv=f"{RESULTS}/clinicians.csv",
        markdown=f"{RESULTS}/clinicians.md",
        html=report(
            f"{RESULTS}/clinicians.html",
            caption="../report/clinicians.rst",
            category="Clinical context",
            subcategory="Model versus clinicians (literature)",
        ),
    params:
        settings=bayes_settings(),
    log:
        f"{RESULTS}/logs/clinicians.log",
    benchmark:
        f"{RESULTS}/benchmarks/clinicians.tsv"
    threads: res("bayes", "threads")
    resources:
        mem_mb=res("bayes", "mem_mb"),
        runtime=res("bayes", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.evaluation.bayes clinicians --posterior {input.posterior:q} --metrics {input.metrics:q}"
        " --literature {input.literature:q} --settings {params.settings:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --html {output.html:q} > {log:q} 2>&1"
