"""Training throughput and the share of step time spent waiting for data, on synthetic cached tensors.

    python benchmarks/train_speed.py                      # 24 scans of 128^3, r3d_18, batch 2
    python benchmarks/train_speed.py --workers 0 2 --steps 4 --size 128
    python benchmarks/train_speed.py --arch r3d_18 mc3_18 r2plus1d_18 mvit_v2_s resnet50 --steps 2

Writes ``--scans`` float16 volumes (a noisy ball on a zero background, like the tensor
cache's output) to a temporary folder and runs the training step of
``workflow_scripts.learning.train`` on them: the same DataLoader (workers, augmentation,
z-normalisation), model (random weights, stem..layer3 frozen), optimizer and forward path
(bf16 autocast and channels_last_3d on CUDA). The first step of each setting warms up and
is not timed. Data wait is the time the loop blocks on the DataLoader.

Each architecture runs in a process of its own, so its peak memory (peak resident set on a
CPU, peak allocated CUDA memory on a GPU) is its own. Every model trains from layer4 on
(for mvit_v2_s its last stage, inside which the volume is resampled to 16x224x224; for the
2D resnet50, its 16 axial slices per scan with layer4 unfrozen, the 2D recipe after epoch 5).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.learning.models import build_model, parameter_groups, train_mode  # noqa: E402
from workflow_scripts.learning.recipe import training_settings  # noqa: E402
from workflow_scripts.common.devices import pick_device
from workflow_scripts.learning.scan_data import ScanDataset, VolumeTransform, make_loader
from workflow_scripts.learning.train import forward


def write_scans(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` float16 volumes in [0, 1] with a zero background, as the tensor cache writes them."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3, dtype=np.float32) - (size - 1) / 2
    ball = (grid ** 2).sum(0) < (0.42 * size) ** 2
    paths = []
    for i in range(n):
        vol = np.where(ball, rng.uniform(0.1, 1.0, (size,) * 3).astype(np.float32), 0).astype(np.float16)
        paths.append(folder / f"scan{i:03d}.npy")
        np.save(paths[-1], vol)
    return paths


def measure(paths: list[Path], device: torch.device, workers: int, steps: int, batch_size: int, arch: str) -> dict:
    """Seconds per step, volumes per second and data-wait share over ``steps`` timed steps."""
    torch.manual_seed(0)
    labels = [i % 2 for i in range(len(paths))]
    job = training_settings(None, {"arch": arch, "weights": "none"})  # the schema's defaults otherwise
    recipe = job.train
    transform = VolumeTransform(train=True, **recipe.augmentation, znorm_mask=recipe.znorm_mask,
                                znorm=arch != "resnet50")
    dataset = ScanDataset(paths, labels, transform, seed=0)
    loader = make_loader(dataset, batch_size, True, 0, workers, pin_memory=device.type == "cuda")
    model = build_model(**job.model).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cuda" and arch != "resnet50":
        model.to(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(parameter_groups(model, lr_head=recipe.lr_head, lr_backbone=recipe.lr_backbone),
                                  weight_decay=recipe.weight_decay)
    criterion = nn.CrossEntropyLoss()
    train_mode(model)
    wait = total = 0.0
    timed = 0
    iterator = iter(loader)
    for step in range(steps + 1):
        tick = time.perf_counter()
        try:
            x, y, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            x, y, _ = next(iterator)
        got = time.perf_counter()
        _, loss = forward(model, x, y, criterion, device, recipe.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        if step > 0:  # step 0 warms up (workers start, cuDNN picks algorithms)
            wait += got - tick
            total += done - tick
            timed += 1
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"arch": arch, "device": str(device), "workers": workers, "batch": batch_size, "steps": timed,
            "s_per_step": total / timed, "volumes_per_s": timed * batch_size / total,
            "data_wait_pct": 100 * wait / total, "peak_memory_mb": peak_mb,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure_in_own_process(*args) -> dict:
    """``measure`` in a fresh process, so the peak memory is this setting's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_with_threads, torch.get_num_threads(), *args).result()


def _measure_with_threads(threads: int, *args) -> dict:
    torch.set_num_threads(threads)
    return measure(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=24)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader worker counts to compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the training process")
    p.add_argument("--arch", nargs="+", default=["r3d_18"],
                   choices=["r3d_18", "mc3_18", "r2plus1d_18", "mvit_v2_s", "resnet50"])
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({args.threads} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scans(Path(tmp), args.scans, args.size)
        for arch in args.arch:
            for workers in args.workers:
                rows.append(measure_in_own_process(paths, device, workers, args.steps, args.batch_size, arch))
    print(f"device: {name}; {args.scans} scans of {args.size}^3 float16, batch {args.batch_size}")
    print(f"{'arch':>12} {'trainable':>11} {'workers':>7} {'steps':>5} {'s/step':>8} {'volumes/s':>10} "
          f"{'data wait %':>12} {'peak MB':>8}")
    for r in rows:
        print(f"{r['arch']:>12} {r['trainable_parameters']:>11,} {r['workers']:>7} {r['steps']:>5} "
              f"{r['s_per_step']:>8.3f} {r['volumes_per_s']:>10.3f} {r['data_wait_pct']:>12.2f} "
              f"{r['peak_memory_mb']:>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
