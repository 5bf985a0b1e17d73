# Alzheimer's disease (AD) versus cognitively normal (CN) from T1 MPRAGE MRI:
# ADNI download -> per-scan preprocessing -> subject-level split -> training, cross-validation
# and test evaluation of the video-pretrained 3D CNN.
# Read README.md for the commands and schemas/config.schema.yaml for every setting.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.17")


# The defaults sit beside this file, so the workflow runs from any working directory;
# --configfile files given on the command line are merged over them.
configfile: Path(workflow.basedir) / "config.yaml"


validate(config, "schemas/config.schema.yaml", set_default=True)


# The global description of `snakemake --report report.html` (see rules/report.smk).
report: "report/workflow.rst"


include: "rules/common.smk"


# Per-scan files are named by ADNI's subject and image ids (002_S_0295/I13722.nii.gz).
wildcard_constraints:
    subject=r"[^/]+",
    image_id=r"[^/_.]+",
    experiment=r"[^/]+",
    fold=r"\d+",


include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/split.smk"
include: "rules/train.smk"
include: "rules/volumetry.smk"
include: "rules/segmentation.smk"
include: "rules/evaluate.smk"
include: "rules/bayes.smk"
include: "rules/explain.smk"
include: "rules/report.smk"
include: "rules/predict.smk"


# The last line of every successful run: scans used, dropped and left out, and where the reasons are.
onsuccess:
    from workflow_scripts.preprocess.usable_scans import outcome_line

    if not PREDICT_ON or Path(RESULTS, "usable.tsv").is_file():  # a predict run without the study has no study line
        if not print_run_summary():  # the summary of `all` ends with the same line
            print(outcome_line(RESULTS))
    if PREDICT_ON:
        from workflow_scripts.predict.predict import outcome_line as predict_outcome_line

        if line := predict_outcome_line(PREDICTED):
            print(line)


rule all:
    default_target: True
    input:
        preprocess_targets,
        rules.split.output,
        expand(f"{RESULTS}/models/{{experiment}}/summary.json", experiment=EXPERIMENTS),
        expand(f"{RESULTS}/cv/{{experiment}}/summary.json", experiment=EXPERIMENTS),
        expand(
            f"{RESULTS}/models/{{experiment}}/package/model_card.json",
            experiment=experiments_of("video", "slices2d"),
        ),
        rules.compare.output,
        report_targets,
        embedding_figures,
        VOLUMETRY_TABLES,
        segmentation_targets,
        rules.explain.input,
        rules.run_summary.output,
