"""The workflow's preprocessing against a plain in-memory loop doing the same stages, on the same scans.

    python benchmarks/preprocess_vs_loop.py --workdir /tmp/pvl --scans 5 --cores 2
    python benchmarks/preprocess_vs_loop.py --workdir /tmp/pvl --scans 16 --cores 2 --json pvl16.json

The loop is what a researcher would write without a workflow: one Python process that, for each
scan, converts the series with dicom2nifti, skull-strips it (deepbet loaded once; SynthStrip through
the stage's function, which reads its 30 MB checkpoint per scan, 0.2 s), resamples,
crops and zooms, runs N4 and reorients, all in memory with the libraries' default threads, and
writes the final image and mask. It calls the workflow's own stage functions with the same
settings, so both compute the same thing. The workflow runs ``snakemake`` on the same scans' final
files, QC montages and QC metrics (what ``preprocess`` makes per scan) in a fresh results folder.

Printed: each stage's seconds summed over the scans (the workflow's from its benchmark files, wall
and CPU, against the loop's timers), the per-stage ratio, and the wall-time ratio. ``--estimate``
turns a run's JSON into an estimate for a large collection on more cores (see ``scale_estimate``):

    python benchmarks/preprocess_vs_loop.py --estimate pvl16.json --estimate-scans 1300 --estimate-cores 8 32

The demo collection (ADNI-shaped sagittal series) is generated and ingested in ``--workdir`` first, untimed.
``--method synthstrip`` plants a SynthStrip checkpoint of the official architecture (see
preprocess_speed.py): the compute is that of the official weights, only the masks are meaningless.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from preprocess_speed import collect, plant_synthstrip  # noqa: E402

LOOP_STAGES = ["nifti", "stripped", "resampled", "cropped128", "n4", "ras"]
WORKFLOW_STAGES = LOOP_STAGES + ["qc", "qc_metrics"]


def bench_config(workdir: Path, n_subjects: int, skullstrip: dict) -> Path:
    """A config file for the benchmark's demo: one scan per subject, no distractors, the chosen stripper."""
    config = {"demo": {"n_subjects": n_subjects, "visits": 1, "n_mci": 0},
              "preprocess": {"skullstrip": skullstrip}}
    path = workdir / "bench.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def snakemake(workdir: Path, configfile: Path, cores: int, targets: list[str]) -> float:
    """Run the workflow on ``targets``; its wall seconds, Snakemake's start-up and planning included."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", str(cores), "--quiet", "progress", "--", *targets]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def scan_targets(scans: pd.DataFrame) -> list[str]:
    """What ``preprocess`` makes for each of these scans: the final image and mask, QC montage and metrics."""
    targets = []
    for row in scans.itertuples():
        stem = f"{row.subject}/{row.image_id}"
        targets += [f"results/ras/{stem}.nii.gz", f"results/ras/{stem}_mask.nii.gz",
                    f"results/qc/{stem}.png", f"results/qc/{stem}.json"]
    return targets


def run_loop(scans_tsv: Path, out_dir: Path, settings: dict, weights: str | None) -> dict:
    """The plain loop (run in its own process by ``--loop``): seconds and CPU seconds per stage, summed."""
    started = time.perf_counter()
    from workflow_scripts.preprocess import convert, crop, n4, reorient, resample, skullstrip
    from workflow_scripts.common.nifti_io import save_nifti_atomic

    scans = pd.read_csv(scans_tsv, sep="\t")
    pre = settings["preprocess"]
    wall = dict.fromkeys(LOOP_STAGES, 0.0)
    cpu = dict.fromkeys(LOOP_STAGES, 0.0)

    def timed(stage, fn, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        wall[stage] += time.perf_counter() - w
        cpu[stage] += time.process_time() - c
        return result

    strip_mask = load_stripper(pre["skullstrip"], weights)
    for row in scans.itertuples():
        img = timed("nifti", convert.convert_series, row.dicom_dir)

        def strip_one(img=img):
            mask = strip_mask(img)
            skullstrip.check_mask(mask, img, pre["skullstrip"]["method"])
            return skullstrip.strip(img, mask, pre["skullstrip"]["method"])

        brain, mask = timed("stripped", strip_one)
        brain, mask = timed("resampled", resample.resample_to_spacing, brain, mask,
                            spacing=pre["resample"]["spacing"], interpolation=pre["resample"]["interpolation"])
        brain, mask = timed("cropped128", crop.crop_and_zoom, brain, mask, margin=pre["crop"]["margin"],
                            target_shape=pre["target_shape"], order=pre["crop"]["zoom_order"],
                            keep_aspect=pre["crop"]["keep_aspect"])
        brain = timed("n4", n4.n4_correct, brain, mask if pre["n4"]["use_mask"] else None,
                      shrink_factor=pre["n4"]["shrink_factor"], iterations=pre["n4"]["iterations"],
                      tolerance=pre["n4"]["tolerance"], spline_param=pre["n4"]["spline_param"])

        def ras_and_write(brain=brain, mask=mask, row=row):
            target = out_dir / row.subject
            save_nifti_atomic(reorient.to_ras(mask), target / f"{row.image_id}_mask.nii.gz")
            save_nifti_atomic(reorient.to_ras(brain), target / f"{row.image_id}.nii.gz")

        timed("ras", ras_and_write)
    return {"wall_s": wall, "cpu_s": cpu, "process_s": time.perf_counter() - started}


def load_stripper(skullstrip_settings: dict, weights: str | None):
    """A mask function as a loop would have it: deepbet's network loaded once, or SynthStrip's function."""
    from workflow_scripts.preprocess.skullstrip import GPU_DEVICES, deepbet_mask, synthstrip_mask, use_gpu

    gpu = use_gpu(GPU_DEVICES[skullstrip_settings["gpu"]])  # preprocess.skullstrip.gpu, as the stage reads it
    if skullstrip_settings["method"] == "deepbet":
        from deepbet import BrainExtraction

        extractor = BrainExtraction(no_gpu=not gpu)
        return lambda img: deepbet_mask(img, threshold=skullstrip_settings["deepbet_threshold"],
                                        n_dilate=skullstrip_settings["deepbet_dilate"], gpu=gpu, extractor=extractor)
    return lambda img: synthstrip_mask(img, weights, threads=os.cpu_count() or 1,
                                       border=skullstrip_settings["synthstrip_border"], gpu=gpu)


def stage_table(workflow: pd.DataFrame, loop: dict, threads: dict) -> pd.DataFrame:
    """Seconds per stage summed over the scans: workflow jobs (wall, CPU, threads) against the loop."""
    sums = workflow.groupby("stage", sort=False)[["seconds", "cpu_s"]].sum()
    rows = []
    for stage in WORKFLOW_STAGES:
        job_s = float(sums.loc[stage, "seconds"]) if stage in sums.index else float("nan")
        job_cpu = float(sums.loc[stage, "cpu_s"]) if stage in sums.index else float("nan")
        loop_s = loop["wall_s"].get(stage)
        rows.append({"stage": stage, "threads": threads[stage], "workflow_job_s": round(job_s, 1),
                     "workflow_cpu_s": round(job_cpu, 1),
                     "loop_s": None if loop_s is None else round(loop_s, 1),
                     "loop_cpu_s": None if loop_s is None else round(loop["cpu_s"][stage], 1),
                     "ratio": None if not loop_s else round(job_s / loop_s, 2)})
    return pd.DataFrame(rows).set_index("stage")


def overhead_per_job(figures: dict) -> float:
    """Core-seconds per job that the workflow's run left idle or spent outside the jobs: its wall time times
    the cores, less every job's wall time times its threads, shared over the jobs (Snakemake's start-up,
    planning and scheduling, and cores idle while a job waits for its inputs)."""
    busy = sum(row["workflow_job_s"] * row["threads"] for row in figures["stages"])
    jobs = figures["scans"] * len(figures["stages"])
    return (figures["workflow_wall_s"] * figures["cores"] - busy) / jobs


def loop_ran(row: dict) -> bool:
    """Whether the loop runs this stage (QC is the workflow's only: its loop figures are None, or NaN from JSON)."""
    return row["loop_cpu_s"] is not None and not math.isnan(row["loop_cpu_s"])


def loop_cpu_floor(figures: dict) -> dict:
    """The shortest wall any schedule of the loop's own computation can take on the run's cores (its CPU seconds
    spread perfectly over them, no start-up, no QC), and that as a share of the loop's wall: a workflow that
    computes the same thing cannot go below it."""
    cpu_s = sum(row["loop_cpu_s"] for row in figures["stages"] if loop_ran(row))
    floor_s = cpu_s / figures["cores"]
    return {"loop_cpu_s": round(cpu_s, 1), "floor_wall_s": round(floor_s, 1),
            "floor_ratio": round(floor_s / figures["loop_wall_s"], 3)}


def floor_sentence(figures: dict) -> str:
    """The floor in the words both the run and --estimate print."""
    floor = loop_cpu_floor(figures)
    return (f"on {figures['cores']} cores the loop's {floor['loop_cpu_s']} CPU s take at least "
            f"{floor['floor_wall_s']} s, {floor['floor_ratio']:.2f} x its wall")


def scale_estimate(figures: dict, n_scans: int, cores: int, planning_s: float) -> dict:
    """Wall time of the workflow and of the loop on ``n_scans`` scans and ``cores`` cores, from one run's figures.

    Workflow: planning, then every job's core-seconds (wall x threads, as measured) plus the measured overhead
    per job, spread over the cores. Loop: each stage's serial and parallel parts from its 2-core wall and CPU
    seconds (Amdahl), the parallel part spread over all cores: optimistic for the loop, whose libraries scale
    less than linearly past a few threads.
    """
    n, measured_cores = figures["scans"], figures["cores"]
    per_job = overhead_per_job(figures)
    workflow_core_s = sum(row["workflow_job_s"] * row["threads"] for row in figures["stages"]) / n
    workflow = planning_s + n_scans * (workflow_core_s + len(figures["stages"]) * per_job) / cores
    loop_per_scan = 0.0
    for row in figures["stages"]:
        if not loop_ran(row):
            continue
        cpu, wall = row["loop_cpu_s"] / n, row["loop_s"] / n
        parallel = min(1.0, max(0.0, (1 - wall / cpu) * measured_cores / (measured_cores - 1))) if cpu else 0.0
        loop_per_scan += cpu * (1 - parallel) + cpu * parallel / cores
    loop = n_scans * loop_per_scan
    return {"scans": n_scans, "cores": cores, "workflow_h": round(workflow / 3600, 2), "loop_h": round(loop / 3600, 2),
            "ratio": round(workflow / loop, 2), "overhead_core_s_per_job": round(per_job, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--scans", type=int, default=5, help="how many scans both preprocess")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--method", choices=["deepbet", "synthstrip"], default="deepbet")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--estimate", type=Path, help="a previous run's --json: print the scale estimate only")
    p.add_argument("--estimate-scans", type=int, default=1300)
    p.add_argument("--estimate-cores", type=int, nargs="+", default=[8, 32])
    p.add_argument("--planning-s", type=float, default=75.0,
                   help="Snakemake's planning time for the large collection (75 s: a dry run of 8,527 jobs "
                        "on 1,300 scans)")
    p.add_argument("--loop", nargs=3, metavar=("SCANS_TSV", "OUT_DIR", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.estimate:
        figures = json.loads(args.estimate.read_text())
        rows = [scale_estimate(figures, args.estimate_scans, c, args.planning_s) for c in args.estimate_cores]
        print(pd.DataFrame(rows).to_markdown(index=False))
        print(f"\n{figures['scans']} scans: {floor_sentence(figures)} (the workflow measured "
              f"{figures['wall_ratio']:.2f})")
        return
    if args.loop:  # the loop's own process: prints its timers as JSON
        scans_tsv, out_dir, settings_json = args.loop
        settings = json.loads(Path(settings_json).read_text())
        print(json.dumps(run_loop(Path(scans_tsv), Path(out_dir), settings, settings.get("weights"))))
        return

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    weights = None
    if args.method == "synthstrip":
        weights = workdir / "planted" / "synthstrip.1.pt"
        plant_synthstrip(weights)
    n_subjects = args.scans + args.scans % 2  # the demo splits subjects evenly between AD and CN
    skullstrip = {"method": args.method, **({"synthstrip_weights": str(weights)} if weights else {})}
    configfile = bench_config(workdir, n_subjects, skullstrip)
    snakemake(workdir, configfile, args.cores, ["results/scans.tsv"])  # demo + ingest, not timed
    scans = pd.read_csv(workdir / "results" / "scans.tsv", sep="\t").head(args.scans)
    if len(scans) < args.scans:
        raise SystemExit(f"the demo gave {len(scans)} scans, fewer than --scans {args.scans}")
    chosen = workdir / "bench_scans.tsv"
    scans.to_csv(chosen, sep="\t", index=False)

    # The loop's settings: config.yaml's, with this benchmark's skull stripper.
    import yaml

    settings = yaml.safe_load((REPO / "config.yaml").read_text())
    settings["preprocess"]["skullstrip"].update(skullstrip)
    settings["weights"] = str(weights) if weights else None
    settings_json = workdir / "loop_settings.json"
    settings_json.write_text(json.dumps(settings, default=str))

    loop_out = workdir / "loop_output"
    shutil.rmtree(loop_out, ignore_errors=True)
    started = time.perf_counter()
    loop_run = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--loop", str(chosen),
                               str(loop_out), str(settings_json)], check=True, capture_output=True, text=True)
    loop_wall = time.perf_counter() - started
    loop = json.loads(loop_run.stdout.strip().splitlines()[-1])

    for stage in WORKFLOW_STAGES:  # a fresh start for every stage: its files, benchmarks and logs
        for folder in (workdir / "results" / stage, workdir / "results" / "benchmarks" / stage,
                       workdir / "results" / "logs" / stage):
            shutil.rmtree(folder, ignore_errors=True)
    workflow_wall = snakemake(workdir, configfile, args.cores, scan_targets(scans))
    workflow = collect(workdir / "results", WORKFLOW_STAGES)
    resources = settings["resources"]
    table = stage_table(workflow, loop, {stage: resources["qc" if stage == "qc_metrics" else stage]["threads"]
                                         for stage in WORKFLOW_STAGES})

    print(f"# {len(scans)} scans, {args.method}, --cores {args.cores}, {os.cpu_count()} CPUs "
          f"({platform.machine()}), {time.strftime('%Y-%m-%d')}")
    print(table.to_markdown())
    ratio = workflow_wall / loop_wall
    figures = {"scans": len(scans), "method": args.method, "cores": args.cores, "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "workflow_wall_s": round(workflow_wall, 1),
               "loop_wall_s": round(loop_wall, 1), "wall_ratio": round(ratio, 3),
               "stages": table.reset_index().to_dict(orient="records")}
    figures["loop_cpu_floor"] = loop_cpu_floor(figures)
    print(f"\nwall: workflow {workflow_wall:.1f} s, loop {loop_wall:.1f} s (its process), ratio {ratio:.2f}; "
          f"workflow overhead {overhead_per_job(figures):.2f} core-s per job; {floor_sentence(figures)}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
