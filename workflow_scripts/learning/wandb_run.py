"""Weights & Biases for a training run (train.wandb): offline by default, the best checkpoints as artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Any


from workflow_scripts.common import cli


def start_wandb(config: dict[str, Any], out_dir: Path, run_id: str | None):
    """A W&B run (None when disabled); offline runs write under ``out_dir/wandb`` and need no account.

    An online run reads its key from the environment (WANDB_API_KEY) or ~/.netrc, never from arguments.
    """
    mode = config["wandb_mode"]
    if mode == "disabled":
        return None
    import wandb

    try:
        return wandb.init(project=config["wandb_project"], entity=config["wandb_entity"], dir=str(out_dir),
                          mode=mode, config=config, id=run_id, resume="allow", name=config["run_name"],
                          reinit="finish_previous")
    except Exception as err:
        raise cli.PipelineError(f"Weights & Biases could not start in {mode} mode ({err}); for online mode set "
                                "WANDB_API_KEY in the environment, or set train.wandb.mode: offline") from err


def log_artifacts(run, out_dir: Path, name: str) -> None:
    """The best checkpoints as W&B model artifacts, referenced in place until synced or uploaded.

    ``policy="immutable"`` keeps W&B from copying each checkpoint (hundreds of MB) into its
    staging folder under the home directory.
    """
    import wandb

    for file, alias in (("best_acc.pt", "best-accuracy"), ("best_loss.pt", "best-loss")):
        if (out_dir / file).is_file():
            artifact = wandb.Artifact(f"{name}-{alias}", type="model")
            artifact.add_file(str(out_dir / file), policy="immutable")
            run.log_artifact(artifact, aliases=[alias])
