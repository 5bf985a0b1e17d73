# Alzheimer's disease (AD) versus cognitively normal (CN) from T1 MPRAGE MRI:
# ADNI download -> per-scan preprocessing -> (split, train, evaluate, explain: later phases).
# Read README.md for the commands and schemas/config.schema.yaml for every setting.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


# The defaults sit beside this file, so the workflow runs from any working directory;
# --configfile files given on the command line are merged over them.
configfile: Path(workflow.basedir) / "config.yaml"


validate(config, "schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"


# Per-scan files are named by ADNI's subject and image ids (002_S_0295/I13722.nii.gz).
wildcard_constraints:
    subject=r"[^/]+",
    image_id=r"[^/_.]+",


include: "rules/data.smk"
include: "rules/preprocess.smk"


rule all:
    default_target: True
    input:
        preprocess_targets,
