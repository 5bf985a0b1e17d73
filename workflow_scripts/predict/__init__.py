"""rules/predict.smk: a model package applied to new scans, without the study (predict)."""
