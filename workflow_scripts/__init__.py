"""Python code of the Alzheimer's MRI workflow, one sub-package per rule file (or pair of them):

    rules/data.smk                         -> workflow_scripts.data
    rules/preprocess.smk                   -> workflow_scripts.preprocess
    rules/split.smk, rules/train.smk       -> workflow_scripts.learning
    rules/evaluate.smk, rules/bayes.smk    -> workflow_scripts.evaluation
    rules/volumetry.smk, segmentation.smk  -> workflow_scripts.hippocampus
    rules/explain.smk                      -> workflow_scripts.explain
    rules/report.smk                       -> workflow_scripts.report
    rules/predict.smk                      -> workflow_scripts.predict
    (shared by all)                        -> workflow_scripts.common

Every module is a set of plain functions plus a thin ``main()`` command line that the
Snakemake rules call (``python -m workflow_scripts.<package>.<module> ...``).
"""
