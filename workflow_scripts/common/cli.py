"""What every stage's command line shares: logging to the rule's log, thread limits, and
one way of turning an expected failure into a message a person can act on."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Callable, Sequence

LOG = logging.getLogger("workflow_scripts")


class PipelineError(RuntimeError):
    """An expected failure (bad input, missing weights) whose message says what to do."""


def limit_threads(threads: int) -> None:
    """Cap the thread pools of ITK (ANTs), OpenMP/BLAS and torch at ``threads``.

    Must run before ``ants`` is imported: ITK reads its variable once at start-up.
    """
    threads = max(1, int(threads))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def machine_memory_mb() -> int | None:
    """This machine's memory in MB, or its cgroup's limit where lower (a container, a SLURM allocation);
    None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(cgroup).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number mean no limit
            limits.append(int(text))
    return min(limits) // 2**20 if limits else None


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for this job (default 1)")
    return p


def job_context() -> str:
    """Where this job runs (host, and the SLURM job id on a cluster): the first line of every log."""
    where = f"host {socket.gethostname()}"
    if os.environ.get("SLURM_JOB_ID"):
        where += f", SLURM job {os.environ['SLURM_JOB_ID']}"
    return where


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main`` with logging set up; a PipelineError exits 1 with its message only."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    LOG.info("running on %s", job_context())
    try:
        main(argv)
    except PipelineError as err:
        LOG.error("%s", err)
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return 0
