"""Per-scan failure isolation: a scan whose own data makes a stage fail is dropped, not fatal.

A real ADNI download always holds a few series that convert badly, give an empty brain mask or
turn non-finite in N4. Such a stage raises :class:`ScanDataError` with a reason code; the stage's
command (:func:`run_stage`) then writes a *failure record* into every output file instead of an
image, and exits 0, so Snakemake counts the job done and the other scans go on. Later stages see
the record in their input and pass it on without working, and the ``usable_scans`` checkpoint
lists the scan in ``dropped.tsv`` with its stage and reason. A record is a small text file that
starts with :data:`MARKER`: no NIfTI reader can mistake it for a brain (``nifti_io.load_nifti``
refuses it by name). Anything else a stage raises (a bug, a missing file) still fails the job.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

from workflow_scripts.common import cli
from workflow_scripts.common.nifti_io import write_text_atomic

LOG = logging.getLogger(__name__)

MARKER = b"ALZ-MRI-PIPELINE SCAN FAILED\n"
RECORD_KEYS = ("stage", "reason_code", "reason")


class ScanDataError(cli.PipelineError):
    """A stage cannot go on because of this scan's own data (not a bug): the scan is dropped."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(reason)
        self.reason_code = reason_code
        self.reason = reason


def read_failure(path: str | Path) -> dict | None:
    """The failure record written in place of ``path``'s image, or None for an ordinary file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MARKER))
            if head != MARKER:
                return None
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def first_failure(paths: Iterable[str | Path]) -> dict | None:
    """The failure record of the first input that is one (a scan dropped by an earlier stage)."""
    for path in paths:
        record = read_failure(path)
        if record is not None:
            return record
    return None


def write_failure(paths: Iterable[str | Path], record: dict) -> None:
    """Write the failure record into every output of the stage, each atomically."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"a failure record needs {', '.join(RECORD_KEYS)}; missing {', '.join(missing)}")
    text = MARKER.decode("ascii") + json.dumps(record, indent=2) + "\n"
    for path in paths:
        write_text_atomic(text, path)


def scan_of(path: str | Path) -> tuple[str, str]:
    """(subject, image id) of a per-scan file named ``<stage>/<subject>/<image_id>[_mask].<ext>``."""
    path = Path(path)
    image_id = path.name.split(".")[0].removesuffix("_mask")
    return path.parent.name, image_id


def run_stage(stage: str, inputs: Iterable[str | Path], outputs: Iterable[str | Path],
              work: Callable[[], None]) -> dict | None:
    """Run one scan's stage; returns the failure record written (None when the stage succeeded).

    An input that is a failure record is passed on to every output without running ``work``.
    A :class:`ScanDataError` raised by ``work`` becomes this stage's failure record; any other
    exception propagates and fails the job, as a bug should.
    """
    inputs, outputs = [Path(p) for p in inputs], [Path(p) for p in outputs]
    upstream = first_failure(inputs)
    if upstream is not None:
        LOG.warning("scan %s/%s was dropped at stage %s (%s: %s); passing its failure record on",
                    *scan_of(outputs[0]), upstream["stage"], upstream["reason_code"], upstream["reason"])
        write_failure(outputs, upstream)
        return upstream
    try:
        work()
    except ScanDataError as err:
        subject, image_id = scan_of(outputs[0])
        record = {"stage": stage, "reason_code": err.reason_code, "reason": err.reason,
                  "subject": subject, "image_id": image_id}
        LOG.error("scan %s/%s dropped at stage %s (%s): %s; the other scans go on", subject, image_id, stage,
                  err.reason_code, err.reason)
        write_failure(outputs, record)
        return record
    return None
