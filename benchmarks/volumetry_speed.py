"""Atlas hippocampus labels on preprocessed demo scans: seconds per scan, and how well the volumes
track the demo's planted (true) hippocampal volumes.

    python benchmarks/volumetry_speed.py --run --workdir /tmp/bench/volumetry --scans 8
    python benchmarks/volumetry_speed.py --workdir /tmp/bench/volumetry --transforms SyN Affine

With ``--run`` the workflow's ``preprocess`` target first runs on a demo collection in ``--workdir``
(8 subjects, one visit, 2 mm voxels, deepbet, 128^3 model inputs; ``--configfile`` adds to or
overrides that). Then, for each transform and scan, ``workflow_scripts.hippocampus.hippocampus_atlas`` labels the
scan's RAS volume in this process with ``--threads`` ITK threads (as the rule does), and each scan's
volumes are compared with the demo truth: Pearson r of recovered and planted volumes (raw, and
divided by ICV / the true brain volume), the recovered-to-planted ratio per group (equal ratios mean
atrophy is measured, not hidden), and the Dice overlap with the true labels; both for the labels as
warped and after dropping CSF-intensity voxels (the default).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO_CONFIG = {"demo": {"n_subjects": 8, "visits": 1, "n_mci": 0, "seed": 5, "voxel_scale": 2.0},
               "preprocess": {"skullstrip": {"method": "deepbet"}, "target_shape": [128, 128, 128]}}


def label_scan(workdir: Path, row, transform: str) -> dict:
    """Label one scan, time it, and compare with the demo truth."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from workflow_scripts.common.settings import resolve
    from workflow_scripts.hippocampus.hippocampus_atlas import atlas_hippocampus
    from workflow_scripts.hippocampus.volumetry import mask_volume, voxel_volume_mm3

    ras = workdir / "results" / "ras" / row.subject
    scan, brain = nib.load(ras / f"{row.image_id}.nii.gz"), nib.load(ras / f"{row.image_id}_mask.nii.gz")
    hippocampus = resolve("hippocampus")  # the schema's settings, but the transform compared here
    started = time.perf_counter()
    labels, record = atlas_hippocampus(scan, brain=brain, template=hippocampus.template, transform=transform,
                                       reg_iterations=list(hippocampus.reg_iterations), seed=hippocampus.seed,
                                       drop_csf=hippocampus.drop_csf)
    seconds = time.perf_counter() - started
    truth = nib.load(workdir / "demo_data" / "truth" / row.subject / f"{row.image_id}_hippocampus.nii.gz")
    truth = np.asarray(resample_from_to(truth, labels, order=0).dataobj)
    got, voxel = np.asarray(labels.dataobj), voxel_volume_mm3(labels)
    stripped_mask = workdir / "results" / "stripped" / row.subject / f"{row.image_id}_mask.nii.gz"
    out = {"transform": transform, "image_id": row.image_id, "group": row.group, "seconds": seconds,
           "registration_s": record["seconds"], "shape": "x".join(map(str, scan.shape)),
           "icv_mm3": mask_volume(nib.load(stripped_mask))}
    for side, code in (("left", 1), ("right", 2)):
        out[f"{side}_mm3"] = record["voxels"][side] * voxel
        out[f"{side}_warped_mm3"] = record["voxels_warped"][side] * voxel
        both = np.count_nonzero((got == code) & (truth == code))
        out[f"{side}_dice"] = 2 * both / (np.count_nonzero(got == code) + np.count_nonzero(truth == code))
    return out


def planted_correlations(part: pd.DataFrame, suffix: str) -> dict[str, float]:
    """Pearson r of measured (``left<suffix>``, ``right<suffix>``) and planted hippocampal volumes per
    side, raw and divided by the measured ICV / the true brain volume (rows merged with the demo truth)."""
    row = {}
    for side in ("left", "right"):
        got, true = part[f"{side}{suffix}"], part[f"hippocampus_{side}_mm3"]
        row[f"r_{side}"] = float(np.corrcoef(got, true)[0, 1])
        row[f"r_{side}_icv"] = float(np.corrcoef(got / part["icv_mm3"], true / part["brain_ml"])[0, 1])
    return row


def agreement(table: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per transform and label version (warped / CSF dropped): r with the planted volumes, group ratios, Dice."""
    table = table.merge(truth, on="image_id")
    rows = []
    for (transform, version), suffix in [((t, v), s) for t in table["transform"].unique()
                                         for v, s in (("warped", "_warped_mm3"), ("csf dropped", "_mm3"))]:
        part = table[table["transform"] == transform]
        row = {"transform": transform, "labels": version, "scans": len(part),
               "mean_s": part["seconds"].mean(), "max_s": part["seconds"].max()}
        row.update(planted_correlations(part, suffix))
        for side in ("left", "right"):
            ratio = part[f"{side}{suffix}"] / part[f"hippocampus_{side}_mm3"]
            for group in ("AD", "CN"):
                row[f"{side}_ratio_{group}"] = ratio[part["group"] == group].mean()
        row["dice_mean"] = part[["left_dice", "right_dice"]].to_numpy().mean() if version == "csf dropped" else None
        rows.append(row)
    return pd.DataFrame(rows).round(3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--run", action="store_true", help="run `snakemake preprocess` on a demo first")
    p.add_argument("--configfile", type=Path, action="append", default=[])
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="ITK threads per registration (the rule's default: 1)")
    p.add_argument("--scans", type=int, default=4, help="how many scans to label (default 4)")
    p.add_argument("--transforms", nargs="+", default=["SyN"])
    p.add_argument("--json", type=Path, help="also write the tables as JSON")
    args = p.parse_args()

    from workflow_scripts.common import cli

    cli.limit_threads(args.threads)  # before ants is imported
    if args.run:
        import yaml

        args.workdir.mkdir(parents=True, exist_ok=True)
        demo = args.workdir / "volumetry_demo.yaml"
        demo.write_text(yaml.safe_dump(DEMO_CONFIG, sort_keys=False))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(args.workdir),
               "--cores", str(args.cores), "preprocess", "--configfile", str(demo), *map(str, args.configfile)]
        subprocess.run(cmd, check=True)
    scans = pd.read_csv(args.workdir / "results" / "scans.tsv", sep="\t", dtype=str).head(args.scans)
    truth = pd.read_csv(args.workdir / "demo_data" / "truth" / "volumes.tsv", sep="\t", dtype={"image_id": str})
    rows = []
    for transform in args.transforms:
        for row in scans.itertuples(index=False):
            rows.append(label_scan(args.workdir, row, transform))
            print(f"{transform} {row.image_id} ({row.group}): {rows[-1]['seconds']:.1f} s", flush=True)
    table = pd.DataFrame(rows)
    summary = agreement(table, truth[["image_id", "brain_ml", "hippocampus_left_mm3", "hippocampus_right_mm3"]])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.round(3).to_string(index=False))
        print(summary.to_string(index=False))
    print(f"{platform.machine()}, {args.threads} threads, peak RSS of this process {peak_mb:.0f} MB, "
          f"grid {table['shape'].iloc[0]}")
    if args.json:
        args.json.write_text(json.dumps({"scans": table.to_dict("records"), "summary": summary.to_dict("records"),
                                         "threads": args.threads, "peak_rss_mb": peak_mb}, indent=2, default=str))


if __name__ == "__main__":
    main()
