# A trained model on new scans (config predict:, workflow_scripts/predict/predict.py). The scans go through
# the study's own stage rules (`use rule`), with the settings the model package records, under
# results/predict/<cohort>/; a guard job first refuses scans the model learnt from.

if not PREDICT_ON:

    rule predict:
        input:
            predict_not_configured,
        localrule: True

else:

    rule predict:
        input:
            f"{PREDICTED}/predictions.html",
        localrule: True

    # The scans, every DICOM series read completely (ingest's checks), and the leakage guard.
    rule predict_scans:
        input:
            card=f"{PREDICT['model']}/model_card.json",
            scans=PREDICT_SCANS["input"].tolist(),
            labels=[PREDICT["labels"]] if PREDICT["labels"] else [],
            collection=[PREDICT["collection_csv"]] if PREDICT["source"] == "ida" else [],
        output:
            PREDICT_SCAN_LIST,
        params:
            settings=job_json(config, *PREDICT_SCANS_SECTIONS, omit=["predict.model", "predict.name", "predict.explain"]),
            package=lambda wildcards, input: os.path.dirname(input.card),
        log:
            f"{PREDICTED}/logs/scans.log",
        threads: 1
        resources:
            mem_mb=res("ingest", "mem_mb"),
            runtime=res("ingest", "runtime"),
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m workflow_scripts.predict.predict scans --settings {params.settings:q}"
            " --package {params.package:q} --output {output:q} > {log:q} 2>&1"

    rule predict_nifti:
        input:
            scans=PREDICT_SCAN_LIST,
            source=predicted_input,
        output:
            predicted_file("nifti"),
        log:
            predicted_log("nifti"),
        benchmark:
            predicted_benchmark("nifti")
        threads: res("nifti", "threads")
        resources:
            mem_mb=res("nifti", "mem_mb"),
            runtime=res("nifti", "runtime"),
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m workflow_scripts.predict.predict import --scans {input.scans:q} --image-id {wildcards.image_id:q}"
            " --output {output:q} > {log:q} 2>&1"

    use rule stripped as predict_stripped with:
        input:
            image=predicted_file("nifti"),
            weights=synthstrip_weights(skullstrip=PREDICT_PRE["skullstrip"]),
        output:
            image=predicted_file("stripped"),
            mask=predicted_file("stripped", "_mask"),
            sidecar=predicted_file("stripped", ext=".json"),
        params:
            settings=skullstrip_settings(PREDICT_PRE["skullstrip"]),
            weights=lambda wildcards, input: f"--synthstrip-weights {input.weights}" if input.weights else "",
        log:
            predicted_log("stripped"),
        benchmark:
            predicted_benchmark("stripped")

    use rule resampled as predict_resampled with:
        input:
            image=predicted_file("stripped"),
            mask=predicted_file("stripped", "_mask"),
        output:
            image=predicted_file("resampled"),
            mask=predicted_file("resampled", "_mask"),
        params:
            settings=preprocess_settings(PREDICT_PRE, "resample"),
        log:
            predicted_log("resampled"),
        benchmark:
            predicted_benchmark("resampled")

    use rule cropped128 as predict_cropped128 with:
        input:
            image=predicted_file("resampled"),
            mask=predicted_file("resampled", "_mask"),
        output:
            image=predicted_file("cropped128"),
            mask=predicted_file("cropped128", "_mask"),
        params:
            settings=preprocess_settings(PREDICT_PRE, "crop", "target_shape"),
        log:
            predicted_log("cropped128"),
        benchmark:
            predicted_benchmark("cropped128")

    use rule n4 as predict_n4 with:
        input:
            image=predicted_file("cropped128"),
            mask=n4_mask_of(PREDICT_PRE, predicted_file("cropped128", "_mask")),
        output:
            predicted_file("n4"),
        params:
            settings=preprocess_settings(PREDICT_PRE, "n4"),
            mask=lambda wildcards, input: f"--mask {input.mask}" if input.mask else "",
        log:
            predicted_log("n4"),
        benchmark:
            predicted_benchmark("n4")

    use rule ras as predict_ras with:
        input:
            image=predicted_file("n4"),
            mask=predicted_file("cropped128", "_mask"),
        output:
            image=predicted_file("ras"),
            mask=predicted_file("ras", "_mask"),
        log:
            predicted_log("ras"),
        benchmark:
            predicted_benchmark("ras")

    use rule qc as predict_qc with:
        input:
            **{stage: predicted_file(stage) for stage in STAGES},
            mask=predicted_file("stripped", "_mask"),
            resampled_mask=predicted_file("resampled", "_mask"),
            cropped_mask=predicted_file("cropped128", "_mask"),
            ras_mask=predicted_file("ras", "_mask"),
        output:
            predicted_file("qc", ext=".png"),
        log:
            predicted_log("qc"),
        benchmark:
            predicted_benchmark("qc")

    use rule qc_metrics as predict_qc_metrics with:
        input:
            nifti=predicted_file("nifti"),
            mask=predicted_file("stripped", "_mask"),
            ras=predicted_file("ras"),
            ras_mask=predicted_file("ras", "_mask"),
        output:
            predicted_file("qc", ext=".json"),
        log:
            predicted_log("qc_metrics"),
        benchmark:
            predicted_benchmark("qc_metrics")

    use rule hippocampus_atlas as predict_hippocampus_atlas with:
        input:
            image=predicted_file("ras"),
            mask=predicted_file("ras", "_mask"),
        output:
            labels=predicted_file("hippocampus_atlas"),
            sidecar=predicted_file("hippocampus_atlas", ext=".json"),
            figure=predicted_file("hippocampus_atlas", ext=".png"),
        log:
            predicted_log("hippocampus_atlas"),
        benchmark:
            predicted_benchmark("hippocampus_atlas")

    # One job for the cohort: the package loaded once, p(AD) per scan, the metrics where labels are
    # known, a map and the hippocampal share per scan, and the cohort's page.
    rule predict_cohort:
        input:
            scans=PREDICT_SCAN_LIST,
            card=f"{PREDICT['model']}/model_card.json",
            ras=expand_predicted(predicted_file("ras")),
            masks=expand_predicted(predicted_file("ras", "_mask")),
            qc=expand_predicted(predicted_file("qc", ext=".json")),
            montages=expand_predicted(predicted_file("qc", ext=".png")),
            # the hippocampal share of each map (no maps: no registration)
            hippocampus=expand_predicted(predicted_file("hippocampus_atlas")) if PREDICT["explain"] else [],
        output:
            predictions=f"{PREDICTED}/predictions.csv",
            dropped=f"{PREDICTED}/dropped.tsv",
            summary=f"{PREDICTED}/summary.json",
            page=f"{PREDICTED}/predictions.html",
        params:
            package=lambda wildcards, input: os.path.dirname(input.card),
            out_dir=lambda wildcards, output: os.path.dirname(output.summary),
            cohort=Path(PREDICTED).name,
            settings=job_json(config, *PREDICT_SCORE_SECTIONS, omit=["predict.model", "predict.name", "predict.input",
                                                                     "predict.collection_csv", "predict.source"]),
            ras=lambda wildcards: predicted_file("ras"),
            mask=lambda wildcards: predicted_file("ras", "_mask"),
            qc=lambda wildcards: predicted_file("qc", ext=".json"),
            montage=lambda wildcards: predicted_file("qc", ext=".png"),
            hippocampus=lambda wildcards: predicted_file("hippocampus_atlas"),
        log:
            f"{PREDICTED}/logs/predict.log",
        benchmark:
            f"{PREDICTED}/benchmarks/predict.tsv"
        threads: res("predict", "threads")
        resources:
            mem_mb=res("predict", "mem_mb"),
            runtime=res("predict", "runtime"),
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m workflow_scripts.predict.predict --threads {threads} score --scans {input.scans:q}"
            " --package {params.package:q} --out-dir {params.out_dir:q} --cohort {params.cohort:q}"
            " --settings {params.settings:q} --ras-pattern {params.ras:q} --mask-pattern {params.mask:q}"
            " --qc-pattern {params.qc:q} --montage-pattern {params.montage:q}"
            " --hippocampus-pattern {params.hippocampus:q} > {log:q} 2>&1"
