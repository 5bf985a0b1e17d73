# Alzheimer's disease (AD) versus cognitively normal (CN) from T1 MPRAGE MRI:
# ADNI download -> per-scan preprocessing -> (split, train, evaluate, explain: later phases).
# Read README.md for the commands and schemas/config.schema.yaml for every setting.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"


rule all:
    default_target: True
    input:
        preprocess_targets,
