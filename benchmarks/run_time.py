"""Wall time of a whole workflow run, and the job time of each rule family, from Snakemake's own log.

Runs `snakemake [--profile P] TARGET` in a fresh folder (or reads the log of a finished run) and
prints the run's wall time and, per rule, the number of jobs, their summed and longest wall time
(each job from its start line to its `Finished jobid` line; 1 s resolution). Rules are then summed
by family, the rule file that defines them (rules/preprocess.smk -> preprocess), with the family's
wall time: the time during which at least one of its jobs ran.

    python benchmarks/run_time.py --workdir /tmp/quick --profile profiles/quick      # the quick profile
    python benchmarks/run_time.py --workdir /tmp/full --cores 2                        # the default `all`
    python benchmarks/run_time.py --workdir /tmp/full --profile profiles/offline -- --cores 2  # ... with no network
    python benchmarks/run_time.py --log /tmp/full/.snakemake/log/<time>.snakemake.log  # a finished run
    python benchmarks/run_time.py --log <first>.snakemake.log <resumed>.snakemake.log  # an interrupted run

A run that was interrupted and resumed (`--rerun-incomplete`) is read from all its logs: their jobs are
pooled and its wall time is the sum of each log's span, leaving out the gap between them and the job that
was killed (it has no `Finished` line; its re-run in the later log counts).
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

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(?P<when>\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
STARTED = re.compile(r"^(local)?(checkpoint|rule) (?P<rule>\w+):$")
JOBID = re.compile(r"^\s+jobid: (?P<jobid>\d+)$")
FINISHED = re.compile(r"^Finished jobid: (?P<jobid>\d+) \(Rule: (?P<rule>\w+)\)$")
RULE_DEFINITION = re.compile(r"^\s*(?:(?:local)?(?:rule|checkpoint) (?P<rule>\w+)|use rule \w+ as (?P<twin>\w+)"
                             r"(?: with)?)\s*:", re.MULTILINE)


def job_times(log_lines: list[str]) -> pd.DataFrame:
    """One row per finished job of a Snakemake log: rule, jobid, start, end, seconds."""
    stamp, pending, started, rows = None, None, {}, []
    for line in log_lines:
        if m := STAMP.match(line):
            stamp = datetime.strptime(m["when"], "%a %b %d %H:%M:%S %Y")
        elif (m := STARTED.match(line)) and stamp is not None:
            pending = (m["rule"], stamp)
        elif (m := JOBID.match(line)) and pending is not None:
            started[int(m["jobid"])], pending = pending, None
        elif (m := FINISHED.match(line)) and int(m["jobid"]) in started:
            rule, start = started.pop(int(m["jobid"]))
            rows.append({"rule": rule, "jobid": int(m["jobid"]), "start": start, "end": stamp,
                         "seconds": (stamp - start).total_seconds()})
    return pd.DataFrame(rows, columns=["rule", "jobid", "start", "end", "seconds"])


def rule_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, summed and longest job seconds, in the order the rules first started."""
    table = (jobs.groupby("rule", sort=False)
             .agg(jobs=("seconds", "size"), first_start=("start", "min"), job_seconds=("seconds", "sum"),
                  longest_job_s=("seconds", "max"))
             .sort_values("first_start").drop(columns="first_start").reset_index())
    return table


def logs_wall_seconds(logs_jobs: list[pd.DataFrame]) -> float:
    """Wall seconds of a run read from its logs: each log's first job start to its last job end, summed."""
    return sum((jobs["end"].max() - jobs["start"].min()).total_seconds() for jobs in logs_jobs if not jobs.empty)


def rule_families(repo: Path = REPO) -> dict[str, str]:
    """Each rule of the workflow -> the stem of the file that defines it (the Snakefile's own rules: 'all')."""
    families = {}
    for path in [repo / "Snakefile", *sorted((repo / "rules").glob("*.smk"))]:
        family = "all" if path.name == "Snakefile" else path.stem
        for m in RULE_DEFINITION.finditer(path.read_text()):
            families[m["rule"] or m["twin"]] = family
    return families


def busy_seconds(jobs: pd.DataFrame) -> float:
    """Seconds during which at least one of ``jobs`` ran (the union of their start-end intervals)."""
    total, end = 0.0, None
    for start, stop in sorted(zip(jobs["start"], jobs["end"])):
        if end is None or start > end:
            total, end = total + (stop - start).total_seconds(), stop
        elif stop > end:
            total, end = total + (stop - end).total_seconds(), stop
    return total


def family_table(jobs: pd.DataFrame, families: dict[str, str]) -> pd.DataFrame:
    """Per rule family, in the order the families first started: jobs, summed job seconds, and wall seconds
    (the union of its jobs' intervals; families overlap when jobs of two families run side by side)."""
    unknown = sorted(set(jobs["rule"]) - set(families))
    if unknown:
        raise SystemExit(f"rules not defined in Snakefile or rules/*.smk: {', '.join(unknown)}")
    jobs = jobs.assign(family=jobs["rule"].map(families))
    rows = [{"family": family, "jobs": len(group), "job_seconds": group["seconds"].sum(),
             "wall_seconds": busy_seconds(group), "first_start": group["start"].min()}
            for family, group in jobs.groupby("family")]
    return pd.DataFrame(rows).sort_values("first_start").drop(columns="first_start").reset_index(drop=True)


def run(workdir: Path, profile: str | None, cores: str, target: str, extra: list[str]) -> tuple[Path, float]:
    """Run Snakemake in ``workdir``; returns its log file and the wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--profile", str((REPO / profile).resolve())] if profile else ["--cores", cores]
    cmd += [*extra, target]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, env=os.environ)
    wall = time.perf_counter() - started
    log = max((workdir / ".snakemake" / "log").glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
    return log, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, help="a folder to run in (fresh: the demo is generated there)")
    p.add_argument("--profile", help="a profile of this repository, e.g. profiles/quick")
    p.add_argument("--cores", default="2", help="without --profile")
    p.add_argument("--target", default="all")
    p.add_argument("--log", type=Path, nargs="+",
                   help="only read this finished run's Snakemake log (several: an interrupted run and its resumptions)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("extra", nargs="*", help="further Snakemake arguments (after --)")
    args = p.parse_args()
    if args.log:
        logs, wall = args.log, None
    elif args.workdir:
        log, wall = run(args.workdir.resolve(), args.profile, args.cores, args.target, args.extra)
        logs = [log]
    else:
        p.error("give --workdir to run, or --log to read a finished run")
    logs_jobs = [job_times(log.read_text().splitlines()) for log in logs]
    jobs = pd.concat(logs_jobs, ignore_index=True)
    if wall is None:
        wall = logs_wall_seconds(logs_jobs)
    table = rule_table(jobs)
    families = family_table(jobs, rule_families())
    print(table.to_markdown(index=False))
    print()
    print(families.to_markdown(index=False))
    print(f"\n{len(jobs)} jobs, wall {wall / 60:.1f} min ({wall:.0f} s), job seconds summed "
          f"{table['job_seconds'].sum():.0f}; {platform.machine()}, {os.cpu_count()} CPUs; "
          f"log{'s' if len(logs) > 1 else ''} {', '.join(map(str, logs))}")
    if args.json:
        args.json.write_text(json.dumps({"logs": [str(log) for log in logs], "profile": args.profile,
                                         "wall_s": round(wall, 1), "cpus": os.cpu_count(), "machine": platform.machine(),
                                         "rules": table.to_dict("records"),
                                         "families": families.to_dict("records")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
