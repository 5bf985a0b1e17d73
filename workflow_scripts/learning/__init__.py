"""rules/split.smk and rules/train.smk: subject-level splits (split), the tensor cache, the networks
(models), the training recipe and loop (recipe, train), and the portable model package."""
