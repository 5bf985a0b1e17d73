"""Ingest speed: seconds per scan with a cold and a warm check cache, against reading the same bytes.

    python benchmarks/ingest_speed.py                      # 240 series of 85 slices (voxel scale 2)
    python benchmarks/ingest_speed.py --series 400 --voxel-scale 1.5 --root /scratch/bench

A small demo collection is generated, and its MPRAGE series are copied (as new subjects, with
their own UIDs: workflow_scripts.data.demo_faults.copy_series) until the collection holds
``--series`` scans. Then, each timed ``--repeats`` times (best kept):

- read: every file read to its end, as ``cat`` would (1 MiB chunks, nothing parsed);
- ingest, cold cache: ``ingest.build_tables`` with an empty check cache (every file parsed), with
  each of ``--workers`` processes (the rule's threads);
- ingest, warm cache: again, with the cache the cold run filled (only the files' stat).

Both "read" and "cold" are timed twice: with the files in the page cache, and after asking the
kernel to drop them (``posix_fadvise(DONTNEED)`` after ``sync``; no root needed), which is what
a first ingest of a fresh download meets. The figures are printed as JSON, with the CPU seconds
of each fastest run (this process and its workers) and the load average before and after: on a
machine shared with other jobs the wall-clock figures of CPU-bound runs grow with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from workflow_scripts.common.settings import resolve
from workflow_scripts.data import ingest
from workflow_scripts.data.demo import collection_options, generate_collection
from workflow_scripts.data.demo_faults import copy_series

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())

SMALL_DEMO = dict(n_subjects=2, visits=1, n_mci=0, distractors=False, seed=3)


def build_collection(root: Path, n_series: int, voxel_scale: float) -> pd.DataFrame:
    """A demo collection of ``n_series`` MPRAGE scans: two generated, the rest copies of them."""
    demo = collection_options(resolve("demo"), CONFIG["data"]["phase_rid_ranges"])
    rows = generate_collection(root, **{**demo, "voxel_scale": voxel_scale, **SMALL_DEMO})
    sources = [(row, ingest.find_image_dir(root, row["Subject"], row["Image Data ID"]))
               for row in rows.to_dict("records")]
    copies = []
    for n in range(n_series - len(sources)):
        row, folder = sources[n % len(sources)]
        subject, image_id = f"{900 + n // 1000:03d}_S_{n % 1000 + 1:04d}", f"I{5_000_000 + n}"
        target = root / "ADNI" / subject / folder.parent.parent.name / folder.parent.name / image_id
        copy_series(folder, target, subject=subject, image_id=image_id, key=f"bench:{image_id}")
        copies.append({**row, "Subject": subject, "Image Data ID": image_id})
    table = pd.concat([rows, pd.DataFrame(copies)], ignore_index=True)
    table.to_csv(root / "collection.csv", index=False)
    return table


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "ADNI").rglob("*") if p.is_file())


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from the disk."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(files: list[Path]) -> int:
    """Read every file to its end, as cat does; returns the bytes read."""
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(1 << 20):
                total += len(chunk)
    return total


def run_ingest(root: Path, cache: dict, workers: int = 1) -> tuple[int, int]:
    """build_tables on the collection with the configured checks; (used, excluded)."""
    options = ingest.table_options(resolve("data", {**CONFIG["data"], "descriptions": ["MPRAGE"]}))
    scans, excluded = ingest.build_tables(ingest.read_collection_csv(root / "collection.csv"), root,
                                          check_cache=cache, workers=workers, **options)
    return len(scans), len(excluded)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the ingest workers)."""
    spent = os.times()
    return spent.user + spent.system + spent.children_user + spent.children_system


def best_of(repeats: int, work, before=lambda: None) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``repeats`` runs of ``work`` (``before`` runs untimed ahead of each)."""
    times = []
    for _ in range(repeats):
        before()
        started, cpu = time.perf_counter(), cpu_seconds()
        work()
        times.append((time.perf_counter() - started, cpu_seconds() - cpu))
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=240, help="scans in the collection (default 240)")
    p.add_argument("--voxel-scale", type=float, default=2.0,
                   help="demo voxel scale: 2 gives 128x128 slices, 85 or 88 per series (1 is ADNI-like)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ingest processes to time (--threads)")
    p.add_argument("--root", type=Path, help="work folder (default: a temporary folder, removed at the end)")
    args = p.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="ingest_speed_"))
    load_before = os.getloadavg()
    try:
        started = time.perf_counter()
        if not (root / "collection.csv").exists():
            build_collection(root, args.series, args.voxel_scale)
        files = all_files(root)
        build_s = time.perf_counter() - started
        n_bytes = read_bytes(files)
        n_scans = len(ingest.read_collection_csv(root / "collection.csv"))
        cold = lambda: drop_page_cache(files)  # noqa: E731
        figures = {"read_cached": best_of(args.repeats, lambda: read_bytes(files)),
                   "read_from_disk": best_of(args.repeats, lambda: read_bytes(files), cold)}
        for w in args.workers:
            figures[f"ingest_cold_cache_cached_files_{w}p"] = best_of(args.repeats, lambda: run_ingest(root, {}, w))
            figures[f"ingest_cold_cache_from_disk_{w}p"] = best_of(args.repeats, lambda: run_ingest(root, {}, w), cold)
        cache: dict = {}
        used, excluded = run_ingest(root, cache)
        figures["ingest_warm_cache"] = best_of(args.repeats, lambda: run_ingest(root, cache))
        report = {"scans": n_scans, "used": used, "excluded": excluded, "files": len(files),
                  "mbytes": round(n_bytes / 1e6, 1), "build_s": round(build_s, 1),
                  "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
                  "seconds": {k: round(wall, 3) for k, (wall, _) in figures.items()},
                  "cpu_seconds": {k: round(cpu, 3) for k, (_, cpu) in figures.items()},
                  "ms_per_scan": {k: round(1000 * wall / n_scans, 2) for k, (wall, _) in figures.items()},
                  "cold_ingest_over_read": {
                      f"{w}p_{where}": round(figures[f"ingest_cold_cache_{kind}_{w}p"][0] / figures[read][0], 1)
                      for w in args.workers for where, kind, read in (("page_cache", "cached_files", "read_cached"),
                                                                      ("from_disk", "from_disk", "read_from_disk"))}}
        print(json.dumps(report, indent=2))
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
