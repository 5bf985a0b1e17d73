# The HTML report: `snakemake --report report.html` after a run gathers every output marked with
# report(). Snakemake shows images and HTML pages in place but offers text tables only as
# downloads, so these rules turn the tables a reader needs into small HTML pages, plot the
# training curves and record the provenance. `report_items` (part of `all`) builds them all.


rule report_items:
    input:
        report_targets,
    localrule: True


rule report_dataset:
    input:
        scans=f"{RESULTS}/usable.tsv",
        excluded=f"{RESULTS}/excluded.tsv",
        dropped=f"{RESULTS}/dropped.tsv",
    output:
        report(f"{REPORT}/dataset.html", caption="../report/dataset.rst", category="Dataset"),
    log:
        f"{RESULTS}/logs/report/dataset.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables dataset --scans {input.scans:q} --excluded {input.excluded:q}"
        " --dropped {input.dropped:q} --output {output:q} > {log:q} 2>&1"


# The QC table of every scan (one row each, robust outliers highlighted, the scans QC's thresholds
# drop) beside the montages. qc: settings are a parameter: changing one rewrites this page only.
rule report_qc:
    input:
        qc_records,
    output:
        html=report(f"{REPORT}/qc.html", caption="../report/qc_table.rst", category="Preprocessing QC"),
        table=f"{REPORT}/qc_table.tsv",
    params:
        settings=job_json(config, "qc"),
    log:
        f"{RESULTS}/logs/report/qc.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables qc --records {input:q} --settings {params.settings:q}"
        " --table {output.table:q} --output {output.html:q} > {log:q} 2>&1"


rule report_split:
    input:
        summary=f"{SPLITS}/summary.json",
        audit=f"{SPLITS}/audit.json",
    output:
        report(f"{REPORT}/split.html", caption="../report/split.rst", category="Split"),
    log:
        f"{RESULTS}/logs/report/split.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables split --summary {input.summary:q} --audit {input.audit:q}"
        " --output {output:q} > {log:q} 2>&1"


rule training_curves:
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
    input:
        history=f"{RESULTS}/models/{{experiment}}/history.json",
        folds=fold_histories,
    output:
        report(
            f"{REPORT}/{{experiment}}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"experiment": "{experiment}"},
        ),
    log:
        f"{RESULTS}/logs/report/{{experiment}}/training_curves.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables curves --history {input.history:q} --fold-history {input.folds:q}"
        " --experiment {wildcards.experiment:q} --output {output:q} > {log:q} 2>&1"


rule report_metrics:
    input:
        f"{RESULTS}/evaluation/{{experiment}}/metrics.json",
    output:
        report(
            f"{REPORT}/{{experiment}}/test_metrics.html",
            caption="../report/test_metrics.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "figure": "test metrics table"},
        ),
    log:
        f"{RESULTS}/logs/report/{{experiment}}/test_metrics.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables metrics --metrics {input:q} --experiment {wildcards.experiment:q}"
        " --output {output:q} > {log:q} 2>&1"


# The cross-validation page (results/report/<experiment>/cv.html) is written by rule cv_summary
# (rules/evaluate.smk) with the summary it shows, so its three figures cannot drift apart.


rule report_comparison:
    input:
        f"{RESULTS}/comparison.csv",
    output:
        report(f"{REPORT}/comparison.html", caption="../report/comparison.rst", category="Comparison"),
    log:
        f"{RESULTS}/logs/report/comparison.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables comparison --csv {input:q} --output {output:q} > {log:q} 2>&1"


# Config, code version (git describe), library versions, the scan list's hash, split hashes,
# seeds and every model's training record. The config is a parameter, so changing any setting
# rewrites this page.
rule provenance:
    input:
        scans=f"{RESULTS}/usable.tsv",
        splits=rules.split.output,
        models=expand(f"{RESULTS}/models/{{experiment}}/summary.json", experiment=EXPERIMENTS),
    output:
        json=f"{REPORT}/provenance.json",
        html=report(f"{REPORT}/provenance.html", caption="../report/provenance.rst", category="Provenance"),
    params:
        config=json.dumps(config, default=str),
        models=provenance_models,
    log:
        f"{RESULTS}/logs/report/provenance.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.report_tables provenance --config-json {params.config:q} --scans {input.scans:q}"
        " --split-files {input.splits:q} {params.models} --json {output.json:q} --output {output.html:q} > {log:q} 2>&1"


# The run's summary (workflow_scripts/report/run_summary.py): scans used and dropped with reasons, each
# experiment's test metrics with intervals, where the report is; `all` prints it at its end.
rule run_summary:
    input:
        usable=f"{RESULTS}/usable.tsv",
        dropped=f"{RESULTS}/dropped.tsv",
        excluded=f"{RESULTS}/excluded.tsv",
        metrics=expand(f"{RESULTS}/evaluation/{{experiment}}/metrics.json", experiment=EXPERIMENTS),
    output:
        f"{RESULTS}/run_summary.md",
    params:
        metrics=lambda wildcards, input: " ".join(shlex.quote(f"{n}={m}") for n, m in zip(EXPERIMENTS, input.metrics)),
        settings=job_json(config, "data.classes"),
        results=lambda wildcards, input: os.path.dirname(input.usable),
    log:
        f"{RESULTS}/logs/report/run_summary.log",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.report.run_summary --results {params.results:q} --metrics {params.metrics}"
        " --settings {params.settings:q} --output {output:q} > {log:q} 2>&1"
