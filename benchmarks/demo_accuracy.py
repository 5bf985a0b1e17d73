"""Does the trained classifier beat chance on held-out subjects of the demo collection?

    python benchmarks/demo_accuracy.py --workdir /tmp/demo_accuracy     # about 30 min on 2 CPU cores
    python benchmarks/demo_accuracy.py --workdir /tmp/demo_accuracy --ventricle-enlargement 1.0 \
        --hippocampus-atrophy 0.4                                        # stronger planted atrophy

Runs the real workflow (``snakemake evaluate``, with ``--cv`` also ``cv``: demo generation, ingest, the six
preprocessing stages, split, training, test prediction, evaluation) in ``--workdir`` with
the overlay below, then reports the held-out test metrics with their bootstrap intervals,
an exact one-sided binomial test of subject-level accuracy against 0.5, and a one-sided
Mann-Whitney test of AUC against 0.5 (threshold-free).

The overlay is sized for a CPU in minutes, and says how it departs from the dissertation:
- Kinetics-400 weights cannot be downloaded on an offline machine, so ``--weights`` defaults
  to ``none`` (random initialisation), ``--trainable-from`` to ``stem`` (train it all) and the
  backbone's learning rate to the head's 1e-3; on a machine with internet pass
  ``--weights kinetics400 --trainable-from layer4`` for the dissertation's recipe. From random
  weights, ``train.recalibrate_bn`` recomputes the trained BatchNorm statistics each epoch
  (without it, eval-mode predictions fell into one class: validation AUC 1.0 at accuracy 0.5).
- 2 mm voxels (demo ``voxel_scale`` 2, resampling to 2 mm) and 64^3 volumes instead of
  ADNI-like 1 mm grids and 128^3, so that an epoch takes seconds, not minutes;
- one visit per subject and a larger test share (ratios 0.5/0.17/0.33), so that the test
  set holds enough subjects for the tests to mean something;
- the best-validation-loss checkpoint is evaluated (``--checkpoint``): validation accuracy
  over 8 subjects moves in steps of 1/8 and its ties keep the earliest epoch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
import pandas as pd
from scipy.stats import binomtest, mannwhitneyu

REPO = Path(__file__).resolve().parents[1]


def experiment_name(args: argparse.Namespace) -> str:
    """One experiment per training setting, so several settings share one preprocessed demo."""
    recalibrate = "_bnrecal" if args.weights != "kinetics400" else ""
    return (f"demo_{args.weights}_from_{args.trainable_from}_b{args.batch_size}_p{args.patience}"
            f"_lr{lr_backbone(args):g}{recalibrate}_s{args.seed}")


def lr_backbone(args: argparse.Namespace) -> float:
    """The dissertation's fine-tuning rate (1e-4) for pretrained weights; the head's rate (1e-3)
    for a backbone trained from random weights, which has features to learn, not to adjust."""
    if args.lr_backbone is not None:
        return args.lr_backbone
    return 1e-4 if args.weights == "kinetics400" else 1e-3


def overlay(args: argparse.Namespace) -> dict:
    """The config overlay of the benchmark, on top of the repository's config.yaml."""
    return {
        "demo": {"n_subjects": args.subjects, "visits": 1, "n_mci": 1, "seed": args.demo_seed,
                 "voxel_scale": 2.0, "hippocampus_atrophy": args.hippocampus_atrophy,
                 "ventricle_enlargement": args.ventricle_enlargement},
        "preprocess": {"skullstrip": {"method": "deepbet"}, "resample": {"spacing": [2.0, 2.0, 2.0]},
                       "target_shape": [args.size] * 3},
        "split": {"ratios": [0.5, 0.17, 0.33]},
        "main_experiment": experiment_name(args),
        "experiments": {experiment_name(args): {"arch": "r3d_18", "weights": args.weights,
                                                "trainable_from": args.trainable_from}},
        "train": {"max_epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size,
                  "patience": args.patience, "lr_backbone": lr_backbone(args),
                  "recalibrate_bn": args.weights != "kinetics400", "num_workers": 0, "wandb": {"mode": "disabled"}},
        "evaluate": {"checkpoint": args.checkpoint},
        "resources": {"train": {"threads": args.threads}, "predict": {"threads": args.threads}},
    }


def run(args: argparse.Namespace) -> dict:
    """Run the workflow up to the test evaluation and collect the figures."""
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    name = experiment_name(args)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(overlay(args), sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", str(args.cores), "--nolock", "evaluate", *(["cv"] if args.cv else []),
           "--configfile", str(config)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=workdir)
    wall = time.perf_counter() - start

    results = workdir / "results"
    metrics = json.loads((results / "evaluation" / name / "metrics.json").read_text())
    history = json.loads((results / "models" / name / "history.json").read_text())
    subject = metrics["subject"]
    correct = int(round(subject["accuracy"] * metrics["n_subjects"]))
    test = binomtest(correct, metrics["n_subjects"], 0.5, alternative="greater")
    # AUC = 0.5 is the Mann-Whitney null: AD scans' probabilities no higher than CN scans'.
    predictions = pd.read_csv(results / "evaluation" / name / "test_predictions.csv")
    auc_test = mannwhitneyu(predictions.loc[predictions["label"] == 1, "prob"],
                            predictions.loc[predictions["label"] == 0, "prob"], alternative="greater")
    return {
        "overlay": overlay(args),
        "wall_s": round(wall, 1),
        "epochs_run": len(history),
        "n_test_scans": metrics["n_scans"],
        "n_test_subjects": metrics["n_subjects"],
        "scan": {k: metrics["scan"][k] for k in ("accuracy", "balanced_accuracy", "auc")},
        "scan_ci": {k: metrics["scan"]["ci"][k] for k in ("accuracy", "balanced_accuracy", "auc")},
        "subject": {k: subject[k] for k in ("accuracy", "balanced_accuracy", "auc")},
        "subject_ci": {k: subject["ci"][k] for k in ("accuracy", "balanced_accuracy", "auc")},
        "subjects_correct": correct,
        "binomial_p_one_sided": float(test.pvalue),
        "auc_mann_whitney_p_one_sided": float(auc_test.pvalue),
        "checkpoint": args.checkpoint,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo_accuracy", help="folder for the demo data and results (reused)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--threads", type=int, default=2, help="threads of the training and prediction jobs")
    p.add_argument("--subjects", type=int, default=48, help="AD + CN demo subjects (one scan each)")
    p.add_argument("--size", type=int, default=64, help="edge of the cubic input volume")
    p.add_argument("--epochs", type=int, default=20, help="train.max_epochs (early stopping may end sooner)")
    p.add_argument("--seed", type=int, default=42, help="train.seed")
    p.add_argument("--batch-size", type=int, default=2, help="train.batch_size (dissertation 2)")
    p.add_argument("--patience", type=int, default=5, help="train.patience (dissertation 5)")
    p.add_argument("--lr-backbone", type=float, default=None,
                   help="train.lr_backbone; default 1e-4 with kinetics400 weights, 1e-3 from random weights")
    p.add_argument("--demo-seed", type=int, default=2024)
    p.add_argument("--weights", default="none", help="kinetics400 on a machine with internet; none here")
    p.add_argument("--trainable-from", default="stem")
    p.add_argument("--hippocampus-atrophy", type=float, default=0.25, help="the demo default")
    p.add_argument("--ventricle-enlargement", type=float, default=0.5, help="the demo default")
    p.add_argument("--checkpoint", default="best_loss", choices=["best_loss", "best_acc"],
                   help="evaluate.checkpoint: best_loss here, since validation accuracy over a few subjects "
                        "moves in coarse steps and ties keep the first epoch")
    p.add_argument("--cv", action="store_true",
                   help="also run `snakemake cv` (the cv.folds fold models), for benchmarks/cv_selection_bias.py")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    figures = run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
