# Hippocampal volumetry, the biomarker baseline: per scan, hippocampus labels from an MNI template
# registered to the scan with ANTs (Harvard-Oxford hippocampi warped along), left/right volumes
# normalised by intracranial volume, and a logistic regression on them trained, cross-validated and
# tested on the same split and folds as the networks. Its fit and predict rules write the paths
# train_model, train_fold, predict_test and predict_fold write, so evaluate_test, evaluate_fold,
# cv_summary and compare treat a volumetry experiment like any other.


rule volumetry:
    input:
        f"{RESULTS}/volumetry/atlas/volumes.tsv",
    localrule: True


rule hippocampus_atlas:
    input:
        image=stage_file("ras"),
        mask=stage_file("ras", "_mask"),
    output:
        labels=stage_file("hippocampus_atlas"),
        sidecar=f"{RESULTS}/hippocampus_atlas/{{subject}}/{{image_id}}.json",
        figure=report(
            f"{RESULTS}/hippocampus_atlas/{{subject}}/{{image_id}}.png",
            caption="../report/volumetry_atlas.rst",
            category="Hippocampus labels",
            labels={"subject": "{subject}", "image": "{image_id}"},
        ),
    params:
        settings=job_json(config, "hippocampus"),
    log:
        log_file("hippocampus_atlas"),
    benchmark:
        benchmark_file("hippocampus_atlas")
    threads: res("hippocampus_atlas", "threads")
    resources:
        mem_mb=res("hippocampus_atlas", "mem_mb"),
        runtime=res("hippocampus_atlas", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.hippocampus_atlas --threads {threads} --settings {params.settings:q}"
        " --input {input.image:q}"
        " --mask {input.mask:q} --output {output.labels:q} --sidecar {output.sidecar:q} --figure {output.figure:q}"
        " > {log:q} 2>&1"


rule hippocampal_volumes:
    wildcard_constraints:
        masks="atlas|unet",
    input:
        scans=f"{RESULTS}/usable.tsv",
        masks=hippocampus_masks,
        icv=brain_masks,
    output:
        table=f"{RESULTS}/volumetry/{{masks}}/volumes.tsv",
        figure=report(
            f"{RESULTS}/volumetry/{{masks}}/volumes.png",
            caption="../report/volumetry_volumes.rst",
            category="Hippocampal volumetry",
            labels={"masks": "{masks}"},
        ),
    params:
        masks_pattern=lambda wildcards: HIPPOCAMPUS_MASKS[wildcards.masks],
        icv_pattern=lambda wildcards: stage_file("stripped", "_mask"),
    log:
        f"{RESULTS}/logs/volumetry/{{masks}}_volumes.log",
    benchmark:
        f"{RESULTS}/benchmarks/volumetry/{{masks}}_volumes.tsv"
    threads: res("volumetry", "threads")
    resources:
        mem_mb=res("volumetry", "mem_mb"),
        runtime=res("volumetry", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.volumetry volumes --scans {input.scans:q} --masks-pattern {params.masks_pattern:q}"
        " --icv-pattern {params.icv_pattern:q} --output {output.table:q} --figure {output.figure:q} > {log:q} 2>&1"


rule fit_volumetry:
    wildcard_constraints:
        experiment=VOLUMETRY_EXPERIMENTS,
    input:
        train=f"{SPLITS}/train.csv",
        val=f"{SPLITS}/val.csv",
        volumes=volumetry_volumes,
    output:
        summary=f"{RESULTS}/models/{{experiment}}/summary.json",
        predictions=f"{RESULTS}/models/{{experiment}}/val_predictions.csv",
        model=f"{RESULTS}/models/{{experiment}}/model.joblib",
    params:
        settings=volumetry_settings,
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/train/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{experiment}}.tsv"
    threads: res("volumetry", "threads")
    resources:
        mem_mb=res("volumetry", "mem_mb"),
        runtime=res("volumetry", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.volumetry --threads {threads} fit --volumes {input.volumes:q}"
        " --train {input.train:q} --val {input.val:q} --settings {params.settings:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"


# One CV fold, fitted like the main model on the fold's manifests: train.csv fits, the inner
# validation split val.csv is only predicted (volumetry selects nothing on it: C and the features
# are fixed), and the held-out fold k is predicted by predict_volumetry_fold for the report.
use rule fit_volumetry as fit_volumetry_fold with:
    input:
        train=FOLD_MANIFEST.format(fold="{fold}", role="train"),
        val=FOLD_MANIFEST.format(fold="{fold}", role="val"),
        volumes=volumetry_volumes,
    output:
        summary=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/summary.json",
        predictions=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/val_predictions.csv",
        model=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/model.joblib",
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cv/{{experiment}}/fold{{fold}}.tsv"


rule predict_volumetry_test:
    wildcard_constraints:
        experiment=VOLUMETRY_EXPERIMENTS,
    input:
        model=f"{RESULTS}/models/{{experiment}}/model.joblib",
        summary=f"{RESULTS}/models/{{experiment}}/summary.json",
        test=f"{SPLITS}/test.csv",
        volumes=volumetry_volumes,
    output:
        f"{RESULTS}/evaluation/{{experiment}}/test_predictions.csv",
    log:
        f"{RESULTS}/logs/predict/{{experiment}}.log",
    threads: res("volumetry", "threads")
    resources:
        mem_mb=res("volumetry", "mem_mb"),
        runtime=res("volumetry", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.volumetry --threads {threads} predict --model {input.model:q}"
        " --summary {input.summary:q} --volumes {input.volumes:q} --manifest {input.test:q} --output {output:q}"
        " > {log:q} 2>&1"


# The fold's model on its held-out fold (subset held_out) or on the test set (subset test); the
# input named test is whichever of the two is predicted (fold_predicted_manifest, rules/common.smk).
use rule predict_volumetry_test as predict_volumetry_fold with:
    wildcard_constraints:
        experiment=VOLUMETRY_EXPERIMENTS,
        subset="held_out|test",
    input:
        model=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/model.joblib",
        summary=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/summary.json",
        test=fold_predicted_manifest,
        volumes=volumetry_volumes,
    output:
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/{{subset}}_predictions.csv",
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}_predict_{{subset}}.log",
