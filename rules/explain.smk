# Explanations of the video networks on test scans: which test scans (a checkpoint: the rest of
# the DAG depends on the predictions), then per experiment 3D Grad-CAM and occlusion maps,
# slice figures, depth profiles, the hippocampal share of attribution and the
# randomised-weights sanity check (Adebayo et al. 2018).


rule explain:
    input:
        expand(f"{RESULTS}/explain/{{experiment}}/summary.json", experiment=EXPLAIN_EXPERIMENTS),
    localrule: True


checkpoint explain_scans:
    input:
        f"{RESULTS}/evaluation/{{experiment}}/test_predictions.csv",
    output:
        f"{RESULTS}/explain/{{experiment}}/scans.csv",
    params:
        settings=job_json(config, "explain", only=("explain.n_correct", "explain.n_wrong")),
    log:
        f"{RESULTS}/logs/explain/{{experiment}}_scans.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.explain.explain choose --predictions {input:q} --settings {params.settings:q}"
        " --output {output:q} > {log:q} 2>&1"


rule explain_experiment:
    wildcard_constraints:
        experiment=name_pattern(EXPLAIN_EXPERIMENTS),
    input:
        unpack(explain_inputs),
        model=f"{RESULTS}/models/{{experiment}}/summary.json",
        scans=f"{RESULTS}/explain/{{experiment}}/scans.csv",
    output:
        summary=f"{RESULTS}/explain/{{experiment}}/summary.json",
        shares=f"{RESULTS}/explain/{{experiment}}/hippocampal_share.csv",
        share_summary=f"{RESULTS}/explain/{{experiment}}/hippocampal_share_summary.csv",
        profiles=f"{RESULTS}/explain/{{experiment}}/depth_profiles.csv",
        sanity=f"{RESULTS}/explain/{{experiment}}/sanity.csv",
        share_figure=report(
            f"{RESULTS}/explain/{{experiment}}/hippocampal_share.png",
            caption="../report/explain_share.rst",
            category="Explanations",
            labels={"experiment": "{experiment}", "figure": "hippocampal share"},
        ),
        profiles_figure=report(
            f"{RESULTS}/explain/{{experiment}}/depth_profiles.png",
            caption="../report/explain_profiles.rst",
            category="Explanations",
            labels={"experiment": "{experiment}", "figure": "depth profiles"},
        ),
        page=report(
            f"{RESULTS}/explain/{{experiment}}/explain.html",
            caption="../report/explain_tables.rst",
            category="Explanations",
            labels={"experiment": "{experiment}", "figure": "tables"},
        ),
        scans=report(
            directory(f"{RESULTS}/explain/{{experiment}}/scans"),
            patterns=["{subject}/{image_id}.png"],
            caption="../report/explain_maps.rst",
            category="Explanations",
            labels={"experiment": "{experiment}", "figure": "maps {subject} {image_id}"},
        ),
    params:
        checkpoint=selected_checkpoint,
        settings=explain_settings(),
        # the patterns the inputs were expanded from (functions, so Snakemake leaves their
        # {subject} and {image_id} for the script to fill in from scans.csv)
        tensor=lambda wildcards: EXPLAIN_FILE_PATTERNS["tensor"],
        image=lambda wildcards: EXPLAIN_FILE_PATTERNS["image"],
        brain=lambda wildcards: EXPLAIN_FILE_PATTERNS["brain"],
        hippocampus=lambda wildcards: EXPLAIN_FILE_PATTERNS["hippocampus"],
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/explain/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/explain/{{experiment}}.tsv"
    threads: res("explain", "threads")
    resources:
        mem_mb=res("explain", "mem_mb"),
        runtime=res("explain", "runtime"),
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts.explain.explain run --threads {threads} --scans {input.scans:q}"
        " --checkpoint {params.checkpoint:q} --tensor-pattern {params.tensor:q} --image-pattern {params.image:q}"
        " --brain-pattern {params.brain:q} --hippocampus-pattern {params.hippocampus:q} --out-dir {params.out_dir:q}"
        " --experiment {wildcards.experiment} --settings {params.settings:q} > {log:q} 2>&1"
