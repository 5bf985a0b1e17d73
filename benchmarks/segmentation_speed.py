"""Hippocampus U-Net speed: training steps per second and inference seconds per scan, next to the
hippocampus study's 1,000 training steps in about an hour on an NVIDIA T4.

    python benchmarks/segmentation_speed.py                                   # CPU, 128^3, both models
    python benchmarks/segmentation_speed.py --device cuda --models unet3d --steps 50
    python benchmarks/segmentation_speed.py --size 32 --steps 3 --json out.json  # a smoke run

Writes ``--scans`` synthetic scans of ``--size``^3 (a brain-like ellipsoid with two small
"hippocampi", RAS NIfTI, brain mask beside) and runs the code the workflow runs: the MONAI
training transforms and cached loader of ``segmentation.training_loader`` (patch sampling, flips,
rotations, elastic deformation), ``segmentation.train_steps`` (forward, loss, backward, Adam) and
``segmentation.segment`` (sliding-window or slice-by-slice inference, midline sides, largest
components) on whole volumes. The first ``--warmup`` steps and the first scan are not timed.
Settings are the config defaults unless given.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.common.settings import resolve  # noqa: E402
from workflow_scripts.hippocampus.segmentation import (STUDY_STEPS_PER_HOUR_T4, build_loss, build_unet,  # noqa: E402
                                                       flat_settings, segment, train_steps, training_loader)
from workflow_scripts.hippocampus.segmentation_data import eval_transforms  # noqa: E402
from workflow_scripts.common.devices import pick_device  # noqa: E402

def default_settings() -> dict:
    """The training CLI's defaults (config.yaml's segmentation: section), so the benchmark times what runs."""
    return flat_settings(resolve("segmentation"))


def write_scans(folder: Path, n: int, size: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic RAS scans with labels (1 left, 2 right) and brain masks, 1.2 mm voxels."""
    rng = np.random.default_rng(seed)
    grid = (np.indices((size,) * 3, dtype=np.float32) + 0.5) / size - 0.5
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    items = []
    for i in range(n):
        brain = ((grid / np.array([0.42, 0.46, 0.40])[:, None, None, None]) ** 2).sum(0) < 1
        labels = np.zeros((size,) * 3, np.uint8)
        for side, x in ((1, -0.14), (2, 0.14)):
            centre = np.array([x, -0.05, -0.1]) + rng.normal(0, 0.01, 3)
            blob = (((grid - centre[:, None, None, None]) / np.array([0.04, 0.12, 0.04])[:, None, None, None]) ** 2
                    ).sum(0) < 1
            labels[blob] = side
        image = np.where(brain, rng.uniform(0.5, 1.0, brain.shape), 0).astype(np.float32)
        image[labels > 0] *= 0.6
        paths = {k: folder / f"scan{i:03d}{k}.nii.gz" for k in ("", "_label", "_mask")}
        for key, data in (("", image), ("_label", labels), ("_mask", brain.astype(np.uint8))):
            nib.save(nib.Nifti1Image(data, affine), paths[key])
        items.append({"image": str(paths[""]), "label": str(paths["_label"]), "brain_mask": str(paths["_mask"]),
                      "image_id": f"scan{i:03d}", "subject": f"s{i:03d}", "group": "", "partition": "train"})
    return items


def measure(model_name: str, items: list[dict], args: argparse.Namespace, device: torch.device) -> dict:
    """Training steps per second (after warm-up) and inference seconds per whole scan."""
    settings = dict(default_settings(), model=model_name, patch_size=args.patch_size, batch_size=args.batch_size,
                    steps=args.warmup + args.steps, device=str(device))
    torch.manual_seed(0)
    model = build_unet(settings).to(device)
    loss_fn = build_loss(settings["loss"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    batches = iter(training_loader(items, settings))
    train_steps(model, (next(batches) for _ in range(args.warmup)), loss_fn, optimizer, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    train_steps(model, (next(batches) for _ in range(args.steps)), loss_fn, optimizer, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps_per_s = args.steps / (time.perf_counter() - tick)

    transform = eval_transforms(with_label=False)
    seconds = []
    for item in items[: args.infer_scans + 1]:
        image = transform({"image": item["image"]})["image"]
        brain = np.asanyarray(nib.load(item["brain_mask"]).dataobj) > 0
        tick = time.perf_counter()
        segment(model, image, settings, device, brain)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tick)
    per_scan = float(np.mean(seconds[1:])) if len(seconds) > 1 else seconds[0]
    return {"model": model_name, "device": str(device), "size": args.size, "patch_size": args.patch_size,
            "batch_size": args.batch_size, "timed_steps": args.steps, "train_steps_per_s": round(steps_per_s, 4),
            "train_steps_per_hour": round(steps_per_s * 3600, 1),
            "vs_study_t4": round(steps_per_s * 3600 / STUDY_STEPS_PER_HOUR_T4, 3),
            "inference_s_per_scan": round(per_scan, 4),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.add_argument("--models", nargs="+", default=["unet2d", "unet3d"], choices=["unet2d", "unet3d"])
    p.add_argument("--size", type=int, default=128, help="scan edge in voxels (the workflow's 128)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--scans", type=int, default=4, help="synthetic training scans")
    p.add_argument("--infer-scans", type=int, default=2, help="timed whole-scan inferences (after one untimed)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = write_scans(Path(tmp), max(args.scans, args.infer_scans + 1), args.size)
        for name in args.models:
            rows.append(measure(name, items, args, device))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.node()} torch {torch.__version__}, {args.threads} CPU threads; the study: "
          f"{STUDY_STEPS_PER_HOUR_T4} steps/hour on a T4")
    print("| model | device | scan | patch x batch | steps/s | steps/hour | x study (T4) | inference s/scan |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['size']}^3 | {'x'.join(map(str, r['patch_size']))} x "
              f"{r['batch_size']} | {r['train_steps_per_s']:.3f} | {r['train_steps_per_hour']:.0f} | "
              f"{r['vs_study_t4']:.2f} | {r['inference_s_per_scan']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
