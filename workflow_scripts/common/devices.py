"""The device a job computes on (train.device, segmentation.device: auto picks CUDA, then MPS, then the CPU)
and the autocast type of a precision setting."""
from __future__ import annotations

import torch

from workflow_scripts.common import cli


def pick_device(name: str) -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless a device is named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: full fp32).

    ``auto`` is bf16 on CUDA (no loss scaling needed) and fp32 elsewhere; ``fp16`` needs CUDA,
    where a GradScaler keeps small gradients from vanishing.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise cli.PipelineError(f"precision fp16 needs a CUDA device (this run is on {device}); use bf16, fp32 or "
                                "auto")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in dtypes:
        raise cli.PipelineError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    return dtypes[precision]
