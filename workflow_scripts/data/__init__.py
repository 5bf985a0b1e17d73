"""rules/data.smk: the ADNI collection read and checked (ingest), diagnosis labels (labels), and the
generated demo collection (demo, with demo_faults for broken series)."""
