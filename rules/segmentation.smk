# The hippocampus segmentation branch: a MONAI U-Net (2D slice by slice or 3D) trained on known
# hippocampus labels (the demo's own truth mapped onto each scan's model grid, or a local copy of the
# Decathlon's Task04_Hippocampus), then one mask per scan (1 = left, 2 = right, on the grid of
# results/ras) that volumetry experiments with `masks: unet` measure through rule hippocampal_volumes.


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
            "python -m workflow_scripts.segmentation_data --truth {params.labels:q} --reference {input.reference:q}"
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
        flags=segmentation_flags(),
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
        "python -m workflow_scripts.segmentation train --threads {threads} {params.source} {params.flags}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule hippocampus_unet:
    input:
        image=stage_file("ras"),
        mask=stage_file("ras", "_mask"),
        model=f"{SEGMENTATION}/best.pt",
    output:
        stage_file("hippocampus"),
    params:
        device=SEG["device"],
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
        "python -m workflow_scripts.segmentation predict --threads {threads} --checkpoint {input.model:q}"
        " --image {input.image:q} --brain-mask {input.mask:q} --device {params.device}"
        " --output {output:q} > {log:q} 2>&1"
