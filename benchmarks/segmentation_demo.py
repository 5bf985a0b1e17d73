"""How well does the hippocampus U-Net segment the demo collection at the workflow's 128^3?

    python benchmarks/segmentation_demo.py --workdir /tmp/bench/segmentation      # about 25 min on 2 CPU cores
    python benchmarks/segmentation_demo.py --workdir /tmp/bench/segmentation --model unet2d --steps 2000

Runs the real workflow (``snakemake segmentation``: demo generation, ingest, the six preprocessing
stages, split, truth mapping, U-Net training, a mask per scan and the volumes table) in
``--workdir`` with the overlay below, then reports Dice per partition (``dice.tsv``), the masks'
volumes against the volumes planted in the demo (Pearson r per side over the held-out scans and
over all scans, raw and divided by ICV), the recovered / planted ratio by group, and the training
and inference times from Snakemake's benchmark files.

The overlay departs from the defaults only to fit a CPU: one visit per subject, 2 mm demo voxels
(``voxel_scale`` 2; the model input is still 128^3), deepbet instead of SynthStrip (whose weights
cannot be downloaded offline), and a larger validation and test share (0.5/0.25/0.25) so that
held-out figures rest on more than one subject. The U-Net keeps config.yaml's settings unless
``--model``/``--steps`` say otherwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.preprocess_speed import collect  # noqa: E402
from benchmarks.volumetry_speed import planted_correlations  # noqa: E402


def overlay(args: argparse.Namespace) -> dict:
    """The config overlay of the benchmark, on top of the repository's config.yaml."""
    segmentation = {"source": "demo", "model": args.model}
    if args.steps is not None:
        segmentation["steps"] = args.steps
    return {"demo": {"n_subjects": args.subjects, "visits": 1, "n_mci": 0, "seed": args.seed, "voxel_scale": 2.0},
            "preprocess": {"skullstrip": {"method": "deepbet"}, "target_shape": [128, 128, 128]},
            "split": {"ratios": [0.5, 0.25, 0.25]},
            "segmentation": segmentation}


def volume_agreement(volumes: pd.DataFrame, planted: pd.DataFrame, dice: pd.DataFrame) -> pd.DataFrame:
    """Per scan set (held out, all): r of the U-Net volumes with the planted ones, and recovered / planted by group."""
    table = volumes.merge(planted, on="image_id").merge(dice[["image_id", "partition"]], on="image_id")
    rows = []
    for name, part in (("held out", table[table["partition"] != "train"]), ("all", table)):
        row = {"scans": name, "n": len(part), **planted_correlations(part, "_mm3")}
        ratio = (part["left_mm3"] + part["right_mm3"]) / (part["hippocampus_left_mm3"] + part["hippocampus_right_mm3"])
        for group in ("AD", "CN"):
            row[f"recovered_{group}"] = float(ratio[part["group"] == group].mean())
            row[f"mm3_{group}"] = float((part["left_mm3"] + part["right_mm3"])[part["group"] == group].mean())
        rows.append(row)
    return pd.DataFrame(rows).round(3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--subjects", type=int, default=16, help="demo subjects, half AD (default 16)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--model", default="unet3d", choices=["unet3d", "unet2d"])
    p.add_argument("--steps", type=int, help="training steps (default: config.yaml's)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    config = args.workdir / "segmentation_demo.yaml"
    config.write_text(yaml.safe_dump(overlay(args), sort_keys=False))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(args.workdir),
                    "--cores", str(args.cores), "segmentation", "--configfile", str(config)], check=True)

    results = args.workdir / "results"
    summary = json.loads((results / "segmentation" / "summary.json").read_text())
    dice = pd.read_csv(results / "segmentation" / "dice.tsv", sep="\t", dtype={"image_id": str, "subject": str})
    volumes = pd.read_csv(results / "volumetry" / "unet" / "volumes.tsv", sep="\t", dtype={"image_id": str})
    planted = pd.read_csv(args.workdir / "demo_data" / "truth" / "volumes.tsv", sep="\t", dtype={"image_id": str})
    planted = planted[["image_id", "brain_ml", "hippocampus_left_mm3", "hippocampus_right_mm3"]]
    by_partition = dice.groupby("partition")[["dice", "dice_left", "dice_right"]].agg(["mean", "min", "max", "count"])
    agreement = volume_agreement(volumes, planted, dice)
    train_s = float(pd.read_csv(results / "benchmarks" / "segmentation" / "train.tsv", sep="\t")["s"].iloc[0])
    predict_s = collect(results, ["hippocampus_unet"])["seconds"]
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(by_partition.round(3).to_string())
        print(agreement.to_string(index=False))
    print(f"model {args.model}, {summary['settings']['steps']} steps (best at {summary['best_step']}), "
          f"{summary['parameters']:,} parameters; training job {train_s:.0f} s "
          f"({summary['speed']['train_steps_per_s']:.2f} steps/s), mask job {predict_s.mean():.1f} s/scan "
          f"(mean of {len(predict_s)}); best {summary['best_volume']}, worst {summary['worst_volume']}")
    if args.json:
        args.json.write_text(json.dumps({"overlay": overlay(args), "dice": json.loads(by_partition.to_json()),
                                         "volumes": agreement.to_dict("records"), "train_s": train_s,
                                         "mask_s_per_scan": float(predict_s.mean()), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
