"""The scans a network trains and predicts on: manifests (the split's CSVs), where each scan's tensor is,
the dataset with its augmentation, and the loaders whose randomness is keyed to (seed, epoch, scan).

Used by training (learning.train), explanations, the U-Net's manifests and volumetry's folds.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from workflow_scripts.common import cli
from workflow_scripts.learning.split import MANIFEST_COLUMNS


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest CSV with its required columns checked and integer labels."""
    try:
        table = pd.read_csv(path, dtype={"subject": str, "image_id": str, "group": str, "path": str})
    except (OSError, pd.errors.ParserError) as err:
        raise cli.PipelineError(f"cannot read manifest {path}: {err}") from err
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise cli.PipelineError(f"manifest {path} lacks columns {missing}; it needs {', '.join(MANIFEST_COLUMNS)}")
    if table.empty:
        raise cli.PipelineError(f"manifest {path} has no scans")
    table["label"] = table["label"].astype(int)
    return table.reset_index(drop=True)


def fold_manifests(folds_csv: str | os.PathLike, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, inner validation) of one CV fold: the split's cv/fold<k>/train.csv and val.csv beside
    cv_folds.csv. Fold k itself (held_out.csv) is only reported on, never used for selection."""
    from workflow_scripts.learning.split import fold_manifest_path

    table = read_manifest(folds_csv)
    if "fold" not in table.columns:
        raise cli.PipelineError(f"{folds_csv} has no 'fold' column; pass the split's cv_folds.csv")
    folds = sorted(table["fold"].astype(int).unique())
    if fold not in folds:
        raise cli.PipelineError(f"fold {fold} is not in {folds_csv} (folds {folds})")
    paths = [fold_manifest_path(Path(folds_csv).parent, fold, role) for role in ("train", "val")]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise cli.PipelineError(f"fold {fold} of {folds_csv} has no {' or '.join(missing)}; re-run the split "
                                f"(snakemake split), which writes the per-fold manifests (config cv.inner_val_share)")
    train, val = (read_manifest(path) for path in paths)
    held_out = set(table.loc[table["fold"].astype(int).eq(fold), "subject"])
    leaked = sorted(held_out & (set(train["subject"]) | set(val["subject"])))
    if leaked:
        raise cli.PipelineError(f"{paths[0].parent} trains or validates on subject(s) of fold {fold} in {folds_csv} "
                                f"({', '.join(leaked[:5])}): the manifests are stale; re-run the split")
    return train, val


def tensor_sources(table: pd.DataFrame, tensor_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where each scan's volume is read from (see the module docstring for the order)."""
    sources = []
    for row in table.itertuples(index=False):
        tensor_path = getattr(row, "tensor_path", None)
        if isinstance(tensor_path, str) and tensor_path:
            sources.append(Path(tensor_path))
        elif tensor_dir is not None:
            sources.append(Path(tensor_dir) / str(row.subject) / f"{row.image_id}.npy")
        else:
            sources.append(Path(row.path))
    missing = [(i, p) for i, p in zip(table["image_id"], sources) if not p.is_file()]
    if missing:
        listing = ", ".join(f"{i}: {p}" for i, p in missing[:5])
        raise cli.PipelineError(f"{len(missing)} scan tensors missing ({listing}{', ...' if len(missing) > 5 else ''});"
                                " run the tensor_cache step for them or fix the manifest's paths")
    return sources


def volume_shape(path: Path) -> tuple[int, ...]:
    """The volume's shape without reading its voxels (from the .npy header or the NIfTI header)."""
    if path.suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r").shape)
    from workflow_scripts.common.nifti_io import load_nifti

    return tuple(load_nifti(path).shape[:3])


def check_shapes(sources: Sequence[Path], image_ids: Sequence[str]) -> tuple[int, ...]:
    """The common volume shape; scans of other shapes are named, as a batch cannot mix them."""
    shapes = [volume_shape(p) for p in sources]
    common = max(set(shapes), key=shapes.count)
    odd = [f"{i} {s}" for i, s in zip(image_ids, shapes) if s != common]
    if odd:
        raise cli.PipelineError(f"scans of a shape other than {common}: {', '.join(odd[:5])}; "
                                "re-run their preprocessing with the configured target shape")
    return common


def load_volume(path: Path) -> torch.Tensor:
    """One scan as a float32 tensor of shape (1, x, y, z), values in [0, 1]."""
    if path.suffix == ".npy":
        array = np.load(path)
    else:
        from workflow_scripts.learning.tensor_cache import normalised_volume

        array = normalised_volume(path)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


class VolumeTransform:
    """TorchIO intensity transforms on one (1, x, y, z) tensor; picklable for DataLoader workers."""

    def __init__(self, train: bool, *, gamma_log_range: Sequence[float], gamma_p: float,
                 noise_std_range: Sequence[float], noise_p: float, znorm_mask: str, znorm: bool = True):
        import torchio as tio

        if znorm_mask not in ("brain", "none"):
            raise cli.PipelineError(f"znorm_mask must be 'brain' or 'none', not {znorm_mask!r}")
        self.znorm_mask = znorm_mask if znorm else "off"
        steps = []
        if train:
            steps += [tio.RandomGamma(log_gamma=tuple(gamma_log_range), p=gamma_p),
                      tio.RandomNoise(std=tuple(noise_std_range), p=noise_p)]
        if znorm:
            steps.append(tio.ZNormalization(masking_method="brain" if znorm_mask == "brain" else None))
        self.transform = tio.Compose(steps) if steps else None
        self.random = bool(train)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        import torchio as tio

        if self.transform is None:
            return volume
        images = {"image": tio.ScalarImage(tensor=volume)}
        if self.znorm_mask == "brain":
            images["brain"] = tio.LabelMap(tensor=(volume > 0).to(torch.uint8))
        return self.transform(tio.Subject(**images))["image"].data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one scan's augmentation in one epoch, independent of worker and batch order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ScanDataset(Dataset):
    """Scans of one split; indexed by (epoch, index) so augmentation is keyed to both."""

    def __init__(self, sources: Sequence[Path], labels: Sequence[int], transform: VolumeTransform, seed: int,
                 names: Sequence[str] | None = None):
        self.sources, self.labels = list(sources), [int(v) for v in labels]
        self.transform, self.seed = transform, seed
        self.names = [str(n) for n in names] if names is not None else [p.name for p in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        volume = load_volume(self.sources[index])
        if self.transform.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                volume = self.transform(volume)
        else:
            volume = self.transform(volume)
        return volume, self.labels[index], index


class EpochSampler(Sampler):
    """Yields (epoch, index); the order of epoch e depends only on (seed, e).

    With ``weights`` an epoch is ``n`` draws with replacement by torch's WeightedRandomSampler
    (class balancing by sampling), from the same (seed, e) generator.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, weights: Sequence[float] | None = None):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        entropy = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(entropy))
        if self.weights is not None:
            order = list(WeightedRandomSampler(self.weights, self.n, replacement=True, generator=generator))
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        return iter([(self.epoch, i) for i in order])


def _worker_init(worker_id: int) -> None:
    """One thread per worker (the main process does the math); numpy/random seeded from torch's seed."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: ScanDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                pin_memory: bool = False, weights: Sequence[float] | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` whose sampler carries the epoch (and draws by ``weights`` when given)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), shuffle, seed, weights),
                      num_workers=num_workers, worker_init_fn=_worker_init, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None)


def split_counts(table: pd.DataFrame) -> dict[str, Any]:
    """Scans and subjects of one split, in all and per label (with its group name)."""
    per_class = {}
    for label, part in table.groupby("label"):
        per_class[str(label)] = {"group": "/".join(sorted(part["group"].astype(str).unique())),
                                 "scans": len(part), "subjects": int(part["subject"].nunique())}
    return {"scans": len(table), "subjects": int(table["subject"].nunique()), "per_class": per_class}


def input_transform(config: dict[str, Any], train: bool) -> VolumeTransform:
    """The run's transform; the 2D baseline (resnet50) takes [0, 1] intensities and applies ImageNet's
    normalisation itself, so it skips z-normalisation."""
    return VolumeTransform(train, gamma_log_range=config["gamma_log_range"], gamma_p=config["gamma_p"],
                           noise_std_range=config["noise_std_range"], noise_p=config["noise_p"],
                           znorm_mask=config["znorm_mask"], znorm=config["arch"] != "resnet50")


@dataclass
class Splits:
    """The training and validation scans of one run, with where their tensors are."""
    train: pd.DataFrame
    val: pd.DataFrame
    train_sources: list[Path]
    val_sources: list[Path]
    shape: tuple[int, ...]


def load_splits(config: dict[str, Any]) -> Splits:
    """The run's manifests (--train/--val, or one fold of --folds-csv), checked for tensors and shapes."""
    if config["folds_csv"]:
        train, val = fold_manifests(config["folds_csv"], config["fold"])
    elif config["train"] and config["val"]:
        train, val = read_manifest(config["train"]), read_manifest(config["val"])
    else:
        raise cli.PipelineError("give --train and --val manifests, or --folds-csv with --fold")
    for name, table in (("training", train), ("validation", val)):
        bad = table[~table["label"].between(0, config["num_classes"] - 1)]
        if len(bad):
            raise cli.PipelineError(f"{name} scans with labels outside 0..{config['num_classes'] - 1}: "
                                    f"{', '.join(bad['image_id'].head(5))}; fix the split's label column")
    train_sources, val_sources = tensor_sources(train, config["tensor_dir"]), tensor_sources(val, config["tensor_dir"])
    shape = check_shapes(train_sources + val_sources, list(train["image_id"]) + list(val["image_id"]))
    return Splits(train, val, train_sources, val_sources, shape)
