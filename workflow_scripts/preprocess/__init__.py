"""rules/preprocess.smk: the six stages (convert, skullstrip, resample, crop, n4, reorient), their QC
montages and metrics (qc, qc_metrics), and the table of scans that passed (usable_scans)."""
