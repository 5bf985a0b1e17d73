"""Per-stage seconds per scan from Snakemake's benchmark files, optionally after a fresh run.

    python benchmarks/preprocess_speed.py --results results
    python benchmarks/preprocess_speed.py --run --workdir /tmp/bench --configfile my.yaml

With ``--run`` the workflow's ``preprocess`` target runs on the demo collection in
``--workdir`` (2 cores: single-threaded stages two at a time, skull stripping on both cores)
before the table is made. ``--plant-synthstrip`` writes a SynthStrip checkpoint with the
official architecture where the config looks for it, its last layer set to predict "inside
the brain" everywhere: the network's compute, and so its time, is that of the official
weights (which cannot be downloaded here); only the masks are meaningless.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STAGES = ["nifti", "stripped", "resampled", "cropped128", "n4", "ras", "qc"]


def collect(results: Path, stages: list[str] = STAGES) -> pd.DataFrame:
    """One row per (stage, scan) with wall seconds and peak memory from the benchmark TSVs."""
    rows = []
    for stage in stages:
        for tsv in sorted((results / "benchmarks" / stage).glob("*/*.tsv")):
            bench = pd.read_csv(tsv, sep="\t").iloc[0]
            rows.append({"stage": stage, "subject": tsv.parent.name, "image_id": tsv.stem,
                         "seconds": float(bench["s"]), "cpu_s": float(bench["cpu_time"]),
                         "max_rss_mb": float(bench["max_rss"])})
    if not rows:
        raise SystemExit(f"no benchmark files under {results}/benchmarks: run the workflow first")
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, median and maximum seconds per scan, and peak memory, for each stage."""
    summary = table.groupby("stage", sort=False).agg(
        scans=("seconds", "size"), mean_s=("seconds", "mean"), median_s=("seconds", "median"),
        max_s=("seconds", "max"), peak_rss_mb=("max_rss_mb", "max"))
    return summary.round(2)


def plant_synthstrip(path: Path) -> None:
    import torch
    from nipreps.synthstrip.model import StripModel

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = StripModel().state_dict()
    state["remaining.2.conv.weight"].zero_()
    state["remaining.2.conv.bias"].fill_(-5.0)  # a distance of -5 mm: every voxel is brain
    torch.save({"epoch": 0, "model_state_dict": state}, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, help="results folder to read (default: <workdir>/results)")
    p.add_argument("--run", action="store_true", help="run `snakemake preprocess` first")
    p.add_argument("--workdir", type=Path, default=Path.cwd())
    p.add_argument("--configfile", type=Path, action="append", default=[])
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--plant-synthstrip", type=Path, help="write a random-weight SynthStrip checkpoint here")
    p.add_argument("--json", type=Path, help="also write the summary as JSON")
    args = p.parse_args()

    if args.plant_synthstrip:
        plant_synthstrip(args.plant_synthstrip)
    if args.run:
        args.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(args.workdir),
               "--cores", str(args.cores), "preprocess"]
        if args.configfile:
            cmd += ["--configfile", *map(str, args.configfile)]
        subprocess.run(cmd, check=True)
    results = args.results or args.workdir / "results"
    summary = summarise(collect(results))
    print(f"# preprocessing seconds per scan ({platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs)")
    print(summary.to_markdown() if hasattr(summary, "to_markdown") else summary.to_string())
    if args.json:
        args.json.write_text(json.dumps(summary.reset_index().to_dict(orient="records"), indent=2))


if __name__ == "__main__":
    main()
