"""Usable scans: the ingest's scans that passed every preprocessing stage, QC and the user's exclusions.

    python -m workflow_scripts.preprocess.usable_scans --scans results/scans.tsv --excluded results/excluded.tsv \\
        --ras-pattern 'results/ras/{subject}/{image_id}.nii.gz' --usable results/usable.tsv \\
        --dropped results/dropped.tsv [--user-exclusions my_exclusions.tsv]

``usable.tsv`` has the columns of ``scans.tsv``; the split and everything after it read only
these scans. ``dropped.tsv`` (beside ``excluded.tsv``, which lists what ingest left out) lists
every scan dropped after ingest with the stage and reason code: a stage's failure record
(``scan_failure``), a QC threshold (``qc_<metric>``, config ``qc:``), or ``excluded_by_user`` for a
scan named in the user's exclusion table (what a person decides after looking at the QC montages).
A scan is listed once, under the first reason.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import write_text_atomic
from workflow_scripts.preprocess.qc_metrics import apply_qc, read_records
from workflow_scripts.common.scan_failure import read_failure

LOG = logging.getLogger(__name__)

DROPPED_COLUMNS = ("image_id", "subject", "group", "visit", "stage", "reason_code", "reason")
USER_EXCLUSION_COLUMNS = ("image_id", "reason")


def read_scans(path: str | Path) -> pd.DataFrame:
    """A scans or excluded table written by ingest, as text."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def read_user_exclusions(path: str | Path) -> pd.DataFrame:
    """The user's exclusion table (TSV, columns ``image_id`` and ``reason``), checked."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise cli.PipelineError(f"cannot read the exclusion table {path} (data.exclude_scans): {err}") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in USER_EXCLUSION_COLUMNS if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"the exclusion table {path} (data.exclude_scans) lacks column(s) "
                                f"{', '.join(missing)}; it is a TSV with the columns image_id and reason, one row "
                                f"per scan to leave out, e.g. 'I13722<TAB>motion artefacts on the QC montage'")
    table = table[list(USER_EXCLUSION_COLUMNS)].apply(lambda col: col.str.strip())
    table = table[table["image_id"] != ""]
    blank = table.loc[table["reason"] == "", "image_id"].tolist()
    if blank:
        raise cli.PipelineError(f"the exclusion table {path} gives no reason for {', '.join(blank[:10])}; say why "
                                f"each scan is left out (the reason is reported in dropped.tsv)")
    return table.drop_duplicates("image_id").reset_index(drop=True)


def stage_failures(scans: pd.DataFrame, ras_pattern: str) -> dict[str, dict]:
    """Failure record by image id, for every scan whose final stage file is one."""
    failures = {}
    for row in scans.to_dict("records"):
        record = read_failure(ras_pattern.format(**row))
        if record is not None:
            failures[row["image_id"]] = record
    return failures


def split_usable(scans: pd.DataFrame, failures: dict[str, dict], user_exclusions: pd.DataFrame,
                 known_ids: set[str], qc_drops: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable, dropped): each scan dropped under its first reason (a stage failure, a QC threshold, then the
    user's choice).

    An exclusion naming an image id ingest never saw is refused (a typo would otherwise keep the scan).
    """
    by_qc = {} if qc_drops is None else {row["image_id"]: (row["reason_code"], row["reason"])
                                          for row in qc_drops.to_dict("records")}
    unknown = sorted(set(user_exclusions["image_id"]) - known_ids)
    if unknown:
        raise cli.PipelineError(f"data.exclude_scans names image id(s) that are not in the collection: "
                                f"{', '.join(unknown[:10])}; use the ids of the 'Image Data ID' column "
                                f"(as in results/scans.tsv)")
    by_user = dict(zip(user_exclusions["image_id"], user_exclusions["reason"]))
    dropped, keep = [], []
    for row in scans.to_dict("records"):
        image_id = row["image_id"]
        if image_id in failures:
            record = failures[image_id]
            reason = (record["stage"], record["reason_code"], record["reason"])
        elif image_id in by_qc:
            reason = ("qc", *by_qc[image_id])
        elif image_id in by_user:
            reason = ("user", "excluded_by_user", f"excluded by the user: {by_user[image_id]}")
        else:
            keep.append(True)
            continue
        keep.append(False)
        dropped.append(dict(zip(DROPPED_COLUMNS, (image_id, row["subject"], row["group"], row.get("visit", ""))
                                + reason)))
    usable = scans[pd.Series(keep, index=scans.index, dtype=bool)].reset_index(drop=True)
    return usable, pd.DataFrame(dropped, columns=list(DROPPED_COLUMNS))


def outcome_line(results_dir: str | Path) -> str:
    """The run's last line: how many scans were used, dropped and left out, and where the reasons are."""
    results = Path(results_dir)
    counts = {}
    for name in ("usable", "dropped", "excluded"):
        path = results / f"{name}.tsv"
        counts[name] = len(read_scans(path)) if path.is_file() else None
    if counts["usable"] is None:
        return ("scans: preprocessing outcome not known yet (no results/usable.tsv)"
                + ("" if counts["excluded"] is None else f"; {counts['excluded']} left out by ingest, reasons in "
                                                         f"{results / 'excluded.tsv'}"))
    return (f"scans: {counts['usable']} used, {counts['dropped']} dropped after ingest (reasons in "
            f"{results / 'dropped.tsv'}), {counts['excluded']} left out by ingest (reasons in "
            f"{results / 'excluded.tsv'})")


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--scans", required=True, help="scans.tsv from ingest")
    p.add_argument("--excluded", required=True, help="excluded.tsv from ingest (ids an exclusion may name)")
    p.add_argument("--ras-pattern", required=True, help="each scan's final stage file, e.g. results/ras/{subject}/"
                                                        "{image_id}.nii.gz")
    p.add_argument("--qc-pattern", help="each scan's QC metrics JSON, e.g. results/qc/{subject}/{image_id}.json")
    settings.add_argument(p, "qc")
    p.add_argument("--user-exclusions", help="TSV of image_id and reason (data.exclude_scans)")
    p.add_argument("--usable", required=True)
    p.add_argument("--dropped", required=True)
    args = p.parse_args(argv)

    scans = read_scans(args.scans)
    known = set(scans["image_id"]) | set(read_scans(args.excluded)["image_id"])
    user = (read_user_exclusions(args.user_exclusions) if args.user_exclusions
            else pd.DataFrame(columns=list(USER_EXCLUSION_COLUMNS)))
    drops = None
    if args.qc_pattern:
        records = read_records([args.qc_pattern.format(**row) for row in scans.to_dict("records")])
        _, drops = apply_qc(records, settings.read_job(args.settings, "qc")[0].plain())
    usable, dropped = split_usable(scans, stage_failures(scans, args.ras_pattern), user, known, drops)
    write_text_atomic(dropped.to_csv(sep="\t", index=False), args.dropped)
    write_text_atomic(usable.to_csv(sep="\t", index=False), args.usable)
    LOG.info("%d of %d scans usable; %d dropped after ingest (%s), see %s", len(usable), len(scans), len(dropped),
             dropped["reason_code"].value_counts().to_dict(), args.dropped)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
