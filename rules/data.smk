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
            demo=config["demo"],
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
            " --n-subjects {params.demo[n_subjects]} --visits {params.demo[visits]}"
            " --n-mci {params.demo[n_mci]} --seed {params.demo[seed]} --phase {params.demo[phase]}"
            " --voxel-scale {params.demo[voxel_scale]}"
            " --hippocampus-atrophy {params.demo[hippocampus_atrophy]}"
            " --ventricle-enlargement {params.demo[ventricle_enlargement]}"
            " --progression-per-visit {params.demo[progression_per_visit]}"
            " --faults {params.demo[faults]} > {log:q} 2>&1"


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
        classes=DATA["classes"],
        descriptions=DATA["descriptions"],
        types=DATA["types"],
        phase_ranges=json.dumps(DATA["phase_rid_ranges"]),
        check_cache=f"{RESULTS}/ingest/series_checks.json",
        min_slice_share=DATA["min_slice_share"],
        min_extent_mm=DATA["min_extent_mm"],
        label_policy=DATA["label_policy"],
        visit_aliases=json.dumps(DATA["visit_aliases"]),
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
        " --classes {params.classes:q} --descriptions {params.descriptions:q} --types {params.types:q}"
        " --phase-ranges {params.phase_ranges:q} --check-cache {params.check_cache:q}"
        " --min-slice-share {params.min_slice_share} --min-extent-mm {params.min_extent_mm} --threads {threads}"
        " --label-policy {params.label_policy} --visit-aliases {params.visit_aliases:q} {params.diagnosis_table}"
        " --scans {output.scans:q} --excluded {output.excluded:q} > {log:q} 2>&1"
