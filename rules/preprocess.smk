# The six per-scan preprocessing stages (dissertation §4.2), one rule and one file per scan each:
# nifti -> stripped -> resampled -> cropped128 -> n4 -> ras, plus a QC montage per scan.


rule preprocess:
    input:
        preprocess_targets,
    localrule: True


rule synthstrip_weights:
    output:
        SYNTHSTRIP_CACHE_FILE,
    params:
        cache=lambda wildcards, output: os.path.dirname(output[0]),
        urls=SKULLSTRIP["synthstrip_urls"],
    log:
        f"{RESULTS}/logs/synthstrip_weights.log",
    localrule: True
    priority: 100
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.skullstrip fetch --cache-dir {params.cache:q}"
        " $(printf -- '--url %s ' {params.urls:q}) > {log:q} 2>&1"


rule nifti:
    input:
        dicom=dicom_dir,
    output:
        stage_file("nifti"),
    log:
        log_file("nifti"),
    benchmark:
        benchmark_file("nifti")
    threads: res("nifti", "threads")
    resources:
        mem_mb=res("nifti", "mem_mb"),
        runtime=res("nifti", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.convert --dicom-dir {input.dicom:q} --output {output:q} > {log:q} 2>&1"


rule stripped:
    input:
        image=stage_file("nifti"),
        weights=synthstrip_weights,
    output:
        image=stage_file("stripped"),
        mask=stage_file("stripped", "_mask"),
        sidecar=f"{RESULTS}/stripped/{{subject}}/{{image_id}}.json",
    params:
        settings=skullstrip_settings(),
        weights=lambda wildcards, input: f"--synthstrip-weights {input.weights}" if input.weights else "",
    log:
        log_file("stripped"),
    benchmark:
        benchmark_file("stripped")
    threads: res("stripped", "threads")
    resources:
        mem_mb=res("stripped", "mem_mb"),
        runtime=res("stripped", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.skullstrip --threads {threads} --settings {params.settings:q} {params.weights}"
        " --input {input.image:q} --output {output.image:q} --mask {output.mask:q}"
        " --sidecar {output.sidecar:q} > {log:q} 2>&1"


rule resampled:
    input:
        image=stage_file("stripped"),
        mask=stage_file("stripped", "_mask"),
    output:
        image=stage_file("resampled"),
        mask=stage_file("resampled", "_mask"),
    params:
        settings=preprocess_settings(PRE, "resample"),
    log:
        log_file("resampled"),
    benchmark:
        benchmark_file("resampled")
    threads: res("resampled", "threads")
    resources:
        mem_mb=res("resampled", "mem_mb"),
        runtime=res("resampled", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.resample --threads {threads} --settings {params.settings:q}"
        " --input {input.image:q} --input-mask {input.mask:q}"
        " --output {output.image:q} --output-mask {output.mask:q} > {log:q} 2>&1"


rule cropped128:
    input:
        image=stage_file("resampled"),
        mask=stage_file("resampled", "_mask"),
    output:
        image=stage_file("cropped128"),
        mask=stage_file("cropped128", "_mask"),
    params:
        settings=preprocess_settings(PRE, "crop", "target_shape"),
    log:
        log_file("cropped128"),
    benchmark:
        benchmark_file("cropped128")
    threads: res("cropped128", "threads")
    resources:
        mem_mb=res("cropped128", "mem_mb"),
        runtime=res("cropped128", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.crop --settings {params.settings:q} --input {input.image:q}"
        " --input-mask {input.mask:q} --output {output.image:q} --output-mask {output.mask:q} > {log:q} 2>&1"


rule n4:
    input:
        image=stage_file("cropped128"),
        mask=n4_mask,
    output:
        stage_file("n4"),
    params:
        settings=preprocess_settings(PRE, "n4"),
        mask=lambda wildcards, input: f"--mask {input.mask}" if input.mask else "",
    log:
        log_file("n4"),
    benchmark:
        benchmark_file("n4")
    threads: res("n4", "threads")
    resources:
        mem_mb=res("n4", "mem_mb"),
        runtime=res("n4", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.n4 --threads {threads} --settings {params.settings:q} {params.mask}"
        " --input {input.image:q} --output {output:q} > {log:q} 2>&1"


rule ras:
    input:
        image=stage_file("n4"),
        mask=stage_file("cropped128", "_mask"),
    output:
        image=stage_file("ras"),
        mask=stage_file("ras", "_mask"),
    log:
        log_file("ras"),
    benchmark:
        benchmark_file("ras")
    threads: res("ras", "threads")
    resources:
        mem_mb=res("ras", "mem_mb"),
        runtime=res("ras", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.reorient --input {input.image:q} --input-mask {input.mask:q}"
        " --output {output.image:q} --output-mask {output.mask:q} > {log:q} 2>&1"


rule qc:
    input:
        **{stage: stage_file(stage) for stage in STAGES},
        mask=stage_file("stripped", "_mask"),
        # each stage's brain mask on that stage's own grid, outlined on its slices
        resampled_mask=stage_file("resampled", "_mask"),
        cropped_mask=stage_file("cropped128", "_mask"),
        ras_mask=stage_file("ras", "_mask"),
    output:
        report(
            f"{RESULTS}/qc/{{subject}}/{{image_id}}.png",
            caption="../report/qc_montage.rst",
            category="Preprocessing QC",
            labels={"subject": "{subject}", "image": "{image_id}"},
        ),
    log:
        log_file("qc"),
    benchmark:
        benchmark_file("qc")
    threads: res("qc", "threads")
    resources:
        mem_mb=res("qc", "mem_mb"),
        runtime=res("qc", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.qc --title '{wildcards.subject} {wildcards.image_id}'"
        " --stage nifti {input.nifti:q} --stage stripped {input.stripped:q}"
        " --stage resampled {input.resampled:q} --stage cropped128 {input.cropped128:q}"
        " --stage n4 {input.n4:q} --stage ras {input.ras:q} --mask {input.mask:q}"
        " --stage-mask nifti {input.mask:q} --stage-mask stripped {input.mask:q}"
        " --stage-mask resampled {input.resampled_mask:q} --stage-mask cropped128 {input.cropped_mask:q}"
        " --stage-mask n4 {input.cropped_mask:q} --stage-mask ras {input.ras_mask:q}"
        " --output {output:q} > {log:q} 2>&1"


# Per-scan QC numbers (workflow_scripts/preprocess/qc_metrics.py): brain volume and share of the field of view
# from the native skull-strip mask, intensities inside and outside the brain, SNR, geometry, and
# the model input's brain share, intensity range and white/grey contrast. The QC table and the
# thresholds of config qc: are applied to all scans' records at once.
rule qc_metrics:
    input:
        nifti=stage_file("nifti"),
        mask=stage_file("stripped", "_mask"),
        ras=stage_file("ras"),
        ras_mask=stage_file("ras", "_mask"),
    output:
        QC_METRICS_FILE,
    log:
        log_file("qc_metrics"),
    benchmark:
        benchmark_file("qc_metrics")
    threads: res("qc", "threads")
    resources:
        mem_mb=res("qc", "mem_mb"),
        runtime=res("qc", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.qc_metrics --nifti {input.nifti:q} --mask {input.mask:q} --ras {input.ras:q}"
        " --ras-mask {input.ras_mask:q} --subject {wildcards.subject:q} --image-id {wildcards.image_id:q}"
        " --output {output:q} > {log:q} 2>&1"


# The scans that passed every stage (a scan whose own data made a stage fail carries that stage's
# failure record instead of its images) and were not excluded by the user: the split and every
# later rule read only these (results/usable.tsv); the others are listed with their stage and
# reason code in results/dropped.tsv, beside ingest's excluded.tsv.
checkpoint usable_scans:
    input:
        scans=f"{RESULTS}/scans.tsv",
        excluded=f"{RESULTS}/excluded.tsv",
        ras=lambda wildcards: expand_scans(stage_file("ras")),
        qc=qc_records,
        user_exclusions=user_exclusions_file,
    output:
        usable=f"{RESULTS}/usable.tsv",
        dropped=f"{RESULTS}/dropped.tsv",
    params:
        ras_pattern=lambda wildcards: stage_file("ras"),
        qc_pattern=lambda wildcards: QC_METRICS_FILE,
        settings=job_json(config, "qc"),
        user_exclusions=lambda wildcards, input: f"--user-exclusions {input.user_exclusions}"
        if input.user_exclusions
        else "",
    log:
        f"{RESULTS}/logs/usable_scans.log",
    threads: 1
    resources:
        mem_mb=res("split", "mem_mb"),
        runtime=res("split", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.preprocess.usable_scans --scans {input.scans:q} --excluded {input.excluded:q}"
        " --ras-pattern {params.ras_pattern:q} --qc-pattern {params.qc_pattern:q} --settings {params.settings:q}"
        " {params.user_exclusions} --usable {output.usable:q}"
        " --dropped {output.dropped:q} > {log:q} 2>&1"
