"""Python code of the Alzheimer's MRI workflow: one module per stage or concern.

Every module is a set of plain functions plus a thin ``main()`` command line that the
Snakemake rules call (``python -m workflow_scripts.<module> ...``).
"""
