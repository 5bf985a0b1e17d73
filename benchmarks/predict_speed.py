"""Seconds per new scan of `snakemake predict`, preprocessing included, from the jobs' own benchmark files.

Generates held-out demo subjects (a seed the study did not use) as an IDA download, runs
`snakemake predict` in a finished study folder on them, and prints per rule family the mean job
seconds per scan, the cohort job's seconds per scored scan, and the wall time per scan.

    python benchmarks/predict_speed.py --workdir STUDY --configfile STUDY/config.yaml \
        --experiment NAME --n-subjects 4 --voxel-scale 1.0 [--json out.json]

STUDY is a folder where `snakemake all` (or at least the experiment's model_package) has run. With
--build-study the benchmark first makes one there: the default demo and preprocessing (deepbet, whose
weights ship in its wheel; 1 mm, 128^3), the experiment trained for one epoch from random weights (the
seconds per new scan do not depend on the weights) and its package:

    python benchmarks/predict_speed.py --workdir /tmp/predict_speed --build-study --experiment r3d_18_kinetics400
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_study(workdir: Path, experiment: str, cores: int) -> Path:
    """The default demo preprocessed with deepbet and ``experiment`` trained for one epoch from random
    weights, up to its model package; returns the study's config overlay."""
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / "study.yaml"
    overlay.write_text(json.dumps({
        "preprocess": {"skullstrip": {"method": "deepbet"}},
        "experiments": {experiment: {"weights": "none"}},
        "train": {"max_epochs": 1, "num_workers": 0, "wandb": {"mode": "disabled"}}}))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
                    "--cores", str(cores), "--configfile", str(overlay), "--",
                    f"results/models/{experiment}/package/model_card.json"], check=True)
    return overlay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--configfile", nargs="*", default=[], help="the study's config overlays")
    p.add_argument("--experiment", required=True)
    p.add_argument("--n-subjects", type=int, default=4)
    p.add_argument("--voxel-scale", type=float, default=1.0, help="1.0: ADNI-like 1.2 mm sagittal series")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--explain", nargs="*", default=["gradcam"])
    p.add_argument("--json", type=Path)
    p.add_argument("--build-study", action="store_true", help="first make a study in --workdir (see above)")
    args = p.parse_args()

    import yaml

    from workflow_scripts.common.settings import resolve
    from workflow_scripts.data.demo import collection_options, generate_collection

    workdir = args.workdir.resolve()
    if args.build_study:
        args.configfile = [str(build_study(workdir, args.experiment, args.cores)), *args.configfile]
    name = f"speed-{args.seed}-{args.voxel_scale:g}".replace(".", "p")
    source = workdir / "predict_speed_inputs" / name
    if not (source / "collection.csv").is_file():
        ranges = yaml.safe_load((REPO / "config.yaml").read_text())["data"]["phase_rid_ranges"]
        demo = collection_options(resolve("demo", {"n_subjects": args.n_subjects, "seed": args.seed, "visits": 1,
                                                   "voxel_scale": args.voxel_scale, "n_mci": 0}), ranges)
        generate_collection(source, distractors=False, **demo)
    overlay = workdir / f"{name}.yaml"
    overlay.write_text(json.dumps({"predict": {
        "model": f"results/models/{args.experiment}/package", "source": "ida", "input": str(source),
        "collection_csv": str(source / "collection.csv"), "name": name, "explain": args.explain}}))
    out = workdir / "results" / "predict" / name
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", str(args.cores), "--nolock", "--rerun-triggers", "mtime", "--forcerun", "predict_scans",
           "--configfile", *args.configfile, str(overlay), "--", "predict"]
    started, clock_start = time.perf_counter(), time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started

    scans = pd.read_csv(out / "scans.tsv", sep="\t", dtype=str)
    scored = pd.read_csv(out / "predictions.csv")
    rows = []
    for folder in sorted((out / "benchmarks").iterdir()):
        files = [folder] if folder.is_file() else sorted(folder.glob("*/*.tsv"))
        files = [f for f in files if f.stat().st_mtime >= clock_start]  # this run's jobs, not an earlier run's
        if not files:
            continue
        seconds = [float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files]
        family = folder.stem if folder.is_file() else folder.name
        per_scan = sum(seconds) / (len(scored) if family == "predict" else max(1, len(files)))
        rows.append({"rule family": family, "jobs": len(files), "seconds per scan": round(per_scan, 1)})
    table = pd.DataFrame(rows)
    result = {"machine": f"{platform.machine()}, {args.cores} cores", "voxel_scale": args.voxel_scale,
              "scans": len(scans), "scored": len(scored), "wall_s": round(wall, 1),
              "wall_s_per_scan": round(wall / len(scans), 1), "job_seconds_per_scan": table.to_dict("records"),
              "sum_of_job_seconds_per_scan": round(float(table["seconds per scan"].sum()), 1)}
    print(table.to_markdown(index=False))
    print(f"\n{len(scans)} scans ({len(scored)} scored), wall {wall:.1f} s = {wall / len(scans):.1f} s per scan "
          f"on {args.cores} cores; job seconds per scan summed: {result['sum_of_job_seconds_per_scan']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
