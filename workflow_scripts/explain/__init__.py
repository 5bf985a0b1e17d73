"""rules/explain.smk: Grad-CAM and occlusion maps of the test scans (explain)."""
