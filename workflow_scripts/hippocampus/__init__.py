"""rules/volumetry.smk and rules/segmentation.smk: the Harvard-Oxford atlas (harvard_oxford), its
registration to each scan (hippocampus_atlas), the segmentation U-Net and hippocampal volumetry."""
