"""Provenance of a result: the code's git version and the library versions it was made with."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """``git describe`` of this repository, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO, capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import torchio
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torchio": torchio.__version__, "numpy": np.__version__}
