"""How large is the selection bias of cross-validation figures chosen on the reported fold?

    python benchmarks/cv_selection_bias.py --workdir RUN_DIR                   # reads a finished run
    python benchmarks/cv_selection_bias.py --workdir RUN_DIR --old-protocol    # also re-trains the old one

RUN_DIR is a finished workflow run's folder (holding results/). Per fold of ``--experiment``
(default: the main one the run's folds were trained for), from its files:

- ``inner_val``: accuracy on the inner validation split (results/splits/cv/fold<k>/val.csv) at
  the epoch the selection rule picked (summary.json) -- the scans that chose the checkpoint;
- ``held_out``: the selected checkpoint's accuracy on the held-out fold k
  (evaluation/held_out/metrics.json) -- this workflow's cross-validation figure;
- ``test``: the same checkpoint on the test set (evaluation/test/metrics.json).

The dissertation's protocol early-stopped and chose the checkpoint on the fold it reported, so its
figure is the top of the reported fold's epoch curve. That figure exists only if the reported fold
is scored every epoch, which this workflow never does during its own training (the held-out fold
would then be a reporting set looked at while training). ``--old-protocol`` therefore trains the
old protocol separately, in RUN_DIR/cv_selection_bias/: per fold the same settings (the fold's
summary.json config) on all the other folds' scans (train.csv + val.csv), validating on fold k
itself; it prints ``old_reported`` (the accuracy at the epoch its rule picked on fold k, for the
accuracy rule the curve's maximum), ``old_curve_max`` and ``old_test`` (that checkpoint on the test
set). ``old_reported - old_test`` and ``old_reported - held_out`` show what choosing on the reported
fold adds. All accuracies are scan-level; mean ± sample SD over folds in the last rows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.common import cli  # noqa: E402


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: is RUN_DIR a finished run of the workflow (snakemake cv)?")
    return json.loads(path.read_text(encoding="utf-8"))


def fold_dirs(workdir: Path, experiment: str) -> list[Path]:
    """The experiment's fold folders results/cv/<experiment>/fold<k>, in fold order."""
    folds = sorted((workdir / "results" / "cv" / experiment).glob("fold*"), key=lambda p: int(p.name[4:]))
    if not folds:
        raise SystemExit(f"no folds under {workdir / 'results' / 'cv' / experiment}; pass --experiment")
    return folds


def selected_row(summary: dict) -> dict:
    """The history row of the epoch the run's selection rule picked."""
    return summary["best"][summary["selection"]["rule"]]


def new_protocol(fold_dir: Path) -> dict:
    """The workflow's own figures of one fold: inner validation at the selected epoch, held-out fold, test set."""
    summary = read_json(fold_dir / "summary.json")
    row = selected_row(summary)
    return {"fold": fold_dir.name, "rule": summary["selection"]["rule"], "epoch": row["epoch"],
            "inner_val": row["val_accuracy"],
            "held_out": read_json(fold_dir / "evaluation" / "held_out" / "metrics.json")["scan"]["accuracy"],
            "test": read_json(fold_dir / "evaluation" / "test" / "metrics.json")["scan"]["accuracy"]}


def old_protocol(workdir: Path, fold_dir: Path, out_root: Path, device: str) -> dict:
    """Train the fold as the dissertation did (validate, i.e. select, on the reported fold) and score it."""
    from workflow_scripts.learning.train import CHECKPOINTS, fit, predict

    k = int(re.fullmatch(r"fold(\d+)", fold_dir.name).group(1))
    manifests = workdir / "results" / "splits" / "cv" / f"fold{k}"
    out = out_root / fold_dir.name
    out.mkdir(parents=True, exist_ok=True)
    others = pd.concat([pd.read_csv(manifests / f"{role}.csv", dtype=str) for role in ("train", "val")])
    others.to_csv(out / "other_folds.csv", index=False)
    config = read_json(fold_dir / "summary.json")["config"]
    config.update(train=str(out / "other_folds.csv"), val=str(manifests / "held_out.csv"), folds_csv=None,
                  fold=None, out_dir=str(out), run_name=f"old-protocol-{fold_dir.name}", resume=False,
                  wandb_mode="disabled", device=device)
    summary = fit(config)
    history = read_json(out / "history.json")
    test = predict(out / CHECKPOINTS[config["selection"]], workdir / "results" / "splits" / "test.csv",
                   out / "test_predictions.csv", config["tensor_dir"], device, config["batch_size"],
                   config["num_workers"])
    return {"old_epoch": selected_row(summary)["epoch"], "old_reported": selected_row(summary)["val_accuracy"],
            "old_curve_max": max(r["val_accuracy"] for r in history),
            "old_test": float((test["pred"] == test["label"]).mean())}


def with_mean_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The per-fold table with a 'mean' and an 'sd' row (sample SD) over the numeric columns."""
    numeric = table.select_dtypes("number").drop(columns=["epoch", "old_epoch"], errors="ignore")
    rows = [{"fold": "mean", **numeric.mean().to_dict()},
            {"fold": "sd", **numeric.std(ddof=1).to_dict()}]
    table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    for column in ("epoch", "old_epoch"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a finished run's folder (holding results/)")
    p.add_argument("--experiment", help="default: the only experiment, or main_experiment of the run's config")
    p.add_argument("--old-protocol", action="store_true", help="also train and score the old protocol per fold")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    experiment = args.experiment or read_json(workdir / "results" / "report" / "provenance.json")["config"][
        "main_experiment"]
    folds = fold_dirs(workdir, experiment)
    os.chdir(workdir)  # the runs' manifests and tensor folder are relative to the run's folder
    rows = [new_protocol(f) for f in folds]
    if args.old_protocol:
        out_root = workdir / "cv_selection_bias" / experiment
        rows = [row | old_protocol(workdir, f, out_root, args.device) for row, f in zip(rows, folds)]
    table = with_mean_rows(pd.DataFrame(rows))
    table["inner_minus_held_out"] = table["inner_val"] - table["held_out"]
    if args.old_protocol:
        table["old_minus_held_out"] = table["old_reported"] - table["held_out"]
    table.loc[table["fold"] == "sd", [c for c in table.columns if c.endswith("_minus_held_out")]] = np.nan
    print(f"{experiment}: scan-level accuracy per fold (selection on the inner validation split vs on the "
          f"reported fold)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.json:
        args.json.write_text(table.to_json(orient="records", indent=2))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
