# Dissertation §4.4-4.5: fine-tune the video-pretrained network, once per experiment and once
# per cross-validation fold. The pretrained weights are fetched first by a local job (on a
# cluster: the submitting host, which has network; compute nodes often do not). Checkpoints
# (last.pt, best_acc.pt, best_loss.pt) sit beside the declared outputs but are not outputs
# themselves, so a re-run of an interrupted job finds last.pt and resumes instead of
# Snakemake deleting it.


rule pretrained_weights:
    output:
        f"{RESULTS}/weights/{{arch}}_{{weights}}.json",
    log:
        f"{RESULTS}/logs/pretrained_weights/{{arch}}_{{weights}}.log",
    wildcard_constraints:
        arch="r3d_18|mc3_18|r2plus1d_18|mvit_v2_s|resnet50",
        weights="kinetics400|imagenet",
    localrule: True
    priority: 100
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.models fetch --arch {wildcards.arch} --weights {wildcards.weights}"
        " --record {output:q} > {log:q} 2>&1"


rule train_model:
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
    input:
        train=f"{SPLITS}/train.csv",
        val=f"{SPLITS}/val.csv",
        tensors=all_tensors,
        weights=experiment_weights,
    output:
        summary=f"{RESULTS}/models/{{experiment}}/summary.json",
        history=f"{RESULTS}/models/{{experiment}}/history.json",
        predictions=f"{RESULTS}/models/{{experiment}}/val_predictions.csv",
    params:
        settings=train_settings,
        tensor_dir=f"{RESULTS}/tensors",
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        run_name=lambda wildcards: wildcards.experiment,
    log:
        f"{RESULTS}/logs/train/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{experiment}}.tsv"
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.train --threads {threads} fit --settings {params.settings:q}"
        " --train {input.train:q} --val {input.val:q} --tensor-dir {params.tensor_dir:q} --out-dir {params.out_dir:q}"
        " --run-name {params.run_name:q} > {log:q} 2>&1"


# One CV fold: the same command on the fold's manifests. Early stopping and the checkpoint choice
# see only the inner validation split (val.csv, subjects of the other folds); the held-out fold k
# is predicted afterwards by rule predict_fold and is the only thing reported.
use rule train_model as train_fold with:
    input:
        train=FOLD_MANIFEST.format(fold="{fold}", role="train"),
        val=FOLD_MANIFEST.format(fold="{fold}", role="val"),
        tensors=all_tensors,
        weights=experiment_weights,
    output:
        summary=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/summary.json",
        history=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/history.json",
        predictions=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/val_predictions.csv",
    params:
        run_name=lambda wildcards: f"{wildcards.experiment}-fold{wildcards.fold}",
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cv/{{experiment}}/fold{{fold}}.tsv"


# The fold's selected checkpoint (the one selected_checkpoint picks for the main model) on its
# held-out fold (subset held_out: the cross-validation figure) or on the test set (subset test).
rule predict_fold:
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
        subset="held_out|test",
    input:
        model=f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/summary.json",
        manifest=fold_predicted_manifest,
        tensors=all_tensors,
    output:
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/{{subset}}_predictions.csv",
    params:
        checkpoint=selected_checkpoint,
        tensor_dir=f"{RESULTS}/tensors",
    log:
        f"{RESULTS}/logs/cv/{{experiment}}/fold{{fold}}_predict_{{subset}}.log",
    threads: res("predict", "threads")
    resources:
        mem_mb=res("predict", "mem_mb"),
        runtime=res("predict", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.train --threads {threads} predict --manifest {input.manifest:q}"
        " --checkpoint {params.checkpoint:q} --tensor-dir {params.tensor_dir:q} --predictions-out {output:q}"
        " > {log:q} 2>&1"


rule predict_test:
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
    input:
        model=f"{RESULTS}/models/{{experiment}}/summary.json",
        test=f"{SPLITS}/test.csv",
        tensors=all_tensors,
    output:
        predictions=f"{RESULTS}/evaluation/{{experiment}}/test_predictions.csv",
        embeddings=f"{RESULTS}/evaluation/{{experiment}}/embeddings_test.npz",
    params:
        checkpoint=selected_checkpoint,
        tensor_dir=f"{RESULTS}/tensors",
    log:
        f"{RESULTS}/logs/predict/{{experiment}}.log",
    threads: res("predict", "threads")
    resources:
        mem_mb=res("predict", "mem_mb"),
        runtime=res("predict", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.train --threads {threads} predict --manifest {input.test:q}"
        " --checkpoint {params.checkpoint:q} --tensor-dir {params.tensor_dir:q}"
        " --predictions-out {output.predictions:q} --embeddings-out {output.embeddings:q} > {log:q} 2>&1"


# The penultimate-layer embeddings of the validation and test scans in two dimensions (train.export_embeddings).
rule embeddings_projection:
    input:
        model=f"{RESULTS}/models/{{experiment}}/summary.json",
        test=f"{RESULTS}/evaluation/{{experiment}}/embeddings_test.npz",
    output:
        report(
            f"{RESULTS}/evaluation/{{experiment}}/embeddings.png",
            caption="../report/embeddings.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "figure": "embeddings"},
        ),
    params:
        val=lambda wildcards, input: os.path.join(os.path.dirname(input.model), "embeddings_val.npz"),
    log:
        f"{RESULTS}/logs/embeddings/{{experiment}}.log",
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
    threads: 1
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.train project {params.val:q} {input.test:q} --output {output:q}"
        " > {log:q} 2>&1"


# The portable package of a trained network (workflow_scripts/learning/model_package.py): its selected
# checkpoint as a plain state dict and a TorchScript module, and a model card with the test metrics,
# the preprocessing settings and hashed training identifiers; `snakemake predict` and users elsewhere
# read only this folder.
rule model_package:
    wildcard_constraints:
        experiment=NETWORK_EXPERIMENTS,
    input:
        model=f"{RESULTS}/models/{{experiment}}/summary.json",
        metrics=f"{RESULTS}/evaluation/{{experiment}}/metrics.json",
        scans=f"{RESULTS}/scans.tsv",
    output:
        card=f"{RESULTS}/models/{{experiment}}/package/model_card.json",
        state=f"{RESULTS}/models/{{experiment}}/package/model.pt",
    params:
        checkpoint=selected_checkpoint,
        settings=job_json(config, "preprocess", "data.classes"),
        out_dir=lambda wildcards, output: os.path.dirname(output.card),
    log:
        f"{RESULTS}/logs/model_package/{{experiment}}.log",
    threads: 1
    resources:
        mem_mb=res("predict", "mem_mb"),
        runtime=res("predict", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.learning.model_package --summary {input.model:q} --checkpoint {params.checkpoint:q}"
        " --test-metrics {input.metrics:q} --scans {input.scans:q} --settings {params.settings:q}"
        " --experiment {wildcards.experiment:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
