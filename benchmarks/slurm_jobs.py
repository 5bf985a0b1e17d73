"""SLURM jobs and wall time of `preprocess` through profiles/slurm, with each scan's stages grouped into one
SLURM job (the profile as shipped) and with one SLURM job per rule instance (the profile without `groups`).

Starts a one-node SLURM cluster on this machine (tests/slurm_cluster.py: needs root, Debian's slurm-wlm and
munge), generates a small demo collection in each of two fresh folders and runs the same target through both
profiles. Prints, per variant, the SLURM jobs submitted, the run's wall time, the node time the SLURM jobs held
(sum of their start-end spans from `scontrol`) and the rules' own job seconds (their benchmark files): the
difference is what each SLURM job costs beyond its rules (starting Snakemake on the node, waiting for the
status checks). A real cluster adds its queue wait per SLURM job on top.

    sudo python benchmarks/slurm_jobs.py --workdir /tmp/slurm_bench --subjects 6 --json slurm_jobs.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import Cluster, start_cluster, unavailable_reason  # noqa: E402


def demo_config(subjects: int) -> dict:
    """A small demo (3 mm heads, 2 mm resampling, 32^3 crops) whose stages take seconds, as in the SLURM test:
    the SLURM cost per job is the same for any size of scan."""
    return {"demo": {"n_subjects": subjects, "visits": 1, "n_mci": 0, "seed": 5, "voxel_scale": 3.0},
            "preprocess": {"skullstrip": {"method": "deepbet"}, "resample": {"spacing": [2.0, 2.0, 2.0]},
                           "target_shape": [32, 32, 32]},
            "resources": {"stripped": {"threads": 1, "mem_mb": 2000}}}


def ungrouped_profile(folder: Path) -> Path:
    """A copy of profiles/slurm without its `groups`: every rule instance its own SLURM job."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile.pop("groups", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def slurm_job_span_seconds(cluster: Cluster, job_id: str) -> float:
    """Start-to-end seconds of a finished SLURM job (scontrol keeps it for MinJobAge)."""
    text = cluster.run("scontrol", "show", "job", job_id).stdout
    times = dict(re.findall(r"\b(StartTime|EndTime)=(\S+)", text))
    start, end = (datetime.fromisoformat(times[k]) for k in ("StartTime", "EndTime"))
    return (end - start).total_seconds()


def run_variant(cluster: Cluster, folder: Path, profile: Path, subjects: int, target: str) -> dict:
    """Run ``target`` through ``profile`` in a fresh ``folder``; the SLURM and rule figures of that run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.yaml").write_text(yaml.safe_dump(demo_config(subjects)))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(folder),
           "--profile", str(profile), "--configfile", str(folder / "bench.yaml"), "--nolock",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", target]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=folder, env=cluster.env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    job_ids = sorted({p.stem for p in (folder / ".snakemake" / "slurm_logs").rglob("*.log")})
    benchmarks = [pd.read_csv(p, sep="\t") for p in (folder / "results" / "benchmarks").rglob("*.tsv")]
    scans = pd.read_csv(folder / "results" / "scans.tsv", sep="\t")
    return {"scans": len(scans), "slurm_jobs": len(job_ids), "rule_jobs": len(benchmarks), "wall_s": round(wall, 1),
            "slurm_job_s": sum(slurm_job_span_seconds(cluster, i) for i in job_ids),
            "rule_job_s": round(sum(float(b["s"].iloc[0]) for b in benchmarks), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a fresh folder for the cluster and both runs")
    p.add_argument("--subjects", type=int, default=6, help="demo subjects (one scan each)")
    p.add_argument("--target", default="preprocess")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot start SLURM here: {reason}")
    workdir = args.workdir.resolve()
    cluster = start_cluster(workdir / "cluster")
    try:
        rows = {
            "grouped (profile as shipped)": run_variant(cluster, workdir / "grouped", PROFILE, args.subjects,
                                                        args.target),
            "one SLURM job per rule": run_variant(cluster, workdir / "ungrouped",
                                                  ungrouped_profile(workdir / "profile_ungrouped"), args.subjects,
                                                  args.target),
        }
    finally:
        cluster.stop()
    table = pd.DataFrame(rows).T
    table["slurm_s_beyond_rules_per_slurm_job"] = ((table["slurm_job_s"] - table["rule_job_s"])
                                                   / table["slurm_jobs"]).round(1)
    print(table.to_markdown())
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, one-node SLURM cluster; target {args.target}")
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "cpus": os.cpu_count(), "variants": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
