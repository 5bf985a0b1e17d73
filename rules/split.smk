# Dissertation §4.3: class balance, subject-level round-robin split, CV folds, leakage audit.


rule tensor_cache:
    input:
        stage_file("ras"),
    output:
        TENSOR_FILE,
    log:
        log_file("tensor_cache"),
    benchmark:
        benchmark_file("tensor_cache")
    threads: res("tensor_cache", "threads")
    resources:
        mem_mb=res("tensor_cache", "mem_mb"),
        runtime=res("tensor_cache", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.tensor_cache --input {input:q} --output {output:q} > {log:q} 2>&1"


rule split:
    input:
        scans=f"{RESULTS}/usable.tsv",
        excluded=f"{RESULTS}/excluded.tsv",  # the label policy's drops, counted per partition in the summary
        tensors=all_tensors,
    output:
        train=f"{SPLITS}/train.csv",
        val=f"{SPLITS}/val.csv",
        test=f"{SPLITS}/test.csv",
        folds=f"{SPLITS}/cv_folds.csv",
        summary=f"{SPLITS}/summary.json",
        table=f"{SPLITS}/summary.txt",  # shown in the report as results/report/split.html
        audit=f"{SPLITS}/audit.json",
        # per CV fold: train.csv, val.csv (inner validation: selection) and held_out.csv (reported on)
        fold_manifests=expand(FOLD_MANIFEST, fold=range(config["cv"]["folds"]), role=FOLD_ROLES),
    params:
        pattern=lambda wildcards: stage_file("ras"),
        settings=job_json(config, "split", "cv", "data.classes", "data.label_policy"),
        out_dir=lambda wildcards, output: os.path.dirname(output.train),
    log:
        f"{RESULTS}/logs/split.log",
    benchmark:
        f"{RESULTS}/benchmarks/split.tsv"
    threads: res("split", "threads")
    resources:
        mem_mb=res("split", "mem_mb"),
        runtime=res("split", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.split --scans {input.scans:q} --path-pattern {params.pattern:q}"
        " --settings {params.settings:q} --excluded {input.excluded:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
