"""Penultimate-layer embeddings of a network: captured at its final linear layer, saved per scan, and
projected on their first two principal components (train.export_embeddings)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from workflow_scripts.common.nifti_io import write_atomic


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer, whose input is the penultimate-layer embedding."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@contextlib.contextmanager
def capture_embeddings(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects, per forward pass, the penultimate-layer embedding of each scan in the batch (the
    mean over a scan's slices for the 2D baseline)."""
    captured: list[torch.Tensor] = []
    slices = getattr(model, "n_slices", None)

    def hook(module, inputs, output):
        features = inputs[0].detach().float().cpu()
        captured.append(features.reshape(-1, slices, features.shape[-1]).mean(dim=1) if slices else features)

    handle = final_linear(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def save_embeddings(path: Path, table: pd.DataFrame, probs: torch.Tensor, indices: Sequence[int],
                    captured: Sequence[torch.Tensor]) -> Path:
    """embeddings_*.npz: one row per scan in manifest order (image_id, subject, label, prob, embedding)."""
    order = np.argsort(indices)
    rows = table.iloc[np.asarray(indices)[order]]
    embedding = torch.cat(list(captured)).numpy()[order]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, image_id=np.asarray(rows["image_id"], dtype=str),
                                subject=np.asarray(rows["subject"], dtype=str), label=rows["label"].to_numpy(),
                                prob=probs.numpy()[order][:, 1], embedding=embedding)
    return write_atomic(path, write)


def plot_embeddings(files: Sequence[str | os.PathLike], output: str | os.PathLike, title: str = "") -> Path:
    """A 2D principal-component projection of the embeddings of ``files`` (e.g. val and test), one
    colour per class and one marker per file; PCA because it is deterministic and needs no tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from workflow_scripts.common.figures import save_figure
    from workflow_scripts.evaluation.evaluate import CLASS_NAMES

    parts = [np.load(f) for f in files]
    stacked = np.concatenate([p["embedding"] for p in parts])
    centred = stacked - stacked.mean(axis=0)
    n_components = min(2, *centred.shape)
    points = PCA(n_components=n_components).fit_transform(centred) if n_components else np.zeros((len(centred), 0))
    points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    start = 0
    for file, part, marker in zip(files, parts, "os^Dv"):
        end = start + len(part["label"])
        for label, colour in ((0, "tab:blue"), (1, "tab:red")):
            chosen = part["label"] == label
            ax.scatter(*points[start:end][chosen].T, c=colour, marker=marker, alpha=0.8, edgecolors="k",
                       label=f"{CLASS_NAMES[label]}, {Path(file).stem.removeprefix('embeddings_')}")
        start = end
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title or "penultimate-layer embeddings")
    ax.legend(fontsize=8)
    return save_figure(fig, Path(output))
