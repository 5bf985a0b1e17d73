# The hippocampus segmentation branch: a MONAI U-Net (2D slice by slice or 3D) trained on known
# hippocampus labels (the demo's own truth mapped onto each scan's model grid, or a local copy of the
# Decathlon's Task04_Hippocampus), then one mask per scan (1 = left, 2 = right, on the grid of
# results/ras) that volumetry experiments with `masks: unet` measure through rule hippocampal_volumes.
#
# Cross-fitted masks (segmentation.source demo): the masks feed a model that is cross-validated on
# the train+val subjects, so no mask may come from a U-Net that saw its subject. K+1 U-Nets train:
# the main one on splits/train.csv (selected on val.csv), and one per CV fold k on
# splits/cv/fold<k>/train.csv (selected on fold<k>/val.csv). Fold k's U-Net segments the scans of
# fold<k>/held_out.csv; the main one the test scans and scans in no partition (left out by class
# balancing). Which U-Net segments a scan is decided once, by checkpoint segmentation_mask_models
# (results/segmentation/mask_models.tsv, read from the manifests): the split rule is not a
# checkpoint, and this small table is, so each mask job gets exactly the one checkpoint it uses
# (a retrained fold re-runs only that fold's masks) rather than all K+1 checkpoints and every
# manifest as inputs with the choice made inside the job. The mask job still refuses a subject its
# U-Net trained or was selected on (the checkpoint records those subjects), and writes a JSON
# sidecar beside the mask naming the U-Net's run folder, its subject lists and their SHA-256.
# With segmentation.source msd the one U-Net learnt from Decathlon images only and never saw an
# ADNI subject, so it segments every scan and no fold U-Net is trained.


rule segmentation:
    input:
        segmentation_outputs,
    localrule: True


if DATA["source"] == "demo":

    rule hippocampus_truth:
        input:
            truth=f"{DATA['adni_root']}/truth",
            reference=stage_file("ras"),
        output:
            SEGMENTATION_TRUTH,
        params:
            labels=lambda wildcards, input: f"{input.truth}/{wildcards.subject}/{wildcards.image_id}_hippocampus.nii.gz",
        log:
            log_file("hippocampus_truth"),
        benchmark:
            benchmark_file("hippocampus_truth")
        threads: res("segmentation_truth", "threads")
        resources:
            mem_mb=res("segmentation_truth", "mem_mb"),
            runtime=res("segmentation_truth", "runtime"),
        conda:
            "../envs/pipeline.yaml"
        shell:
            "python -m workflow_scripts.hippocampus.segmentation_data --truth {params.labels:q} --reference {input.reference:q}"
            " --output {output:q} > {log:q} 2>&1"


rule train_segmentation:
    input:
        unpack(segmentation_inputs),
    output:
        summary=f"{SEGMENTATION}/summary.json",
        history=f"{SEGMENTATION}/history.json",
        dice=f"{SEGMENTATION}/dice.tsv",
        best=f"{SEGMENTATION}/best.pt",
        last=f"{SEGMENTATION}/last.pt",
        figure=report(
            f"{SEGMENTATION}/best_worst.png",
            caption="../report/segmentation.rst",
            category="Hippocampus segmentation",
        ),
    params:
        source=segmentation_source_flags,
        settings=segmentation_settings(),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/segmentation/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/segmentation/train.tsv"
    threads: res("segmentation_train", "threads")
    resources:
        mem_mb=res("segmentation_train", "mem_mb"),
        runtime=res("segmentation_train", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.segmentation train --threads {threads} {params.source}"
        " --settings {params.settings:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


# The same training for CV fold k: fit on its train.csv, select on its val.csv, score its held_out.csv.
use rule train_segmentation as train_segmentation_fold with:
    input:
        unpack(segmentation_fold_inputs),
    output:
        summary=f"{SEGMENTATION_FOLD}/summary.json",
        history=f"{SEGMENTATION_FOLD}/history.json",
        dice=f"{SEGMENTATION_FOLD}/dice.tsv",
        best=f"{SEGMENTATION_FOLD}/best.pt",
        last=f"{SEGMENTATION_FOLD}/last.pt",
        figure=f"{SEGMENTATION_FOLD}/best_worst.png",
    log:
        f"{RESULTS}/logs/segmentation/cv/fold{{fold}}/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/segmentation/cv/fold{{fold}}/train.tsv"


checkpoint segmentation_mask_models:
    input:
        unpack(segmentation_mask_models_inputs),
    output:
        SEGMENTATION_MASK_MODELS,
    params:
        held_out=lambda wildcards, input: " ".join(shlex.quote(path) for path in input.held_out),
    log:
        f"{RESULTS}/logs/segmentation/mask_models.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.segmentation assign --scans {input.scans:q} --train {input.train:q}"
        " --val {input.val:q} --test {input.test:q} --held-out {params.held_out} --output {output:q} > {log:q} 2>&1"


rule hippocampus_unet:
    input:
        image=stage_file("ras"),
        mask=stage_file("ras", "_mask"),
        model=segmentation_model,
    output:
        mask=stage_file("hippocampus"),
        sidecar=SEGMENTATION_SIDECAR,
    log:
        log_file("hippocampus_unet"),
    benchmark:
        benchmark_file("hippocampus_unet")
    threads: res("segmentation_predict", "threads")
    resources:
        mem_mb=res("segmentation_predict", "mem_mb"),
        runtime=res("segmentation_predict", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.hippocampus.segmentation predict --threads {threads} --checkpoint {input.model:q}"
        " --image {input.image:q} --brain-mask {input.mask:q} --subject {wildcards.subject:q}"
        " --output {output.mask:q} --sidecar {output.sidecar:q} > {log:q} 2>&1"
