# Helpers shared by the rules: paths, look-ups in the scans table, command-line flags.
import json
import os
import re
import shlex
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError

# Rules run `python -m workflow_scripts.<stage> ...`: put this checkout's package first on
# Python's path, so the code beside this Snakefile runs from any working directory and
# inside conda environments, whatever else is installed.
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)

RESULTS = config["results_dir"]
DATA = config["data"]
PRE = config["preprocess"]
STAGES = ["nifti", "stripped", "resampled", "cropped128", "n4", "ras"]


def stage_file(stage, suffix=""):
    """Path pattern of one scan's file of one stage, named by ADNI's own ids."""
    return f"{RESULTS}/{stage}/{{subject}}/{{image_id}}{suffix}.nii.gz"


def log_file(stage):
    return f"{RESULTS}/logs/{stage}/{{subject}}/{{image_id}}.log"


def benchmark_file(stage):
    return f"{RESULTS}/benchmarks/{stage}/{{subject}}/{{image_id}}.tsv"


def res(rule_name, key):
    return config["resources"][rule_name][key]


def check_demo_paths():
    """With the demo source the collection CSV must live in the demo root it is generated into."""
    if DATA["source"] == "demo" and Path(DATA["collection_csv"]).parent != Path(DATA["adni_root"]):
        raise WorkflowError(
            f"data.source is demo, so data.collection_csv ({DATA['collection_csv']}) must be a file directly "
            f"inside data.adni_root ({DATA['adni_root']}), where the demo collection is generated."
        )


check_demo_paths()


def scans_table():
    """The ingest checkpoint's table of usable scans (waits for ingest to run)."""
    path = checkpoints.ingest.get().output.scans
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def dicom_dir(wildcards):
    table = scans_table()
    row = table[table["image_id"] == wildcards.image_id]
    if row.empty:
        raise WorkflowError(f"image {wildcards.image_id} is not in {RESULTS}/scans.tsv")
    return row["dicom_dir"].iloc[0]


def expand_scans(pattern):
    table = scans_table()
    return expand(pattern, zip, subject=table["subject"], image_id=table["image_id"])


def preprocess_targets(wildcards):
    """Every stage's final file for every usable scan, and its QC montage."""
    return (
        expand_scans(stage_file("ras"))
        + expand_scans(stage_file("ras", "_mask"))
        + expand_scans(f"{RESULTS}/qc/{{subject}}/{{image_id}}.png")
    )


SKULLSTRIP = PRE["skullstrip"]
SYNTHSTRIP_CACHE_FILE = f"{SKULLSTRIP['synthstrip_cache']}/synthstrip.1.pt"


def synthstrip_weights(wildcards=None):
    """Weights for skull stripping with SynthStrip (a configured copy or the cached download)."""
    if SKULLSTRIP["method"] != "synthstrip":
        return []
    configured = SKULLSTRIP["synthstrip_weights"]
    if configured:
        if not Path(configured).expanduser().is_file():
            raise WorkflowError(
                f"preprocess.skullstrip.synthstrip_weights={configured} does not exist. Remedies: (1) point "
                f"it at a copy of synthstrip.1.pt, or set it to null to download it once into "
                f"{SKULLSTRIP['synthstrip_cache']}; (2) set preprocess.skullstrip.method: deepbet (works offline)."
            )
        return str(Path(configured).expanduser())
    return SYNTHSTRIP_CACHE_FILE


def skullstrip_flags():
    s = SKULLSTRIP
    flags = [f"--method {s['method']}"]
    if s["method"] == "synthstrip":
        flags.append(f"--synthstrip-border {s['synthstrip_border']}")
    else:
        flags.append(f"--deepbet-threshold {s['deepbet_threshold']} --deepbet-dilate {s['deepbet_dilate']}")
    if s["gpu"]:
        flags.append("--gpu")
    return " ".join(flags)


def n4_flags():
    n4 = PRE["n4"]
    flags = [
        f"--shrink-factor {n4['shrink_factor']}",
        "--iterations " + " ".join(str(i) for i in n4["iterations"]),
        f"--tolerance {n4['tolerance']}",
    ]
    if n4["spline_param"] is not None:
        flags.append(f"--spline-param {n4['spline_param']}")
    return " ".join(flags)


def n4_mask(wildcards):
    if not PRE["n4"]["use_mask"]:
        return []
    return stage_file("cropped128", "_mask").format(subject=wildcards.subject, image_id=wildcards.image_id)


# --- split, train, evaluate -------------------------------------------------------------

TENSOR_FILE = f"{RESULTS}/tensors/{{subject}}/{{image_id}}.npy"
SPLITS = f"{RESULTS}/splits"
MAIN = config["main_experiment"]
if MAIN not in config["experiments"]:
    raise WorkflowError(
        f"main_experiment '{MAIN}' is not one of the experiments in config: {', '.join(config['experiments'])}"
    )


# Every experiment is trained, cross-validated and evaluated on the same split and folds; the
# main one comes first in the comparison.
EXPERIMENTS = [MAIN] + [name for name in config["experiments"] if name != MAIN]


def experiment_kind(name):
    """video (a video network), slices2d (the 2D ResNet-50 baseline) or volumetry (hippocampal volumes)."""
    return config["experiments"][name].get("kind", "video")


def experiments_of(*kinds):
    return [name for name in EXPERIMENTS if experiment_kind(name) in kinds]


def name_pattern(names):
    """A wildcard constraint matching exactly these experiment names (nothing when there are none),
    so that rules of different kinds can write the same output paths without ambiguity."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


NETWORK_EXPERIMENTS = name_pattern(experiments_of("video", "slices2d"))
VOLUMETRY_EXPERIMENTS = name_pattern(experiments_of("volumetry"))


def all_tensors(wildcards):
    """The cached tensor of every usable scan (training reads these, never NIfTI)."""
    return expand_scans(TENSOR_FILE)


def experiment_weights(wildcards):
    """The Kinetics-400 weights record a training job needs, fetched once by a local job:
    cluster compute nodes often have no network."""
    exp = config["experiments"][wildcards.experiment]
    if experiment_kind(wildcards.experiment) != "video" or str(exp["weights"]) != "kinetics400":
        return []
    return f"{RESULTS}/weights/{exp['arch']}_kinetics400.json"


def train_flags(wildcards):
    """Command-line flags of one experiment's training run, from config.train and the experiment."""
    t, exp = config["train"], config["experiments"][wildcards.experiment]
    aug = t["augmentation"]
    return " ".join(
        [
            f"--arch {exp['arch']} --weights {shlex.quote(str(exp['weights']))}",
            f"--trainable-from {exp.get('trainable_from', 'layer4')}",
            f"--max-epochs {t['max_epochs']} --batch-size {t['batch_size']} --seed {t['seed']}",
            f"--lr-head {t['lr_head']} --lr-backbone {t['lr_backbone']} --weight-decay {t['weight_decay']}",
            f"--t0 {t['t0']} --patience {t['patience']} --class-weights {t['class_weights']}",
            "--gamma-log-range {} {} --gamma-p {}".format(*aug["gamma_log_range"], aug["gamma_p"]),
            "--noise-std-range {} {} --noise-p {}".format(*aug["noise_std_range"], aug["noise_p"]),
            f"--znorm-mask {t['znorm_mask']} --device {t['device']} --num-workers {t['num_workers']}",
            f"--on-changed-settings {t['on_changed_settings']}",
            "--recalibrate-bn" if t["recalibrate_bn"] else "",
            f"--wandb-mode {t['wandb']['mode']} --wandb-project {shlex.quote(t['wandb']['project'])}",
        ]
    )


def fold_metrics(wildcards):
    return expand(
        f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/evaluation/metrics.json",
        experiment=wildcards.experiment,
        fold=range(config["cv"]["folds"]),
    )


def comparison_flags(wildcards, input):
    """--experiment NAME METRICS PREDICTIONS for every experiment, main first."""
    return " ".join(
        f"--experiment {shlex.quote(name)} {shlex.quote(metrics)} {shlex.quote(predictions)}"
        for name, metrics, predictions in zip(EXPERIMENTS, input.metrics, input.predictions)
    )
