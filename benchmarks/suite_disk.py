"""Disk the test suite needs: the peak size of pytest's temporary folder while the suite runs.

    python benchmarks/suite_disk.py                       # the whole suite (pytest -q)
    python benchmarks/suite_disk.py -- tests/test_train.py  # a part of it

The suite trains the real networks, whose checkpoints are 100-330 MB each, so the free disk
under the temporary folder is a requirement of `pytest -q` like its run time. pytest runs with
``--basetemp`` set to a fresh folder under ``--root`` (default: the system's temporary folder);
every ``--interval`` seconds the size of that folder is taken (files counted once however
many hard links they have), and the peak, the time it was reached and the test running then
are printed as JSON. The folder is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, each inode counted once (checkpoints are hard-linked)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(folder, onerror=lambda _: None):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # removed between listing and stat
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def current_test(log: Path) -> str:
    """The last test id pytest reported in verbose output (the one running, or just finished)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "::" in line]
    return lines[-1].split(" ")[0] if lines else ""


def measure(pytest_args: list[str], root: Path, interval: float) -> dict:
    """Run pytest on ``pytest_args`` with a fresh basetemp under ``root``; sample its size."""
    basetemp = Path(tempfile.mkdtemp(prefix="suite_disk_", dir=root)) / "basetemp"
    log = basetemp.parent / "pytest.log"
    samples: list[tuple[float, int, str]] = []
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                    f"--basetemp={basetemp}", *pytest_args], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                size = folder_bytes(basetemp) if basetemp.exists() else 0
                samples.append((time.perf_counter() - started, size, current_test(log)))
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = process.wait()
        stop.set()
        sampler.join()
    end_size = folder_bytes(basetemp) if basetemp.exists() else 0
    summary_line = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1]
    shutil.rmtree(basetemp.parent, ignore_errors=True)
    peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0, "")
    return {"pytest_args": pytest_args, "returncode": returncode, "result": summary_line.strip("= "),
            "seconds": round(time.perf_counter() - started, 1), "interval_s": interval,
            "peak_gb": round(peak[1] / 1e9, 2), "peak_at_s": round(peak[0], 1), "peak_during": peak[2],
            "left_at_end_gb": round(end_size / 1e9, 2), "samples": len(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()),
                        help="where pytest's temporary folder is made (default: the system's)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between size samples")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest after --, e.g. -- tests/test_train.py")
    args = parser.parse_args(argv)
    result = measure(args.pytest_args, args.root, args.interval)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
