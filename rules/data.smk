# The input collection: the generated demo (data.source: demo) and ingest.

if DATA["source"] == "demo":

    rule demo_collection:
        output:
            csv=DATA["collection_csv"],
            tree=directory(f"{DATA['adni_root']}/ADNI"),
            truth=directory(f"{DATA['adni_root']}/truth"),
        params:
            root=lambda wildcards, output: os.path.dirname(output.csv),
            csv_name=lambda wildcards, output: os.path.basename(output.csv),
            settings=job_json(config, "demo", "data.phase_rid_ranges"),
        log:
            f"{RESULTS}/logs/demo_collection.log",
        benchmark:
            f"{RESULTS}/benchmarks/demo_collection.tsv"
        threads: res("demo", "threads")
        resources:
            mem_mb=res("demo", "mem_mb"),
            runtime=res("demo", "runtime"),
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m workflow_scripts.data.demo --root {params.root:q} --csv-name {params.csv_name:q}"
            " --settings {params.settings:q} > {log:q} 2>&1"


checkpoint ingest:
    input:
        csv=DATA["collection_csv"],
        tree=f"{DATA['adni_root']}/ADNI",
        diagnosis=DATA["diagnosis_table"] or [],
    output:
        scans=f"{RESULTS}/scans.tsv",
        excluded=f"{RESULTS}/excluded.tsv",
    params:
        adni_root=lambda wildcards, input: os.path.dirname(input.tree),
        # data.diagnosis_table is an input; the other left-out keys are other rules' paths and switches
        settings=job_json(config, "data", omit=["data.source", "data.adni_root", "data.collection_csv",
                                                "data.exclude_scans", "data.diagnosis_table"]),
        check_cache=f"{RESULTS}/ingest/series_checks.json",
        diagnosis_table=lambda wildcards, input: (
            f"--diagnosis-table {shlex.quote(input.diagnosis)}" if input.diagnosis else ""
        ),
    log:
        f"{RESULTS}/logs/ingest.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest.tsv"
    threads: res("ingest", "threads")
    resources:
        mem_mb=res("ingest", "mem_mb"),
        runtime=res("ingest", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.data.ingest --collection-csv {input.csv:q} --adni-root {params.adni_root:q}"
        " --settings {params.settings:q} --check-cache {params.check_cache:q} --threads {threads}"
        " {params.diagnosis_table} --scans {output.scans:q} --excluded {output.excluded:q} > {log:q} 2>&1"
