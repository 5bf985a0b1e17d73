"""Does a code change keep the workflow's results? The same tiny demo run at two revisions, compared file by file.

Runs `snakemake --profile profiles/quick TARGETS` once with the code of each revision (a git worktree,
put first on PYTHONPATH so every job imports that revision's `workflow_scripts`) and compares the
two results folders: stage images and tensors (voxels, grid and dtype, exactly), splits and
prediction tables (text, exactly), training histories, summaries and metrics (JSON values exactly,
with the keys that record when, where and with which versions a run happened left out, and each
run's folder written as <run>). Exits 1 when anything else differs.

    python benchmarks/behaviour_identity.py --before 921ce80 --workdir /tmp/identity          # HEAD's tree
    python benchmarks/behaviour_identity.py --before 921ce80 --after main --workdir /tmp/identity
    python benchmarks/behaviour_identity.py --compare /tmp/identity/before /tmp/identity/after
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["preprocess", "split", "train", "cv", "evaluate"]  # the main experiment, its folds, its test figures
# Keys whose values say when, where or with what a run happened, not what it computed.
VOLATILE = re.compile(r"seconds|wait_share|time|date|host|version|created|elapsed|duration|peak_|rss|device_name")
SKIPPED_DIRS = {"logs", "benchmarks", ".snakemake"}
SKIPPED_SUFFIXES = {".png", ".html", ".pt", ".log", ".npz"}  # figures, pages, checkpoints: their numbers are compared
# Caches keyed by the files' sizes and modification times, which differ between any two runs.
SKIPPED_FILES = {"ingest/series_checks.json"}
SHOWN = 20  # differing files printed


def checkout(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` at ``where`` (recreated), so its code runs without touching this checkout."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], capture_output=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def run_workflow(code: Path, workdir: Path, targets: list[str], cores: str) -> float:
    """The quick profile's TARGETS with the code in ``code``; returns the wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    which = subprocess.run([sys.executable, "-c", "import workflow_scripts; print(workflow_scripts.__file__)"],
                           env=env, cwd=workdir, capture_output=True, text=True, check=True).stdout.strip()
    if not which.startswith(str(code)):
        raise SystemExit(f"jobs would import workflow_scripts from {which}, not from {code}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(code / "profiles" / "quick" / "settings.yaml"), "--cores", cores, *targets]
    started = time.perf_counter()
    with open(workdir / "snakemake.out", "w") as out:
        subprocess.run(cmd, cwd=workdir, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def result_files(results: Path) -> Iterator[Path]:
    """Every compared file under ``results``, relative to it."""
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results)
        if (path.is_file() and not SKIPPED_DIRS & set(rel.parts) and path.suffix not in SKIPPED_SUFFIXES
                and rel.as_posix() not in SKIPPED_FILES):
            yield rel


def plain_json(value: Any, run_dir: str) -> Any:
    """``value`` without volatile keys, with the run's folder written as <run>."""
    if isinstance(value, dict):
        return {k.replace(run_dir, "<run>"): plain_json(v, run_dir) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [plain_json(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    return value


def json_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two JSON values differ, as key paths with both values (at most a few per file)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += json_differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def compare_file(rel: Path, before: Path, after: Path) -> list[str]:
    """How ``rel`` differs between the two results folders (empty: identical)."""
    a, b = before / "results" / rel, after / "results" / rel
    if rel.name.endswith(".nii.gz"):
        import nibabel as nib

        x, y = nib.load(a), nib.load(b)
        problems = []
        if not np.array_equal(x.affine, y.affine):
            problems.append(f"affine differs by up to {np.abs(x.affine - y.affine).max():.3g}")
        if x.get_data_dtype() != y.get_data_dtype() or x.shape != y.shape:
            problems.append(f"{x.get_data_dtype()} {x.shape} != {y.get_data_dtype()} {y.shape}")
        elif not np.array_equal(xa := np.asanyarray(x.dataobj), ya := np.asanyarray(y.dataobj)):
            problems.append(f"voxels differ by up to {np.abs(xa.astype(float) - ya.astype(float)).max():.3g}")
        return problems
    if rel.suffix == ".npy":
        x, y = np.load(a), np.load(b)
        return [] if x.dtype == y.dtype and np.array_equal(x, y) else ["array differs"]
    if rel.suffix == ".json":
        return json_differences(plain_json(json.loads(a.read_text()), str(before)),
                                plain_json(json.loads(b.read_text()), str(after)))[:5]
    text_a = a.read_text(errors="replace").replace(str(before), "<run>")
    text_b = b.read_text(errors="replace").replace(str(after), "<run>")
    return [] if text_a == text_b else ["text differs"]


def compare(before: Path, after: Path) -> dict:
    """Every compared file's differences; files present in one run only are differences too."""
    a, b = set(result_files(before / "results")), set(result_files(after / "results"))
    report = {str(rel): [f"only in {'before' if rel in a else 'after'}"] for rel in sorted(a ^ b)}
    kinds: dict[str, int] = {}
    for rel in sorted(a & b):
        kind = "stage images" if rel.name.endswith(".nii.gz") else rel.suffix.lstrip(".") or "other"
        kinds[kind] = kinds.get(kind, 0) + 1
        if problems := compare_file(rel, before, after):
            report[str(rel)] = problems
    return {"compared": kinds, "differences": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="revision whose results are the reference")
    p.add_argument("--after", help="revision to check (default: this checkout's working tree)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/identity"))
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--cores", default="2")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="only compare two finished runs")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    args = p.parse_args()
    if args.compare:
        before, after = args.compare
    else:
        if not args.before:
            p.error("--before REV (or --compare BEFORE AFTER)")
        before, after = args.workdir / "before", args.workdir / "after"
        for label, rev, run_dir in (("before", args.before, before), ("after", args.after, after)):
            code = checkout(rev, args.workdir / f"code_{label}") if rev else REPO
            seconds = run_workflow(code, run_dir, args.targets, args.cores)
            print(f"{label}: {rev or 'working tree'} ({code}) ran {' '.join(args.targets)} in {seconds:.0f} s")
    result = compare(before.resolve(), after.resolve())
    print("compared: " + ", ".join(f"{n} {kind}" for kind, n in result["compared"].items()))
    for rel, problems in list(result["differences"].items())[:SHOWN]:
        print(f"DIFFERS {rel}: " + "; ".join(problems))
    if len(result["differences"]) > SHOWN:
        print(f"... and {len(result['differences']) - SHOWN} more (--json has them all)")
    print("identical" if not result["differences"] else f"{len(result['differences'])} files differ")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(1 if result["differences"] else 0)


if __name__ == "__main__":
    main()
