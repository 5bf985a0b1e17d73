"""Figures written the way every stage writes files: atomically, so no half-written PNG is left behind."""
from __future__ import annotations

from pathlib import Path

from workflow_scripts.common.nifti_io import write_atomic


def save_figure(fig, path: Path) -> Path:
    """Save a figure atomically (no half-written PNG is ever left behind) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    finally:
        plt.close(fig)
