# Helpers shared by the rules: paths, look-ups in the scans table, command-line flags.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod

from workflow_scripts.common.cli import PipelineError, machine_memory_mb
from workflow_scripts.common.settings import job_json, resolve
from workflow_scripts.learning.recipe import training_settings
from workflow_scripts.preprocess.skullstrip import command_settings as skullstrip_command_settings
from workflow_scripts.hippocampus.volumetry import command_settings as volumetry_command_settings

# Rules run `python -m workflow_scripts.<stage> ...`: put this checkout's package first on
# Python's path, so the code beside this Snakefile runs from any working directory and
# inside conda environments, whatever else is installed. Without conda environments, `python`
# is the interpreter running Snakemake (the virtual environment with the project's packages),
# so `.venv/bin/snakemake` works without activating the environment.
def job_path_prefix():
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return ""
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "


shell.prefix(
    "set -euo pipefail; "
    + job_path_prefix()
    + f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)

# offline: true resolves every download before anything reads the config: the file on this machine,
# or what needs none (workflow_scripts/common/offline.py); the log says which.
if config["offline"]:
    from workflow_scripts.common.offline import offline_config

    for note in offline_config(config):
        logger.warning(note)

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


def register_local_memory():
    """A local run without --resources mem_mb gets this machine's memory as its mem_mb, so Snakemake never starts
    jobs whose declared memory (resources: in config.yaml) sums past it; a job declaring more than the machine
    has is given all of it (Snakemake caps a job at the run's total) and runs alone. On a cluster each job has
    its own allocation."""
    given = workflow.global_resources
    if given["_nodes"].value is not None or any(given.get(k).value is not None for k in ("mem_mb", "mem", "mem_mib")):
        return
    machine = machine_memory_mb()
    if machine:
        workflow.register_resource("mem_mb", machine)


register_local_memory()


def res(rule_name, key):
    """A job's declared threads, memory (MB) or run time (config resources:)."""
    return config["resources"][rule_name][key]


def check_demo_paths():
    """With the demo source the collection CSV must live in the demo root it is generated into."""
    if DATA["source"] == "demo" and Path(DATA["collection_csv"]).parent != Path(DATA["adni_root"]):
        raise WorkflowError(
            f"data.source is demo, so data.collection_csv ({DATA['collection_csv']}) must be a file directly "
            f"inside data.adni_root ({DATA['adni_root']}), where the demo collection is generated."
        )


check_demo_paths()


def check_classes_have_rows():
    """A class of data.classes that no row of the collection CSV has stops the run before any job (the CSV's
    groups listed). The demo's CSV is checked once it exists; visit_diagnosis takes classes from the diagnosis
    table, not the Group column."""
    csv = Path(DATA["collection_csv"])
    if not workflow.is_main_process or not csv.is_file() or DATA["label_policy"] == "visit_diagnosis":
        return
    from workflow_scripts.data.ingest import classes_without_rows, groups_in

    try:
        missing = classes_without_rows(csv, DATA["classes"])
        if missing:
            raise WorkflowError(
                f"data.classes names {', '.join(missing)}, but no row of {csv} has that group (compared without case "
                f"and surrounding spaces); the CSV's groups are: {', '.join(groups_in(csv)) or 'none'}")
    except PipelineError as err:
        raise WorkflowError(str(err)) from None


check_classes_have_rows()


def scans_table():
    """The ingest checkpoint's table of scans to preprocess (waits for ingest to run)."""
    path = checkpoints.ingest.get().output.scans
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if table.empty:
        raise WorkflowError(f"ingest found no usable scan in {DATA['collection_csv']}; every scan's reason is in "
                            f"{checkpoints.ingest.get().output.excluded}")
    return table


def usable_table():
    """The scans that passed every preprocessing stage and the user's exclusions (checkpoint usable_scans)."""
    outputs = checkpoints.usable_scans.get().output
    table = pd.read_csv(outputs.usable, sep="\t", dtype=str, keep_default_na=False)
    if table.empty:
        raise WorkflowError(f"no scan passed preprocessing: the reasons are in {outputs.dropped} (and ingest's "
                            f"exclusions in {RESULTS}/excluded.tsv)")
    return table


def user_exclusions_file(wildcards):
    """data.exclude_scans, checked to exist (a missing table stops the run before any job)."""
    path = DATA["exclude_scans"]
    if not path:
        return []
    if not Path(path).is_file():
        raise WorkflowError(f"data.exclude_scans={path} does not exist; write a TSV with the columns image_id and "
                            f"reason, or set it to null")
    return path


def dicom_dir(wildcards):
    table = scans_table()
    row = table[table["image_id"] == wildcards.image_id]
    if row.empty:
        raise WorkflowError(f"image {wildcards.image_id} is not in {RESULTS}/scans.tsv")
    return row["dicom_dir"].iloc[0]


def expand_scans(pattern):
    """``pattern`` for every scan ingest accepted (the per-scan stages run on these)."""
    table = scans_table()
    return expand(pattern, zip, subject=table["subject"], image_id=table["image_id"])


def expand_usable(pattern):
    """``pattern`` for every scan that passed preprocessing (everything after the stages reads only these)."""
    table = usable_table()
    return expand(pattern, zip, subject=table["subject"], image_id=table["image_id"])


# One scan's QC metrics (rule qc_metrics), beside its montage.
QC_METRICS_FILE = f"{RESULTS}/qc/{{subject}}/{{image_id}}.json"


def preprocess_targets(wildcards):
    """Every stage's final file for every scan ingest accepted, its QC montage and metrics, and the
    usable-scans table."""
    return (
        expand_scans(stage_file("ras"))
        + expand_scans(stage_file("ras", "_mask"))
        + expand_scans(f"{RESULTS}/qc/{{subject}}/{{image_id}}.png")
        + expand_scans(QC_METRICS_FILE)
        + [f"{RESULTS}/usable.tsv"]
    )


def qc_records(wildcards):
    """The QC metrics of every scan ingest accepted (a dropped scan's file is its failure record)."""
    return expand_scans(QC_METRICS_FILE)


SKULLSTRIP = PRE["skullstrip"]
SYNTHSTRIP_CACHE_FILE = f"{SKULLSTRIP['synthstrip_cache']}/synthstrip.1.pt"


def synthstrip_weights(wildcards=None, skullstrip=None):
    """Weights for skull stripping with SynthStrip (a configured copy or the cached download)."""
    s = skullstrip or SKULLSTRIP
    if s["method"] != "synthstrip":
        return []
    configured = s["synthstrip_weights"]
    if configured:
        if not Path(configured).expanduser().is_file():
            raise WorkflowError(
                f"preprocess.skullstrip.synthstrip_weights={configured} does not exist. Remedies: (1) point "
                f"it at a copy of synthstrip.1.pt, or set it to null to download it once into "
                f"{s['synthstrip_cache']}; (2) set preprocess.skullstrip.method: deepbet (works offline)."
            )
        return str(Path(configured).expanduser())
    return SYNTHSTRIP_CACHE_FILE


def skullstrip_settings(skullstrip=None):
    """The skull-strip job's settings: this config's, or a model package's (predict); with the QC brain
    volume bound, applied where the mask is made so a non-brain never reaches the later stages."""
    return skullstrip_command_settings(skullstrip or SKULLSTRIP, config["qc"]["thresholds"].get("brain_volume_ml"))


def preprocess_settings(preprocess, *sections):
    """The settings of a preprocessing job: ``sections`` of this config's preprocess (or a model package's)."""
    return job_json({"preprocess": preprocess}, *(f"preprocess.{section}" for section in sections))


def n4_mask_of(preprocess, mask_pattern):
    """The input function of N4's mask: the cropped brain mask, when the settings use one."""
    def n4_mask(wildcards):
        if not preprocess["n4"]["use_mask"]:
            return []
        return mask_pattern.format(subject=wildcards.subject, image_id=wildcards.image_id)

    return n4_mask


n4_mask = n4_mask_of(PRE, stage_file("cropped128", "_mask"))


# --- split, train, evaluate -------------------------------------------------------------

TENSOR_FILE = f"{RESULTS}/tensors/{{subject}}/{{image_id}}.npy"
SPLITS = f"{RESULTS}/splits"
MAIN = config["main_experiment"]
if MAIN not in config["experiments"]:
    raise WorkflowError(
        f"main_experiment '{MAIN}' is not one of the experiments in config: {', '.join(config['experiments'])}"
    )


def experiment_entry(name):
    """experiments.<name> with the schema's defaults for the keys it leaves out."""
    try:
        return resolve("experiments.*", config["experiments"][name], f"experiments.{name}")
    except PipelineError as err:
        raise WorkflowError(str(err)) from None


# Every experiment is trained, cross-validated and evaluated on the same split and folds; the
# main one comes first in the comparison.
EXPERIMENTS = [MAIN] + [name for name in config["experiments"] if name != MAIN and experiment_entry(name).enabled]
if not experiment_entry(MAIN).enabled:
    raise WorkflowError(f"main_experiment '{MAIN}' has enabled: false; enable it or choose another main_experiment")


def experiment_kind(name):
    """video (a video network), slices2d (the 2D ResNet-50 baseline) or volumetry (hippocampal volumes)."""
    return experiment_entry(name).kind


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
    return expand_usable(TENSOR_FILE)


def experiment_weights(wildcards):
    """The pretrained weights record (Kinetics-400 or ImageNet) a training job needs, fetched once by a
    local job: cluster compute nodes often have no network."""
    exp = experiment_entry(wildcards.experiment)
    if exp.weights not in ("kinetics400", "imagenet"):
        return []
    return f"{RESULTS}/weights/{exp.arch}_{exp.weights}.json"


def experiment_settings(name):
    """The settings object of an experiment's training jobs (learning.recipe.training_settings): its model
    keys and recipe, defaults from the schema, checked (a contradictory recipe stops the run here)."""
    try:
        return training_settings(config["train"], config["experiments"][name], name)
    except PipelineError as err:
        raise WorkflowError(str(err)) from None


def experiment_recipe(name):
    """config.train with the experiment's own overrides, completed and checked."""
    return experiment_settings(name).train


def selected_checkpoint(wildcards, input):
    """The checkpoint evaluated on the test set: evaluate.checkpoint, or the one train.selection picked."""
    name = config["evaluate"]["checkpoint"]
    if name == "selected":
        name = {"accuracy": "best_acc", "loss": "best_loss", "hierarchy": "best_hierarchy"}[
            experiment_recipe(wildcards.experiment)["selection"]
        ]
    return os.path.join(os.path.dirname(input.model), f"{name}.pt")


def train_settings(wildcards):
    """One experiment's training settings as the JSON its jobs receive (params: a change re-runs them)."""
    return json.dumps(experiment_settings(wildcards.experiment).plain(), sort_keys=True)


def embedding_figures(wildcards):
    """The embeddings projection of every network experiment whose recipe exports embeddings."""
    return [
        f"{RESULTS}/evaluation/{name}/embeddings.png"
        for name in experiments_of("video", "slices2d")
        if experiment_recipe(name)["export_embeddings"]
    ]


# --- cross-validation -------------------------------------------------------------------
# Per fold k the split writes three manifests (workflow_scripts.learning.split.fold_manifest_path): train.csv,
# val.csv (the inner validation split: early stopping and checkpoint choice) and held_out.csv (fold k,
# only reported on). The fold's model predicts its held-out fold and the test set.
FOLD_ROLES = ["train", "val", "held_out"]
FOLD_MANIFEST = f"{SPLITS}/cv/fold{{fold}}/{{role}}.csv"


def fold_predicted_manifest(wildcards):
    """What a fold's model predicts: its held-out fold (wildcard subset held_out) or the test set (test)."""
    if wildcards.subset == "held_out":
        return FOLD_MANIFEST.format(fold=wildcards.fold, role="held_out")
    return f"{SPLITS}/test.csv"


def fold_files(name):
    """An input function: results/cv/<experiment>/fold<k>/``name`` for every fold of the experiment."""

    def files(wildcards):
        return expand(f"{RESULTS}/cv/{{experiment}}/fold{{fold}}/{name}", experiment=wildcards.experiment,
                      fold=range(config["cv"]["folds"]))

    return files


fold_metrics = fold_files("evaluation/held_out/metrics.json")  # THE cross-validation figure's inputs
fold_test_metrics = fold_files("evaluation/test/metrics.json")
fold_summaries = fold_files("summary.json")


def comparison_flags(wildcards, input):
    """--experiment NAME METRICS PREDICTIONS for every experiment, main first."""
    return " ".join(
        f"--experiment {shlex.quote(name)} {shlex.quote(metrics)} {shlex.quote(predictions)}"
        for name, metrics, predictions in zip(EXPERIMENTS, input.metrics, input.predictions)
    )


# --- hippocampal volumetry --------------------------------------------------------------

# Hippocampus labels per scan (1 = left, 2 = right) by source: the atlas warped to each scan by
# rule hippocampus_atlas, or the segmentation U-Net's masks (rule hippocampus_unet).
HIPPOCAMPUS_MASKS = {"atlas": stage_file("hippocampus_atlas"), "unet": stage_file("hippocampus")}


def hippocampus_masks(wildcards):
    return expand_usable(HIPPOCAMPUS_MASKS[wildcards.masks])


def brain_masks(wildcards):
    """The stage-2 skull-strip mask of every usable scan (native grid): the ICV of each scan."""
    return expand_usable(stage_file("stripped", "_mask"))


def volumetry_masks(name):
    return experiment_entry(name).masks


# The volumes tables the volumetry experiments read (built by `all`).
VOLUMETRY_TABLES = sorted(
    {f"{RESULTS}/volumetry/{volumetry_masks(name)}/volumes.tsv" for name in experiments_of("volumetry")}
)


def volumetry_volumes(wildcards):
    return f"{RESULTS}/volumetry/{volumetry_masks(wildcards.experiment)}/volumes.tsv"


def volumetry_settings(wildcards):
    """Features, regularisation and mask source of one volumetry experiment, as its fit's settings JSON."""
    return volumetry_command_settings(config["experiments"][wildcards.experiment])


# --- clinical context (bayes) and the report -------------------------------------------

BAYES = config["bayes"]
# The published visual MTA rating figures placed next to the models (literature, not measured here).
LITERATURE_TABLE = BAYES["literature"] or str(
    Path(workflow.basedir) / "workflow_scripts" / "evaluation" / "mta_visual_rating_literature.tsv"
)
REPORT = f"{RESULTS}/report"


def bayes_settings():
    """Prior, credible level, draws, seed, figure level and each prevalence with its source (the literature
    table is a path, passed as one)."""
    return job_json(config, "bayes", omit=("bayes.literature",))


fold_histories = fold_files("history.json")


def provenance_models(wildcards, input):
    """--model NAME SUMMARY for every experiment."""
    return " ".join(f"--model {shlex.quote(n)} {shlex.quote(s)}" for n, s in zip(EXPERIMENTS, input.models))


def report_targets(wildcards):
    """Every item of the HTML report that the workflow builds itself (the rest are other rules' outputs)."""
    per_experiment = ["test_metrics.html", "cv.html"]
    targets = [f"{REPORT}/dataset.html", f"{REPORT}/qc.html", f"{REPORT}/split.html", f"{REPORT}/comparison.html",
               f"{REPORT}/provenance.html", f"{RESULTS}/clinicians.html"]
    targets += expand(f"{REPORT}/{{experiment}}/{{item}}", experiment=EXPERIMENTS, item=per_experiment)
    targets += expand(f"{RESULTS}/bayes/{{experiment}}/ppv_npv.png", experiment=EXPERIMENTS)
    targets += expand(f"{REPORT}/{{experiment}}/training_curves.png", experiment=experiments_of("video", "slices2d"))
    return targets


# --- hippocampus segmentation (MONAI U-Net) ---------------------------------------------

SEG = config["segmentation"]
SEGMENTATION = f"{RESULTS}/segmentation"
SEGMENTATION_TRUTH_DIR = f"{SEGMENTATION}/truth"
SEGMENTATION_TRUTH = f"{SEGMENTATION_TRUTH_DIR}/{{subject}}/{{image_id}}.nii.gz"
# Cross-fitting (rules/segmentation.smk): CV fold k's U-Net, the table naming each scan's U-Net, and
# the sidecar beside each mask saying which U-Net made it.
SEGMENTATION_FOLD = f"{SEGMENTATION}/cv/fold{{fold}}"
SEGMENTATION_MASK_MODELS = f"{SEGMENTATION}/mask_models.tsv"
SEGMENTATION_SIDECAR = f"{RESULTS}/hippocampus/{{subject}}/{{image_id}}.json"


def segmentation_in_all():
    """auto: only where the demo's own truth labels train it (data.source and segmentation.source demo)."""
    if SEG["in_all"] == "auto":
        return DATA["source"] == "demo" and SEG["source"] == "demo"
    return bool(SEG["in_all"])


def segmentation_cross_fitted():
    """Demo labels belong to the classified subjects, so their masks are cross-fitted; an MSD U-Net saw none of them."""
    return SEG["source"] == "demo"


def segmentation_inputs(wildcards):
    """Training inputs: the split's manifests, RAS scans, brain masks and mapped truth (demo); dataset.json (msd)."""
    if SEG["source"] == "msd":
        manifest = Path(SEG["msd_root"]) / "dataset.json"
        if not manifest.is_file():
            raise WorkflowError(
                f"segmentation.source is msd but {manifest} does not exist. Download Task04_Hippocampus.tar from "
                f"the Medical Segmentation Decathlon (http://medicaldecathlon.com), unpack it and set "
                f"segmentation.msd_root to the folder holding dataset.json, imagesTr/ and labelsTr/ (the workflow "
                f"never downloads it); or set segmentation.source: demo with the demo collection."
            )
        return {"dataset": str(manifest)}
    return {
        "train": f"{SPLITS}/train.csv",
        "val": f"{SPLITS}/val.csv",
        "test": f"{SPLITS}/test.csv",
        **segmentation_labelled_scans(),
    }


def segmentation_labelled_scans():
    """Every usable scan's RAS image, brain mask and mapped true labels (demo source only)."""
    if DATA["source"] != "demo":
        raise WorkflowError(
            "segmentation.source demo trains on the demo collection's true hippocampus labels, which exist only "
            "with data.source demo; with ADNI data set segmentation.source: msd and segmentation.msd_root."
        )
    return {
        "truth": expand_usable(SEGMENTATION_TRUTH),
        "images": expand_usable(stage_file("ras")),
        "masks": expand_usable(stage_file("ras", "_mask")),
    }


def segmentation_fold_inputs(wildcards):
    """Training inputs of CV fold k's U-Net: fold<k>/train.csv (fitted), val.csv (selection), held_out.csv (scored)."""
    if not segmentation_cross_fitted():
        raise WorkflowError(
            f"there is no U-Net of CV fold {wildcards.fold} with segmentation.source {SEG['source']}: its one "
            f"U-Net never saw an ADNI subject and segments every scan (results/segmentation/best.pt)"
        )
    parts = {role: FOLD_MANIFEST.format(fold=wildcards.fold, role=role) for role in FOLD_ROLES}
    return parts | segmentation_labelled_scans()


def segmentation_source_flags(wildcards, input):
    """Where the training labels come from, as command-line flags (the main split's or a CV fold's manifests)."""
    if SEG["source"] == "msd":
        return f"--msd-root {shlex.quote(SEG['msd_root'])}"
    manifests = " ".join(f"--{name.replace('_', '-')} {shlex.quote(input[name])}"
                         for name in ("train", "val", "test", "held_out") if name in input.keys())
    return f"{manifests} --truth-dir {shlex.quote(SEGMENTATION_TRUTH_DIR)}"


def segmentation_mask_models_inputs(wildcards):
    """What decides each scan's U-Net: the usable scans, the split's manifests and every fold's held_out.csv."""
    return {
        "scans": checkpoints.usable_scans.get().output.usable,
        "train": f"{SPLITS}/train.csv",
        "val": f"{SPLITS}/val.csv",
        "test": f"{SPLITS}/test.csv",
        "held_out": [FOLD_MANIFEST.format(fold=k, role="held_out") for k in range(config["cv"]["folds"])],
    }


def segmentation_model(wildcards):
    """The checkpoint of the one U-Net that never saw this scan's subject: its CV fold's, or the main one
    (test scans, scans in no partition, and every scan with segmentation.source msd)."""
    if not segmentation_cross_fitted():
        return f"{SEGMENTATION}/best.pt"
    path = checkpoints.segmentation_mask_models.get().output[0]
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    row = table[table["image_id"] == wildcards.image_id]
    if row.empty:
        raise WorkflowError(f"scan {wildcards.image_id} is not in {path}; delete it so that rule "
                            f"segmentation_mask_models re-runs on the current table of usable scans")
    model = row["model"].iloc[0]
    run = SEGMENTATION if model == "main" else SEGMENTATION_FOLD.format(fold=model.removeprefix("fold"))
    return f"{run}/best.pt"


def segmentation_settings():
    """The U-Net's settings (config segmentation:) as the JSON its training jobs receive; in_all (a switch of
    `all`) and msd_root (a path, passed as one) are not settings of the network."""
    return job_json(config, "segmentation", omit=("segmentation.in_all", "segmentation.msd_root"))


def segmentation_outputs(wildcards):
    """The trained models' summaries, Dice tables and figures (main, and each CV fold's when cross-fitted),
    every usable scan's mask with its sidecar, and their volumes."""
    folds = range(config["cv"]["folds"]) if segmentation_cross_fitted() else []
    return [
        f"{SEGMENTATION}/summary.json",
        f"{SEGMENTATION}/dice.tsv",
        f"{SEGMENTATION}/best_worst.png",
        *expand(f"{SEGMENTATION_FOLD}/{{name}}", fold=folds, name=["summary.json", "dice.tsv", "best_worst.png"]),
        *expand_usable(stage_file("hippocampus")),
        *expand_usable(SEGMENTATION_SIDECAR),
        f"{RESULTS}/volumetry/unet/volumes.tsv",
    ]


def segmentation_targets(wildcards):
    """What `all` builds of the segmentation branch (segmentation.in_all)."""
    return segmentation_outputs(wildcards) if segmentation_in_all() else []


# --- explanations -----------------------------------------------------------------------

EXPLAIN = config["explain"]


def explain_experiments():
    """explain.experiments, or every enabled video experiment; anything else named stops the run."""
    video = experiments_of("video")
    named = EXPLAIN["experiments"] or video
    wrong = [name for name in named if name not in video]
    if wrong:
        raise WorkflowError(
            f"explain.experiments names {', '.join(wrong)}, which are not enabled video experiments "
            f"({', '.join(video) or 'none'}); the 2D slice baseline and volumetry are not explained"
        )
    return named


EXPLAIN_EXPERIMENTS = explain_experiments()


# What `explain run` reads per chosen scan, by path pattern: the rule's inputs expand them, and the
# command gets them as they are (--tensor-pattern ...), so both name the same files.
EXPLAIN_FILE_PATTERNS = {
    "tensor": TENSOR_FILE,
    "image": stage_file("ras"),
    "brain": stage_file("ras", "_mask"),
    "hippocampus": HIPPOCAMPUS_MASKS[EXPLAIN["hippocampus_masks"]],
}


def explain_inputs(wildcards):
    """The chosen scans' tensors, RAS scans, brain masks and hippocampus labels, in the order of
    scans.csv (known once checkpoint explain_scans has chosen them from the test predictions)."""
    chosen = pd.read_csv(checkpoints.explain_scans.get(experiment=wildcards.experiment).output[0],
                         dtype={"subject": str, "image_id": str})
    return {f"{kind}_files": expand(pattern, zip, subject=chosen["subject"], image_id=chosen["image_id"])
            for kind, pattern in EXPLAIN_FILE_PATTERNS.items()}


def explain_settings():
    """The explanation settings of one experiment's maps (explain.experiments, which experiments, and the
    choice of scans are other jobs' business) and the device."""
    return job_json(config, "explain", "train.device",
                    omit=("explain.experiments", "explain.n_correct", "explain.n_wrong"))


# --- predict (rules/predict.smk) ----------------------------------------------------------

PREDICT = config["predict"]
PREDICT_ON = bool(PREDICT["model"] and PREDICT["input"])


def print_run_summary():
    """At the end of `all` (the default target) print results/run_summary.md; says whether it did."""
    summary = Path(RESULTS, "run_summary.md")
    targets = workflow.dag_settings.targets
    if (not targets or "all" in targets) and summary.is_file():
        print(summary.read_text(), end="")
        return True
    return False


def predict_not_configured(wildcards):
    raise WorkflowError(
        "snakemake predict needs predict.model (a model package: results/models/<experiment>/package) and "
        "predict.input (the folder of new scans) in a --configfile or --config; README, Predict new scans"
    )


if PREDICT_ON:
    from workflow_scripts.learning.model_package import read_card
    from workflow_scripts.predict.predict import (SCANS_SECTIONS as PREDICT_SCANS_SECTIONS,
                                                  SCORE_SECTIONS as PREDICT_SCORE_SECTIONS, list_new_scans,
                                                  listing_settings, preprocessing_settings, scan_id)

    PREDICT_LISTING = listing_settings(PREDICT, DATA["descriptions"], DATA["types"])
    try:
        PREDICT_CARD = read_card(PREDICT["model"])
        PREDICT_SCANS = list_new_scans(PREDICT_LISTING)
    except PipelineError as err:
        raise WorkflowError(str(err)) from None
    # the package's preprocessing, never this config's (differences are reported, not mixed in)
    PREDICT_PRE, PREDICT_DIFFERENCES = preprocessing_settings(PREDICT_CARD, PRE)
    for difference in PREDICT_DIFFERENCES:
        logger.warning(f"predict: the model's preprocessing is used; the current config differs at {difference}")
    PREDICTED = f"{RESULTS}/predict/{PREDICT['name'] or scan_id(Path(PREDICT['input']).name)}"
    PREDICT_SCAN_LIST = f"{PREDICTED}/scans.tsv"


def predicted_file(stage, suffix="", ext=".nii.gz"):
    """Path pattern of a new scan's file of one stage, under the cohort's folder."""
    return f"{PREDICTED}/{stage}/{{subject}}/{{image_id}}{suffix}{ext}"


def predicted_log(stage):
    return f"{PREDICTED}/logs/{stage}/{{subject}}/{{image_id}}.log"


def predicted_benchmark(stage):
    return f"{PREDICTED}/benchmarks/{stage}/{{subject}}/{{image_id}}.tsv"


def expand_predicted(pattern):
    return expand(pattern, zip, subject=PREDICT_SCANS["subject"], image_id=PREDICT_SCANS["image_id"])


def predicted_input(wildcards):
    """The DICOM folder or NIfTI file of one new scan."""
    row = PREDICT_SCANS[PREDICT_SCANS["image_id"] == wildcards.image_id]
    if row.empty:
        raise WorkflowError(f"scan {wildcards.image_id} is not among the new scans under {PREDICT['input']}")
    return row["input"].iloc[0]
